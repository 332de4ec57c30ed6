"""The README's test command is what CI runs, and its demo command names the script that exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    demo, tests = _readme_commands()[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.strip() in ci
    assert "pytest" in tests


def test_demo_command_runs_the_demo_script():
    demo = _readme_commands()[0]
    assert "python scripts/demo.py" in demo
    assert (ROOT / "scripts" / "demo.py").exists()

"""GPU tests: every test here carries the ``gpu`` marker, and a ``gpu`` test is skipped where CUDA is not available.

    python -m pytest -m gpu tests/gpu          # on a machine with a CUDA GPU
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_jobs(tmp_path_factory):
    """The tiny random Llama and its classification data, and the jobs run on them (``TinyJobs``)."""
    from _tiny import write_classification_data, write_tiny_model_dir
    from _tiny_jobs import TinyJobs

    root = tmp_path_factory.mktemp("tiny_jobs")
    write_tiny_model_dir(root / "model")
    write_classification_data(root / "data", n_train=96, n_val=16)
    return TinyJobs(root)


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded CPU generator for one test's random inputs (drawn on the CPU, then moved to the GPU)."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def flash_attn4():
    """Skips the test where FlashAttention-4 cannot run (it needs a Hopper or Blackwell GPU and its package)."""
    from nemo_customizer.models.flash_attn4 import unavailable_reason

    reason = unavailable_reason(torch.device("cuda"))
    if reason:
        pytest.skip(f"FlashAttention-4 does not run here: {reason}")

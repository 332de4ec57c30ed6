"""End to end on the real embedded model: customize() SmolLM2-135M-Instruct for a few steps, then generate."""

import json

import pytest


@pytest.mark.slow
def test_customize_smollm2_few_steps_then_generate(tmp_path):
    from nemo_customizer import customize
    from nemo_customizer.config import compose_config
    from nemo_customizer.inference import Generator

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": f"Is {n} even or odd? Answer: ", "completion": "even" if n % 2 == 0 else "odd"}
            for n in range(40)]
    (data / "training.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:32]) + "\n")
    (data / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows[32:]) + "\n")

    result = customize("smollm2-135m-instruct", dataset=str(data), output_dir=str(tmp_path / "job"),
                       hyperparameters={"epochs": 1, "batch_size": 16, "micro_batch_size": 8, "max_steps": 2,
                                        "learning_rate": 1e-3}, progress_bar=False)
    assert result.steps == 2
    assert result.trainable_parameters == 30 * (8 * 576 + 576 * 8 + 8 * 576 + 192 * 8)  # q and v, r=8, 30 layers
    records = [json.loads(line) for line in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2]
    config = json.loads((tmp_path / "job" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]

    base = compose_config(["model=smollm2-135m-instruct"])
    with Generator.from_config(base, adapter=result.adapter_path) as generator:
        completion = generator.complete(rows[3]["prompt"], max_tokens=4)
    assert completion.completion_tokens >= 1 and completion.prompt_tokens > 5

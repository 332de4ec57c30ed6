"""configs(): the shipped models with their run defaults, like /v1/customization/configs."""

from __future__ import annotations

import pytest

from nemo_customizer.config import compose_config, configs, num_parameters


def test_configs_lists_the_four_models_and_the_generic_one():
    rows = {row["name"]: row for row in configs()}
    assert sorted(rows) == ["hf-llama", "llama-3.1-8b-instruct", "llama-3.2-1b-instruct", "llama-3.3-70b-instruct",
                            "smollm2-135m-instruct"]
    assert {name: row["max_seq_length"] for name, row in rows.items()} == {
        "hf-llama": 4096, "llama-3.1-8b-instruct": 4096, "llama-3.2-1b-instruct": 4096,
        "llama-3.3-70b-instruct": 4096, "smollm2-135m-instruct": 2048}
    assert rows["hf-llama"]["num_parameters"] is None  # known only from the checkpoint
    assert rows["llama-3.3-70b-instruct"]["tensor_parallel_size"] == 4
    assert rows["llama-3.3-70b-instruct"]["use_sequence_parallel"] is True
    assert all(row["sequence_packing_supported"] for row in rows.values())
    assert set(rows["smollm2-135m-instruct"]) == {"name", "max_seq_length", "tensor_parallel_size",
                                                  "use_sequence_parallel", "sequence_packing_supported",
                                                  "num_parameters"}


def test_test_models_are_listed_on_request():
    assert "tiny-llama-test" in [row["name"] for row in configs(include_test_models=True)]


@pytest.mark.parametrize("name, expected", [
    ("smollm2-135m-instruct", 134_515_008),  # HF model card: 135M
    ("llama-3.2-1b-instruct", 1_235_814_400),  # 1.24B
    ("llama-3.1-8b-instruct", 8_030_261_248),  # 8.03B
    ("llama-3.3-70b-instruct", 70_553_706_496),  # 70.6B
])
def test_num_parameters_matches_published_counts(name, expected):
    assert num_parameters(compose_config([f"model={name}"]).model.architecture) == expected

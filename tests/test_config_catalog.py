"""configs(): the shipped models with their run defaults, like /v1/customization/configs."""

from __future__ import annotations

import pytest

from nemo_customizer.config import compose_config, configs, num_parameters


def test_configs_lists_the_shipped_models_and_the_generic_ones():
    rows = {row["name"]: row for row in configs()}
    assert sorted(rows) == ["gemma-2-2b-it", "gemma-3-1b-it", "gemma-3-4b-it", "hf", "hf-llama", "llama-3.1-8b-instruct", "llama-3.1-nemotron-nano-8b-v1",
                            "llama-3.2-1b-instruct", "llama-3.3-70b-instruct", "ministral-8b-instruct-2410",
                            "mistral-7b-instruct-v0.3", "phi-3.5-mini-instruct", "phi-4", "qwen2.5-7b-instruct",
                            "qwen3-0.6b", "qwen3-8b", "smollm2-135m-instruct"]
    assert {name: row["max_seq_length"] for name, row in rows.items()} == {
        "gemma-2-2b-it": 4096, "gemma-3-1b-it": 4096, "gemma-3-4b-it": 4096, "hf": 4096, "hf-llama": 4096, "llama-3.1-8b-instruct": 4096, "llama-3.2-1b-instruct": 4096,
        "llama-3.3-70b-instruct": 4096, "llama-3.1-nemotron-nano-8b-v1": 4096, "ministral-8b-instruct-2410": 4096,
        "mistral-7b-instruct-v0.3": 4096, "phi-3.5-mini-instruct": 4096, "phi-4": 4096, "qwen2.5-7b-instruct": 4096,
        "qwen3-0.6b": 4096, "qwen3-8b": 4096,
        "smollm2-135m-instruct": 2048}
    assert rows["hf"]["num_parameters"] is rows["hf-llama"]["num_parameters"] is None  # known from the checkpoint
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
    ("qwen2.5-7b-instruct", 7_615_616_512),  # 7.61B (q/k/v biases included)
    ("qwen3-0.6b", 596_049_920),  # 0.6B; 0.44B without the (tied) embedding
    ("qwen3-8b", 8_190_735_360),  # 8.2B; 6.95B without the embedding and head
    ("llama-3.1-nemotron-nano-8b-v1", 8_030_261_248),  # 8.03B, Llama-3.1-8B's shape
    ("phi-3.5-mini-instruct", 3_821_079_552),  # 3.82B
    ("phi-4", 14_659_507_200),  # 14.7B
    ("gemma-2-2b-it", 2_614_341_888),  # 2.61B (four norms per layer, tied embedding)
    ("gemma-3-1b-it", 999_885_952),  # 1B (four norms per layer, q/k norms, tied embedding)
    ("gemma-3-4b-it", 3_880_263_168),  # the text model of the 4.3B image-text model (no vision tower)
    ("mistral-7b-instruct-v0.3", 7_248_023_552),  # 7.25B
    ("ministral-8b-instruct-2410", 8_019_808_256),  # model card: 8,019,808,256
])
def test_num_parameters_matches_published_counts(name, expected):
    assert num_parameters(compose_config([f"model={name}"]).model.architecture) == expected

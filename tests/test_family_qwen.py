"""Qwen2/Qwen2.5 and Qwen3 train, export and load like Llama: tiny random checkpoints written with transformers' own
classes (no downloads); logits, packed training, TP=2, one LoRA step, PEFT and merged exports against transformers
(+ peft). Also: config.json's family picks the model (``model=hf``), and an unsupported one fails before any work."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _multiproc import run_world
from _tiny import load_tiny_model, tiny_arch, write_classification_data, write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# GQA everywhere (4 heads, 2 key/value heads); Qwen3 with head_dim 24, not hidden/heads = 16.
FAMILIES = {
    "qwen2": dict(architecture="Qwen2ForCausalLM"),
    "qwen3": dict(architecture="Qwen3ForCausalLM", head_dim=24),
}


def _arch(family: str, tied: bool = False):
    return tiny_arch(tied=tied, **FAMILIES[family])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(family, tied) → (directory, architecture, transformers model) of tiny random checkpoints."""
    root = tmp_path_factory.mktemp("qwen")
    out = {}
    for family in FAMILIES:
        for tied in (False, True):
            arch = _arch(family, tied)
            directory = root / f"{family}-{'tied' if tied else 'untied'}"
            out[family, tied] = directory, arch, write_tiny_checkpoint(directory, arch)
    return out


def _tokens(arch, seed: int = 1, shape=(2, 24)):
    return torch.randint(0, arch.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# --- config: the family comes from config.json; an unsupported one is refused before any work ------------------


def test_checkpoint_config_json_reads_as_its_family(checkpoints):
    from nemo_customizer.config import read_hf_config

    for (family, _), (directory, arch, _) in checkpoints.items():
        read = read_hf_config(directory)
        assert read.architectures == arch.architectures and read.model_type == family
        assert read.head_dim == (24 if family == "qwen3" else None)  # Qwen2's config.json has no head_dim


# The official config.json values of the shipped Qwen models (the keys our reader uses).
OFFICIAL = {
    "qwen2.5-7b-instruct": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-06, tie_word_embeddings=False,
        use_sliding_window=False, sliding_window=131072, hidden_act="silu", bos_token_id=151643,
        eos_token_id=151645),
    "qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False, head_dim=128, hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        vocab_size=151936, max_position_embeddings=40960, rope_scaling=None, rope_theta=1000000,
        rms_norm_eps=1e-06, tie_word_embeddings=True, use_sliding_window=False, sliding_window=None,
        hidden_act="silu", bos_token_id=151643, eos_token_id=151645),
    "qwen3-8b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False, head_dim=128, hidden_size=4096,
        intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=151936, max_position_embeddings=40960, rope_scaling=None, rope_theta=1000000,
        rms_norm_eps=1e-06, tie_word_embeddings=False, use_sliding_window=False, sliding_window=None,
        hidden_act="silu", bos_token_id=151643, eos_token_id=151645),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_shipped_qwen_yaml_matches_its_config_json(name):
    from nemo_customizer.config import architecture_from_hf, compose_config, merge_checkpoint_architecture

    model = compose_config([f"model={name}"]).model
    merge_checkpoint_architecture(model, architecture_from_hf(OFFICIAL[name]))  # raises on any difference


@pytest.mark.parametrize("key, value, words", [
    ("architectures", ["Gemma2ForCausalLM"], ["Gemma2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM"]),
    ("attention_bias", True, ["attention_bias"]),
    ("use_sliding_window", True, ["use_sliding_window"]),
])
def test_unsupported_config_json_is_a_config_error(key, value, words):
    from nemo_customizer.config import ConfigError, architecture_from_hf

    data = dict(OFFICIAL["qwen3-0.6b"], **{key: value})
    if key == "architectures":
        data["model_type"] = "gemma2"
    with pytest.raises(ConfigError) as error:
        architecture_from_hf(data)
    for word in words:
        assert word in str(error.value)


@pytest.fixture(scope="module")
def unsupported_dir(tmp_path_factory):
    """A checkpoint folder whose config.json names an architecture we do not build, and training data."""
    root = tmp_path_factory.mktemp("unsupported")
    (root / "model").mkdir()
    (root / "model/config.json").write_text(json.dumps(dict(OFFICIAL["qwen3-0.6b"], architectures=["GPTNeoXForCausalLM"],
                                                            model_type="gpt_neox")))
    write_classification_data(root / "data", n_train=8, n_val=2)
    return root


@pytest.mark.parametrize("model", ["hf", "hf-llama"])
def test_unsupported_architecture_exits_2_before_any_work(unsupported_dir, model):
    out = unsupported_dir / f"job-{model}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "nemo_customizer", f"model={model}",
                             f"model.checkpoint={unsupported_dir / 'model'}", f"dataset.path={unsupported_dir / 'data'}",
                             f"output_dir={out}", "device=cpu"], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "GPTNeoXForCausalLM" in lines[0], result.stderr
    assert "Qwen2ForCausalLM" in lines[0]  # the supported ones are listed
    assert not out.exists()


def test_unsupported_architecture_is_a_config_error_from_python(unsupported_dir, monkeypatch):
    from nemo_customizer import data
    from nemo_customizer.api import customize
    from nemo_customizer.config import ConfigError

    def no_reading(*args, **kwargs):
        raise AssertionError("the data was read before the architecture was checked")

    monkeypatch.setattr(data, "load_dataset", no_reading)
    out = unsupported_dir / "job-python"
    with pytest.raises(ConfigError, match="GPTNeoXForCausalLM"):
        customize("hf", dataset=str(unsupported_dir / "data"), output_dir=str(out), device="cpu",
                  model={"checkpoint": str(unsupported_dir / "model")})
    assert not out.exists()


# --- numerics against transformers (+ peft), one process ------------------------------------------------------


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(checkpoints, family, tied):
    directory, arch, hf = checkpoints[family, tied]
    ours = load_tiny_model(arch, directory).eval()
    tokens = _tokens(arch, shape=(2, 40))
    with torch.no_grad():
        expected, actual = hf(tokens).logits, ours(tokens, torch.arange(40).expand_as(tokens), None,
                                                   runtime_gather_output=True)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-4


def _lora_model(arch, directory, seed: int = 1):
    """Our model with LoRA on every linear (r=4, alpha=8), every adapter weight random so every path counts."""
    from nemo_customizer.config.schema import LoraConfig
    from nemo_customizer.peft.apply import apply_lora
    from nemo_customizer.peft.lora import adapter_parameters

    model = load_tiny_model(arch, directory)
    lora = LoraConfig(adapter_dim=4, alpha=8.0, adapter_dropout=0.0, target_modules=TARGETS)
    apply_lora(model, arch, lora, seed=seed)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for param in adapter_parameters(model).values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model, lora


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_step_and_exported_adapter_match_peft(checkpoints, tmp_path, family):
    """Our exported adapter loads in peft with equal logits; one step's loss and every LoRA gradient equal
    transformers+peft's (the q/k/v biases of Qwen2 stay frozen in the base)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from nemo_customizer.peft.export import save_peft_adapter
    from nemo_customizer.peft.lora import adapter_parameters

    directory, arch, _ = checkpoints[family, True]
    model, lora = _lora_model(arch, directory)
    save_peft_adapter(model, lora, tmp_path / "adapter", base_model=str(directory))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model))  # biases and norms frozen

    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(directory)),
                                           str(tmp_path / "adapter"), is_trainable=True)
    tokens, labels = _tokens(arch, seed=2), _tokens(arch, seed=3)
    mask = torch.zeros(tokens.shape)
    mask[0, 5:] = 1
    mask[1, 12:20] = 1
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        ours_logits = model.eval()(tokens, positions, None, runtime_gather_output=True)
    theirs_logits = peft_model.eval()(tokens).logits
    assert (ours_logits - theirs_logits.detach()).abs().max().item() <= 1e-4

    ours_loss = model(tokens, positions, None, labels=labels, loss_mask=mask).sum() / mask.sum()
    ours_loss.backward()
    theirs_loss = (torch.nn.functional.cross_entropy(theirs_logits.flatten(0, 1), labels.flatten(), reduction="none")
                   * mask.flatten()).sum() / mask.sum()
    theirs_loss.backward()
    torch.testing.assert_close(ours_loss, theirs_loss, rtol=1e-5, atol=1e-6)
    # Our gradients under peft's names: the adapter export of a model whose adapter weights are its gradients.
    with torch.no_grad():
        for param in adapter_parameters(model).values():
            param.copy_(param.grad)
    save_peft_adapter(model, lora, tmp_path / "grads", base_model=str(directory))
    ours_grads = load_file(str(tmp_path / "grads/adapter_model.safetensors"))
    theirs_grads = {name.replace(".default", ""): p.grad for name, p in peft_model.named_parameters()
                    if p.requires_grad}
    assert ours_grads.keys() == theirs_grads.keys() and len(ours_grads) == 2 * 7 * arch.num_hidden_layers
    for name, expected in theirs_grads.items():
        assert expected.norm() > 0, name
        assert (ours_grads[name] - expected).norm() <= 1e-4 * expected.norm(), name


@pytest.mark.usefixtures("cpu_parallel")
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merged_export_loads_in_transformers(checkpoints, tmp_path, family, tied):
    """``lora_merged`` (and ``all_weights``, the same writer): the base under HF names with the adapters folded in,
    a config.json written from the architecture alone; transformers' logits equal ours."""
    from transformers import AutoModelForCausalLM

    from nemo_customizer.checkpoints.hf_export import save_hf_checkpoint
    from nemo_customizer.models.hf_state import hf_state_dict
    from nemo_customizer.peft.export import adapter_state_dict
    from nemo_customizer.peft.merge import merge_lora_into_hf

    directory, arch, _ = checkpoints[family, tied]
    model, lora = _lora_model(arch, directory, seed=4)
    state = merge_lora_into_hf(hf_state_dict(model, arch), adapter_state_dict(model), lora.alpha / lora.adapter_dim)
    save_hf_checkpoint(state, arch, tmp_path / "merged", source_dir=None)
    assert json.loads((tmp_path / "merged/config.json").read_text())["model_type"] == family
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert type(exported).__name__ == arch.architectures[0]
    tokens = _tokens(arch, seed=5)
    with torch.no_grad():
        ours = model.eval()(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None, runtime_gather_output=True)
        assert (exported(tokens).logits - ours).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_loss_and_lora_grads_equal_unpacked(checkpoints, cpu_parallel, family):
    from test_packing_numerics import check_packed_equals_unpacked, packed_and_unpacked

    directory, arch, _ = checkpoints[family, False]
    check_packed_equals_unpacked(packed_and_unpacked(str(directory), tp=1, sp=False, layout=cpu_parallel, arch=arch))


# --- TP=2 (+SP) over gloo ------------------------------------------------------------------------------------


def _tensor_parallel_worker(rank: int, directories: dict, out: str) -> None:
    """Per family, at TP=2 with SP: the gathered logits, and packed vs unpacked loss and LoRA grads (one parallel
    state for all of them)."""
    from test_packing_numerics import packed_and_unpacked

    from nemo_customizer.config import compose_config
    from nemo_customizer.distributed.parallel import destroy_parallel, initialize_parallel
    from nemo_customizer.models.gpt import forward_logits
    from nemo_customizer.training.session import TrainingSession

    layout = initialize_parallel(tensor_parallel_size=2, pipeline_parallel_size=1, device=torch.device("cpu"), seed=0)
    results = {}
    try:
        for family, directory in directories.items():
            arch = _arch(family)
            cfg = compose_config(["model=tiny-llama-test", "model.tensor_parallel_size=2", "device=cpu",
                                  "precision=fp32"])
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, architecture=arch))
            with TrainingSession(cfg, checkpoint_dir=directory, layout=layout) as session:
                model = session.build_model(trainable=False)
                with torch.no_grad():
                    logits = forward_logits(model.eval(), _tokens(arch, shape=(2, 40)))
            results[family] = {"logits": logits,
                               "packing": packed_and_unpacked(directory, 2, True, layout=layout, arch=arch)}
    finally:
        destroy_parallel(layout)
    torch.save(results, f"{out}.rank{rank}.pt")


def test_tensor_parallel_equals_transformers(checkpoints, tmp_path):
    from test_packing_numerics import check_packed_equals_unpacked

    directories = {family: str(checkpoints[family, False][0]) for family in FAMILIES}
    run_world(_tensor_parallel_worker, 2, directories, str(tmp_path / "out"))
    for rank in range(2):
        results = torch.load(tmp_path / f"out.rank{rank}.pt")
        for family in FAMILIES:
            _, arch, hf = checkpoints[family, False]
            with torch.no_grad():
                expected = hf(_tokens(arch, shape=(2, 40))).logits
            assert (results[family]["logits"] - expected).abs().max().item() <= 1e-4, family
            check_packed_equals_unpacked(results[family]["packing"])


def test_qwen3_chat_template_teaches_hermes_tool_calls():
    from nemo_customizer.inference.tool_calls import detect_tool_syntax, parse_tool_calls

    template = ('{%- if tools %}{{- "# Tools\\n\\nYou are provided with function signatures within <tools></tools> '
                'XML tags:\\n<tools>" }}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}{{- "\\n</tools>\\n\\n'
                'For each function call, return a json object with function name and arguments within '
                '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
                '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}{%- endif %}')
    assert detect_tool_syntax(template) == "hermes"
    content, calls = parse_tool_calls('<think>\n</think>\n\n<tool_call>\n{"name": "weather", "arguments": '
                                      '{"city": "Paris"}}\n</tool_call>', "hermes")
    assert [c["function"]["name"] for c in calls] == ["weather"] and content == "<think>\n</think>"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kv_cache_generation_matches_transformers(tmp_path, family):
    """generate() with the KV cache (q/k norms and biases on every new token) equals transformers' greedy search."""
    from _tiny import TINY_VOCAB, tiny_generator_config, write_tiny_model_dir

    from nemo_customizer.inference import Generator

    arch = dataclasses.replace(tiny_arch(vocab=TINY_VOCAB, **FAMILIES[family]), bos_token_id=1, eos_token_id=2)
    hf = write_tiny_model_dir(tmp_path, arch)
    with Generator.from_config(tiny_generator_config(tmp_path, arch)) as gen:
        prompt = gen.encode("Qwen says hello")
        completion = gen.complete("Qwen says hello", max_tokens=16)
    expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, eos_token_id=2,
                           pad_token_id=0)[0, len(prompt):].tolist()
    assert completion.token_ids == expected

"""Checks every model family passes against transformers (+ peft) on tiny random checkpoints (``_tiny``): logits,
one LoRA step and the exported adapter, the merged export, TP=2 (+SP), and KV-cache generation. The family test
files (``test_family_*.py``) choose the checkpoints; these helpers hold what is compared and how."""

from __future__ import annotations

import dataclasses
import json

import torch

from _tiny import load_tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tokens(arch, seed: int = 1, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(0, arch.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1]).expand_as(ids)


def check_logits_match(arch, directory, hf, length: int = 40) -> None:
    """Our padded forward's logits equal transformers' (fp32)."""
    ours = load_tiny_model(arch, directory).eval()
    ids = tokens(arch, shape=(2, length))
    with torch.no_grad():
        expected, actual = hf(ids).logits, ours(ids, positions(ids), None, runtime_gather_output=True)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-4


def lora_model(arch, directory, seed: int = 1):
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


def check_lora_step_matches_peft(arch, directory, tmp_path, length: int = 24) -> None:
    """Our exported adapter loads in peft with equal logits; one step's loss and every LoRA gradient equal
    transformers+peft's (biases and norms stay frozen in the base)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from nemo_customizer.peft.export import save_peft_adapter
    from nemo_customizer.peft.lora import adapter_parameters

    model, lora = lora_model(arch, directory)
    save_peft_adapter(model, lora, tmp_path / "adapter", base_model=str(directory))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model))

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(directory)),
                                           str(tmp_path / "adapter"), is_trainable=True)
    ids, labels = tokens(arch, seed=2, shape=(2, length)), tokens(arch, seed=3, shape=(2, length))
    mask = torch.zeros(ids.shape)
    mask[0, 5:] = 1
    mask[1, 12:20] = 1
    with torch.no_grad():
        ours_logits = model.eval()(ids, positions(ids), None, runtime_gather_output=True)
    theirs_logits = peft_model.eval()(ids).logits
    assert (ours_logits - theirs_logits.detach()).abs().max().item() <= 1e-4

    ours_loss = model(ids, positions(ids), None, labels=labels, loss_mask=mask).sum() / mask.sum()
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


def check_merged_export_loads_in_transformers(arch, directory, tmp_path, model_type: str, length: int = 24) -> None:
    """``lora_merged`` (and ``all_weights``, the same writer): the base under HF names with the adapters folded in,
    a config.json written from the architecture alone; transformers' logits equal ours."""
    from transformers import AutoModelForCausalLM

    from nemo_customizer.checkpoints.hf_export import save_hf_checkpoint
    from nemo_customizer.models.hf_state import hf_state_dict
    from nemo_customizer.peft.export import adapter_state_dict
    from nemo_customizer.peft.merge import merge_lora_into_hf

    model, lora = lora_model(arch, directory, seed=4)
    state = merge_lora_into_hf(hf_state_dict(model, arch), adapter_state_dict(model), lora.alpha / lora.adapter_dim)
    save_hf_checkpoint(state, arch, tmp_path / "merged", source_dir=None)
    assert json.loads((tmp_path / "merged/config.json").read_text())["model_type"] == model_type
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert type(exported).__name__ == arch.architectures[0]
    ids = tokens(arch, seed=5, shape=(2, length))
    with torch.no_grad():
        ours = model.eval()(ids, positions(ids), None, runtime_gather_output=True)
        assert (exported(ids).logits - ours).abs().max().item() <= 1e-4


def tensor_parallel_worker(rank: int, cases: dict, out: str) -> None:
    """Per case ``name → (checkpoint directory, architecture)``, at TP=2 with SP: the gathered logits of
    ``tokens(arch, shape=(2, 40))``, and packed vs unpacked loss and LoRA grads (one parallel state for all)."""
    from test_packing_numerics import packed_and_unpacked

    from nemo_customizer.config import compose_config
    from nemo_customizer.distributed.parallel import destroy_parallel, initialize_parallel
    from nemo_customizer.models.gpt import forward_logits
    from nemo_customizer.training.session import TrainingSession

    layout = initialize_parallel(tensor_parallel_size=2, pipeline_parallel_size=1, device=torch.device("cpu"), seed=0)
    results = {}
    try:
        for name, (directory, arch) in cases.items():
            cfg = compose_config(["model=tiny-llama-test", "model.tensor_parallel_size=2", "device=cpu",
                                  "precision=fp32"])
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, architecture=arch))
            with TrainingSession(cfg, checkpoint_dir=directory, layout=layout) as session:
                model = session.build_model(trainable=False)
                with torch.no_grad():
                    logits = forward_logits(model.eval(), tokens(arch, shape=(2, 40)))
            results[name] = {"logits": logits,
                             "packing": packed_and_unpacked(directory, 2, True, layout=layout, arch=arch)}
    finally:
        destroy_parallel(layout)
    torch.save(results, f"{out}.rank{rank}.pt")


def check_tensor_parallel_equals_transformers(cases: dict, hf_models: dict, tmp_path) -> None:
    """``tensor_parallel_worker`` on 2 processes; each rank's logits equal transformers' (``hf_models[name]``)."""
    from _multiproc import run_world
    from test_packing_numerics import check_packed_equals_unpacked

    run_world(tensor_parallel_worker, 2, cases, str(tmp_path / "out"))
    for rank in range(2):
        results = torch.load(tmp_path / f"out.rank{rank}.pt")
        for name, (_, arch) in cases.items():
            with torch.no_grad():
                expected = hf_models[name](tokens(arch, shape=(2, 40))).logits
            assert (results[name]["logits"] - expected).abs().max().item() <= 1e-4, name
            check_packed_equals_unpacked(results[name]["packing"])


def check_generation_matches_transformers(tmp_path, arch, prompts, max_tokens: int = 16, device: str = "cpu") -> None:
    """generate() with the KV cache, one prompt alone and all of them in one batch, equals transformers' greedy
    search of each prompt (``arch`` with the byte tokenizer's vocabulary and bos/eos ids 1/2), fp32 on ``device``."""
    from _tiny import tiny_generator_config, write_tiny_model_dir

    from nemo_customizer.inference import Generator

    hf = write_tiny_model_dir(tmp_path, arch).to(device)
    with Generator.from_config(tiny_generator_config(tmp_path, arch, device)) as gen:
        encoded = [gen.encode(prompt) for prompt in prompts]
        alone = gen.complete(prompts[0], max_tokens=max_tokens)
        batch = gen.complete_batch(prompts, max_tokens=max_tokens) if len(prompts) > 1 else [alone]
    for prompt, ids, completion in zip(prompts, encoded, batch):
        expected = hf.generate(torch.tensor([ids], device=device), do_sample=False, max_new_tokens=max_tokens, eos_token_id=2,
                               pad_token_id=0)[0, len(ids):].tolist()
        assert completion.token_ids == expected, prompt
        if prompt == prompts[0]:
            assert alone.token_ids == expected

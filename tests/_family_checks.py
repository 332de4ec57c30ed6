"""Checks every model family passes against transformers (+ peft) on tiny random checkpoints (``_tiny.py``): a
family's test file (``test_family_qwen.py``, ``test_family_phi.py``) calls them with its checkpoints and the LoRA
target names PEFT uses for it."""

from __future__ import annotations

import dataclasses
import json

import torch

from _tiny import load_tiny_model


def tokens(arch, seed: int = 1, shape=(2, 24)):
    return torch.randint(0, arch.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def check_logits_match_transformers(arch, directory, hf) -> None:
    ours = load_tiny_model(arch, directory).eval()
    batch = tokens(arch, shape=(2, 40))
    with torch.no_grad():
        expected = hf(batch).logits
        actual = ours(batch, torch.arange(40).expand_as(batch), None, runtime_gather_output=True)
    assert actual.shape == expected.shape and expected.std() > 0.1
    assert (actual - expected).abs().max().item() <= 1e-4


def lora_model(arch, directory, targets, seed: int = 1):
    """Our model with LoRA on ``targets`` (r=4, alpha=8), every adapter weight random so every path counts."""
    from nemo_customizer.config.schema import LoraConfig
    from nemo_customizer.peft.apply import apply_lora
    from nemo_customizer.peft.lora import adapter_parameters

    model = load_tiny_model(arch, directory)
    lora = LoraConfig(adapter_dim=4, alpha=8.0, adapter_dropout=0.0, target_modules=list(targets))
    apply_lora(model, arch, lora, seed=seed)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for param in adapter_parameters(model).values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model, lora


def check_lora_step_and_adapter_match_peft(arch, directory, targets, tmp_path) -> dict:
    """Our exported adapter loads in peft with equal logits; one step's loss and every LoRA gradient equal
    transformers+peft's; only the adapters train. Returns the exported adapter's config."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from nemo_customizer.peft.export import save_peft_adapter
    from nemo_customizer.peft.lora import adapter_parameters

    model, lora = lora_model(arch, directory, targets)
    save_peft_adapter(model, lora, tmp_path / "adapter", base_model=str(directory))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model))  # biases and norms frozen

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(directory)),
                                           str(tmp_path / "adapter"), is_trainable=True)
    batch, labels = tokens(arch, seed=2), tokens(arch, seed=3)
    mask = torch.zeros(batch.shape)
    mask[0, 5:] = 1
    mask[1, 12:20] = 1
    positions = torch.arange(batch.shape[1]).expand_as(batch)
    with torch.no_grad():
        ours_logits = model.eval()(batch, positions, None, runtime_gather_output=True)
    theirs_logits = peft_model.eval()(batch).logits
    assert (ours_logits - theirs_logits.detach()).abs().max().item() <= 1e-4

    ours_loss = model(batch, positions, None, labels=labels, loss_mask=mask).sum() / mask.sum()
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
    assert ours_grads.keys() == theirs_grads.keys() and len(ours_grads) == 2 * len(targets) * arch.num_hidden_layers
    for name, expected in theirs_grads.items():
        assert expected.norm() > 0, name
        assert (ours_grads[name] - expected).norm() <= 1e-4 * expected.norm(), name
    return json.loads((tmp_path / "adapter/adapter_config.json").read_text())


def check_merged_export_loads_in_transformers(arch, directory, targets, model_type: str, tmp_path) -> None:
    """``lora_merged`` (and ``all_weights``, the same writer): the base under HF names with the adapters folded in,
    a config.json written from the architecture alone; transformers' logits equal ours."""
    from transformers import AutoModelForCausalLM

    from nemo_customizer.checkpoints.hf_export import save_hf_checkpoint
    from nemo_customizer.models.hf_state import hf_state_dict
    from nemo_customizer.peft.export import adapter_state_dict
    from nemo_customizer.peft.merge import merge_lora_into_hf

    model, lora = lora_model(arch, directory, targets, seed=4)
    state = merge_lora_into_hf(hf_state_dict(model, arch), adapter_state_dict(model), lora.alpha / lora.adapter_dim)
    save_hf_checkpoint(state, arch, tmp_path / "merged", source_dir=None)
    assert json.loads((tmp_path / "merged/config.json").read_text())["model_type"] == model_type
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert type(exported).__name__ == arch.architectures[0]
    batch = tokens(arch, seed=5)
    with torch.no_grad():
        ours = model.eval()(batch, torch.arange(batch.shape[1]).expand_as(batch), None, runtime_gather_output=True)
        assert (exported(batch).logits - ours).abs().max().item() <= 1e-4


def tensor_parallel_worker(rank: int, cases: dict, out: str, adapters: dict | None = None) -> None:
    """Per case (name → (checkpoint directory, architecture)), at TP=2 with SP: the gathered logits, and packed vs
    unpacked loss and LoRA grads (one parallel state for all of them); saved to ``{out}.rank{rank}.pt``. With
    ``adapters`` (name → a peft adapter of that case's checkpoint): also the logits with the adapter loaded, sharded
    over TP, and the adapter exported back from the shards."""
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
            if adapters and name in adapters:
                results[name].update(_adapter_at_tensor_parallel(cfg, directory, arch, adapters[name], layout))
    finally:
        destroy_parallel(layout)
    torch.save(results, f"{out}.rank{rank}.pt")


def _adapter_at_tensor_parallel(cfg, directory, arch, adapter, layout) -> dict:
    from nemo_customizer.models.gpt import forward_logits
    from nemo_customizer.peft.apply import apply_lora
    from nemo_customizer.peft.export import adapter_state_dict, load_peft_adapter, read_lora_config
    from nemo_customizer.training.session import TrainingSession

    with TrainingSession(cfg, checkpoint_dir=directory, layout=layout) as session:
        model = session.build_model(trainable=False)
        apply_lora(model, arch, read_lora_config(adapter), seed=0)
        load_peft_adapter(model, adapter)
        with torch.no_grad():
            logits = forward_logits(model.eval(), tokens(arch, shape=(2, 40)))
        return {"adapter_logits": logits, "adapter_export": adapter_state_dict(model)}


def check_tensor_parallel_results(out: str, cases: dict, adapters: dict | None = None) -> None:
    """``tensor_parallel_worker``'s results against transformers (``cases``: name → (architecture, HF model)) and
    peft (``adapters``: name → (adapter directory, peft model))."""
    from safetensors.torch import load_file
    from test_packing_numerics import check_packed_equals_unpacked

    for rank in range(2):
        results = torch.load(f"{out}.rank{rank}.pt")
        for name, (arch, hf) in cases.items():
            with torch.no_grad():
                expected = hf(tokens(arch, shape=(2, 40))).logits
            assert (results[name]["logits"] - expected).abs().max().item() <= 1e-4, name
            check_packed_equals_unpacked(results[name]["packing"])
            if adapters and name in adapters:
                adapter, peft_model = adapters[name]
                with torch.no_grad():
                    expected = peft_model(tokens(arch, shape=(2, 40))).logits
                assert (results[name]["adapter_logits"] - expected).abs().max().item() <= 1e-4, name
                written = load_file(f"{adapter}/adapter_model.safetensors")
                exported = results[name]["adapter_export"]
                assert exported.keys() == written.keys()
                for key, tensor in written.items():
                    torch.testing.assert_close(exported[key], tensor, rtol=0, atol=0)

"""Checks every model family passes against transformers (+ peft) on tiny random checkpoints (``_tiny``): logits,
one LoRA step and the exported adapter, the merged export, TP=2 (+SP) with an optional peft adapter loaded into the
shards, and KV-cache generation. The family test files (``test_family_*.py``) choose the checkpoints and the LoRA
target names PEFT uses for the family; these helpers hold what is compared and how."""

from __future__ import annotations

import dataclasses
import json

import torch

from _tiny import load_tiny_model

# What PEFT targets on the families with separate q/k/v and gate/up projections (Llama, Qwen, Mistral).
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tokens(arch, seed: int = 1, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(0, arch.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1]).expand_as(ids)


def check_logits_match_transformers(arch, directory, hf, length: int = 40) -> None:
    """Our padded forward's logits equal transformers' (fp32), on logits that are not all alike."""
    ours = load_tiny_model(arch, directory).eval()
    ids = tokens(arch, shape=(2, length))
    with torch.no_grad():
        expected, actual = hf(ids).logits, ours(ids, positions(ids), None, runtime_gather_output=True)
    assert actual.shape == expected.shape and expected.std() > 0.1
    assert (actual - expected).abs().max().item() <= 1e-4


def packed_logits(arch, directory, rows) -> tuple:
    """Our logits of ``rows`` (each ``[1, n]``) packed into one THD row, split back per row."""
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = [row.shape[1] for row in rows]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                             max_seqlen_kv=max(lengths))
    with torch.no_grad():
        logits = load_tiny_model(arch, directory).eval()(
            torch.cat(rows, dim=1), torch.cat([torch.arange(n) for n in lengths])[None], None,
            packed_seq_params=params, runtime_gather_output=True)[0]
    return logits.split(lengths)


def check_packed_logits_match_transformers(arch, directory, hf, lengths=(30, 5, 19)) -> None:
    """Sequences of ``lengths`` packed into one row: each one's logits equal transformers' on it alone."""
    rows = [tokens(arch, seed=10 + i, shape=(1, n)) for i, n in enumerate(lengths)]
    actual = torch.cat(packed_logits(arch, directory, rows))
    with torch.no_grad():
        expected = torch.cat([hf(row).logits[0] for row in rows])
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


def check_lora_step_and_adapter_match_peft(arch, directory, targets, tmp_path, length: int = 24) -> dict:
    """Our exported adapter loads in peft with equal logits; one step's loss and every LoRA gradient equal
    transformers+peft's; only the adapters train (biases and norms stay frozen in the base). Returns the exported
    adapter's config."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from nemo_customizer.peft.export import save_peft_adapter
    from nemo_customizer.peft.lora import adapter_parameters

    model, lora = lora_model(arch, directory, targets)
    save_peft_adapter(model, lora, tmp_path / "adapter", base_model=str(directory), architecture=arch)
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
    save_peft_adapter(model, lora, tmp_path / "grads", base_model=str(directory), architecture=arch)
    ours_grads = load_file(str(tmp_path / "grads/adapter_model.safetensors"))
    theirs_grads = {name.replace(".default", ""): p.grad for name, p in peft_model.named_parameters()
                    if p.requires_grad}
    assert ours_grads.keys() == theirs_grads.keys() and len(ours_grads) == 2 * len(targets) * arch.num_hidden_layers
    for name, expected in theirs_grads.items():
        assert expected.norm() > 0, name
        assert (ours_grads[name] - expected).norm() <= 1e-4 * expected.norm(), name
    return json.loads((tmp_path / "adapter/adapter_config.json").read_text())


def check_merged_export_loads_in_transformers(arch, directory, targets, model_type: str, tmp_path,
                                              length: int = 24) -> None:
    """``lora_merged`` (and ``all_weights``, the same writer): the base under HF names with the adapters folded in,
    a config.json written from the architecture alone (in ``tmp_path / "merged"``); transformers' logits equal
    ours."""
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
    ids = tokens(arch, seed=5, shape=(2, length))
    with torch.no_grad():
        ours = model.eval()(ids, positions(ids), None, runtime_gather_output=True)
        assert (exported(ids).logits - ours).abs().max().item() <= 1e-4


def tensor_parallel_worker(rank: int, cases: dict, out: str, adapters: dict | None = None) -> None:
    """Per case (name → (checkpoint directory, architecture)), at TP=2 with SP: the gathered logits of
    ``tokens(arch, shape=(2, 40))``, and packed vs unpacked loss and LoRA grads (one parallel state for all of them);
    saved to ``{out}.rank{rank}.pt``. With ``adapters`` (name → a peft adapter directory of that case's checkpoint):
    also the logits with the adapter loaded, sharded over TP, and the adapter exported back from the shards."""
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


def check_tensor_parallel_equals_transformers(checkpoints: dict, tmp_path, adapters: dict | None = None) -> None:
    """``tensor_parallel_worker`` on 2 processes for ``checkpoints`` (name → (directory, architecture, HF model));
    each rank's logits equal transformers', its packed loss and LoRA grads the unpacked ones. With ``adapters``
    (name → (peft adapter directory, peft model)): the logits with the adapter loaded into the shards equal peft's,
    and the adapter exported back from the shards equals the one peft wrote, bit for bit."""
    from safetensors.torch import load_file

    from _multiproc import run_world
    from test_packing_numerics import check_packed_equals_unpacked

    out = str(tmp_path / "out")
    cases = {name: (str(directory), arch) for name, (directory, arch, _) in checkpoints.items()}
    adapter_dirs = {name: str(adapter) for name, (adapter, _) in (adapters or {}).items()}
    run_world(tensor_parallel_worker, 2, cases, out, adapter_dirs)
    for rank in range(2):
        results = torch.load(f"{out}.rank{rank}.pt")
        for name, (_, arch, hf) in checkpoints.items():
            with torch.no_grad():
                expected = hf(tokens(arch, shape=(2, 40))).logits
            assert (results[name]["logits"] - expected).abs().max().item() <= 1e-4, name
            check_packed_equals_unpacked(results[name]["packing"])
            if name in adapter_dirs:
                peft_model = adapters[name][1]
                with torch.no_grad():
                    expected = peft_model(tokens(arch, shape=(2, 40))).logits
                assert (results[name]["adapter_logits"] - expected).abs().max().item() <= 1e-4, name
                written = load_file(f"{adapter_dirs[name]}/adapter_model.safetensors")
                exported = results[name]["adapter_export"]
                assert exported.keys() == written.keys()
                for key, tensor in written.items():
                    torch.testing.assert_close(exported[key], tensor, rtol=0, atol=0)


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
        expected = hf.generate(torch.tensor([ids], device=device), do_sample=False, max_new_tokens=max_tokens,
                               eos_token_id=2, pad_token_id=0)[0, len(ids):].tolist()
        assert completion.token_ids == expected, prompt
        if prompt == prompts[0]:
            assert alone.token_ids == expected

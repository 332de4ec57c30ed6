"""LoRA on Megatron layers: B=0 start, targets, and the exported adapter matches peft on transformers."""

import pytest
import torch

from nemo_customizer.config.schema import LoraConfig
from nemo_customizer.models.gpt import forward_logits
from nemo_customizer.peft.apply import apply_lora, resolve_targets
from nemo_customizer.peft.export import load_peft_adapter, save_peft_adapter
from nemo_customizer.peft.lora import adapter_parameters

from _tiny import load_tiny_model, tiny_arch, write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("cpu_parallel")



def test_resolve_targets_accepts_hf_and_megatron_names():
    assert resolve_targets(["q_proj", "v_proj"]) == {"linear_qkv": {"q_proj", "v_proj"}}
    assert resolve_targets(["linear_fc1", "down_proj"]) == {"linear_fc1": {"gate_proj", "up_proj"},
                                                            "linear_fc2": {"down_proj"}}
    with pytest.raises(ValueError, match="unknown module 'qproj'"):
        resolve_targets(["qproj"])


def test_lora_starts_at_base_and_only_adapters_train(tmp_path):
    arch = tiny_arch()
    write_tiny_checkpoint(tmp_path, arch)
    model = load_tiny_model(arch, tmp_path).eval()
    tokens = torch.randint(0, arch.vocab_size, (1, 12))
    with torch.no_grad():
        before = forward_logits(model, tokens)
    summary = apply_lora(model, arch, LoraConfig(target_modules=["q_proj", "v_proj"]), seed=0)
    with torch.no_grad():
        after = forward_logits(model.eval(), tokens)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model))
    # q: (r × 64, 64 × r) ; v: (r × 64, 32 × r) per layer, 2 layers, r = 8
    assert summary.trainable_parameters == 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8)
    assert "q_proj, v_proj" in str(summary)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["linear_qkv", "o_proj", "linear_fc1", "down_proj"]])
@pytest.mark.parametrize("tied", [False, True])
def test_exported_adapter_matches_peft(tmp_path, targets, tied):
    from peft import PeftModel

    arch = tiny_arch(tied=tied)
    hf = write_tiny_checkpoint(tmp_path / "base", arch)
    model = load_tiny_model(arch, tmp_path / "base")
    lora = LoraConfig(adapter_dim=4, alpha=8.0, adapter_dropout=0.0, target_modules=targets)
    apply_lora(model, arch, lora, seed=1)
    with torch.no_grad():  # B starts at zero; give every adapter weight a value so the mapping is exercised
        for p in adapter_parameters(model).values():
            p.normal_(0, 0.2)
    save_peft_adapter(model, lora, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    tokens = torch.randint(0, arch.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = forward_logits(model.eval(), tokens)
        peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
        theirs = peft_model(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-4

    # and the adapter loads back into a fresh model with identical outputs
    fresh = load_tiny_model(arch, tmp_path / "base")
    apply_lora(fresh, arch, lora, seed=99)
    load_peft_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(fresh.eval(), tokens), ours)

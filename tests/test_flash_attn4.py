"""``model.attention_kernel``: which flash attention packed batches get, and how FlashAttention-4 is called.

FlashAttention-4 itself runs only on Hopper/Blackwell GPUs (``tests/gpu/`` checks its numerics there);
here its entry point is replaced by a recorder that computes the reference result.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from nemo_customizer.config import ConfigError
from nemo_customizer.models import flash_attn4
from nemo_customizer.models.attention import packed_causal_mask

from _tiny import tiny_arch

pytestmark = pytest.mark.usefixtures("cpu_parallel")


def _reference(q, k, v, cu, scale):
    total = q.shape[0]
    return torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float().transpose(0, 1), v.float().transpose(0, 1),
        attn_mask=packed_causal_mask(cu, total), scale=scale, enable_gqa=True).transpose(0, 1)


@pytest.fixture
def fake_flash_attn4(monkeypatch):
    """FlashAttention-4 'installed' on a compute capability 9.0 GPU: calls are recorded and answered exactly."""
    calls = []

    def varlen(q, k, v, **kwargs):
        calls.append(dict(q=q, k=k, v=v, **kwargs))
        out = _reference(q, k, v, kwargs["cu_seqlens_q"], kwargs["softmax_scale"]).to(q.dtype)
        return out, torch.zeros(q.shape[1], q.shape[0])

    monkeypatch.setattr(flash_attn4, "_load", lambda: (varlen, ""))
    monkeypatch.setattr(flash_attn4, "_capability_major", lambda index: 9)
    return calls


def test_the_kernel_choice(fake_flash_attn4, monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert flash_attn4.use_flash_attn4("auto", cuda, 64)
    assert flash_attn4.use_flash_attn4("fa4", cuda, 64)
    assert not flash_attn4.use_flash_attn4("torch", cuda, 64)
    for kernel in ("auto", "torch", "fa4"):
        assert not flash_attn4.use_flash_attn4(kernel, cpu, 64)
    assert not flash_attn4.use_flash_attn4("auto", cuda, 60)  # head sizes its kernels do not take
    assert not flash_attn4.use_flash_attn4("auto", cuda, 512)
    monkeypatch.setattr(flash_attn4, "_capability_major", lambda index: 8)  # Ampere: torch's flash attention
    assert not flash_attn4.use_flash_attn4("auto", cuda, 64)
    assert "compute capability 9.x or 10.x" in flash_attn4.unavailable_reason(cuda)
    monkeypatch.setattr(flash_attn4, "_capability_major", lambda index: 9)
    monkeypatch.setattr(flash_attn4, "_load", lambda: (None, "flash-attn-4 is not importable"))
    assert not flash_attn4.use_flash_attn4("auto", cuda, 64)
    assert flash_attn4.unavailable_reason(cuda) == "flash-attn-4 is not importable"


def test_without_the_package_auto_is_torch_and_a_direct_call_says_why(monkeypatch):
    monkeypatch.setattr(flash_attn4, "_load", lambda: (None, "flash-attn-4 is not importable (no module)"))
    with pytest.raises(RuntimeError, match="model.attention_kernel=fa4: flash-attn-4 is not importable"):
        flash_attn4.packed_causal_attention(*[torch.zeros(4, 2, 8)] * 3, torch.tensor([0, 4]), torch.tensor([0, 4]),
                                            4, 4, 0.5)


def test_packed_batches_go_to_flash_attn4_with_grouped_heads(fake_flash_attn4, monkeypatch):
    """CoreAttention hands FlashAttention-4 the grouped key/value heads as they are (no copies), int32 boundaries,
    causal masking and the softmax scale, and returns ``[t, heads * head_dim]``."""
    import nemo_customizer.models.attention as attention
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_customizer.models.gpt import transformer_config

    # The model's choice on a CUDA tensor, made here for CPU tensors (the recorder runs anywhere).
    monkeypatch.setattr(attention, "use_flash_attn4", lambda kernel, device, head_dim: kernel != "torch")
    arch = tiny_arch(heads=4, kv_heads=2)
    core = attention.CoreAttention(transformer_config(arch), 1, AttnMaskType.causal, "self")
    gen = torch.Generator().manual_seed(0)
    total, cu = 21, torch.tensor([0, 7, 10, 21, 21], dtype=torch.int64)
    q = torch.randn(total, 4, 16, generator=gen).bfloat16()
    k, v = (torch.randn(total, 2, 16, generator=gen).bfloat16() for _ in range(2))
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=11, max_seqlen_kv=11)
    out = core(q, k, v, None, packed_seq_params=params)
    (call,) = fake_flash_attn4
    assert call["k"].shape == (total, 2, 16) and call["v"].shape == (total, 2, 16)
    assert call["cu_seqlens_q"].dtype == torch.int32 and call["cu_seqlens_q"].tolist() == cu.tolist()
    assert call["causal"] is True and call["softmax_scale"] == core.softmax_scale
    assert call["max_seqlen_q"] == call["max_seqlen_k"] == 11
    expected = _reference(q, k, v, cu.to(torch.int32), core.softmax_scale).reshape(total, 64)
    assert out.shape == (total, 64)
    assert (out.float() - expected).abs().max().item() <= 2e-2
    fp32 = core(q.float(), k.float(), v.float(), None, packed_seq_params=params)  # fp32: not a flash kernel
    assert len(fake_flash_attn4) == 1 and fp32.shape == (total, 64)
    core.attention_kernel = "torch"
    core(q, k, v, None, packed_seq_params=params)
    assert len(fake_flash_attn4) == 1


def test_the_config_reaches_every_layer(cpu_parallel):
    from nemo_customizer.config import compose_config
    from nemo_customizer.models.attention import CoreAttention
    from nemo_customizer.training.session import TrainingSession

    cfg = compose_config(["model=tiny-llama-test", "model.random_weights=true", "model.attention_kernel=torch",
                          "device=cpu"])
    with TrainingSession(cfg, checkpoint_dir=None, layout=cpu_parallel) as session:
        model = session.build_model(trainable=False)
    kernels = [m.attention_kernel for m in model.modules() if isinstance(m, CoreAttention)]
    assert kernels == ["torch"] * cfg.model.architecture.num_hidden_layers


def test_fa4_where_it_cannot_run_is_refused_before_any_work(tmp_path):
    from nemo_customizer.api import customize

    with pytest.raises(ConfigError, match="model.attention_kernel=fa4 cannot run: it runs on CUDA GPUs, not cpu"):
        customize("tiny-llama-test", dataset=str(tmp_path / "missing"), output_dir=str(tmp_path / "job"),
                  device="cpu", model={"attention_kernel": "fa4"})
    assert not (tmp_path / "job").exists()


@pytest.mark.parametrize("overrides, pattern", [
    ({"precision": "fp32"}, "it runs bf16/fp16 attention and precision is fp32"),
    ({"model": {"attention_kernel": "fa4", "architecture": {"head_dim": 12}}}, "this model's is 12"),
])
def test_fa4_on_a_gpu_it_cannot_serve_is_refused_before_any_work(fake_flash_attn4, monkeypatch, tmp_path, overrides,
                                                                  pattern):
    import nemo_customizer.distributed.parallel as parallel
    from nemo_customizer.api import customize

    monkeypatch.setattr(parallel, "resolve_device", lambda name: torch.device("cuda", 0))  # a Hopper, as far as it knows
    kwargs = {"model": {"attention_kernel": "fa4"}, **overrides}
    with pytest.raises(ConfigError, match=pattern):
        customize("tiny-llama-test", dataset=str(tmp_path / "missing"), output_dir=str(tmp_path / "job"), **kwargs)
    assert not (tmp_path / "job").exists()

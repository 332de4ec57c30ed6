"""One-GPU numerics check: CUDA bf16 against CPU fp32 on the same job, and packed attention on CUDA.

    python scripts/gpu_check.py [--out DIR]

1. A tiny random Llama (HF checkpoint written with transformers) fine-tuned for 10 steps with LoRA and with
   all_weights, on CPU in fp32 and on CUDA in bf16: the per-step losses agree within bf16 tolerance.
2. Packed (THD, varlen flash attention) logits equal unpacked logits on CUDA, GQA, bf16 and fp32.
Prints a table and exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

BF16_RTOL = 3e-2  # per-step loss, bf16 weights/activations against fp32
GRAPHS_RTOL = 5e-3  # per-step loss, the same bf16 job with and without CUDA graphs (padded GEMM shapes round apart)


def _job(root: Path, name: str, device: str, precision: str, finetuning: str, model: dict | None = None,
         **hyperparameters) -> list[float]:
    from nemo_customizer.api import customize

    customize("tiny-llama-test", dataset=str(root / "data"), output_dir=str(root / name), device=device,
              precision=precision, progress_bar=False,
              hyperparameters={"finetuning_type": finetuning, "epochs": 1, "batch_size": 8, "micro_batch_size": 4,
                               "learning_rate": 1e-3, "max_steps": 10, "lora": {"adapter_dropout": 0.0},
                               **hyperparameters},
              model={"checkpoint": str(root / "model"), "random_weights": False, **(model or {})})
    return _train_losses(root / name)


def _train_losses(job_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "train"]


def _flash_attn4_runs() -> bool:
    from nemo_customizer.models.flash_attn4 import unavailable_reason

    return not unavailable_reason(torch.device("cuda"))


def check_training(root: Path) -> list[dict]:
    from _tiny import write_classification_data, write_tiny_model_dir

    write_tiny_model_dir(root / "model")
    write_classification_data(root / "data", n_train=96, n_val=16)
    kinds = ("lora", "all_weights")
    # A CPU job's adaptations of mcore (compat.megatron_cpu) end with it: CUDA and CPU jobs may run in any order.
    gpu_losses = {kind: _job(root, f"{kind}-cuda", "cuda", "bf16", kind) for kind in kinds}
    results = check_inference(root, root / "lora-cuda" / "adapter")
    # bf16 weights updated in place (no fp32 master copy; stochastic rounding) against mixed precision
    no_masters = _job(root, "all_weights-bf16-weights", "cuda", "bf16", "all_weights", fp32_master_weights=False)
    worst = max(abs(a - b) / abs(a) for a, b in zip(gpu_losses["all_weights"], no_masters))
    results.append(dict(check="all_weights: cuda bf16 without fp32 master weights vs with (10 steps)", worst_rel=worst,
                        ok=worst <= BF16_RTOL and len(no_masters) == 10, mixed=gpu_losses["all_weights"],
                        bf16_weights=no_masters))
    # 3 epochs of 3 steps of 8 micro batches: several static shapes, each replayed many times
    packed = dict(sequence_packing_enabled=True, batch_size=32, micro_batch_size=2, epochs=3, max_steps=9)
    for kind in kinds:  # packed micro batches eagerly vs replayed from CUDA graphs (training.graphs)
        eager = _job(root, f"{kind}-packed", "cuda", "bf16", kind, **packed)
        graphed = _job(root, f"{kind}-graphs", "cuda", "bf16", kind, cuda_graphs=True, **packed)
        worst = max(abs(a - b) / abs(a) for a, b in zip(eager, graphed))
        results.append(dict(check=f"{kind}: packed cuda bf16, CUDA graphs vs eager losses ({len(eager)} steps)",
                            worst_rel=worst, ok=worst <= GRAPHS_RTOL and len(eager) == len(graphed) > 1,
                            eager=eager, graphed=graphed))
        if kind == "lora":  # dropout draws random numbers inside the graph: new masks on every replay
            dropout = dict(lora={"adapter_dropout": 0.1}, **packed)
            eager_dropout = _job(root, "lora-packed-dropout", "cuda", "bf16", kind, **dropout)
            graphed_dropout = _job(root, "lora-graphs-dropout", "cuda", "bf16", kind, cuda_graphs=True, **dropout)
            worst = max(abs(a - b) / abs(a) for a, b in zip(eager_dropout, graphed_dropout))
            results.append(dict(
                check="lora, adapter_dropout 0.1: CUDA graphs vs eager losses (other masks: within 5%, and not the "
                      "dropout-free losses)", worst_rel=worst,
                ok=worst <= 0.05 and len(eager_dropout) == len(graphed_dropout) > 1 and graphed_dropout != graphed,
                eager=eager_dropout, graphed=graphed_dropout))
    if _flash_attn4_runs():  # the packed jobs above took FlashAttention-4 (model.attention_kernel=auto)
        flash4 = _train_losses(root / "lora-packed")
        flash2 = _job(root, "lora-packed-torch-attention", "cuda", "bf16", "lora", model={"attention_kernel": "torch"},
                      **packed)
        worst = max(abs(a - b) / abs(a) for a, b in zip(flash2, flash4))
        results.append(dict(check=f"lora: packed cuda bf16, FlashAttention-4 vs torch's flash attention losses "
                                  f"({len(flash4)} steps)", worst_rel=worst,
                            ok=worst <= GRAPHS_RTOL and len(flash4) == len(flash2) > 1, fa4=flash4, torch=flash2))
    for finetuning in kinds:
        cpu = _job(root, f"{finetuning}-cpu", "cpu", "fp32", finetuning)
        gpu = gpu_losses[finetuning]
        worst = max(abs(a - b) / abs(a) for a, b in zip(cpu, gpu))
        results.append(dict(check=f"{finetuning}: cuda bf16 vs cpu fp32 losses (10 steps)", worst_rel=worst,
                            ok=worst <= BF16_RTOL and len(cpu) == len(gpu) == 10, cpu=cpu, cuda=gpu))
    return results


def check_inference(root: Path, adapter: Path) -> list[dict]:
    """Generation on CUDA with an adapter trained on CUDA: greedy tokens equal ``transformers`` + ``peft`` on the same
    GPU (fp32); batched decoding equals one prompt at a time; rows with and without the adapter decode in one batch
    as they do alone (the server's multi-LoRA path); bf16 generation runs (the default precision on GPUs)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from nemo_customizer.config import compose_config
    from nemo_customizer.inference.generator import Generator

    prompts = ["yes a b c\nAnswer: ", "no d d a b\nAnswer: ", "yes\nAnswer: ", "no a b c d a b c d a b\nAnswer: "]
    tokens = 20

    def config(precision: str):
        return compose_config(["model=tiny-llama-test", f"model.checkpoint={root / 'model'}",
                               "model.random_weights=false", "device=cuda", f"precision={precision}"])

    reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(root / "model")),
                                          str(adapter)).cuda().eval()
    results = []
    with Generator.from_config(config("fp32"), adapter=str(adapter)) as gen:
        batched = [c.token_ids for c in gen.complete_batch(prompts, max_tokens=tokens)]
        single = [gen.complete(p, max_tokens=tokens).token_ids for p in prompts]
        with torch.no_grad():
            expected = []
            for p in prompts:
                ids = torch.tensor([gen.encode(p)], device="cuda")
                out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                         do_sample=False, eos_token_id=sorted(gen.eos_ids), pad_token_id=0)
                expected.append(out[0, ids.shape[1]:].tolist())
    mismatched = sum(a != b for a, b in zip(single, expected))
    results.append(dict(check=f"generation on CUDA fp32 with a CUDA-trained adapter: greedy tokens vs transformers+"
                              f"peft ({len(prompts)} prompts x {tokens} tokens; value: prompts that differ)",
                        worst_rel=float(mismatched), ok=mismatched == 0))
    mismatched = sum(a != b for a, b in zip(batched, single))
    results.append(dict(check="generation on CUDA fp32: batched decoding vs one prompt at a time (value: prompts "
                              "that differ)", worst_rel=float(mismatched), ok=mismatched == 0))
    with Generator.from_config(config("fp32")) as gen:
        plain = [c.token_ids for c in gen.complete_batch(prompts[:2], max_tokens=tokens)]
        gen.attach_adapters(max_rank=16).add("tuned", adapter)
        rows = [gen.new_row(gen.encode(p), max_tokens=tokens, adapter=name)
                for p, name in zip(prompts[:2] * 2, [None, None, "tuned", "tuned"])]
        from nemo_customizer.inference.continuous import ContinuousBatch

        batch = ContinuousBatch(gen, max_rows=4)
        for row in rows:
            batch.add(row)
        while batch.active:
            batch.step()
        mixed = [row.completion().token_ids for row in rows]
    mismatched = sum(a != b for a, b in zip(mixed, plain + single[:2]))
    results.append(dict(check="generation on CUDA fp32: base and adapter rows in one batch vs each alone (the "
                              "server's multi-LoRA path; value: rows that differ)", worst_rel=float(mismatched),
                        ok=mismatched == 0 and plain != single[:2]))
    with Generator.from_config(config("bf16"), adapter=str(adapter)) as gen:
        completions = gen.complete_batch(prompts, max_tokens=tokens)
    ran = all(c.completion_tokens == len(c.token_ids) > 0 for c in completions)
    results.append(dict(check="generation on CUDA bf16 (KV cache, batched decoding) runs", worst_rel=0.0, ok=ran))
    return results


def check_packed(root: Path) -> list[dict]:
    from megatron.core.packed_seq_params import PackedSeqParams

    from _tiny import load_tiny_model, tiny_arch, write_tiny_checkpoint
    from nemo_customizer.distributed.parallel import destroy_parallel, initialize_parallel
    from nemo_customizer.models.gpt import forward_logits

    arch = tiny_arch(heads=4, kv_heads=2, hidden=128)
    write_tiny_checkpoint(root / "packed", arch)
    layout = initialize_parallel(tensor_parallel_size=1, pipeline_parallel_size=1, device=torch.device("cuda"),
                                 seed=0)
    results = []
    try:
        model = load_tiny_model(arch, root / "packed").cuda().eval()
        gen = torch.Generator().manual_seed(0)
        sequences = [torch.randint(0, arch.vocab_size, (n,), generator=gen).cuda() for n in (37, 5, 90, 64)]
        cu = torch.tensor([0, 37, 42, 132, 196], dtype=torch.int32, device="cuda")
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=90,
                                 max_seqlen_kv=90)
        positions = torch.cat([torch.arange(len(s), device="cuda") for s in sequences])[None]
        for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 3e-2)):
            model.to(dtype)
            with torch.no_grad():
                packed = model(torch.cat(sequences)[None], positions, None, packed_seq_params=params,
                               runtime_gather_output=True)[0].float()
                unpacked = torch.cat([forward_logits(model, s[None])[0] for s in sequences]).float()
            rel = ((packed - unpacked).norm() / unpacked.norm()).item()
            results.append(dict(check=f"packed vs unpacked logits on CUDA ({dtype})", worst_rel=rel, ok=rel <= tol))
    finally:
        destroy_parallel(layout)
    return results


def check_graph_safe_rng() -> list[dict]:
    """mcore's tracker switched to graph-safe generators (what CUDA graphs need under sequence parallelism) keeps
    its states; a checkpoint's tensor copy restores them; a captured fork draws new numbers on every replay."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from nemo_customizer.distributed.parallel import (destroy_parallel, initialize_parallel, rng_states_to_register,
                                                      rng_tracker_states, set_rng_tracker_states,
                                                      use_graph_safe_rng)

    layout = initialize_parallel(tensor_parallel_size=1, pipeline_parallel_size=1, device=torch.device("cuda"),
                                 seed=3)

    def draw() -> torch.Tensor:
        with get_cuda_rng_tracker().fork():
            return torch.rand(8, device="cuda")

    try:
        before = rng_tracker_states()
        expected = draw()
        set_rng_tracker_states(before)
        use_graph_safe_rng()
        kept = torch.equal(draw(), expected)
        saved = rng_tracker_states()
        first = draw()
        set_rng_tracker_states(saved)
        restored = torch.equal(draw(), first)
        graph, out = torch.cuda.CUDAGraph(), torch.empty(8, device="cuda")
        for generator in rng_states_to_register():
            graph.register_generator_state(generator)
        stream = torch.cuda.Stream()
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            out.copy_(draw())
        graph.replay()
        replay1 = out.clone()
        graph.replay()
        advances = not torch.equal(out, replay1)
    finally:
        destroy_parallel(layout)
    return [dict(check=f"graph-safe RNG tracker: states kept {kept}, checkpoint round trip {restored}, "
                       f"replays draw anew {advances}", worst_rel=0.0, ok=kept and restored and advances)]


def _worst_rel(pairs) -> float:
    """The largest ``max|a - b| / max|b|`` over ``(ours, reference)`` pairs of tensors."""
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in pairs)


def check_kernels() -> list[dict]:
    """GPU-only kernels against their CPU/eager reference on the same inputs."""
    from nemo_customizer.models.norm import fused_rms_norm, rms_norm

    gen = torch.Generator().manual_seed(0)
    results = []
    for tokens in (4096, 1531):  # two shapes: the compiled graph is dynamic, not specialized to the first
        x = torch.randn(tokens, 2048, generator=gen).cuda().to(torch.bfloat16).requires_grad_()
        w = (torch.rand(2048, generator=gen) + 0.5).cuda().to(torch.bfloat16).requires_grad_()
        fused = fused_rms_norm.compiled(eps=1e-5)(x, w)
        fused.float().square().sum().backward()
        grads = x.grad.clone(), w.grad.clone()
        x.grad = w.grad = None
        eager = rms_norm(x, w, 1e-5)
        eager.float().square().sum().backward()
        worst = _worst_rel([(fused, eager), (grads[0], x.grad), (grads[1], w.grad)])
        results.append(dict(check=f"compiled RMSNorm vs eager, bf16, {tokens} tokens (fwd, d_x, d_w)",
                            worst_rel=worst, ok=worst <= 2e-2))
    from nemo_customizer.models.loss import (LOSS_CHUNK_TOKENS, _cross_entropy_fp32, _kernel_cross_entropy_and_grad,
                                             _fused_cross_entropy, _fused_cross_entropy_and_grad)
    from nemo_customizer.models.rope import _fused_rotate, _rotate

    for tokens in (LOSS_CHUNK_TOKENS, 700):
        logits = (torch.randn(tokens, 128256, generator=gen) * 3).cuda().to(torch.bfloat16).requires_grad_()
        targets = torch.randint(0, 128256, (tokens,), generator=gen).cuda()
        fused = _fused_cross_entropy.compiled()(logits, targets)
        fused.sum().backward()
        fused_grad, logits.grad = logits.grad.clone(), None
        reference = _cross_entropy_fp32(logits, targets)  # eager
        reference.sum().backward()
        worst = _worst_rel([(fused, reference), (fused_grad.float(), logits.grad.float())])
        results.append(dict(check=f"compiled cross-entropy vs eager fp32, bf16 logits, {tokens} tokens (loss, grad)",
                            worst_rel=worst, ok=worst <= 2e-2))
        # The frozen-output-weight loss head computes the logits' gradient in forward, compiled: against autograd.
        losses, grad = _fused_cross_entropy_and_grad.compiled()(logits.detach(), targets)
        worst = _worst_rel([(losses, reference.detach()), (grad.float(), logits.grad.float())])
        results.append(dict(check=f"compiled cross-entropy + logits gradient in forward vs eager autograd, "
                                  f"{tokens} tokens (loss, grad)", worst_rel=worst, ok=worst <= 2e-2))
        # What the frozen-output loss head runs on CUDA: the Triton kernel (models.loss_kernel).
        losses, grad = _kernel_cross_entropy_and_grad()(logits.detach(), targets)
        worst = _worst_rel([(losses, reference.detach()), (grad.float(), logits.grad.float())])
        results.append(dict(check=f"Triton cross-entropy + logits gradient vs eager autograd, {tokens} tokens "
                                  f"(loss, grad)", worst_rel=worst, ok=worst <= 2e-2))
    results.append(_check_loss_head(gen))
    q = torch.randn(3000, 32, 64, generator=gen).cuda().to(torch.bfloat16).requires_grad_()
    k = torch.randn(3000, 8, 64, generator=gen).cuda().to(torch.bfloat16).requires_grad_()
    angles = torch.rand(3000, 1, 64, generator=gen).cuda() * 6.28
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    upstream = [torch.randn(t.shape, generator=gen).cuda().to(torch.bfloat16) for t in (q, k)]

    def outputs_and_grads(fn):
        outs = fn(q, k, cos, sin)
        grads = torch.autograd.grad(outs, (q, k), upstream)
        return [t.float() for t in (*outs, *grads)]

    fused = outputs_and_grads(_fused_rotate.compiled())
    eager = outputs_and_grads(_rotate)  # autograd through the eager formula
    worst = _worst_rel(zip(fused, eager))
    results.append(dict(check="compiled RoPE vs eager, bf16 (q, k, d_q, d_k)", worst_rel=worst,
                        ok=worst <= 2e-2))
    results.append(_check_triton_rope(gen))
    results.append(_check_bf16_adamw_kernel(gen))
    results.append(_check_master_adamw_kernel(gen))
    results.append(_check_triton_swiglu(gen))
    results.append(_check_packed_gqa_attention(gen, "torch"))
    if _flash_attn4_runs():
        results.append(_check_packed_gqa_attention(gen, "fa4"))
    return results


def _check_loss_head(gen: torch.Generator) -> dict:
    """The training loss head on CUDA (bf16, the Triton cross-entropy, gradients computed in forward chunk by chunk)
    with a trained output weight and position weights, against fp32 autograd over the whole logits."""
    from nemo_customizer.distributed.parallel import destroy_parallel, initialize_parallel
    from nemo_customizer.models.loss import masked_token_losses

    tokens, hidden_size, vocab = 2500, 2048, 128256  # three chunks, the last one partial
    hidden = torch.randn(tokens, hidden_size, generator=gen).cuda().to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.05).cuda().to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen).cuda()
    position_weights = (torch.rand(tokens, generator=gen) > 0.1).float().cuda()  # 0: a graph's padding positions
    layout = initialize_parallel(tensor_parallel_size=1, pipeline_parallel_size=1, device=torch.device("cuda"), seed=0)
    try:
        losses = masked_token_losses(hidden, targets, weight, position_weights)
        ours = [losses, *torch.autograd.grad(losses.sum(), (hidden, weight))]
    finally:
        destroy_parallel(layout)
    hidden32, weight32 = (t.detach().float().requires_grad_() for t in (hidden, weight))
    reference = torch.nn.functional.cross_entropy(hidden32 @ weight32.t(), targets, reduction="none") * position_weights
    expected = [reference, *torch.autograd.grad(reference.sum(), (hidden32, weight32))]
    worst = _worst_rel((a.float(), b) for a, b in zip(ours, expected))
    return dict(check=f"loss head, trained output weight, bf16, {tokens} tokens with position weights, against fp32 "
                      "autograd (losses, d_hidden, d_weight)", worst_rel=worst, ok=worst <= 2e-2)


def _check_triton_rope(gen: torch.Generator) -> dict:
    """The Triton RoPE kernel (``models.rope.rotate`` on CUDA) against autograd through the fp32 eager formula, on
    query/key views of a fused projection output as mcore passes them, for two token counts and head sizes."""
    from nemo_customizer.models.rope import _rotate, rotate

    worst = 0.0
    for tokens, head_dim in ((4096, 64), (1531, 128)):
        mixed = torch.randn(tokens, 8, 6 * head_dim, generator=gen).cuda().to(torch.bfloat16)
        query, key, _ = torch.split(mixed, [4 * head_dim, head_dim, head_dim], dim=2)
        query = query.reshape(tokens, 32, head_dim).detach().requires_grad_()
        key = key.detach().requires_grad_()
        angles = torch.rand(tokens, 1, head_dim, generator=gen).cuda() * 6.28
        cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
        upstream = [torch.randn(t.shape, generator=gen).cuda().to(torch.bfloat16) for t in (query, key)]
        outs = rotate(query, key, cos, sin)
        assert outs[0].grad_fn is not None and "RotateHalf" in type(outs[0].grad_fn).__name__, "not the kernel path"
        ours = [*outs, *torch.autograd.grad(outs, (query, key), upstream)]
        fp32 = [t.detach().float().requires_grad_() for t in (query, key)]
        ref_outs = _rotate(*fp32, cos.float(), sin.float())
        reference = [*ref_outs, *torch.autograd.grad(ref_outs, fp32, [u.float() for u in upstream])]
        worst = max(worst, _worst_rel((a.float(), b) for a, b in zip(ours, reference)))
    return dict(check="Triton RoPE vs fp32 eager autograd, bf16 strided q/k views (q, k, d_q, d_k)",
                worst_rel=worst, ok=worst <= 1e-2)


def _check_triton_swiglu(gen: torch.Generator) -> dict:
    """The MLP's SwiGLU module on CUDA (Triton, both directions) against autograd of the fp32 formula."""
    import torch.nn.functional as F
    from nemo_customizer.models.swiglu import SwiGLU

    worst = 0.0
    for rows, width in ((4096, 8192), (1531, 14336)):
        x = (torch.randn(rows, 1, 2 * width, generator=gen) * 2).cuda().to(torch.bfloat16).requires_grad_()
        upstream = torch.randn(rows, 1, width, generator=gen).cuda().to(torch.bfloat16)
        out = SwiGLU()(x)
        assert "SwiGLUFunction" in type(out.grad_fn).__name__
        ours = [out, *torch.autograd.grad(out, x, upstream)]
        x32 = x.detach().float().requires_grad_()
        gate, up = x32.chunk(2, dim=-1)
        ref = F.silu(gate) * up
        reference = [ref, *torch.autograd.grad(ref, x32, upstream.float())]
        worst = max(worst, _worst_rel((a.float(), b) for a, b in zip(ours, reference)))
    return dict(check="Triton SwiGLU vs fp32 autograd, bf16 (out, d_x)", worst_rel=worst, ok=worst <= 1e-2)


def _check_bf16_adamw_kernel(gen: torch.Generator) -> dict:
    """``Bf16AdamW``'s Triton update against the fp32 AdamW arithmetic: moments equal to bf16 rounding, every weight
    one of the two bf16 neighbours of the fp32 result and unbiased on average, and ``found_inf`` changing nothing."""
    from nemo_customizer.training.bf16_adamw import Bf16AdamW

    n = 3_000_001  # not a multiple of the kernel's block
    weight = (torch.randn(n, generator=gen) * 0.02).cuda().to(torch.bfloat16)
    grad = torch.randn(n, generator=gen).cuda().to(torch.bfloat16)
    exp_avg = (torch.randn(n, generator=gen) * 0.1).cuda().to(torch.bfloat16)
    exp_avg_sq = (torch.rand(n, generator=gen) * 0.01).cuda().to(torch.bfloat16)
    param = torch.nn.Parameter(weight.clone())
    optimizer = Bf16AdamW([param], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    optimizer.state[param].update(step=torch.tensor(4.0, device="cuda"), exp_avg=exp_avg.clone(),
                                  exp_avg_sq=exp_avg_sq.clone())
    param.grad = grad
    optimizer.grad_scale = torch.tensor(2.0, device="cuda")
    optimizer.found_inf = torch.tensor(1.0, device="cuda")
    optimizer.step()
    state = optimizer.state[param]
    unchanged = (torch.equal(param.detach(), weight) and float(state["step"]) == 4.0
                 and torch.equal(state["exp_avg"], exp_avg))
    optimizer.found_inf = torch.tensor(0.0, device="cuda")
    optimizer.step()
    g = grad.float() / 2.0
    m = exp_avg.float() * 0.9 + g * 0.1
    v = exp_avg_sq.float() * 0.95 + g * g * 0.05
    expected = weight.float() * (1 - 1e-3 * 0.1) - (1e-3 / (1 - 0.9 ** 5)) * m / (v.sqrt() / (1 - 0.95 ** 5) ** 0.5 + 1e-8)
    moments = _worst_rel([(state["exp_avg"].float(), m), (state["exp_avg_sq"].float(), v)])
    # A bf16 step is at most 2^-7 of the value (8 significant bits). Near 0 the fp32 result itself carries the
    # cancellation error of weight - update, so the bound there is that of 1e-4.
    ulp = expected.abs().clamp(min=1e-4) * 2.0 ** -7
    off = (param.detach().float() - expected) * expected.sign() / ulp  # > 0: rounded away from zero
    within = bool((off.abs() <= 1.05).all())
    bias = off.mean().abs().item()  # rounding toward zero (truncation) would give about -0.25
    ok = unchanged and float(state["step"]) == 5.0 and moments <= 1e-2 and within and bias < 0.01
    return dict(check=f"Triton Bf16AdamW vs fp32 AdamW (moments; weights within one bf16 step: {within}, mean "
                      f"rounding offset {bias:.1e} steps; found_inf left all unchanged: {unchanged})",
                worst_rel=moments, ok=ok)


def _check_master_adamw_kernel(gen: torch.Generator) -> dict:
    """``MasterAdamW``'s Triton update (fp32 masters) against torch's fused AdamW over the same masters, three steps:
    masters and moments close, the bf16 model copy equal to the masters rounded to nearest; ``found_inf`` changes
    nothing."""
    from nemo_customizer.training.bf16_adamw import MasterAdamW

    n = 3_000_001  # not a multiple of the kernel's block
    start = (torch.randn(n, generator=gen) * 0.02).cuda()
    grads = [torch.randn(n, generator=gen).cuda() for _ in range(3)]
    reference = torch.nn.Parameter(start.clone())
    torch_adamw = torch.optim.AdamW([reference], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    master = torch.nn.Parameter(start.clone())
    model = start.to(torch.bfloat16)
    ours = MasterAdamW([master], {id(master): model}, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for grad in grads:
        reference.grad, master.grad = grad.clone(), grad.clone()
        torch_adamw.step()
        ours.step()
    before = master.detach().clone(), model.clone()
    ours.found_inf = torch.tensor(1.0, device="cuda")
    ours.step()
    unchanged = torch.equal(master.detach(), before[0]) and torch.equal(model, before[1])
    state, ref_state = ours.state[master], torch_adamw.state[reference]
    worst = _worst_rel([(master.detach() - start, reference.detach() - start),
                        (state["exp_avg"], ref_state["exp_avg"]), (state["exp_avg_sq"], ref_state["exp_avg_sq"])])
    copy_exact = torch.equal(model, master.detach().to(torch.bfloat16))
    return dict(check=f"Triton MasterAdamW vs torch fused AdamW, fp32 masters, 3 steps (updates, moments; bf16 model "
                      f"copy rounded to nearest: {copy_exact}; found_inf left all unchanged: {unchanged})",
                worst_rel=worst, ok=worst <= 1e-4 and copy_exact and unchanged and float(state["step"]) == 3.0)


def _check_packed_gqa_attention(gen: torch.Generator, kernel: str) -> dict:
    """Packed flash attention with 8 key/value heads for 32 query heads, as the model calls it (``CoreAttention``,
    heads not expanded where the flash kernel takes GQA), bf16: outputs and q/k/v gradients against fp32 causal
    attention per sequence with expanded heads. ``kernel``: ``model.attention_kernel`` (torch's or
    FlashAttention-4)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from _tiny import tiny_arch
    from nemo_customizer.models.attention import CoreAttention
    from nemo_customizer.models.gpt import transformer_config

    attention = CoreAttention(transformer_config(tiny_arch(heads=32, kv_heads=8, hidden=32 * 64)), 1,
                              AttnMaskType.causal, "self", attention_kernel=kernel)
    lengths = [700, 13, 1500, 1, 380, 1502, 0, 0]  # empty segments at the end, as CUDA graphs pad cu_seqlens
    total = sum(lengths)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32).cuda()
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                             max_seqlen_kv=max(lengths))
    inputs = [torch.randn(total, h, 64, generator=gen).cuda() for h in (32, 8, 8)]
    upstream = torch.randn(total, 32 * 64, generator=gen).cuda()

    def outputs_and_grads(dtype, fn):
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        out = fn(*leaves)
        return [t.float() for t in (out, *torch.autograd.grad(out, leaves, upstream.to(dtype)))]

    def reference(q, k, v):
        k, v = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
        outs = []
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if e == s:
                continue
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True
            ).transpose(0, 1).reshape(e - s, -1))
        return torch.cat(outs)

    ours = outputs_and_grads(torch.bfloat16, lambda q, k, v: attention(q, k, v, None, packed_seq_params=params))
    expected = outputs_and_grads(torch.float32, reference)
    worst = max(((a - b).norm() / b.norm()).item() for a, b in zip(ours, expected))
    expanded = kernel == "torch" and not attention._varlen_native_gqa
    return dict(check=f"packed flash attention ({kernel}), GQA 32/8 heads{' (expanded)' if expanded else ''}, bf16 vs "
                      "fp32 per sequence (out, d_q, d_k, d_v)", worst_rel=worst, ok=worst <= 2e-2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write results.json here")
    parser.add_argument("--kernels-only", action="store_true",
                        help="only the kernel, packed-attention and RNG checks (no training or generation jobs)")
    args = parser.parse_args(argv)
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        results = check_kernels() + check_packed(root) + check_graph_safe_rng()
        if not args.kernels_only:
            results += check_training(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for r in results:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']}: worst relative difference {r['worst_rel']:.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

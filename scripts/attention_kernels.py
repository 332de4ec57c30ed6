"""Per-layer GPU kernel time of packed causal attention fwd+bwd: torch varlen_attn (FA2) vs FA4, 1B and 8B shapes.

    python scripts/attention_kernels.py      # needs a Hopper/Blackwell GPU and flash-attn-4

4,096 packed tokens (lengths drawn with mean 600), bf16, 32 query / 8 key-value heads; the sum of GPU kernel time
over 20 forward+backward calls under the torch profiler, divided by 20, and the four largest kernels. The numbers in
docs/PERFORMANCE.md ("Packed attention kernels alone") come from this code.
"""
import math, torch
from torch.profiler import profile, ProfilerActivity
from torch.nn.attention.varlen import varlen_attn
from flash_attn.cute import flash_attn_varlen_func

gen = torch.Generator().manual_seed(0)
def lengths_for(total, mean=600):
    out, used = [], 0
    while used < total:
        n = max(16, int(torch.empty(1).exponential_(1 / mean, generator=gen).item())); n = min(n, total - used)
        out.append(n); used += n
    return out
for name, heads, kvh, d in (("1B", 32, 8, 64), ("8B", 32, 8, 128)):
    lens = lengths_for(4096); cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32).cuda(); m = max(lens)
    s = 1 / math.sqrt(d)
    q = torch.randn(4096, heads, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4096, kvh, d, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
    go = torch.randn_like(q)
    impls = {"fa2": lambda a, b, c: varlen_attn(a, b, c, cu, cu, m, m, scale=s, window_size=(-1, 0)),
             "fa4": lambda a, b, c: flash_attn_varlen_func(a, b, c, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m,
                                                          max_seqlen_k=m, softmax_scale=s, causal=True)[0]}
    for impl, fn in impls.items():
        def step():
            a, b, c = (t.detach().requires_grad_() for t in (q, k, v))
            out = fn(a, b, c)
            torch.autograd.grad(out, (a, b, c), go)
        for _ in range(5): step()
        torch.cuda.synchronize()
        n = 20
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n): step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        total = sum(e.self_device_time_total for e in events) / n
        top = sorted(events, key=lambda e: -e.self_device_time_total)[:4]
        print(f"{name} {impl}: {total:.0f} us per layer fwd+bwd; " + "; ".join(
            f"{e.key[:50]} {e.self_device_time_total / n:.0f}" for e in top), flush=True)

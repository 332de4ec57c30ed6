"""Where a training step's GPU time goes, from a torch profiler Chrome trace of a few steps.

    python scripts/benchmark.py --equal-work --cuda-graphs --model llama-3.1-8b-instruct --profile DIR
    python scripts/trace_summary.py DIR/llama-3.1-8b-instruct-lora-qv.json [--steps 3] [--json]

Per step: kernel time by category (GEMMs, attention, the norm/RoPE/activation kernels, the loss, the optimizer,
other element-wise work, copies, communication) and by kernel name; over the trace: the span from the first to the
last GPU event, the time some kernel, copy or memset ran ("busy"), the rest ("idle"), and the largest gaps. The step
profiles of docs/PERFORMANCE.md come from this code.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys

CATEGORIES = (
    # (category, pattern over the kernel name, lower case); the first match wins
    ("communication", r"nccl|allreduce|all_reduce|allgather|reduce_scatter"),
    ("attention", r"flash|fmha|attention|_attn|sdpa|flex"),
    ("loss", r"cross_entropy|nll_loss|log_softmax|logsumexp"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("GEMMs", r"gemm|nvjet|xmma|cutlass|cublas|matmul|_mm_|scaled_mm|splitk|sm90_|sm80_|wgmma"),
    ("norm, RoPE, activation", r"rms|rsqrt|norm|rope|rotate|rotary|swiglu|geglu|silu|gelu"),
    ("copies", r"memcpy|memset|copy|cat_|transpose|contiguous"),
)
OTHER = "other element-wise"


def kernel_category(name: str) -> str:
    """The category of a kernel, by its (demangled) name."""
    lowered = name.lower()
    for category, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return category
    return OTHER


def gpu_events(trace: dict) -> list[dict]:
    """Kernels, copies and memsets of a Chrome trace, by start time."""
    events = [e for e in trace["traceEvents"]
              if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(events, key=lambda e: e["ts"])


def busy_and_gaps(events: list[dict]) -> tuple[float, float, list[tuple[float, float]]]:
    """(span µs, busy µs, gaps as (µs, start µs)): busy is the union of the events' intervals."""
    if not events:
        return 0.0, 0.0, []
    start = events[0]["ts"]
    busy, gaps = 0.0, []
    run_start, run_end = events[0]["ts"], events[0]["ts"] + events[0]["dur"]
    for e in events[1:]:
        if e["ts"] > run_end:
            busy += run_end - run_start
            gaps.append((e["ts"] - run_end, run_end))
            run_start, run_end = e["ts"], e["ts"] + e["dur"]
        else:
            run_end = max(run_end, e["ts"] + e["dur"])
    busy += run_end - run_start
    return run_end - start, busy, sorted(gaps, reverse=True)


def summarize(trace: dict, steps: int) -> dict:
    """Per-step milliseconds by category and by kernel name, and the trace's busy/idle split."""
    events = gpu_events(trace)
    by_name: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    by_category: dict[str, float] = collections.defaultdict(float)
    for e in events:
        name = re.sub(r"<.*", "", e["name"])[:100]
        by_name[name][0] += 1
        by_name[name][1] += e["dur"]
        by_category[kernel_category(e["name"]) if e["cat"] == "kernel" else "copies"] += e["dur"]
    span, busy, gaps = busy_and_gaps(events)
    kernels_ms = sum(by_category.values()) / steps / 1e3
    return dict(
        steps=steps, kernels_ms_per_step=round(kernels_ms, 3),
        categories={c: dict(ms=round(us / steps / 1e3, 3), share=round(us / steps / 1e3 / kernels_ms, 3))
                    for c, us in sorted(by_category.items(), key=lambda kv: -kv[1])},
        kernels=[dict(name=n, ms=round(us / steps / 1e3, 3), calls=count // steps)
                 for n, (count, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:45]],
        span_ms=round(span / 1e3, 2), busy_ms=round(busy / 1e3, 2), idle_ms=round((span - busy) / 1e3, 2),
        largest_gaps_us=[round(g) for g, _ in gaps[:10]],
        gaps_over_20us_ms=round(sum(g for g, _ in gaps if g > 20) / 1e3, 2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", help="a Chrome trace (benchmark.py --profile DIR writes DIR/<model>-<mode>.json)")
    parser.add_argument("steps", nargs="?", type=int, default=3, help="steps in the trace (default 3)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = parser.parse_args(argv)
    with open(args.trace) as handle:
        summary = summarize(json.load(handle), args.steps)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"kernels per step {summary['kernels_ms_per_step']:.2f} ms")
    for category, part in summary["categories"].items():
        print(f"  {part['ms']:8.3f} ms {part['share']:6.1%}  {category}")
    for kernel in summary["kernels"]:
        print(f"{kernel['ms']:8.3f} ms {kernel['calls']:6d}x  {kernel['name']}")
    print(f"span {summary['span_ms']:.2f} ms, busy {summary['busy_ms']:.2f} ms, idle {summary['idle_ms']:.2f} ms "
          f"({args.steps} steps, with the gaps between steps)")
    print("largest gaps (µs):", summary["largest_gaps_us"], " gaps over 20 µs in all:",
          summary["gaps_over_20us_ms"], "ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

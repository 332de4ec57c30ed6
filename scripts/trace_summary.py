"""Kernel time per kernel name and GPU idle time in a torch profiler Chrome trace of a few training steps.

    python scripts/benchmark.py --packed --cuda-graphs --model llama-3.2-1b-instruct --profile DIR
    python scripts/trace_summary.py DIR/llama-3.2-1b-instruct-lora-qv.json [STEPS, default 3]

Per step: kernel time by name; over the trace: the span from the first to the last GPU event, the time some kernel,
copy or memset ran ("busy"), the rest ("idle"), and the largest gaps. The idle and per-kernel numbers of
docs/PERFORMANCE.md's step profiles come from this code.
"""
import json, sys, re, collections
trace = json.load(open(sys.argv[1]))
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
ev = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
ev.sort(key=lambda e: e["ts"])
groups = collections.defaultdict(lambda: [0, 0.0])
for e in ev:
    n = e["name"]
    n = re.sub(r"<.*", "", n)[:100]
    groups[n][0] += 1
    groups[n][1] += e["dur"]
total = sum(g[1] for g in groups.values())
print(f"kernels total per step {total / steps / 1e3:.2f} ms over {len(ev)} events")
for n, (c, d) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:45]:
    print(f"{d / steps / 1e3:8.3f} ms {c // steps:6d}x  {n}")
# busy union and gaps
busy, end0, gaps = 0.0, None, []
start = ev[0]["ts"]
cur_s, cur_e = ev[0]["ts"], ev[0]["ts"] + ev[0]["dur"]
for e in ev[1:]:
    if e["ts"] > cur_e:
        busy += cur_e - cur_s
        gaps.append((e["ts"] - cur_e, cur_e))
        cur_s, cur_e = e["ts"], e["ts"] + e["dur"]
    else:
        cur_e = max(cur_e, e["ts"] + e["dur"])
busy += cur_e - cur_s
span = cur_e - start
print(f"span {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms, idle {(span - busy) / 1e3:.2f} ms (3 steps incl. between-step gaps)")
gaps.sort(reverse=True)
print("largest gaps (us, at offset ms):", [(round(g), round((t - start) / 1e3, 2)) for g, t in gaps[:25]])
print("gaps >20us total ms:", round(sum(g for g, _ in gaps if g > 20) / 1e3, 2), "count", sum(1 for g, _ in gaps if g > 20))

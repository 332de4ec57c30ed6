"""Interconnect check: bandwidth of the collectives tensor and sequence parallelism use, between this host's GPUs.

    torchrun --nproc-per-node 2 scripts/comm_check.py [--mib 32]

Times NCCL all-gather, reduce-scatter and all-reduce of one bf16 activation-sized buffer (``--mib``, default 32:
4096 tokens × 4096 hidden, what an 8B layer under TP+SP exchanges), and prints the bus bandwidth in GB/s (NCCL
tests' convention). TP scaling depends on it: with ~8 such exchanges per layer and step, a 32-layer model moves
~8 GB per step, 25 ms at 300 GB/s (NVLink) but ~200 ms at 40 GB/s (PCIe).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def _timed(fn, iterations: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iterations):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / iterations


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, default=32.0, help="size of the full (gathered) buffer in MiB")
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args(argv)
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    world = dist.get_world_size()
    elements = int(args.mib * 2**20 / 2) // world * world
    full = torch.randn(elements, device="cuda", dtype=torch.bfloat16)
    shard = torch.empty(elements // world, device="cuda", dtype=torch.bfloat16)
    nbytes = full.numel() * full.element_size()
    results = {}
    for name, fn, factor in (
        ("all_gather", lambda: dist.all_gather_into_tensor(full, shard), (world - 1) / world),
        ("reduce_scatter", lambda: dist.reduce_scatter_tensor(shard, full), (world - 1) / world),
        ("all_reduce", lambda: dist.all_reduce(full), 2 * (world - 1) / world),
    ):
        seconds = _timed(fn, args.iterations)
        results[name] = dict(ms=round(seconds * 1e3, 3), bus_gb_s=round(nbytes * factor / seconds / 1e9, 1))
    if dist.get_rank() == 0:
        print(json.dumps(dict(gpus=world, mib=args.mib, card=torch.cuda.get_device_name(), **results)), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

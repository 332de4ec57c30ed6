"""Load test of the OpenAI-compatible server: N requests, C at a time, with the official ``openai`` client.

    PYTHONPATH=. python scripts/load_test_server.py                    # in-process server, embedded SmolLM2
    PYTHONPATH=. python scripts/load_test_server.py --concurrency 1    # the same requests one at a time
    PYTHONPATH=. python scripts/load_test_server.py --adapters 3       # requests spread over base + 3 adapters
    python scripts/load_test_server.py --url http://127.0.0.1:8000/v1 --model smollm2-135m-instruct

Without ``--url`` it starts a server on a free loopback port in this process (``model=--config``, adapters of
``--adapters`` random rank-8 q/v LoRAs written to a temporary directory) and stops it afterwards. Every request is
a greedy ``/v1/completions`` call with ``max_tokens``; one warm-up request runs before the clock starts. Prints
requests/s, generated tokens/s (from the responses' ``usage``), and latency p50/p95.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "Write one sentence about the ocean:",
    "Classify the sentiment of this review as positive or negative.\nReview: A slow, dull film.\nSentiment:",
    "List three colors:",
    "def fibonacci(n):",
    "Translate to French: good morning\nFrench:",
    "The three laws of motion are",
    "Q: What is 12 times 12?\nA:",
]


def _write_adapters(directory: Path, count: int, arch) -> list[str]:
    """``count`` random rank-8 LoRAs on q_proj/v_proj (HF PEFT files), named adapter0, adapter1, ..."""
    import torch
    from safetensors.torch import save_file

    from nemo_customizer.config import LoraConfig
    from nemo_customizer.peft.export import peft_adapter_config

    head_dim = arch.head_dim or arch.hidden_size // arch.num_attention_heads
    widths = {"q_proj": arch.num_attention_heads * head_dim, "v_proj": arch.num_key_value_heads * head_dim}
    names = []
    for k in range(count):
        generator = torch.Generator().manual_seed(k)
        weights = {}
        for layer in range(arch.num_hidden_layers):
            for projection, width in widths.items():
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{projection}"
                weights[f"{prefix}.lora_A.weight"] = torch.randn(8, arch.hidden_size, generator=generator) * 0.01
                weights[f"{prefix}.lora_B.weight"] = torch.randn(width, 8, generator=generator) * 0.01
        target = directory / f"adapter{k}"
        target.mkdir(parents=True)
        save_file(weights, str(target / "adapter_model.safetensors"))
        config = peft_adapter_config(LoraConfig(adapter_dim=8, alpha=16, target_modules=list(widths)), "base",
                                     list(widths))
        (target / "adapter_config.json").write_text(json.dumps(config))
        names.append(target.name)
    return names


def _start_server(args, adapters_dir: str | None):
    """(base URL, served model names, stop function) of an in-process server."""
    import uvicorn

    from nemo_customizer.config import compose_config
    from nemo_customizer.distributed.parallel import free_port
    from nemo_customizer.serving.app import create_app
    from nemo_customizer.serving.service import build_service

    overrides = [f"model={args.config}", f"serving.max_batch_size={args.max_batch_size}", "serving.log_level=warning"]
    if adapters_dir:
        overrides += [f"serving.adapters_dir={adapters_dir}", "serving.preload_adapters=true"]
    service = build_service(compose_config(overrides))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join()
        service.close()

    return f"http://127.0.0.1:{port}/v1", service.registry.model_ids(), stop


async def _run(url: str, models: list[str], args) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key=args.api_key or "none", max_retries=0, timeout=3600)
    gate = asyncio.Semaphore(args.concurrency)
    latencies, tokens = [], []

    async def one(i: int) -> None:
        async with gate:
            started = time.perf_counter()
            response = await client.completions.create(model=models[i % len(models)], prompt=PROMPTS[i % len(PROMPTS)],
                                                       max_tokens=args.max_tokens, temperature=0)
            latencies.append(time.perf_counter() - started)
            tokens.append(response.usage.completion_tokens)

    await client.completions.create(model=models[0], prompt=PROMPTS[0], max_tokens=4, temperature=0)  # warm-up
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.requests)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {"requests": args.requests, "concurrency": args.concurrency, "models": len(models), "wall_s": wall,
            "requests_per_s": args.requests / wall, "completion_tokens": sum(tokens),
            "tokens_per_s": sum(tokens) / wall, "latency_p50_s": statistics.median(latencies),
            "latency_p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server's /v1 URL (default: start one in this process)")
    parser.add_argument("--model", action="append", help="model name(s) to request (with --url; repeatable)")
    parser.add_argument("--api-key", help="the server's API key (with --url)")
    parser.add_argument("--config", default="smollm2-135m-instruct", help="model config of the in-process server")
    parser.add_argument("--adapters", type=int, default=0, help="random adapters to serve and spread requests over")
    parser.add_argument("--max-batch-size", type=int, default=8, help="serving.max_batch_size of the server")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    stop = None
    with tempfile.TemporaryDirectory() as scratch:
        if args.url:
            url, models = args.url, args.model or []
            if not models:
                parser.error("--url needs --model")
        else:
            adapters_dir = None
            if args.adapters:
                from nemo_customizer.config import compose_config

                adapters_dir = scratch
                arch = compose_config([f"model={args.config}"]).model.architecture
                _write_adapters(Path(scratch), args.adapters, arch)
            url, models, stop = _start_server(args, adapters_dir)
        try:
            result = asyncio.run(_run(url, models, args))
        finally:
            if stop is not None:
                stop()
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{result['requests']} requests ({args.max_tokens} max tokens, greedy), {result['concurrency']} at a time, "
          f"over {result['models']} model name(s): {result['wall_s']:.1f} s")
    print(f"requests/s {result['requests_per_s']:.2f}   generated tokens/s {result['tokens_per_s']:.1f} "
          f"({result['completion_tokens']} tokens)   latency p50 {result['latency_p50_s']:.2f} s, "
          f"p95 {result['latency_p95_s']:.2f} s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""OpenAI-compatible inference server: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, one base model
and many LoRA adapters chosen by model name, continuous batching. Needs the ``[serve]`` extra (FastAPI, uvicorn).

    service.py    what is served: generator + adapters + scheduler + limits (``build_service``)
    adapters.py   model names → adapters; discovery in adapters_dir, loading on first use, runtime load/unload
    scheduler.py  the model's thread: queued rows → continuous batch, wake-ups for the request handlers
    protocol.py   OpenAI request schemas (pydantic) and response / chunk bodies
    errors.py     OpenAI-shaped errors
    app.py        FastAPI routes, streaming (SSE), API key, request size limit, error handlers
    server.py     ``serve(cfg)``: run it with uvicorn
"""

from nemo_customizer.serving.server import serve

__all__ = ["serve"]

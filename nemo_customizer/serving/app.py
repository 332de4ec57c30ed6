"""The FastAPI application: OpenAI routes, streaming, authentication, request limits and OpenAI-shaped errors.

Handlers are thin: validate the request, resolve the model name to an adapter (``adapters``), tokenize, queue the
rows with the scheduler, then answer once they finish or stream their text as it settles (server-sent events in
OpenAI's chunk format, ending with ``data: [DONE]``). Every failure a client can cause is a 4xx error in OpenAI's
shape; an unexpected one is a 500 whose details go to the server log only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from nemo_customizer.inference.chat import ReasoningStream, chat_completion
from nemo_customizer.inference.generator import Row
from nemo_customizer.serving import protocol as p
from nemo_customizer.serving.errors import APIError, bad_request, error_body
from nemo_customizer.serving.scheduler import Job
from nemo_customizer.serving.service import Service

log = logging.getLogger("nemo_customizer.serving")


def create_app(service: Service) -> FastAPI:
    """The ASGI app serving ``service``; its lifespan starts and stops the scheduler thread."""

    @asynccontextmanager
    async def lifespan(_app):
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="nemo_customizer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=service.api_key, max_bytes=service.settings.max_request_bytes)
    _add_error_handlers(app)
    app.include_router(_routes(service))

    @app.get("/health")
    async def health() -> Dict[str, str]:
        return {"status": "ok"}

    return app


class Guard:
    """ASGI middleware for ``/v1``: the API key first (before reading a body), then the body size limit."""

    def __init__(self, app, *, api_key: Optional[str], max_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and not self._authorized(headers.get(b"authorization", b"")):
            return await _send_error(send, APIError(
                401, "Incorrect or missing API key: send it as the header 'Authorization: Bearer KEY'.",
                code="invalid_api_key"))
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_error(send, self._too_large())
        body, more = bytearray(), True
        while more:  # read it all here, so an oversized chunked body is refused too
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _send_error(send, self._too_large())
        await self.app(scope, _replay([{"type": "http.request", "body": bytes(body), "more_body": False}], receive),
                       send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than this server's limit of {self.max_bytes} bytes "
                             "(serving.max_request_bytes).", code="request_too_large")


def _replay(messages: List[dict], receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()  # later: disconnect notices while streaming

    return replayed


async def _send_error(send, error: APIError) -> None:
    payload = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, exc: RequestValidationError):
        problems = []
        for error in exc.errors()[:3]:
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
            problems.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
        first = exc.errors()[0] if exc.errors() else {}
        param = next((str(part) for part in first.get("loc", ())[1:2]), None)  # ("body", "temperature", ...)
        if first.get("type") == "json_invalid":
            message = f"The request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})."
            param = None
        else:
            message = "Invalid request: " + "; ".join(problems) + "."
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), type=kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(_request, exc: Exception):
        log.exception("request failed")
        return JSONResponse(error_body("The server had an error while processing the request; see its log.",
                                       type="server_error"), status_code=500)


def _routes(service: Service) -> APIRouter:
    router = APIRouter(prefix="/v1")
    generator = service.generator

    @router.get("/models")
    async def list_models() -> Dict[str, Any]:
        ids = await run_in_threadpool(service.registry.model_ids)
        return {"object": "list", "data": [_card(service, model_id) for model_id in ids]}

    @router.get("/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> Dict[str, Any]:
        ids = await run_in_threadpool(service.registry.model_ids)
        if model_id not in ids:
            raise APIError(404, f"The model {model_id!r} does not exist on this server.", param="model",
                           code="model_not_found")
        return _card(service, model_id)

    @router.post("/completions")
    async def completions(body: p.CompletionRequest):
        body.check_supported()
        adapter = await run_in_threadpool(service.registry.resolve, body.model)
        max_tokens = service.check_max_tokens(16 if body.max_tokens is None else body.max_tokens)
        prompts = body.prompts()
        service.check_choices(len(prompts) * body.n)
        encoded = [await run_in_threadpool(service.encode, prompt) for prompt in prompts]
        rows = _rows(service, encoded, body, max_tokens, adapter)
        job = _submit(service, rows)
        request_id, created = p.new_id("cmpl"), p.now()
        prompt_tokens = sum(len(ids) for ids in encoded)
        if body.stream:
            return _stream(job, _completion_events(job, body, request_id, created, prompt_tokens))
        await _finished(job)
        results = [row.completion() for row in rows]
        choices = [p.completion_choice(i, result.text, result.finish_reason) for i, result in enumerate(results)]
        return p.completion_body(request_id, created, body.model, choices,
                                 p.usage(prompt_tokens, sum(result.completion_tokens for result in results)))

    @router.post("/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest):
        body.check_supported()
        adapter = await run_in_threadpool(service.registry.resolve, body.model)
        requested = body.requested_max_tokens()
        max_tokens = service.check_max_tokens(service.settings.max_tokens if requested is None else requested)
        service.check_choices(body.n)
        prompt_ids, template = await run_in_threadpool(service.render_chat, body.template_messages(), body.tools)
        tool_syntax = template.tool_syntax if body.tools and body.tool_choice != "none" else None
        rows = _rows(service, [prompt_ids], body, max_tokens, adapter,
                     eos_ids=generator.eos_ids | template.end_of_turn_ids)
        job = _submit(service, rows)
        request_id, created = p.new_id("chatcmpl"), p.now()
        if body.stream:
            return _stream(job, _chat_events(job, body, request_id, created, len(prompt_ids), tool_syntax,
                                             template.reasoning))
        await _finished(job)
        replies = [chat_completion(row.completion(), tool_syntax=tool_syntax, reasoning=template.reasoning)
                   for row in rows]
        choices = [p.chat_choice(i, reply.message, reply.finish_reason) for i, reply in enumerate(replies)]
        return p.chat_body(request_id, created, body.model, choices,
                           p.usage(len(prompt_ids), sum(reply.completion_tokens for reply in replies)))

    @router.post("/load_lora_adapter")
    async def load_adapter(body: p.LoadAdapterRequest) -> Dict[str, Any]:
        service.check_runtime_adapters()
        info = await run_in_threadpool(service.registry.load, body.lora_name, body.lora_path)
        return {"object": "adapter", "name": info.name, "model": f"{service.registry.base_name}@{info.name}",
                "rank": info.rank, "alpha": info.alpha, "target_modules": info.target_modules}

    @router.post("/unload_lora_adapter")
    async def unload_adapter(body: p.UnloadAdapterRequest) -> Dict[str, Any]:
        service.check_runtime_adapters()
        await run_in_threadpool(service.unload_adapter, body.lora_name)
        return {"object": "adapter", "name": body.lora_name, "deleted": True}

    return router


def _card(service: Service, model_id: str) -> Dict[str, Any]:
    base = service.registry.base_name
    return p.model_card(model_id, created=service.created, root=base, parent=None if model_id == base else base)


def _rows(service: Service, encoded: Sequence[List[int]], body, max_tokens: int, adapter: Optional[str],
          eos_ids=None) -> List[Row]:
    """One row per prompt and choice, in OpenAI's choice order (prompt-major). Choice ``k`` samples with
    ``seed + k``, so ``n`` seeded choices differ from each other and repeat across identical requests. Seeds are
    taken modulo 2**64, the range torch seeds cover (a negative seed is its two's complement, as in torch)."""
    stops = body.stops()
    rows = []
    for ids in encoded:
        for k in range(body.n):
            seed = None if body.seed is None else (body.seed + k) % 2**64
            try:
                rows.append(service.generator.new_row(ids, max_tokens=max_tokens, temperature=body.temperature,
                                                      top_p=body.top_p, stop=stops, seed=seed, eos_ids=eos_ids,
                                                      adapter=adapter))
            except ValueError as exc:  # the prompt leaves no room in the context (or the adapter was just unloaded)
                too_long = len(ids) >= service.generator.max_context
                raise bad_request(str(exc), param="messages" if eos_ids is not None else "prompt",
                                  code="context_length_exceeded" if too_long else None) from exc
    return rows


def _submit(service: Service, rows: List[Row]) -> Job:
    job = Job(rows, asyncio.get_running_loop())
    try:
        service.scheduler.submit(job)
    except RuntimeError as exc:
        raise APIError(503, str(exc), type="server_error") from exc
    return job


async def _finished(job: Job) -> None:
    try:
        await job.finished()
    except asyncio.CancelledError:  # the client went away: free the batch rows
        job.cancel()
        raise
    if job.error is not None:
        raise _job_error(job)


def _job_error(job: Job) -> APIError:
    return APIError(500, f"Generation failed: {job.error}", type="server_error")


def _stream(job: Job, events: AsyncIterator[Dict[str, Any]]) -> StreamingResponse:
    async def sse() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects mid-stream
            if not job.done:
                job.cancel()

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _text_deltas(job: Job) -> AsyncIterator[List[tuple]]:
    """Per wake-up, ``[(choice index, new settled text, finish reason or None, row)]`` for the rows that moved;
    every row ends with one item that has its finish reason."""
    sent = [""] * len(job.rows)
    finished = [False] * len(job.rows)
    while True:
        if job.error is not None:
            raise _job_error(job)
        moved = []
        for i, row in enumerate(job.rows):
            if finished[i]:
                continue
            done = row.done  # read first: if it turns true meanwhile, the next round sends the rest
            text = row.visible_text()
            delta = text[len(sent[i]):] if text.startswith(sent[i]) else ""
            if delta or done:
                sent[i] += delta
                finished[i] = done
                moved.append((i, delta, row.completion().finish_reason if done else None, row))
        if moved:
            yield moved
        if all(finished):
            return
        await job.changed()


async def _completion_events(job: Job, body: p.CompletionRequest, request_id: str, created: int,
                             prompt_tokens: int) -> AsyncIterator[Dict[str, Any]]:
    try:
        async for moved in _text_deltas(job):
            for i, delta, finish, _ in moved:
                yield p.completion_body(request_id, created, body.model, [p.completion_choice(i, delta, finish)],
                                        None, chunk=True)
    except APIError as exc:
        yield exc.body()
        return
    if body.include_usage:
        completion_tokens = sum(len(row.generated) for row in job.rows)
        yield p.completion_body(request_id, created, body.model, [], p.usage(prompt_tokens, completion_tokens),
                                chunk=True)


async def _chat_events(job: Job, body: p.ChatCompletionRequest, request_id: str, created: int, prompt_tokens: int,
                       tool_syntax: Optional[str], reasoning: bool) -> AsyncIterator[Dict[str, Any]]:
    """Chat chunks: the role first, then content deltas (and ``reasoning_content`` deltas while a ``<think>`` block
    the template teaches is open). When tool calls may be parsed, a choice's text is held until it finishes (a call
    cannot be told from content before its end) and then sent as reasoning, content and/or whole ``tool_calls``."""

    def chunk(choice: Dict[str, Any]) -> Dict[str, Any]:
        return p.chat_body(request_id, created, body.model, [choice], None, chunk=True)

    splitters = [ReasoningStream() for _ in job.rows]
    for i in range(len(job.rows)):
        yield chunk(p.chat_delta(i, {"role": "assistant", "content": ""}))
    try:
        async for moved in _text_deltas(job):
            for i, delta, finish, row in moved:
                if tool_syntax is None:
                    fields = splitters[i].push(delta, final=finish is not None) if reasoning else {"content": delta}
                    for key, piece in fields.items():
                        if piece:
                            yield chunk(p.chat_delta(i, {key: piece}))
                    if finish is not None:
                        yield chunk(p.chat_delta(i, {}, finish))
                    continue
                if finish is None:
                    continue
                reply = chat_completion(row.completion(), tool_syntax=tool_syntax, reasoning=reasoning)
                for key in ("reasoning_content", "content"):
                    if reply.message.get(key):
                        yield chunk(p.chat_delta(i, {key: reply.message[key]}))
                if reply.message.get("tool_calls"):
                    yield chunk(p.chat_delta(i, {"tool_calls": p.tool_call_deltas(reply.message["tool_calls"])}))
                yield chunk(p.chat_delta(i, {}, reply.finish_reason))
    except APIError as exc:
        yield exc.body()
        return
    if body.include_usage:
        completion_tokens = sum(len(row.generated) for row in job.rows)
        yield p.chat_body(request_id, created, body.model, [], p.usage(prompt_tokens, completion_tokens), chunk=True)


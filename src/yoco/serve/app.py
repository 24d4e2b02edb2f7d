"""``yoco serve``'s HTTP side: OpenAI's completions and chat completions APIs over the scheduler.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (tokenizers with a chat template),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus). Streaming answers are server-sent
events in OpenAI's chunk format ending with ``data: [DONE]``. Beyond OpenAI's fields a request may
give ``top_k`` and ``ignore_eos`` (vLLM's names), and every choice carries its ``token_ids``.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a request
that cannot run (too long, never fits the budget, malformed JSON, an option yoco does not implement),
422 for a field of the wrong type or range (the message names it), 404 for another model's name, 503
with ``Retry-After`` when the waiting queue is full. A request's failure never touches the others.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine import SamplingParams
from ..errors import YocoError
from .scheduler import Event, Overloaded, Request, RequestError, Scheduler

RETRY_AFTER_S = 1


class SamplingFields(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="allow")  # other OpenAI fields: refused below if they ask for more

    model: str | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=1)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False
    n: Annotated[int, Field(ge=1)] = 1
    echo: bool = False
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    user: str | None = None

    def refuse_unimplemented(self) -> None:
        """An option whose effect yoco does not implement is an error, not silently ignored."""
        asked = {"n": self.n != 1, "echo": self.echo, "logprobs": self.logprobs not in (None, False, 0),
                 "presence_penalty": self.presence_penalty != 0, "frequency_penalty": self.frequency_penalty != 0,
                 "logit_bias": bool(self.logit_bias), "best_of": self.best_of not in (None, 1)}
        for name, on in asked.items():
            if on:
                raise FieldError(name, f"{name} is not supported by yoco serve (one choice per request, no "
                                       "logprobs or penalties)")
        if self.model_extra:
            name = sorted(self.model_extra)[0]
            raise FieldError(name, f"unknown field {name!r}")

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise FieldError("stop", "stop takes up to 4 non-empty strings")
        return tuple(stops)

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, None if self.top_p == 1 else self.top_p, self.seed)


class CompletionRequest(SamplingFields):
    prompt: str | list[int]
    max_tokens: Annotated[int, Field(ge=1)] = 16
    suffix: str | None = None


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class FieldError(YocoError, ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class ModelNotFound(YocoError, LookupError):
    """A request names another model than the one served."""

    field = "model"


class ServerStartError(YocoError, RuntimeError):
    """The HTTP server did not start."""


# The answer to each error a request can raise: HTTP status, OpenAI's error type, headers.
ERROR_ANSWERS: dict[type, tuple[int, str, dict | None]] = {
    FieldError: (400, "invalid_request_error", None),
    RequestError: (400, "invalid_request_error", None),
    ModelNotFound: (404, "not_found_error", None),
    Overloaded: (503, "server_overloaded", {"Retry-After": str(RETRY_AFTER_S)}),
}


def error_response(status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


def create_app(scheduler: Scheduler, model_name: str, *, chat_template: str | None = None,
               special_tokens: dict[str, str] | None = None, scheduler_thread: bool = True) -> FastAPI:
    """The FastAPI app serving ``scheduler``'s model as ``model_name``. ``scheduler_thread``: the
    scheduler runs in a thread of its own that starts and stops with the app; otherwise the caller runs
    it (``serve_forever`` runs it on the main thread)."""

    async def lifespan(app):
        if scheduler_thread:
            scheduler.start()
        yield
        if scheduler_thread:
            scheduler.stop()

    app = FastAPI(title="yoco serve", lifespan=lifespan)
    tokenizer = scheduler.tokenizer
    created = int(time.time())
    eos = getattr(tokenizer, "eos_id", None)
    render_chat = compile_chat_template(chat_template) if chat_template else None

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, f"malformed JSON body: {errors[0].get('msg')}")
        first = errors[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(422, f"{where or 'body'}: {first.get('msg')}", param=where or None)

    async def request_failed(request, exc: YocoError):
        status, kind, headers = next(ERROR_ANSWERS[c] for c in type(exc).__mro__ if c in ERROR_ANSWERS)
        return error_response(status, str(exc), param=getattr(exc, "field", None), kind=kind, headers=headers)

    for error in ERROR_ANSWERS:
        app.add_exception_handler(error, request_failed)

    def check_model(name: str | None) -> None:
        if name not in (None, model_name):
            raise ModelNotFound(f"model {name!r} is not served here (this server serves {model_name!r})")

    def submit(body: SamplingFields, prompt: list[int], max_tokens: int) -> tuple[Any, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request = Request(prompt, max_tokens, body.sampling(), body.stop_strings(),
                          frozenset() if body.ignore_eos or eos is None else frozenset({eos}),
                          emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        return scheduler.submit(request), events

    async def run(http: HTTPRequest, body: SamplingFields, prompt: list[int], max_tokens: int, chat: bool):
        check_model(body.model)
        body.refuse_unimplemented()
        sequence, events = submit(body, prompt, max_tokens)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        usage = lambda n: {"prompt_tokens": len(prompt), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(prompt) + n}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream_events(scheduler, sequence, events, ident, chat, include_usage, usage,
                                                   model_name, created),
                                     media_type="text/event-stream")
        text, tokens, finish = [], [], None
        try:
            while finish is None:
                try:
                    event: Event = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        scheduler.cancel(sequence)
                        return None
                    continue
                text.append(event.text)
                if event.token is not None:
                    tokens.append(event.token)
                finish = event.finish_reason
        except asyncio.CancelledError:
            scheduler.cancel(sequence)
            raise
        if finish == "error":
            return error_response(500, event.error or "the sequence failed", kind="server_error")
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None, "token_ids": tokens}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": [choice], "usage": usage(len(tokens))}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        if body.suffix:
            raise FieldError("suffix", "suffix is not supported by yoco serve")
        prompt = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        return await run(http, body, prompt, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        if render_chat is None:
            raise RequestError(f"{model_name}'s tokenizer has no chat template (tokenizer_config.json "
                               "'chat_template'): use /v1/completions")
        text = render_chat(messages=[m.model_dump() for m in body.messages], add_generation_prompt=True,
                           **(special_tokens or {}))
        prompt = tokenizer.encode(text)
        limit = scheduler.model.config.max_seq_len
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, min(256, limit - len(prompt)))
        return await run(http, body, prompt, max_tokens, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "yoco", "max_model_len": scheduler.model.config.max_seq_len}]}

    @app.get("/health")
    async def health():
        m = scheduler.metrics
        return {"status": "ok", "running": m.running, "waiting": m.waiting, "cache_bytes": m.cache_bytes,
                "kv_budget_bytes": scheduler.kv_budget}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(scheduler.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


async def stream_events(scheduler: Scheduler, sequence, events: asyncio.Queue, ident: str, chat: bool,
                        include_usage: bool, usage, model_name: str, created: int):
    """The server-sent events of one streaming request; a client that goes away cancels this
    generator, which cancels its sequence."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list, **extra) -> str:
        body = {"id": ident, "object": kind, "created": created, "model": model_name, "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    n = 0
    finished = False
    try:
        if chat:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        while True:
            event: Event = await events.get()
            if event.finish_reason == "error":
                finished = True
                yield f"data: {json.dumps({'error': {'message': event.error, 'type': 'server_error'}})}\n\n"
                break
            if event.token is not None:
                n += 1
            piece = {"delta": {"content": event.text}} if chat else {"text": event.text, "logprobs": None}
            yield chunk([{"index": 0, **piece, "finish_reason": event.finish_reason,
                          "token_ids": [] if event.token is None else [event.token]}])
            if event.finish_reason is not None:
                finished = True
                break
        if include_usage:
            yield chunk([], usage=usage(n))
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away (the generator was closed or cancelled mid-stream)
            scheduler.cancel(sequence)


def serve_forever(app: FastAPI, scheduler: Scheduler, host: str, port: int, banner: str = "") -> None:
    """Serve ``app`` over HTTP on host:port from a thread while ``scheduler`` runs on this thread (the
    main one: see ``yoco.serve.scheduler`` for why), until SIGINT or SIGTERM; ``banner`` goes to stderr
    once the server listens. Raises ``ServerStartError`` when it cannot start (e.g. the port is taken)."""
    import signal
    import sys
    import socket
    import threading

    import uvicorn

    try:  # bound here, so that a taken port is one line of ours, not uvicorn's log and a dead thread
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as e:
        raise ServerStartError(f"cannot listen on {host}:{port}: {e.strerror or e} (is the port taken?)") from None
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    http = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="yoco-http", daemon=True)
    http.start()
    while not server.started:  # the app's startup is quick: a lifespan without work
        if not http.is_alive():
            listener.close()
            raise ServerStartError(f"the HTTP server on {host}:{port} did not start")
        time.sleep(0.01)
    if banner:
        print(banner, file=sys.stderr)
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        scheduler.run(until=lambda: stopping.is_set() or not http.is_alive())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.should_exit = True
        http.join(timeout=30)
        listener.close()


def compile_chat_template(template: str):
    """A chat template (Jinja, as in transformers' tokenizer_config.json), rendered in a sandbox."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    compiled = env.from_string(template)
    return lambda **values: compiled.render(**values)


__all__ = ["create_app", "compile_chat_template", "serve_forever"]

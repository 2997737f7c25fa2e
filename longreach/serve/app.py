"""The FastAPI application: OpenAI-compatible routes in vLLM's shapes, SSE streams, metrics.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info`` (the shapes lm-eval's remote
tokenizer reads), ``GET /health``, ``GET /version`` and ``GET /metrics`` (Prometheus).

Every error is ``{"error": {"message", "type", "param", "code"}}``: 400 for an invalid body
(never FastAPI's 422), 404 for an unknown model or route, 400 in vLLM's wording when the
prompt plus ``max_tokens`` exceeds what the method serves, 503 with ``Retry-After`` when the
bounded queue is full. An unexpected failure is logged with its traceback on the server and
answered with a one-line 500, never the traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

import longreach
from longreach.errors import LongreachError
from longreach.serve.engine import Cancelled, Choice, Delta, Engine, Params, TokenInfo
from longreach.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    context_length_error,
    error_body,
)
from longreach.serve.worker import QueueFull, Worker

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
_COUNTED = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is there


@dataclass
class ServeInfo:
    """What the server says about itself in /v1/models."""

    name: str  # the served model name clients pass as `model`
    source: str  # the alias or directory it was loaded from
    method: str  # canonical method spec
    trained_length: int | None


class _Metrics:
    def __init__(self, worker: Worker) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "longreach_requests", "Requests answered", ["endpoint", "status"], registry=r
        )
        self.rejected = Counter(
            "longreach_rejected_requests", "Requests refused: queue full", registry=r
        )
        self.cancelled = Counter(
            "longreach_cancelled_requests", "Generations stopped: client gone", registry=r
        )
        self.prompt_tokens = Counter(
            "longreach_prompt_tokens", "Prompt tokens prefilled", registry=r
        )
        self.generation_tokens = Counter(
            "longreach_generation_tokens", "Tokens generated", registry=r
        )
        self.prefill_seconds = Histogram(
            "longreach_prefill_seconds",
            "Prefill time per choice",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800),
            registry=r,
        )
        self.tokens_per_second = Gauge(
            "longreach_decode_tokens_per_second", "Decode speed of the last choice", registry=r
        )
        queue_depth = Gauge("longreach_queue_depth", "Requests waiting for the model", registry=r)
        queue_depth.set_function(lambda: worker.waiting)
        running = Gauge("longreach_running_requests", "Requests on the model now", registry=r)
        running.set_function(lambda: worker.running)

    def choice(self, choice: Choice, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens - choice.cached_tokens)
        self.generation_tokens.inc(len(choice.token_ids))
        self.prefill_seconds.observe(choice.prefill_s)
        if len(choice.token_ids) > 1 and choice.decode_s > 0:
            self.tokens_per_second.set((len(choice.token_ids) - 1) / choice.decode_s)


def create_app(engine: Engine, info: ServeInfo, max_queue: int = 8) -> FastAPI:
    """The application serving ``engine``; ``max_queue`` requests may wait behind the running one."""
    worker = Worker(max_queue)
    metrics = _Metrics(worker)
    app = FastAPI(title="longreach", version=longreach.__version__, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.worker = worker
    created = int(time.time())

    @app.middleware("http")
    async def _count(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response = await call_next(request)
        path = request.url.path
        if path in _COUNTED:
            metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    # ---- errors

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(LongreachError)
    async def _longreach_error(request: Request, exc: LongreachError) -> JSONResponse:
        return _error_response(ApiError(400, str(exc)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            message, loc = "The request body is not valid JSON.", []
        elif loc:
            message = f"{'.'.join(loc)}: {message}"
        return _error_response(ApiError(400, message, param=".".join(loc) or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(
            exc.status_code, "BadRequestError"
        )
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"There is no route {request.method} {request.url.path}."
        return _error_response(ApiError(exc.status_code, message, kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return _error_response(
            ApiError(500, f"internal error ({type(exc).__name__}): {exc}", "InternalServerError")
        )

    # ---- information

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": longreach.__version__}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": info.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "longreach",
                    "root": info.source,
                    "parent": None,
                    "max_model_len": engine.max_model_len,
                    "permission": [],
                    "longreach": {
                        "method": info.method,
                        "trained_length": info.trained_length,
                        "sessions": engine.sessions_enabled,
                    },
                }
            ],
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- tokenizer

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        _check_model(body.model, info)
        if body.messages is not None:
            text = engine_chat_text(engine, body.messages, body.add_generation_prompt)
            ids = engine.encode(text, add_special_tokens=False)
        else:
            ids = engine.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        reply: dict[str, Any] = {
            "count": len(ids),
            "max_model_len": engine.max_model_len,
            "tokens": ids,
        }
        if body.return_offsets and body.prompt is not None:
            reply["offsets"] = engine.offsets(body.prompt, body.add_special_tokens)
        if body.return_token_strs:
            reply["token_strs"] = [engine.token_text(i) for i in ids]
        return reply

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        _check_model(body.model, info)
        _check_ids(body.tokens, engine.vocab_size, "tokens")
        return {"prompt": engine.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        tok = engine.tokenizer
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": getattr(tok, "eos_token", None),
            "bos_token": getattr(tok, "bos_token", None),
            "pad_token": getattr(tok, "pad_token", None),
            "unk_token": getattr(tok, "unk_token", None),
            "chat_template": engine.chat_template,
            "model_max_length": engine.max_model_len,
            "vocab_size": engine.vocab_size,
        }

    # ---- generation

    async def run_job(request: Request, job: Callable[[threading.Event], Any]) -> Any:
        """Run ``job`` on the model worker; stop it if the client goes away first."""
        cancel = threading.Event()
        try:
            future = worker.submit(lambda: job(cancel))
        except QueueFull:
            metrics.rejected.inc()
            raise _queue_full() from None
        wrapped = asyncio.wrap_future(future)
        while True:
            done, _ = await asyncio.wait({wrapped}, timeout=_POLL_S)
            if done:
                return wrapped.result()
            if await request.is_disconnected():
                cancel.set()
                future.cancel()
                metrics.cancelled.inc()
                raise Cancelled

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _check_model(body.model, info)
        _check_session(body, engine, info)
        prompts = _completion_prompts(engine, body)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens must be at least 1 without echo", param="max_tokens")
        for ids, _ in prompts:
            _check_length(len(ids), max_tokens, engine.max_model_len)
        params = _params(body, max_tokens, body.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            events = _completion_events(engine, metrics, info.name, body, prompts, params, rid)
            return _stream(request, worker, metrics, events)

        def job(cancel: threading.Event) -> list[tuple[int, Choice]]:
            out = []
            for ids, _ in prompts:
                for _ in range(body.n):
                    choice = engine.generate(
                        ids, params, cancelled=cancel, session_id=body.session_id
                    )
                    metrics.choice(choice, len(ids))
                    out.append((len(ids), choice))
            return out

        try:
            results = await run_job(request, job)
        except Cancelled:
            return Response(status_code=499)
        choices = []
        for i, (_, choice) in enumerate(results):
            ids, text = prompts[i // body.n]
            choices.append(_completion_choice(engine, body, i, ids, text, choice))
        return {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": info.name,
            "choices": choices,
            "usage": _usage([len(ids) for ids, _ in prompts], [c for _, c in results]),
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        _check_model(body.model, info)
        _check_session(body, engine, info)
        text = engine_chat_text(engine, body.messages, body.add_generation_prompt)
        ids = engine.encode(text, add_special_tokens=False)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = max(engine.max_model_len - len(ids), 1)
        if max_tokens == 0:
            raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")
        _check_length(len(ids), max_tokens, engine.max_model_len)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = _params(body, max_tokens, top)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            events = _chat_events(engine, metrics, info.name, body, ids, params, rid)
            return _stream(request, worker, metrics, events)

        def job(cancel: threading.Event) -> list[Choice]:
            out = []
            for _ in range(body.n):
                choice = engine.generate(ids, params, cancelled=cancel, session_id=body.session_id)
                metrics.choice(choice, len(ids))
                out.append(choice)
            return out

        try:
            results = await run_job(request, job)
        except Cancelled:
            return Response(status_code=499)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": info.name,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": _chat_logprobs(c.tokens) if body.logprobs else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                for i, c in enumerate(results)
            ],
            "usage": _usage([len(ids)], results),
        }

    return app


# --------------------------------------------------------------------------- helpers


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _queue_full() -> ApiError:
    return ApiError(
        503,
        "The server is busy: its request queue is full. Retry after a moment.",
        "ServiceUnavailableError",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def _check_session(body: Any, engine: Engine, info: ServeInfo) -> None:
    if body.session_id is not None and not engine.sessions_enabled:
        raise ApiError(
            400,
            f"Sessions keep a bounded KV cache between requests, and {info.method} keeps an "
            "unbounded one: start the server with a cache-policy method (e.g. --method "
            "streaming) or drop session_id.",
            param="session_id",
        )


def _check_model(name: str | None, info: ServeInfo) -> None:
    if name is not None and name not in (info.name, info.source):
        raise ApiError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")


def _check_ids(ids: list[int], vocab: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(
            400, f"Token id {bad} is out of vocabulary (the vocabulary has {vocab}).", param=param
        )


def _check_length(n_input: int, n_output: int, max_model_len: int) -> None:
    if n_input + n_output > max_model_len:
        raise context_length_error(n_input, n_output, max_model_len)


def _params(body: Any, max_tokens: int, logprobs: int | None) -> Params:
    return Params(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=body.stop_list(),
        logprobs=logprobs,
    )


def engine_chat_text(engine: Engine, messages: list[Any], add_generation_prompt: bool) -> str:
    if not engine.chat_template:
        raise ApiError(
            400,
            "This model's tokenizer has no chat template: start the server with "
            "--chat-template FILE, or use /v1/completions.",
            param="messages",
        )
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        return engine.render_chat(plain, add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - a template that rejects these messages
        raise ApiError(
            400, f"The chat template failed on these messages: {exc}", param="messages"
        ) from None


def _completion_prompts(engine: Engine, body: CompletionRequest) -> list[tuple[list[int], str]]:
    """Each prompt as (token ids, text); texts of token prompts are their decoding."""
    prompt = body.prompt
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]  # type: ignore[list-item]
    else:
        items = list(prompt)  # type: ignore[arg-type]
    if not items:
        raise ApiError(400, "The prompt cannot be empty.", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            ids = engine.encode(item, add_special_tokens=body.add_special_tokens)
            text = item
        else:
            _check_ids(item, engine.vocab_size, "prompt")
            ids, text = list(item), engine.decode(list(item), skip_special_tokens=False)
        if not ids:
            raise ApiError(400, "The prompt cannot be empty.", param="prompt")
        out.append((ids, text))
    return out


def _completion_logprobs(
    tokens: list[TokenInfo], offset: int, want_top: bool
) -> dict[str, list[Any]]:
    text_offset, token_logprobs, strs, tops = [], [], [], []
    for t in tokens:
        text_offset.append(offset)
        offset += len(t.text)
        strs.append(t.text)
        token_logprobs.append(t.logprob)
        tops.append(None if t.top is None and t.logprob is None else dict(t.top or []))
    if want_top:
        # the chosen token always appears among the alternatives, as vLLM reports it
        for t, top in zip(tokens, tops, strict=True):
            if top is not None and t.logprob is not None:
                top.setdefault(t.text, t.logprob)
    return {
        "text_offset": text_offset,
        "token_logprobs": token_logprobs,
        "tokens": strs,
        "top_logprobs": tops,
    }


def _completion_choice(
    engine: Engine, body: CompletionRequest, index: int, ids: list[int], text: str, choice: Choice
) -> dict[str, Any]:
    out_text = choice.text
    logprobs = None
    if body.logprobs is not None:
        tokens = list(choice.tokens)
        if body.echo:
            tokens = engine.prompt_logprobs(ids, body.logprobs) + tokens
        logprobs = _completion_logprobs(tokens, 0, True)
    if body.echo:
        out_text = text + out_text
    out = {
        "index": index,
        "text": out_text,
        "logprobs": logprobs,
        "finish_reason": choice.finish_reason,
        "stop_reason": choice.stop_reason,
    }
    if body.return_token_ids:
        out["prompt_token_ids"] = ids
        out["token_ids"] = choice.token_ids
    return out


def _chat_logprobs(tokens: list[TokenInfo]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t.text,
                "logprob": t.logprob,
                "bytes": list(t.text.encode("utf-8")),
                "top_logprobs": [
                    {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}
                    for s, v in (t.top or [])
                ],
            }
            for t in tokens
        ]
    }


def _usage(prompt_counts: list[int], choices: list[Choice]) -> dict[str, Any]:
    """Usage as vLLM counts it: each prompt once (whatever ``n``), every choice's tokens."""
    completion = sum(len(c.token_ids) for c in choices)
    prompt = sum(prompt_counts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in choices)},
    }


# --------------------------------------------------------------------------- streaming

_DONE = object()


class _Events:
    """A producer on the model thread, a consumer in the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


EventSource = Callable[[Callable[[Any], None], threading.Event], None]


def _stream(
    request: Request, worker: Worker, metrics: _Metrics, source: EventSource
) -> StreamingResponse:
    """An SSE response; ``source(emit, cancel)`` runs on the model worker and emits dicts."""
    loop = asyncio.get_running_loop()
    events = _Events(loop)
    cancel = threading.Event()

    def job() -> None:
        try:
            source(events.put, cancel)
        except Cancelled:
            metrics.cancelled.inc()
        except ApiError as exc:
            events.put(exc.body())
        except LongreachError as exc:
            events.put(error_body(400, str(exc), "BadRequestError"))
        except Exception as exc:  # noqa: BLE001 - reported in the stream, logged here
            log.exception("unexpected error in a stream")
            events.put(
                error_body(
                    500, f"internal error ({type(exc).__name__}): {exc}", "InternalServerError"
                )
            )
        finally:
            events.put(_DONE)

    try:
        future = worker.submit(job)
    except QueueFull:
        metrics.rejected.inc()
        raise _queue_full() from None

    async def body() -> AsyncIterator[bytes]:
        finished = False
        try:
            while True:
                item = await events.queue.get()
                if item is _DONE:
                    finished = True
                    break
                yield f"data: {json.dumps(item, separators=(',', ':'))}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away: stop generating
                cancel.set()
                future.cancel()

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _completion_events(
    engine: Engine,
    metrics: _Metrics,
    model: str,
    body: CompletionRequest,
    prompts: list[tuple[list[int], str]],
    params: Params,
    rid: str,
) -> EventSource:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    created = int(time.time())

    def chunk(index: int, text: str, logprobs: Any, finish: str | None, stop: str | None) -> dict:
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                    "stop_reason": stop,
                }
            ],
        }

    def source(emit: Callable[[Any], None], cancel: threading.Event) -> None:
        results: list[Choice] = []
        for p, (ids, text) in enumerate(prompts):
            for k in range(body.n):
                index = p * body.n + k
                offset = [0]
                if body.echo:
                    lp = None
                    if body.logprobs is not None:
                        lp = _completion_logprobs(
                            engine.prompt_logprobs(ids, body.logprobs), 0, True
                        )
                        offset[0] = len(text)
                    emit(chunk(index, text, lp, None, None))

                def on_delta(d: Delta, index: int = index, offset: list[int] = offset) -> None:
                    lp = None
                    if body.logprobs is not None:
                        lp = _completion_logprobs(d.tokens, offset[0], True)
                        offset[0] += sum(len(t.text) for t in d.tokens)
                    emit(chunk(index, d.text, lp, d.finish_reason, d.stop_reason))

                choice = engine.generate(
                    ids, params, on_delta=on_delta, cancelled=cancel, session_id=body.session_id
                )
                metrics.choice(choice, len(ids))
                results.append(choice)
        if include_usage:
            emit(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage([len(ids) for ids, _ in prompts], results),
                }
            )

    return source


def _chat_events(
    engine: Engine,
    metrics: _Metrics,
    model: str,
    body: ChatRequest,
    ids: list[int],
    params: Params,
    rid: str,
) -> EventSource:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    created = int(time.time())

    def chunk(index: int, delta: dict, logprobs: Any, finish: str | None) -> dict:
        return {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [
                {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            ],
        }

    def source(emit: Callable[[Any], None], cancel: threading.Event) -> None:
        results: list[Choice] = []
        for index in range(body.n):
            emit(chunk(index, {"role": "assistant", "content": ""}, None, None))

            def on_delta(d: Delta, index: int = index) -> None:
                lp = _chat_logprobs(d.tokens) if body.logprobs else None
                emit(chunk(index, {"content": d.text} if d.text else {}, lp, d.finish_reason))

            choice = engine.generate(
                ids, params, on_delta=on_delta, cancelled=cancel, session_id=body.session_id
            )
            metrics.choice(choice, len(ids))
            results.append(choice)
        if include_usage:
            emit(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage([len(ids)], results),
                }
            )

    return source

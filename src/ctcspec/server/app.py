"""`ctcspec serve`: the OpenAI HTTP API (chat completions, completions, models) over one EngineService,
with server-sent-event streaming, Prometheus metrics and a chat page.

Anything a client sends that cannot be served is answered with OpenAI's error object and a 4xx — malformed JSON
and invalid fields 400, a missing or wrong API key 401, an unknown model or path 404, a full queue 429, a server
shutting down 503 — and never with a traceback. Every response, and the last chunk of every stream, carries the
request's speculation figures under "ctcspec" (drafter, beta, tokens/s, ...).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import socket
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

import jinja2
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ctcspec.errors import CtcspecError, one_line
from ctcspec.prompts import encode_chat
from ctcspec.server.schemas import ChatCompletionRequest, CompletionRequest, GenerationFields
from ctcspec.server.service import EngineService, Failed, Finished, Job, QueueFull, ShuttingDown, StepText

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An OpenAI error response: HTTP status, message, and the error object's type, param and code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"message": message, "type": type, "param": param, "code": code}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse({"error": error.body}, status_code=error.status)


def validation_error(exc: RequestValidationError) -> ApiError:
    """pydantic's most specific complaint about a request body, as OpenAI words a 400: the deepest, and of a union's
    branches the one whose type matched (a too-long list of stop strings, not "should be a string")."""
    first = max(exc.errors(), key=lambda error: (len(error.get("loc", ())),
                                                 not error["type"].endswith(("_type", "_parsing"))))
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON")
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return ApiError(400, "the request has no JSON body")
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    # a union's branch name (e.g. "str", "list[int]") is pydantic's bookkeeping, not the client's field
    param = ".".join(p for p in where if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool"))
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return ApiError(400, f"{param}: {message}" if param else message, param=param or None)


class Reply:
    """The response shapes of one request: OpenAI's completion object, its stream chunks and usage."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int):
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""),
                "created": self.created, "model": self.model}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def completion(self, text: str, done: Finished) -> dict:
        choice = {"index": 0, "finish_reason": done.finish_reason, "logprobs": None}
        choice |= {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {**self._head(False), "choices": [choice], "usage": self.usage(done.completion_tokens),
                "ctcspec": done.stats}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False, **extra) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(True), "choices": [choice], **extra}

    def usage_chunk(self, done: Finished) -> dict:
        return {**self._head(True), "choices": [], "usage": self.usage(done.completion_tokens), "ctcspec": done.stats}


class CountRequests:
    """ASGI middleware counting answered requests by endpoint and status (pure ASGI, so streams pass untouched)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        def count(status: int) -> None:
            route = scope.get("route")  # set by the router on a match: the label set stays bounded
            self.metrics.requests.labels(getattr(route, "path", "other"), str(status)).inc()

        async def counted(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            if not started:  # the outer error middleware answers 500
                count(500)
            raise


class JobStream(EventSourceResponse):
    """A job's server-sent events that cancel the job however the response ends: finished, the client gone (even
    before the first event), or the server stopping. Cancelling a finished job does nothing."""

    def __init__(self, job: Job, events, **kwargs):
        super().__init__(events, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def sse(payload: dict | str) -> bytes:
    return format_sse_event(data_str=payload if isinstance(payload, str) else json.dumps(payload))


def check_address(host: str, port: int) -> None:
    """A CtcspecError, before anything loads, when this machine cannot listen on host:port."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise CtcspecError(f"--host {host!r}: not an address this machine can listen on ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise CtcspecError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def run_server(app: FastAPI, host: str, port: int, drain_timeout: float) -> None:
    """Serve `app` until Ctrl-C or SIGTERM, then give open requests `drain_timeout` seconds to finish.

    uvicorn re-raises the signal that stopped it once it has shut down; after a clean drain that is the normal end
    of the command, so the signal is received by a handler that does nothing and the command returns."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=drain_timeout, log_level="info")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def page() -> str:
    """The chat page, shipped in the package (no build step, nothing fetched from elsewhere)."""
    return resources.files("ctcspec.server").joinpath("static/index.html").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Served:
    """What the routes serve: the engine's service, the model's name for clients, the API key (None: none)."""
    service: EngineService
    model_name: str
    api_key: str | None


def served(request: Request) -> Served:
    return request.app.state.served


def authorized(request: Request, authorization: str | None = Header(None)) -> None:
    """The /v1 routes' key check: `Authorization: Bearer <key>` when the server has a key."""
    key = served(request).api_key
    if key is None:
        return
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not secrets.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


def check_model(server: Served, name: str | None) -> None:
    if name is not None and name != server.model_name:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {server.model_name!r}",
                       param="model", code="model_not_found")


public = APIRouter()
api = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])


@public.get("/", response_class=HTMLResponse, include_in_schema=False)
async def chat_page():
    return page()


@public.get("/health")
async def health():
    return {"status": "ok"}


@public.get("/metrics")
async def prometheus(request: Request):
    return Response(generate_latest(served(request).service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@api.get("/models")
async def models(request: Request):
    server = served(request)
    return {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                        "created": int(server.service.started), "owned_by": "ctcspec"}]}


@api.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    server = served(request)
    check_model(server, body.model)
    try:
        prompt_ids = encode_chat(server.service.tokenizer, [m.as_template_message() for m in body.messages])
    except CtcspecError:
        raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages") from None
    except jinja2.TemplateError as exc:
        raise ApiError(400, f"the model's chat template refuses these messages: {one_line(exc)}",
                       param="messages") from None
    return await respond(request, body, prompt_ids, Reply(True, server.model_name, len(prompt_ids)))


@api.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    server = served(request)
    check_model(server, body.model)
    if isinstance(body.prompt, str):
        prompt_ids = list(server.service.tokenizer(body.prompt)["input_ids"])
    else:
        prompt_ids = body.prompt
        vocab = server.service.engine.vocab_size
        if not all(0 <= t < vocab for t in prompt_ids):
            raise ApiError(400, f"prompt: token ids must be in 0..{vocab - 1}", param="prompt")
    return await respond(request, body, prompt_ids, Reply(False, server.model_name, len(prompt_ids)))


async def respond(request: Request, body: GenerationFields, prompt_ids: list[int], reply: Reply):
    """Admit the request, then stream its answer, or wait for it (cancelling it if the client goes away)."""
    job = admit(served(request).service, body, prompt_ids, "messages" if reply.chat else "prompt")
    if body.stream:
        return JobStream(job, stream(job, reply, body.include_usage()), headers={"Cache-Control": "no-cache"})
    watcher = asyncio.create_task(cancel_when_gone(request, job))
    try:
        parts, done = [], None
        async for event in job.stream():
            if isinstance(event, Failed):
                raise ApiError(500, event.message, type="server_error")
            parts.append(event.text)
            done = event if isinstance(event, Finished) else None
        return reply.completion("".join(parts), done)
    finally:
        watcher.cancel()
        job.cancel()  # when the wait itself was cancelled (the server stopping): no answer for nobody


def admit(service: EngineService, body: GenerationFields, prompt_ids: list[int], prompt_param: str) -> Job:
    """The request as a queued job, or the ApiError saying why not (context, settings, queue, shutdown)."""
    room = service.room(prompt_ids)
    length = body.length()
    if room <= 0 or (length or 0) > room:
        asked = f"; {length} more tokens were asked for" if length else ""
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens and {service.context_note}{asked}, which "
                            "does not fit: shorten the prompt or max_tokens",
                       param="max_tokens" if room > 0 else prompt_param, code="context_length_exceeded")
    try:
        return service.submit(prompt_ids, length or room, body.sampling_settings(), body.seed, body.stop or ())
    except CtcspecError as exc:
        raise ApiError(400, str(exc)) from None
    except QueueFull:
        raise ApiError(429, f"the queue is full ({service.max_queue} requests admitted): retry later",
                       type="rate_limit_error", code="queue_full") from None
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None


async def stream(job: Job, reply: Reply, include_usage: bool):
    """The job as OpenAI stream chunks: the role, one chunk per step that released text (with the step's token
    count), the finish reason with the request's figures, the usage if asked, then [DONE]."""
    usage = {"usage": None} if include_usage else {}
    if reply.chat:
        yield sse(reply.chunk(None, role=True, **usage))
    async for event in job.stream():
        if isinstance(event, StepText) and event.text:
            step = {"step": event.step, "step_tokens": event.step_tokens}
            yield sse(reply.chunk(event.text, ctcspec=step, **usage))
        elif isinstance(event, Finished):
            yield sse(reply.chunk(event.text, event.finish_reason, ctcspec=event.stats, **usage))
            if include_usage:
                yield sse(reply.usage_chunk(event))
        elif isinstance(event, Failed):
            yield sse({"error": ApiError(500, event.message, type="server_error").body})
    yield sse("[DONE]")


async def cancel_when_gone(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _api_error(request: Request, exc: ApiError):
    return error_response(exc)


async def _invalid(request: Request, exc: RequestValidationError):
    return error_response(validation_error(exc))


async def _http(request: Request, exc: HTTPException):
    code = "not_found" if exc.status_code == 404 else None
    return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))


async def _unexpected(request: Request, exc: Exception):
    log.exception("unexpected error")
    return error_response(ApiError(500, f"internal server error ({type(exc).__name__})", type="server_error"))


@asynccontextmanager
async def _lifespan(app: FastAPI):
    service = app.state.served.service
    try:
        yield
    finally:  # after uvicorn has drained (or, past --drain-timeout, cancelled) the open requests; or a forced exit
        service.close()
    await service.wait_closed()


def create_app(service: EngineService, model_name: str, api_key: str | None = None) -> FastAPI:
    """The HTTP API over `service`, answering for the model `model_name`; with `api_key`, the /v1 endpoints want
    `Authorization: Bearer <api_key>`."""
    handlers = {ApiError: _api_error, RequestValidationError: _invalid, HTTPException: _http, Exception: _unexpected}
    app = FastAPI(title="ctcspec", lifespan=_lifespan, docs_url=None, redoc_url=None, exception_handlers=handlers)
    app.state.served = Served(service, model_name, api_key)
    app.include_router(public)
    app.include_router(api)
    app.add_middleware(CountRequests, metrics=service.metrics)
    return app

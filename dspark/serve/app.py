"""The FastAPI app: OpenAI's /v1/completions and /v1/chat/completions (streamed as server-sent events
or not), /v1/models, /health and /metrics, over one engine thread (dspark.serve.worker).

Requests are checked here in the order a client can fix them (auth, JSON and field types, model,
sampling values via `SamplingParams`, the prompt, the queue bound) and then by `Engine.add_request`
on the engine thread (context length, stop token ids); every refusal is an OpenAI error body naming
the field, and none touches the requests already running. A stream whose client goes away aborts
its requests at the next round.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from dspark.config import SamplingParams
from dspark.llm import LLM, PACKAGED, Completion
from dspark.serve.metrics import Metrics
from dspark.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, error_body, new_id, now,
                                   param_of)
from dspark.serve.worker import Admitted, Delta, Rejected, Submission, Worker
from dspark.text import ChatTemplate, ChatTemplateError, StopStringMatcher, read_chat_template

# The plain template of models that ship none (nano): one "role: content" line per message.
PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant:{% endif %}")


@dataclass
class ServeConfig:
    """What the front end enforces on top of the engine's own limits."""

    model_name: str
    api_key: str | None = None
    max_waiting: int = 64  # engine requests queued beyond the running batch; more answer 429
    default_max_tokens: int = 256  # a chat request without max_tokens (completions default to 16, as OpenAI)
    chat_template: str = PLAIN_CHAT_TEMPLATE
    created: int = field(default_factory=now)


def chat_template_of(model: str | Path) -> str | None:
    """The checkpoint's chat template (chat_template.jinja or tokenizer_config.json), if it has one."""
    root = PACKAGED.get(str(model), Path(model))
    for path in (root / "target", root):
        if path.is_dir() and (found := read_chat_template(path)) is not None:
            return found[0]
    return None


class _State:
    def __init__(self, llm: LLM, worker: Worker, metrics: Metrics, config: ServeConfig):
        self.llm, self.worker, self.metrics, self.config = llm, worker, metrics, config
        self.in_flight = 0  # engine requests admitted by this front end and not yet finished
        self.chat_template = ChatTemplate(config.chat_template, llm.tokenizer)  # dspark.text: the one renderer

    @property
    def capacity(self) -> int:
        return self.llm.engine.max_batch + self.config.max_waiting


def create_app(llm: LLM, worker: Worker, metrics: Metrics, config: ServeConfig) -> FastAPI:
    state = _State(llm, worker, metrics, config)
    app = FastAPI(title="dspark", docs_url=None, redoc_url=None)
    app.state.dspark = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"malformed JSON: {first.get('msg', '')}", code="json_invalid"), 400)
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        message = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: "
                            f"{err.get('msg')}" for err in errors)
        return JSONResponse(error_body(message, param=param, code="invalid_value"), 400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), 500)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), kind, code=str(e.status_code)), e.status_code)

    app.add_middleware(_BearerAuth, state=state)

    @app.get("/health")
    async def health():
        if not state.worker.alive:
            return JSONResponse(error_body("the engine thread is not running", "server_error"), 503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.config.model_name, "object": "model",
                                            "created": state.config.created, "owned_by": "dspark",
                                            "max_model_len": state.llm.engine.max_seq_len}]}

    @app.get("/metrics")
    async def metrics():
        running, waiting = state.worker.counts()
        cache = state.llm.engine.cache
        text = state.metrics.render(running, waiting, cache.free_pages, cache.num_pages - 1)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _generate(state, body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _generate(state, body, request, chat=True)

    return app


class _BearerAuth:
    """With an API key, /v1/ answers 401 unless `Authorization: Bearer KEY`. Plain ASGI: Starlette's
    BaseHTTPMiddleware would hide a client's disconnect from the handler below it."""

    def __init__(self, app, state: _State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        key = self.state.config.api_key
        if key is not None and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if given != f"Bearer {key}".encode():
                response = JSONResponse(error_body("missing or wrong API key (Authorization: Bearer KEY)",
                                                   code="invalid_api_key"), 401)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------- requests
def _prompts(state: _State, body, chat: bool) -> list[list[int]]:
    tok = state.llm.tokenizer
    if chat:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        try:
            prompts = [state.chat_template.encode(messages)]
        except ChatTemplateError as e:  # templates raise on message orders they do not allow
            raise APIError(400, str(e), param="messages") from None
    else:
        p = body.prompt
        if isinstance(p, str):
            prompts = [tok.encode(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [tok.encode(x) for x in p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = [list(x) for x in p]
    if not prompts or any(not ids for ids in prompts):
        raise APIError(400, "the prompt is empty (it encodes to no tokens)", param="messages" if chat else "prompt")
    return prompts


def _params(state: _State, body, chat: bool, prompt_len: int, choices: int) -> list[SamplingParams]:
    if body.n < 1:
        raise APIError(400, f"n must be >= 1, got {body.n}", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported (only 0)", param=name)
    if not chat and body.echo:
        raise APIError(400, "echo is not supported", param="echo")
    if chat and body.top_logprobs:
        raise APIError(400, "top_logprobs is not supported (only 0): logprobs gives the sampled token's",
                       param="top_logprobs")
    max_tokens = body.max_completion_tokens if chat and body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        engine = state.llm.engine
        room = engine.max_seq_len - prompt_len - engine.num_draft_tokens - 1
        max_tokens = max(1, min(state.config.default_max_tokens, room)) if chat else 16
    top_k = 0 if body.top_k in (None, -1) else body.top_k
    stop_ids = tuple(dict.fromkeys([*state.llm.eos_token_ids, *(body.stop_token_ids or ())]))
    try:
        return [SamplingParams(temperature=1.0 if body.temperature is None else body.temperature, top_k=top_k,
                               top_p=1.0 if body.top_p is None else body.top_p,
                               seed=None if body.seed is None else body.seed + i, stop_token_ids=stop_ids,
                               max_tokens=max_tokens) for i in range(choices)]
    except (ValueError, TypeError) as e:
        msg = str(e)
        param = param_of(msg, "messages" if chat else "prompt")
        if param == "max_tokens" and chat and body.max_completion_tokens is not None:
            param = "max_completion_tokens"
        raise APIError(400, msg, param=param) from None


class _Call:
    """One HTTP request's engine requests: their event queue, and cleanup that runs exactly once."""

    def __init__(self, state: _State, choices: int):
        self.state, self.choices = state, choices
        self.events: asyncio.Queue = asyncio.Queue()
        self.request_ids: list[int] = []
        self.finished: set[int] = set()  # choice indices
        self._closed = False
        self._loop = asyncio.get_running_loop()
        state.in_flight += choices

    def deliver(self, event) -> None:
        """Called on the engine thread; never blocks."""
        if self._closed and isinstance(event, Admitted):  # its client went away while it was queued
            self.state.worker.abort(event.request_ids)
            return
        self._loop.call_soon_threadsafe(self.events.put_nowait, event)

    def close(self) -> None:
        """Abort what has not finished (the client went away) and give back the queue places."""
        if self._closed:
            return
        self._closed = True
        self.state.in_flight -= self.choices
        left = [rid for i, rid in enumerate(self.request_ids) if i not in self.finished]
        if left:
            self.state.worker.abort(left)

    async def next_delta(self) -> Delta | None:
        """The next event of this call's choices; None when its client went away (watch_disconnect)."""
        delta = await self.events.get()
        if delta is not None and delta.completion is not None:
            self.finished.add(delta.index)
        return delta

    async def watch_disconnect(self, request: Request, every: float = 0.25) -> None:
        """Wake the waiting handler with None when a non-streamed request's client disconnects (a
        stream notices by itself: its response is cancelled)."""
        while not self._closed:
            await asyncio.sleep(every)
            if await request.is_disconnected():
                self.events.put_nowait(None)
                return


async def _generate(state: _State, body, request: Request, chat: bool):
    if body.model != state.config.model_name:
        raise APIError(400, f"the model {body.model!r} does not exist; this server serves "
                            f"{state.config.model_name!r}", param="model", code="model_not_found")
    prompts = _prompts(state, body, chat)
    per_prompt = _params(state, body, chat, max(len(p) for p in prompts), body.n)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    try:
        stop = list(StopStringMatcher(stop).stop_strings)
    except ValueError as e:
        raise APIError(400, str(e), param="stop") from None
    choices = len(prompts) * body.n
    if not state.worker.alive:
        raise APIError(503, "the server is shutting down", "server_error")
    if state.in_flight + choices > state.capacity:
        state.metrics.observe_rejected()
        raise APIError(429, f"the server is full ({state.in_flight} requests in flight, at most {state.capacity}); "
                            "retry later", "rate_limit_exceeded", code="rate_limit_exceeded")
    call = _Call(state, choices)
    try:
        # Choice i = prompt i // n, sampled with seed + i % n (OpenAI's choice order).
        sub = Submission([p for p in prompts for _ in range(body.n)], per_prompt * len(prompts), stop,
                         bool(body.logprobs) if chat else body.logprobs is not None, call.deliver)
        try:
            state.worker.submit(sub)
        except RuntimeError as e:  # stopped since the check above
            raise APIError(503, str(e), "server_error") from None
        answer = await call.events.get()
        if isinstance(answer, Rejected):
            msg = str(answer.error)
            status = 503 if isinstance(answer.error, RuntimeError) else 400
            code = "context_length_exceeded" if "max_seq_len" in msg or "cache pages" in msg else None
            raise APIError(status, msg, "invalid_request_error" if status == 400 else "server_error",
                           param_of(msg, "messages" if chat else "prompt") if status == 400 else None, code)
        assert isinstance(answer, Admitted)
        call.request_ids = answer.request_ids
    except BaseException:
        call.close()
        raise
    prompt_tokens = sum(len(prompts[i // body.n]) for i in range(choices))
    rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(state, call, body, chat, rid, created, prompt_tokens, usage),
                                 media_type="text/event-stream", background=BackgroundTask(call.close))
    watch = asyncio.create_task(call.watch_disconnect(request))
    try:
        done: dict[int, Completion] = {}
        while len(done) < choices:
            delta = await call.next_delta()
            if delta is None:  # nobody will read the answer: abort (in close) and say so in the log only
                raise APIError(400, "the client disconnected", code="client_disconnected")
            if delta.completion is not None:
                done[delta.index] = delta.completion
    finally:
        watch.cancel()
        call.close()
    failed = [c for c in done.values() if c.finish_reason not in ("stop", "length")]
    if failed:
        shutdown = failed[0].error == Worker.SHUTDOWN
        raise APIError(503 if shutdown else 500, failed[0].error or f"request ended: {failed[0].finish_reason}",
                       "server_error")
    out = [_choice(state, i, done[i], chat) for i in range(choices)]
    completion_tokens = sum(len(c.token_ids) for c in done.values())
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": state.config.model_name, "choices": out, "usage": _usage(prompt_tokens, completion_tokens)}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _logprobs(state: _State, token_ids: list[int], logprobs: list[float] | None, chat: bool, offset: int = 0):
    if logprobs is None:
        return None
    decode = state.llm.tokenizer.decode
    tokens = [decode([t]) for t in token_ids]
    if chat:
        return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []}
                            for s, lp in zip(tokens, logprobs)]}
    offsets = []
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}


def _choice(state: _State, index: int, c: Completion, chat: bool) -> dict:
    out = {"index": index, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
           "logprobs": _logprobs(state, c.token_ids, c.logprobs, chat)}
    if chat:
        out["message"] = {"role": "assistant", "content": c.text}
    else:
        out["text"] = c.text
    return out


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _stream(state: _State, call: _Call, body, chat: bool, rid: str, created: int, prompt_tokens: int,
                  usage: bool) -> AsyncIterator[str]:
    """A chunk per round per choice that added text (or finished), then usage if asked, then [DONE]."""
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": state.config.model_name}
    want_logprobs = bool(body.logprobs) if chat else body.logprobs is not None
    completion_tokens, offsets = 0, [0] * call.choices
    try:
        if chat:
            for i in range(call.choices):
                yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
        while len(call.finished) < call.choices:
            d = await call.next_delta()
            c = d.completion
            if c is not None and c.finish_reason not in ("stop", "length"):
                message = c.error or f"request ended: {c.finish_reason}"
                yield _sse(error_body(message, "server_error", code="503" if message == Worker.SHUTDOWN else "500"))
                return
            completion_tokens += len(d.token_ids)
            if not d.text and c is None:
                continue  # tokens whose text is not complete yet (a multi-byte character, a possible stop string)
            choice = {"index": d.index, "logprobs": _logprobs(state, d.token_ids, d.logprobs if want_logprobs else None,
                                                               chat, offsets[d.index]),
                      "finish_reason": None if c is None else c.finish_reason}
            offsets[d.index] += len(d.text)
            if chat:
                choice["delta"] = {"content": d.text} if d.text else {}
            else:
                choice["text"] = d.text
            if c is not None:
                choice["stop_reason"] = c.stop_reason
            yield _sse({**head, "choices": [choice]})
        if usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        call.close()

"""The FastAPI application: OpenAI endpoints, fork handles, programs, health, metrics."""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from dendrite.server import responses as R
from dendrite.server.config import ServerConfig
from dendrite.server.errors import ApiError
from dendrite.server.metrics import prometheus_text
from dendrite.server.schemas import (ChatRequest, CompletionRequest, ProgramRun, SequenceCreate,
                                     SequenceFork, SequenceGenerate, chat_messages,
                                     constraint_of, sampling_params)
from dendrite.server.worker import EngineWorker, Generation, ProgramJob

__all__ = ["create_app"]

# pydantic's union-member and model-name tags in an error location: not field names
_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[A-Z]\w*|function-.*|"
                  r"literal\[.*\]|constrained-.*|json-or-python\[.*\])$")


def _param(loc: tuple) -> str:
    parts = [str(p) for p in loc[1:] if not _TAG.match(str(p))] if loc and loc[0] == "body" \
        else [str(p) for p in loc]
    return ".".join(parts)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """A 400 naming the first offending fields (JSON path), OpenAI style."""
    errs = exc.errors()
    for e in errs:
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx", {}).get("error", "")
            return ApiError(400, f"request body is not valid JSON ({ctx})".replace(" ()", ""),
                            param="body")
    msgs, first, seen = [], None, set()
    for e in errs:
        p = _param(tuple(e.get("loc", ())))
        if e.get("type") == "missing" and not p:
            msgs.append("request body is missing or not a JSON object")
            continue
        if p in seen:
            continue  # one message per field (a union reports each member)
        seen.add(p)
        first = first or p
        if e.get("type") == "extra_forbidden":
            msgs.append(f"{p}: unknown field")
        elif e.get("type") == "missing":
            msgs.append(f"{p}: field required")
        else:
            msgs.append(f"{p}: {e.get('msg')}")
        if len(msgs) >= 4:
            break
    return ApiError(400, "; ".join(msgs) or "invalid request", param=first or "body")


class _BodyLimit:
    """Refuse bodies over `limit` bytes with 413 before they are parsed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = ApiError(413, f"request body exceeds this server's limit of {self.limit} bytes",
                           param="body", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse(too_big.body(), status_code=413)(scope, receive, send)
        if declared is not None:
            return await self.app(scope, receive, send)  # the server enforces the length
        # No Content-Length (chunked): buffer the body up to the limit, then replay it.
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                return await JSONResponse(too_big.body(), status_code=413)(scope, receive, send)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(engine: Any, config: ServerConfig | None = None,
               worker: EngineWorker | None = None) -> FastAPI:
    """An ASGI app serving `engine`; its engine thread starts and stops with the app."""
    config = config or ServerConfig()
    worker = worker or EngineWorker(engine, config)
    tokenizer = engine.tokenizer
    token_text = R.TokenText(engine)
    model_name = config.model_name or Path(str(engine.model_dir)).name
    keys = set(config.api_keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not worker.running:
            worker.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    app = FastAPI(title="Dendrite", lifespan=lifespan)
    app.state.worker = worker
    app.state.config = config
    app.add_middleware(_BodyLimit, limit=config.max_request_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a bad request: an OpenAI-shaped 500 (Starlette logs the traceback).
        err = ApiError(500, f"internal server error: {type(exc).__name__}: {exc}")
        return JSONResponse(err.body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        err = _validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    def owner(request: Request) -> str:
        """The API key of the request ("" when the server has none)."""
        if not keys:
            return ""
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in keys:
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        return token.strip()

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves "
                                f"{model_name!r}", param="model", code="model_not_found")

    def render_chat(messages: list, add_generation_prompt: bool = True,
                    field_name: str = "messages") -> str:
        from dendrite.model.tokenizer import ChatTemplateError

        try:
            return tokenizer.apply_chat_template(chat_messages(messages),
                                                 add_generation_prompt=add_generation_prompt)
        except ChatTemplateError as e:
            raise ApiError(400, f"{field_name}: {e}", param=field_name) from None
        except Exception as e:  # noqa: BLE001 - a template that rejects the messages
            raise ApiError(400, f"{field_name}: the chat template failed: {e}",
                           param=field_name) from None

    async def generate(request: Request, start: Any, n: int, *, chat: bool, stream: bool,
                       stop: list[str], logprobs: bool, include_usage: bool,
                       extra: dict | None = None) -> Any:
        """Start a generation on the engine thread, then answer whole or as SSE."""
        if logprobs and chat:
            await worker.call(token_text.prepare)  # token bytes, read off the engine thread
        gen = Generation(asyncio.get_running_loop(), asyncio.Queue())
        try:
            handle_info = await worker.call(lambda: start(gen))
        except asyncio.CancelledError:
            worker.cancel(gen)
            raise
        if isinstance(handle_info, dict):
            extra = {**(extra or {}), "sequence": handle_info}
        if stream:
            return StreamingResponse(
                R.stream(worker, gen, n, chat=chat, model=model_name, tokenizer=tokenizer,
                         stop=stop, logprobs=logprobs, tt=token_text, include_usage=include_usage,
                         extra=extra),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices = await R.collect(worker, gen, request.is_disconnected, n)
        build = R.chat_body if chat else R.completion_body
        body = build(gen, choices, model_name, token_text, logprobs)
        if extra:
            body.update(extra)
        if choices.sequence is not None:
            body["sequence"] = choices.sequence
        return body

    def stops(req: Any) -> list[str]:
        return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])

    # -- OpenAI endpoints -------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request,
                          key: str = Depends(owner)) -> Any:
        check_model(req.model)
        for name in ("echo", "suffix", "best_of", "logit_bias"):
            v = getattr(req, name)
            if v not in (None, False) and not (name == "best_of" and v == req.n):
                raise ApiError(400, f"{name} is not supported", param=name)
        params = sampling_params(req, config, req.n, logprobs=req.logprobs or 0)
        constraint, cfield = constraint_of(req)
        return await generate(
            request, lambda g: worker.start_generation(g, req.prompt, True, params, constraint,
                                                       constraint_field=cfield),
            req.n, chat=False, stream=req.stream, stop=stops(req),
            logprobs=req.logprobs is not None,
            include_usage=bool(req.stream_options and req.stream_options.include_usage))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request,
                               key: str = Depends(owner)) -> Any:
        check_model(req.model)
        if req.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        params = sampling_params(req, config, req.n, max_tokens=mt,
                                 logprobs=req.top_logprobs or 0)
        constraint, cfield = constraint_of(req)
        prompt = render_chat(req.messages)
        return await generate(
            request,
            lambda g: worker.start_generation(g, prompt, False, params, constraint, "messages",
                                              constraint_field=cfield),
            req.n, chat=True, stream=req.stream, stop=stops(req), logprobs=req.logprobs,
            include_usage=bool(req.stream_options and req.stream_options.include_usage))

    @app.get("/v1/models")
    async def models(key: str = Depends(owner)) -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "dendrite"}]}

    @app.get("/health")
    async def health() -> dict:
        if not worker.running:
            raise ApiError(503, "the engine thread is not running")
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        snap = await worker.call(worker.snapshot)
        return PlainTextResponse(prometheus_text(snap),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- fork handles -----------------------------------------------------------------
    def ttl_of(ttl: float | None) -> float:
        if ttl is None:
            return config.handle_ttl
        if ttl > config.max_handle_ttl:
            raise ApiError(400, f"ttl={ttl:g} exceeds this server's limit of "
                                f"{config.max_handle_ttl:g} s", param="ttl")
        return float(ttl)

    @app.post("/v1/sequences")
    async def create_sequence(req: SequenceCreate, key: str = Depends(owner)) -> dict:
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give exactly one of prompt, messages", param="prompt")
        ttl = ttl_of(req.ttl)
        if req.messages is not None:
            if not req.messages:
                raise ApiError(400, "messages is empty", param="messages")
            text = render_chat(req.messages, req.add_generation_prompt)
            return await worker.call(lambda: worker.create_handle(key, text, False, ttl,
                                                                  "messages"))
        return await worker.call(lambda: worker.create_handle(key, req.prompt, True, ttl))

    @app.get("/v1/sequences")
    async def list_sequences(key: str = Depends(owner)) -> dict:
        return {"object": "list", "data": await worker.call(lambda: worker.list_handles(key))}

    @app.get("/v1/sequences/{sid}")
    async def get_sequence(sid: str, key: str = Depends(owner)) -> dict:
        return await worker.call(lambda: worker.get_handle(key, sid))

    @app.post("/v1/sequences/{sid}/fork")
    async def fork_sequence(sid: str, req: SequenceFork, key: str = Depends(owner)) -> dict:
        if req.n > config.max_fork:
            raise ApiError(400, f"n={req.n} exceeds this server's fork limit of "
                                f"{config.max_fork}", param="n")
        ttl = None if req.ttl is None else ttl_of(req.ttl)
        kids = await worker.call(lambda: worker.fork_handle(key, sid, req.n, ttl))
        return {"object": "list", "parent": sid, "data": kids}

    @app.post("/v1/sequences/{sid}/generate")
    async def generate_sequence(sid: str, req: SequenceGenerate, request: Request,
                                key: str = Depends(owner)) -> Any:
        check_model(req.model)
        if req.n != 1:
            raise ApiError(400, "generate continues one sequence: n must be 1 (fork the "
                                "sequence into n handles first)", param="n")
        [params] = sampling_params(req, config, 1, logprobs=req.logprobs or 0)
        constraint, cfield = constraint_of(req)
        return await generate(
            request,
            lambda g: worker.generate_handle(g, key, sid, req.text, params, constraint, cfield),
            1, chat=False, stream=req.stream, stop=stops(req),
            logprobs=req.logprobs is not None,
            include_usage=bool(req.stream_options and req.stream_options.include_usage))

    @app.delete("/v1/sequences/{sid}")
    async def delete_sequence(sid: str, key: str = Depends(owner)) -> dict:
        await worker.call(lambda: worker.delete_handle(key, sid))
        return {"id": sid, "object": "sequence", "deleted": True}

    # -- programs ---------------------------------------------------------------------
    @app.post("/v1/programs/run")
    async def run_program(req: ProgramRun, request: Request, key: str = Depends(owner)) -> Any:
        import dendrite.dsl as dsl

        try:
            program = dsl.loads(req.script, filename="<script>", name=req.program)
        except dsl.ScriptError as e:
            raise ApiError(400, f"script: {e.format()}", param="script") from None
        except KeyError as e:
            raise ApiError(400, str(e.args[0]) if e.args else str(e), param="program") from None
        try:
            args = program.bind(req.args)
        except TypeError as e:
            raise ApiError(400, f"args: {e}", param="args") from None
        job = ProgramJob(deadline=time.monotonic() + config.max_program_seconds)

        def run() -> Any:
            try:
                return worker.run_program(job, program, args, req.seed)
            except dsl.ScriptError as e:
                raise ApiError(400, f"script: {e.format()}", param="script") from None

        task = asyncio.ensure_future(worker.call(run, program=True))
        # read a late error of an abandoned run, so asyncio does not warn about it
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    break
                if await request.is_disconnected():
                    job.cancelled = True
                    break
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if job.cancelled:
            raise ApiError(499, "client disconnected")
        return {"object": "program.run", "program": program.name, **task.result()}

    return app


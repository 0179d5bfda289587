"""The engine thread: the only thread that touches the engine.

The engine is not thread-safe, so the asyncio side never calls it: it puts
commands (functions of the engine) on a thread-safe queue and awaits their
results. The engine thread runs commands, steps the engine while any
generation is live, and pushes each generation's new tokens to its request's
`asyncio.Queue` with `loop.call_soon_threadsafe`. A request whose client goes
away is cancelled by a command that releases its sequences, so pages never
outlive their requests; fork handles (kept sequences) are released on DELETE,
when their TTL runs out, or when the server stops.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import secrets
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from dendrite.server.config import ServerConfig
from dendrite.server.errors import ApiError, request_error

log = logging.getLogger("dendrite.server")

__all__ = ["EngineWorker", "Generation", "Handle", "ProgramJob"]


@dataclass
class Generation:
    """One request's generations (one per choice) and the queue its events go to.

    Events: ("tokens", index, ids, logprobs, top_logprobs) (top_logprobs: per token
    a list of (token id, logprob), best first, or empty lists when not asked for),
    ("done", index, GenResult),
    ("error", ApiError), and for a handle's generation ("sequence", info)
    (the handle after it) before its last "done". Created on the asyncio side; the engine thread fills
    `handles` when it starts the request.
    """

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    handles: list = field(default_factory=list)
    owned: list = field(default_factory=list)  # sequences released when it ends
    sent: list[int] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    on_done: Callable[[], None] | None = None  # engine thread, after all choices finished
    on_cancel: Callable[[], None] | None = None
    prompt_tokens: int = 0
    ended: bool = False
    failed: bool = False  # a choice finished with an engine error

    def push(self, event: tuple) -> None:
        """Hand an engine event to the request's asyncio queue (thread-safe)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class Handle:
    """A fork handle: a kept sequence, owned by the API key that made it."""

    id: str
    owner: str
    seq: Any
    ttl: float
    expires: float
    busy: Generation | None = None

    def touch(self) -> None:
        """Push the handle's expiry `ttl` seconds from now."""
        self.expires = time.monotonic() + self.ttl


@dataclass
class ProgramJob:
    """A `/v1/programs/run` in the engine thread; `cancelled` is set by the client side."""

    cancelled: bool = False
    deadline: float = float("inf")


class _ProgramCancelled(Exception):
    pass


_ids = itertools.count(1)


def as_api_error(e: BaseException) -> BaseException:
    """What a request gets for an exception of its engine command: ApiErrors as
    they are; a value the engine refuses (ValueError, TypeError) a 400; anything
    else a 500 (logged with its traceback by the engine thread), never a dropped
    connection. Control-flow exceptions pass through."""
    if isinstance(e, ApiError) or not isinstance(e, Exception):
        return e
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (ValueError, TypeError)):
        return ApiError(400, text)
    return ApiError(500, f"internal server error: {type(e).__name__}: {text}")


def new_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}{secrets.token_hex(6)}"


class EngineWorker:
    """Owns the engine on one thread; the asyncio side talks to it via `call`."""

    def __init__(self, engine: Any, config: ServerConfig | None = None) -> None:
        self.engine = engine
        self.config = config or ServerConfig()
        self._commands: "queue.Queue[tuple[Callable[[], Any], Callable[[bool, Any], None] | None, bool]]" = queue.Queue()
        self._deferred: deque = deque()  # program commands that arrived while a program ran
        self._gens: dict[int, Generation] = {}
        self.handles: dict[str, Handle] = {}
        self._stop = threading.Event()
        self._in_program = False
        self._next_expiry = 0.0
        self._thread = threading.Thread(target=self._loop, name="dendrite-engine", daemon=True)
        self.counters = {"requests": 0, "generated_tokens": 0, "errors": 0, "handles_expired": 0,
                         "programs": 0}
        self._rate: deque = deque()  # (time, tokens) of the last seconds, for tokens/s
        self.context_limit = self._context_limit()

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "EngineWorker":
        """Start the engine thread; returns self."""
        self._thread.start()
        return self

    def stop_soon(self) -> None:
        """Begin `stop` without waiting: the engine thread fails every request in
        flight (its stream ends with a 503 event) and releases every sequence.
        Safe in a signal handler; the HTTP server then finds no stream still open."""
        self._stop.set()
        self._commands.put((lambda: None, None, False))  # wake it up

    def stop(self, timeout: float = 30.0) -> None:
        """Fail every request in flight, release every sequence, stop the thread."""
        if not self._thread.is_alive():
            return
        self.stop_soon()
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the engine thread is alive."""
        return self._thread.is_alive()

    def _context_limit(self) -> int:
        """The most tokens one sequence may hold: the model's context and the KV pool."""
        pool_tokens = self.engine.pool.num_pages * self.engine.page_size
        ctx = getattr(getattr(self.engine.runner, "config", None), "max_position_embeddings", None)
        limit = min(pool_tokens, int(ctx)) if ctx else pool_tokens
        if self.config.max_prompt_tokens is not None:
            limit = min(limit, self.config.max_prompt_tokens + self.config.max_tokens)
        return limit

    # -- calls from the asyncio side -------------------------------------------
    async def call(self, fn: Callable[[], Any], program: bool = False) -> Any:
        """Run `fn()` on the engine thread and return its result (or raise its error)."""
        if self._stop.is_set():
            raise ApiError(503, "the server is shutting down")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if fut.done():
                return
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(as_api_error(value))

        self._commands.put((fn, lambda ok, v: loop.call_soon_threadsafe(settle, ok, v), program))
        return await fut

    def post(self, fn: Callable[[], Any]) -> None:
        """Run `fn()` on the engine thread, not waiting for it (cancellations)."""
        self._commands.put((fn, None, False))

    def call_sync(self, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        """`call` for plain threads (tests, shutdown code)."""
        done = threading.Event()
        box: list = []

        def reply(ok: bool, value: Any) -> None:
            box.append((ok, value))
            done.set()

        self._commands.put((fn, reply, False))
        if not done.wait(timeout):
            raise TimeoutError("the engine thread did not answer")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    # -- the thread -------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if self._deferred and not self._in_program:
                    self._run(*self._deferred.popleft())
                self._service(block=not self._gens and not self._deferred)
                if self._gens:
                    self._step()
        finally:
            self._shutdown()

    def _service(self, block: bool) -> None:
        """Run queued commands, push new tokens, expire handles."""
        first = True
        while True:
            try:
                item = self._commands.get(timeout=0.25) if (block and first) else \
                    self._commands.get_nowait()
            except queue.Empty:
                break
            first = False
            if item[2] and self._in_program:
                self._deferred.append(item)  # one program at a time
                continue
            self._run(*item)
        self._pump()
        now = time.monotonic()
        if now >= self._next_expiry:
            self._next_expiry = now + 0.5
            self._expire(now)

    def _run(self, fn: Callable[[], Any], reply: Callable[[bool, Any], None] | None,
             program: bool) -> None:
        try:
            value = fn()
        except BaseException as e:  # noqa: BLE001 - every error goes back to its request
            if not isinstance(e, (ApiError, ValueError, TypeError, KeyError)):
                log.error("engine command failed:\n%s", traceback.format_exc())
            if reply is not None:
                reply(False, e)
            return
        if reply is not None:
            reply(True, value)

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as e:  # noqa: BLE001 - the server must outlive a failed step
            log.error("engine step failed:\n%s", traceback.format_exc())
            self.counters["errors"] += 1
            err = ApiError(500, f"the engine failed while generating: {type(e).__name__}: {e}")
            for gen in list(self._gens.values()):
                gen.push(("error", err))
                self._end(gen, cancelled=True)
            return
        self._pump()

    def _pump(self) -> None:
        """Send every generation its new tokens; end the finished ones."""
        new = 0
        for gen in list(self._gens.values()):
            events = []
            for i, h in enumerate(gen.handles):
                if gen.finished[i]:
                    continue
                n = len(h.token_ids)
                if n > gen.sent[i]:
                    tops = h.top_logprobs[gen.sent[i]:n] if h.params.logprobs > 0 else \
                        [[] for _ in range(n - gen.sent[i])]
                    events.append(("tokens", i, h.token_ids[gen.sent[i]:n],
                                   h.logprobs[gen.sent[i]:n], tops))
                    new += n - gen.sent[i]
                    gen.sent[i] = n
                if h.done:
                    if h.error is not None:  # LeafTooLarge, ModelOutputError: this request only
                        events.append(("error", request_error(h.error)))
                        gen.failed = True
                    else:
                        events.append(("done", i, h.result))
                    gen.finished[i] = True
            if gen.failed:
                # The request fails as a whole: its other choices end ("abort").
                for ev in events:
                    gen.push(ev)
                self.counters["errors"] += 1
                self._end(gen, cancelled=True)
                continue
            if all(gen.finished):
                # before the last events: `on_done` may push the handle's new state
                self._end(gen, cancelled=False)
            for ev in events:
                gen.push(ev)
        if new:
            self.counters["generated_tokens"] += new
            self._rate.append((time.monotonic(), new))

    def _end(self, gen: Generation, cancelled: bool) -> None:
        if gen.ended:
            return
        gen.ended = True
        self._gens.pop(id(gen), None)
        if cancelled:
            # End the requests first ("abort"), then give back their sequences.
            for h in gen.handles:
                if not h.done:
                    self.engine.cancel(h)
        try:
            if cancelled and gen.on_cancel is not None:
                gen.on_cancel()
            elif not cancelled and gen.on_done is not None:
                gen.on_done()
        finally:
            for seq in gen.owned:
                seq.release()

    def _expire(self, now: float) -> None:
        for h in [h for h in self.handles.values() if h.expires <= now and h.busy is None]:
            log.info("handle %s expired", h.id)
            self.counters["handles_expired"] += 1
            self._drop_handle(h)

    def _drop_handle(self, h: Handle) -> None:
        if h.busy is not None:
            self._end(h.busy, cancelled=True)
        self.handles.pop(h.id, None)
        h.seq.release()

    def _shutdown(self) -> None:
        err = ApiError(503, "the server is shutting down")
        for item in list(self._deferred):
            if item[1] is not None:
                item[1](False, err)
        while True:
            try:
                _, reply, _ = self._commands.get_nowait()
            except queue.Empty:
                break
            if reply is not None:
                reply(False, err)
        for gen in list(self._gens.values()):
            gen.push(("error", err))
            self._end(gen, cancelled=True)
        n = len(self.handles)
        for h in list(self.handles.values()):
            self._drop_handle(h)
        log.info("engine thread stopped; released %d live handle(s), %d page(s) in use",
                 n, self.engine.pool.used)

    # -- commands (run on the engine thread) ---------------------------------------
    def check_length(self, n_prompt: int, max_tokens: int, field_name: str = "prompt") -> None:
        """A sequence must fit the model's context and the KV pool."""
        if self.config.max_prompt_tokens is not None and n_prompt > self.config.max_prompt_tokens:
            raise ApiError(400, f"{field_name} has {n_prompt} tokens; this server accepts at most "
                                f"{self.config.max_prompt_tokens}", param=field_name)
        if n_prompt + max_tokens > self.context_limit:
            if n_prompt >= self.context_limit:
                raise ApiError(400, f"{field_name} has {n_prompt} tokens; the limit is "
                                    f"{self.context_limit} (model context / KV pool)",
                               param=field_name)
            raise ApiError(400, f"{field_name} ({n_prompt} tokens) + max_tokens ({max_tokens}) "
                                f"exceeds the limit of {self.context_limit} tokens",
                           param="max_tokens")

    def _submit(self, seq: Any, params: Any, constraint: Any, constraint_field: str | None) -> Any:
        """`engine.submit`; a grammar the engine finds invalid only when it compiles
        it for this tokenizer (an unknown special token, no string the tokenizer
        can produce) is a 400 naming the request field that gave it."""
        from dendrite.grammar import GrammarError

        try:
            return self.engine.submit(seq, params, constraint=constraint)
        except GrammarError as e:
            where = constraint_field or "response_format"
            raise ApiError(400, f"{where}: {e}", param=where) from None

    def start_generation(self, gen: Generation, prompt: str | list[int], add_bos: bool,
                         params: list, constraint: Any, field_name: str = "prompt",
                         constraint_field: str | None = None) -> None:
        """Prefill `prompt` once and generate one branch per entry of `params`
        (n > 1: forked children, O(1) each, sharing the prompt's pages)."""
        if gen.ended:
            return
        eng = self.engine
        ids = eng.encode(prompt, add_bos=add_bos)
        if not ids:
            raise ApiError(400, f"{field_name} is empty", param=field_name)
        self.check_length(len(ids), max(p.max_tokens for p in params), field_name)
        seq = eng.new_sequence(ids, add_bos=False)
        made = [seq]
        try:
            if len(params) == 1:
                branches = [seq]
            else:
                branches = seq.fork(len(params))
                made += branches
                seq.release()  # the children hold the prompt's pages
                made.remove(seq)
            for b, p in zip(branches, params):
                gen.handles.append(self._submit(b, p, constraint, constraint_field))
        except BaseException:
            for h in gen.handles:
                eng.cancel(h)
            gen.handles = []
            for s in made:
                s.release()
            raise
        gen.owned = made
        self._register(gen, len(ids))

    def _register(self, gen: Generation, prompt_tokens: int) -> None:
        gen.prompt_tokens = prompt_tokens
        gen.sent = [0] * len(gen.handles)
        gen.finished = [False] * len(gen.handles)
        self._gens[id(gen)] = gen
        self.counters["requests"] += 1

    def cancel(self, gen: Generation) -> None:
        """Release a generation whose client went away (posted from the asyncio side)."""
        def run() -> None:
            if not gen.ended:
                log.info("request cancelled; releasing %d sequence(s)", len(gen.owned))
                self._end(gen, cancelled=True)
            gen.ended = True
        self.post(run)

    # handles
    def _handle(self, owner: str, hid: str) -> Handle:
        h = self.handles.get(hid)
        if h is None or h.owner != owner:  # another key's handle does not exist for you
            raise ApiError(404, f"no sequence {hid!r} (expired, deleted, or never made)",
                           param="id", code="sequence_not_found")
        return h

    def _room(self, owner: str, more: int) -> None:
        have = sum(1 for h in self.handles.values() if h.owner == owner)
        cap = self.config.max_handles_per_key
        if have + more > cap:
            raise ApiError(429, f"too many live sequences: this key holds {have}, the request "
                                f"adds {more}, the limit is {cap}; DELETE some first",
                           code="too_many_sequences")

    def _new_handle(self, owner: str, seq: Any, ttl: float) -> Handle:
        h = Handle(new_id("seq"), owner, seq, ttl, time.monotonic() + ttl)
        self.handles[h.id] = h
        return h

    def create_handle(self, owner: str, prompt: str | list[int], add_bos: bool, ttl: float,
                      field_name: str = "prompt") -> dict:
        """Create a sequence handle owned by `owner` from a prompt; its description."""
        self._room(owner, 1)
        ids = self.engine.encode(prompt, add_bos=add_bos)
        if not ids:
            raise ApiError(400, f"{field_name} is empty", param=field_name)
        self.check_length(len(ids), 0, field_name)
        seq = self.engine.new_sequence(ids, add_bos=False)
        try:
            self.engine.flush([seq])  # the handle keeps its prompt's KV, computed once
        except BaseException:
            seq.release()
            raise
        return self.describe(self._new_handle(owner, seq, ttl))

    def fork_handle(self, owner: str, hid: str, n: int, ttl: float | None) -> list[dict]:
        """Fork an owned handle into `n` children; their descriptions."""
        h = self._handle(owner, hid)
        self._busy(h)
        self._room(owner, n)
        kids = h.seq.fork(n)
        h.touch()
        return [self.describe(self._new_handle(owner, k, ttl or h.ttl)) for k in kids]

    def _busy(self, h: Handle) -> None:
        if h.busy is not None:
            raise ApiError(409, f"sequence {h.id} is generating; wait for it to finish",
                           param="id", code="sequence_busy")

    def generate_handle(self, gen: Generation, owner: str, hid: str, text: str | list[int] | None,
                        params: Any, constraint: Any, constraint_field: str | None = None) -> dict:
        """Continue a handle: a child generates; when it finishes it becomes the
        handle (the old leaf is released), and if cancelled the handle is unchanged."""
        h = self._handle(owner, hid)
        self._busy(h)
        if gen.ended:
            return self.describe(h)
        extra = self.engine.encode(text, add_bos=False) if text else []
        self.check_length(h.seq.num_tokens + len(extra), params.max_tokens, "text")
        [child] = h.seq.fork(1)
        try:
            if extra:
                child.append_tokens(extra)
            gen.handles = [self._submit(child, params, constraint, constraint_field)]
        except BaseException:
            child.release()
            raise

        def done() -> None:
            old, h.seq = h.seq, child
            old.release()  # the child keeps the shared pages
            h.busy = None
            h.touch()
            gen.push(("sequence", self.describe(h)))

        def cancelled() -> None:
            child.release()
            h.busy = None
            h.touch()

        gen.on_done, gen.on_cancel = done, cancelled
        h.busy = gen
        h.touch()
        self._register(gen, child.num_tokens - len(extra))
        return self.describe(h)

    def delete_handle(self, owner: str, hid: str) -> None:
        """Release an owned handle's sequence."""
        self._drop_handle(self._handle(owner, hid))

    def describe(self, h: Handle, text: bool = False) -> dict:
        """A handle's JSON description (with its text when asked)."""
        out = {"id": h.id, "object": "sequence", "num_tokens": h.seq.num_tokens,
               "ttl": h.ttl, "expires_in": round(max(h.expires - time.monotonic(), 0.0), 3),
               "generating": h.busy is not None}
        if text:
            out["text"] = self.engine.tokenizer.decode(h.seq.tokens, skip_special_tokens=False)
        return out

    def get_handle(self, owner: str, hid: str) -> dict:
        """An owned handle's description, text included; renews its TTL."""
        h = self._handle(owner, hid)
        h.touch()
        return self.describe(h, text=True)

    def list_handles(self, owner: str) -> list[dict]:
        """Descriptions of every handle `owner` holds."""
        return [self.describe(h) for h in self.handles.values() if h.owner == owner]

    # programs
    def run_program(self, job: ProgramJob, program: Any, args: dict, seed: int | None) -> Any:
        """Run a program to the end; other requests keep stepping inside its steps."""
        if job.cancelled:
            raise ApiError(499, "cancelled")

        def progress(_rt: Any) -> None:
            self._service(block=False)  # serve the other requests between its steps
            if job.cancelled:
                raise _ProgramCancelled()
            if time.monotonic() > job.deadline:
                raise ApiError(408, "the program ran longer than this server allows "
                                    f"({self.config.max_program_seconds:g} s)")

        self._in_program = True
        self.counters["programs"] += 1
        try:
            result = program.run(self.engine, seed=seed, progress=progress, **args)
        except _ProgramCancelled:
            raise ApiError(499, "cancelled") from None
        finally:
            self._in_program = False
        from dendrite.cli_run import _jsonable, format_value

        return {"result": _jsonable(result.value), "text": format_value(result.value),
                "steps": result.steps, "nodes": len(result.tree),
                "gen_tokens": result.gen_tokens, "seconds": round(result.seconds, 4)}

    # -- introspection -------------------------------------------------------------
    def snapshot(self) -> dict:
        """Numbers for /metrics (engine thread)."""
        now = time.monotonic()
        while self._rate and self._rate[0][0] < now - 10.0:
            self._rate.popleft()
        window = [n for t, n in self._rate]
        mem = self.engine.memory_stats()
        return {
            "running": sum(1 for g in self._gens.values()),
            "queued": self._commands.qsize() + len(self._deferred),
            "handles": len(self.handles),
            "pages_used": mem["pages_used"], "pages_free": mem["pages_free"],
            "pages_total": mem["pages_total"],
            "tokens_per_second": sum(window) / 10.0,
            "forks": int(self.engine.stats.get("forks", 0)),
            "steps": int(self.engine.stats.get("steps", 0)),
            "preemptions": int(self.engine.stats.get("preemptions", 0)),
            **{k: v for k, v in self.counters.items()},
        }

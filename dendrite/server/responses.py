"""OpenAI-shaped response bodies and server-sent-event streams of a `Generation`."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from dendrite.server.errors import ApiError
from dendrite.stopping import TextDeltas
from dendrite.server.worker import EngineWorker, Generation, new_id

FINISH = {"eos": "stop", "stop": "stop", "grammar": "stop", "length": "length",
          "abort": "abort"}


@dataclass
class Choices:
    """What the events of a generation add up to, per choice."""

    n: int
    token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    top_logprobs: list[list[list]] = field(default_factory=list)  # per choice, per token
    results: list[Any] = field(default_factory=list)
    sequence: dict | None = None  # the fork handle after a /generate

    def __post_init__(self) -> None:
        self.token_ids = [[] for _ in range(self.n)]
        self.logprobs = [[] for _ in range(self.n)]
        self.top_logprobs = [[] for _ in range(self.n)]
        self.results = [None] * self.n

    @property
    def done(self) -> bool:
        """Whether every choice has its result."""
        return all(r is not None for r in self.results)

    def apply(self, ev: tuple) -> None:
        """Apply one engine event (sequence, tokens, result; an error is raised) to the choices."""
        if ev[0] == "error":
            raise ev[1]
        if ev[0] == "sequence":
            self.sequence = ev[1]
        elif ev[0] == "tokens":
            self.token_ids[ev[1]].extend(ev[2])
            self.logprobs[ev[1]].extend(ev[3])
            self.top_logprobs[ev[1]].extend(ev[4])
        else:
            self.results[ev[1]] = ev[2]


class TokenText:
    """A token's text and bytes as OpenAI's logprobs report them. Bytes come from
    the grammar tokenizer (llguidance), so a token holding part of a multi-byte
    character reports its real bytes, not U+FFFD's."""

    def __init__(self, engine: Any) -> None:
        self.tokenizer = engine.tokenizer
        self._engine = engine
        self._ll: Any = None

    def prepare(self) -> None:
        """Build the engine's grammar tokenizer if needed: call on the engine thread
        (the engine builds it lazily and is not thread-safe)."""
        if self._ll is None:
            try:
                self._ll = self._engine.grammar_tokenizer.ll
            except Exception:  # noqa: BLE001 - no llguidance tokenizer: encode the text
                self._ll = False

    def text(self, t: int) -> str:
        """The text of token `t` alone (special tokens kept)."""
        return self.tokenizer.decode([t], skip_special_tokens=False)

    def bytes(self, t: int) -> list[int]:
        """The bytes of token `t` (exact from llguidance when built, else its text's UTF-8)."""
        if self._ll:
            return list(self._ll.decode_bytes([t]))
        return list(self.text(t).encode())


def completion_logprobs(tt: TokenText, ids: list[int], lps: list[float], tops: list[list],
                        offset: int = 0) -> dict:
    """The legacy completions `logprobs` block: per token its text, its logprob and
    `top_logprobs`, a dict of the `logprobs: n` likeliest tokens' texts (best
    first) plus the chosen token, as OpenAI gives up to n + 1 entries."""
    toks = [tt.text(t) for t in ids]
    offsets, pos = [], offset
    for t in toks:
        offsets.append(pos)
        pos += len(t)
    top_dicts = []
    for tok, lp, top in zip(toks, lps, tops):
        d = {tt.text(a): float(x) for a, x in top}
        d.setdefault(tok, float(lp))
        top_dicts.append(d)
    return {"tokens": toks, "token_logprobs": [float(x) for x in lps],
            "top_logprobs": top_dicts, "text_offset": offsets}


def chat_logprobs(tt: TokenText, ids: list[int], lps: list[float], tops: list[list]) -> dict:
    """The chat `logprobs` block: per token its logprob and `top_logprobs`, the
    `top_logprobs: n` likeliest tokens at that position, best first."""
    content = []
    for t, x, top in zip(ids, lps, tops):
        content.append({"token": tt.text(t), "logprob": float(x), "bytes": tt.bytes(t),
                        "top_logprobs": [{"token": tt.text(a), "logprob": float(y),
                                          "bytes": tt.bytes(a)} for a, y in top]})
    return {"content": content}


def usage(gen: Generation, choices: Choices) -> dict:
    """The OpenAI ``usage`` object: prompt, completion and total tokens."""
    done = sum(len(r.token_ids) if r is not None else len(t)
               for r, t in zip(choices.results, choices.token_ids))
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": done,
            "total_tokens": gen.prompt_tokens + done}


async def collect(worker: EngineWorker, gen: Generation,
                  disconnected: Callable[[], Awaitable[bool]], n: int) -> Choices:
    """Wait for every choice; a client that goes away cancels the generation."""
    choices = Choices(n)
    try:
        while not choices.done:
            try:
                ev = await asyncio.wait_for(gen.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await disconnected():
                    raise ApiError(499, "client disconnected") from None
                continue
            choices.apply(ev)
    finally:
        worker.cancel(gen)  # a no-op once the engine thread has ended it
    return choices


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream(worker: EngineWorker, gen: Generation, n: int, *, chat: bool, model: str,
                 tokenizer: Any, stop: list[str], logprobs: bool, tt: TokenText,
                 include_usage: bool, extra: dict | None = None) -> AsyncIterator[str]:
    """SSE chunks of a generation, then `data: [DONE]`. When the client goes
    away Starlette cancels this generator and `finally` releases the sequences."""
    rid = new_id("chatcmpl" if chat else "cmpl")
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    texts = [TextDeltas(tokenizer, stop) for _ in range(n)]
    choices = Choices(n)
    offsets = [0] * n

    def chunk(i: int, text: str | None, ids: list[int], lps: list[float], tops: list[list],
              finish: str | None, role: bool = False) -> dict:
        if chat:
            delta: dict = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            c: dict = {"index": i, "delta": delta, "finish_reason": finish,
                       "logprobs": chat_logprobs(tt, ids, lps, tops) if logprobs and ids else None}
        else:
            c = {"index": i, "text": text or "", "finish_reason": finish,
                 "logprobs": completion_logprobs(tt, ids, lps, tops, offsets[i])
                 if logprobs and ids else None}
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [c]}
        if extra:
            body.update(extra)
        return body

    try:
        if chat:
            for i in range(n):
                yield sse(chunk(i, "", [], [], [], None, role=True))
        def flush(i: int) -> str | None:
            """One chunk of choice i's tokens received since its last chunk."""
            ids, lps, tops = unsent.pop(i)
            delta = texts[i].feed(choices.token_ids[i])
            if not (delta or logprobs):
                return None
            offsets[i] += len(delta)
            return sse(chunk(i, delta, ids, lps, tops, None))

        while not choices.done:
            # Everything the engine pushed since the last wake-up goes out as
            # one chunk per choice: a client (or this loop) that falls behind
            # the engine gets fewer, larger events instead of one per token.
            batch = [await gen.events.get()]
            while not gen.events.empty():
                batch.append(gen.events.get_nowait())
            unsent: dict[int, tuple[list, list, list]] = {}
            for ev in batch:
                if ev[0] == "error":
                    for i in sorted(unsent):
                        if (out := flush(i)) is not None:
                            yield out
                    yield sse(ev[1].body())
                    return
                choices.apply(ev)
                if ev[0] == "sequence":
                    extra = {**(extra or {}), "sequence": ev[1]}
                    continue
                i = ev[1]
                if ev[0] == "tokens":
                    ids, lps, tops = unsent.setdefault(i, ([], [], []))
                    ids.extend(ev[2])
                    lps.extend(ev[3])
                    tops.extend(ev[4])
                    continue
                if i in unsent and (out := flush(i)) is not None:
                    yield out
                delta = texts[i].finish(ev[2].text)
                yield sse(chunk(i, delta, [], [], [], FINISH.get(ev[2].finish_reason, "stop")))
            for i in sorted(unsent):
                if (out := flush(i)) is not None:
                    yield out
        if include_usage:
            body = {"id": rid, "object": obj, "created": created, "model": model,
                    "choices": [], "usage": usage(gen, choices)}
            yield sse(body)
        yield "data: [DONE]\n\n"
    finally:
        worker.cancel(gen)


def _tops(r: Any) -> list[list]:
    return r.top_logprobs if r.top_logprobs is not None else [[] for _ in r.token_ids]


def completion_body(gen: Generation, choices: Choices, model: str, tt: TokenText,
                    logprobs: bool) -> dict:
    """The ``/v1/completions`` response body."""
    out = []
    for i, r in enumerate(choices.results):
        out.append({"index": i, "text": r.text,
                    "logprobs": completion_logprobs(tt, r.token_ids, r.logprobs, _tops(r))
                    if logprobs else None,
                    "finish_reason": FINISH.get(r.finish_reason, "stop")})
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": out, "usage": usage(gen, choices)}


def chat_body(gen: Generation, choices: Choices, model: str, tt: TokenText,
              logprobs: bool) -> dict:
    """The ``/v1/chat/completions`` response body."""
    out = []
    for i, r in enumerate(choices.results):
        out.append({"index": i, "message": {"role": "assistant", "content": r.text},
                    "logprobs": chat_logprobs(tt, r.token_ids, r.logprobs, _tops(r))
                    if logprobs else None,
                    "finish_reason": FINISH.get(r.finish_reason, "stop")})
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": out, "usage": usage(gen, choices)}

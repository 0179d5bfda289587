"""How engine events become SSE chunks: events that queue up while the stream
is busy leave as one chunk per choice, and the chunks add up to the text."""

from __future__ import annotations

import asyncio
import json

from dendrite.engine import GenResult
from dendrite.model.tokenizer import Tokenizer
from dendrite.server.responses import stream
from dendrite.server.worker import Generation


class _Worker:
    """The one call `stream` makes on the engine thread's side: cancel at the end."""

    def __init__(self) -> None:
        self.cancelled: list[Generation] = []

    def cancel(self, gen: Generation) -> None:
        self.cancelled.append(gen)


def _run(tokenizer, events: list[tuple], n: int = 1) -> tuple[list[dict], _Worker]:
    async def main() -> list[str]:
        gen = Generation(asyncio.get_running_loop(), asyncio.Queue())
        for ev in events:  # all queued before the stream first wakes up
            gen.events.put_nowait(ev)
        worker = _Worker()
        out = [s async for s in stream(worker, gen, n, chat=False, model="m", tokenizer=tokenizer,
                                       stop=[], logprobs=False, tt=None, include_usage=False)]
        return out, worker

    out, worker = asyncio.run(main())
    assert out[-1] == "data: [DONE]\n\n"
    return [json.loads(s[len("data: "):]) for s in out[:-1]], worker


def _result(tokenizer, ids: list[int]) -> GenResult:
    return GenResult(token_ids=ids, text=tokenizer.decode(ids, skip_special_tokens=True),
                     finish_reason="length", logprobs=[0.0] * len(ids), complete=True)


def test_queued_token_events_leave_as_one_chunk_per_choice(tiny_model):
    tok = Tokenizer(tiny_model)
    ids = [tok.encode("hello world again", add_special_tokens=False)[:3],
           tok.encode("tree fork", add_special_tokens=False)[:2]]
    events = [("tokens", 0, [ids[0][0]], [0.0], [[]]), ("tokens", 1, [ids[1][0]], [0.0], [[]]),
              ("tokens", 0, [ids[0][1]], [0.0], [[]]), ("tokens", 0, [ids[0][2]], [0.0], [[]]),
              ("tokens", 1, [ids[1][1]], [0.0], [[]]),
              ("done", 0, _result(tok, ids[0])), ("done", 1, _result(tok, ids[1]))]
    chunks, worker = _run(tok, events, n=2)
    per_choice = [[c["choices"][0] for c in chunks if c["choices"][0]["index"] == i] for i in range(2)]
    for i in range(2):
        # one chunk with all of its tokens' text, then the finish chunk
        assert len(per_choice[i]) == 2, per_choice[i]
        assert "".join(c["text"] for c in per_choice[i]) == tok.decode(ids[i], skip_special_tokens=True)
        assert per_choice[i][-1]["finish_reason"] == "length"
    assert len(worker.cancelled) == 1


def test_events_arriving_one_at_a_time_still_stream_token_by_token(tiny_model):
    tok = Tokenizer(tiny_model)
    ids = tok.encode("hello world", add_special_tokens=False)[:2]

    async def main() -> list[str]:
        gen = Generation(asyncio.get_running_loop(), asyncio.Queue())
        got: list[str] = []

        async def feed() -> None:
            for t in ids:
                gen.events.put_nowait(("tokens", 0, [t], [0.0], [[]]))
                await asyncio.sleep(0.01)  # the stream drains the queue in between
            gen.events.put_nowait(("done", 0, _result(tok, ids)))

        task = asyncio.create_task(feed())
        async for s in stream(_Worker(), gen, 1, chat=False, model="m", tokenizer=tok, stop=[],
                              logprobs=False, tt=None, include_usage=False):
            got.append(s)
        await task
        return got

    got = asyncio.run(main())
    texts = [json.loads(s[6:])["choices"][0]["text"] for s in got[:-1]]
    assert len(texts) == 3 and "".join(texts) == tok.decode(ids, skip_special_tokens=True)

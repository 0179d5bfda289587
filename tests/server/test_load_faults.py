"""Reliability: 64 concurrent streaming clients, and clients that disconnect,
cancel or time out (loopback only, bounded in count)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from conftest import live_pages_match, start_server

from dendrite.server.config import ServerConfig

CLIENTS = 64
PER_CLIENT = 2


@pytest.fixture(scope="module")
def srv(tiny_model):
    s = start_server(tiny_model, ServerConfig(max_tokens=4096))
    yield s
    s.stop()


def _request(i: int) -> dict:
    # distinct prompts of different lengths, some sharing a prefix, some chat
    if i % 3 == 2:
        return {"path": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": f"Tell me about {i}"}],
                         "max_tokens": 4, "temperature": 0.9, "seed": 1000 + i}}
    return {"path": "/v1/completions",
            "body": {"prompt": "The story goes " + "on and " * (i % 5) + str(i),
                     "max_tokens": 4, "temperature": 0.9 if i % 2 else 0.0, "seed": 1000 + i}}


def _text(path: str, body: dict) -> str:
    c = body["choices"][0]
    return c["message"]["content"] if "message" in c else c["text"]


async def _stream(client: httpx.AsyncClient, req: dict) -> tuple[str, str]:
    text, finish = "", None
    async with client.stream("POST", req["path"], json={**req["body"], "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for ch in json.loads(line[6:])["choices"]:
                text += ch.get("text") or ch.get("delta", {}).get("content") or ""
                finish = ch["finish_reason"] or finish
    return text, finish


def test_64_concurrent_streams_equal_one_at_a_time(srv):
    reqs = [_request(i) for i in range(CLIENTS * PER_CLIENT)]

    async def main() -> list[tuple[str, str]]:
        limits = httpx.Limits(max_connections=CLIENTS + 8)
        async with httpx.AsyncClient(base_url=srv.url, timeout=300, limits=limits) as client:
            async def one_client(k: int) -> list:
                return [await _stream(client, reqs[k * PER_CLIENT + j]) for j in range(PER_CLIENT)]
            per = await asyncio.gather(*(one_client(k) for k in range(CLIENTS)))
        return [x for p in per for x in p]

    got = asyncio.run(main())
    assert len(got) == len(reqs) and all(f == "length" or f == "stop" for _, f in got)
    with srv.client() as c:
        alone = [_text(r["path"], c.post(r["path"], json=r["body"]).json()) for r in reqs]
    assert [t for t, _ in got] == alone
    assert live_pages_match(srv) == (0, 0)


def _wait_idle(srv, timeout: float = 60.0) -> None:
    """Until the engine thread has no generation left (bounded; no timing asserted)."""
    deadline = time.monotonic() + timeout
    while srv.on_engine(lambda e: len(srv.worker._gens)) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_disconnects_cancels_and_timeouts_release_their_sequences(srv):
    long = {"prompt": "Go on forever", "max_tokens": 4000, "ignore_eos": True,
            "temperature": 0.8, "seed": 1}
    with srv.client() as c:
        keep = c.post("/v1/sequences", json={"prompt": "a handle that stays " * 4}).json()
        kids = c.post(f"/v1/sequences/{keep['id']}/fork", json={"n": 2}).json()["data"]
        before = c.get(f"/v1/sequences/{kids[0]['id']}").json()["num_tokens"]

        # 1. a streaming client reads a few chunks and hangs up
        with c.stream("POST", "/v1/completions", json={**long, "stream": True, "n": 3}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 3:
                    break
        # 2. a streaming generate on a handle, hung up: the handle stays as it was
        with c.stream("POST", f"/v1/sequences/{kids[0]['id']}/generate",
                      json={**{k: v for k, v in long.items() if k != "prompt"},
                            "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 3:
                    break

    # 3. a non-streaming client times out
    with srv.client() as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json=long, timeout=httpx.Timeout(120, read=0.5))

    # 4. asyncio clients cancelled mid-request (streaming and not)
    async def cancelled() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            async def streaming() -> None:
                async with client.stream("POST", "/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": "hi"}], "stream": True,
                        "max_tokens": 4000, "ignore_eos": True}) as r:
                    async for _ in r.aiter_lines():
                        pass
            tasks = [asyncio.create_task(streaming()),
                     asyncio.create_task(client.post("/v1/completions", json=long))]
            await asyncio.sleep(0.5)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    asyncio.run(cancelled())

    # 5. a program whose client times out
    script = ('program p():\n    "Once"\n    fork 2 as b:\n'
              '        gen t(max_tokens=4000, ignore_eos=true)\n    return t\n')
    with srv.client() as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/programs/run", json={"script": script}, timeout=httpx.Timeout(120, read=0.5))

    _wait_idle(srv)
    used, live = live_pages_match(srv)
    assert used == live > 0  # exactly the pages of the three live handles
    with srv.client() as c:
        assert len(c.get("/v1/sequences").json()["data"]) == 3
        assert c.get(f"/v1/sequences/{kids[0]['id']}").json()["num_tokens"] == before
        r = c.post(f"/v1/sequences/{kids[0]['id']}/generate", json={"max_tokens": 2})
        assert r.status_code == 200 and r.json()["sequence"]["num_tokens"] == before + 2
        for h in c.get("/v1/sequences").json()["data"]:
            c.delete(f"/v1/sequences/{h['id']}")
    assert live_pages_match(srv) == (0, 0)

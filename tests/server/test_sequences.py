"""Fork handles: /v1/sequences create, fork, generate, delete; key scoping, TTL,
limits; and /v1/programs/run."""

from __future__ import annotations

import json
import time

import pytest

from conftest import live_pages_match, start_server

from dendrite.server.config import ServerConfig

A, B = "key-a", "key-b"


@pytest.fixture(scope="module")
def srv(tiny_model):
    s = start_server(tiny_model, ServerConfig(api_keys=(A, B), max_handles_per_key=6,
                                              max_fork=4, handle_ttl=30.0))
    yield s
    s.stop()


@pytest.fixture
def a(srv):
    with srv.client(A) as c:
        yield c
    with srv.client(A) as c:  # leave no handle behind for the next test
        for h in c.get("/v1/sequences").json()["data"]:
            c.delete(f"/v1/sequences/{h['id']}")


def _sse_text(resp) -> tuple[str, list[dict]]:
    chunks = [json.loads(line[6:]) for line in resp.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    return "".join(c["choices"][0]["text"] for c in chunks if c.get("choices")), chunks


def test_generate_on_a_handle_equals_a_completion(a):
    kw = {"max_tokens": 8, "temperature": 0.8, "seed": 11}
    want = a.post("/v1/completions", json={"prompt": "In the forest", **kw}).json()
    h = a.post("/v1/sequences", json={"prompt": "In the forest"}).json()
    assert h["num_tokens"] == want["usage"]["prompt_tokens"]
    got = a.post(f"/v1/sequences/{h['id']}/generate", json=kw).json()
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    # the handle now holds prompt + generated tokens and continues from there
    assert got["sequence"]["num_tokens"] == h["num_tokens"] + 8
    info = a.get(f"/v1/sequences/{h['id']}").json()
    assert info["text"].endswith(want["choices"][0]["text"])


def test_fork_children_continue_like_n_choices(a):
    kw = {"max_tokens": 6, "temperature": 1.0}
    many = a.post("/v1/completions", json={"prompt": "Two paths", "n": 3, "seed": 40, **kw})
    h = a.post("/v1/sequences", json={"prompt": "Two paths"}).json()
    kids = a.post(f"/v1/sequences/{h['id']}/fork", json={"n": 3}).json()["data"]
    assert len({k["id"] for k in kids}) == 3
    texts = [a.post(f"/v1/sequences/{k['id']}/generate", json={"seed": 40 + i, **kw})
             .json()["choices"][0]["text"] for i, k in enumerate(kids)]
    assert texts == [c["text"] for c in many.json()["choices"]]
    # the parent is untouched by its children's generations
    assert a.get(f"/v1/sequences/{h['id']}").json()["num_tokens"] == h["num_tokens"]


def test_generate_streams_and_appends_text(a):
    h = a.post("/v1/sequences", json={"prompt": "Story:"}).json()
    body = {"text": " Then", "max_tokens": 5, "temperature": 0, "stream": True}
    r = a.post(f"/v1/sequences/{h['id']}/generate", json=body)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    text, chunks = _sse_text(r)
    want = a.post("/v1/completions", json={"prompt": "Story: Then", "max_tokens": 5,
                                           "temperature": 0}).json()["choices"][0]["text"]
    assert text == want
    assert chunks[-1]["sequence"]["num_tokens"] > h["num_tokens"]


def test_chat_messages_make_a_handle(a, srv):
    msgs = [{"role": "user", "content": "Hello"}]
    h = a.post("/v1/sequences", json={"messages": msgs}).json()
    rendered = srv.engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert h["num_tokens"] == len(srv.engine.tokenizer.encode(rendered, add_special_tokens=False))


def test_handles_are_scoped_to_their_key(a, srv):
    h = a.post("/v1/sequences", json={"prompt": "mine"}).json()
    with srv.client(B) as b:
        assert b.get(f"/v1/sequences/{h['id']}").status_code == 404
        assert b.post(f"/v1/sequences/{h['id']}/fork", json={"n": 2}).status_code == 404
        assert b.post(f"/v1/sequences/{h['id']}/generate", json={}).status_code == 404
        assert b.delete(f"/v1/sequences/{h['id']}").status_code == 404
        assert b.get("/v1/sequences").json()["data"] == []
    with srv.client() as anon:
        assert anon.post("/v1/sequences", json={"prompt": "x"}).status_code == 401
    assert a.get(f"/v1/sequences/{h['id']}").status_code == 200


def test_delete_releases_and_then_404(a, srv):
    h = a.post("/v1/sequences", json={"prompt": "short lived " * 8}).json()
    kids = a.post(f"/v1/sequences/{h['id']}/fork", json={"n": 2}).json()["data"]
    used, live = live_pages_match(srv)
    assert used == live > 0
    for x in [h] + kids:
        r = a.delete(f"/v1/sequences/{x['id']}")
        assert r.status_code == 200 and r.json()["deleted"] is True
    assert a.delete(f"/v1/sequences/{h['id']}").status_code == 404
    assert a.post(f"/v1/sequences/{kids[0]['id']}/generate", json={}).status_code == 404
    assert live_pages_match(srv) == (0, 0)


def test_limits_on_handles_and_fan_out(a):
    h = a.post("/v1/sequences", json={"prompt": "limits"}).json()
    r = a.post(f"/v1/sequences/{h['id']}/fork", json={"n": 5})
    assert r.status_code == 400 and "fork limit of 4" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "n"
    assert a.post(f"/v1/sequences/{h['id']}/fork", json={"n": 4}).status_code == 200
    r = a.post(f"/v1/sequences/{h['id']}/fork", json={"n": 2})  # 1 + 4 + 2 > 6
    assert r.status_code == 429 and "limit is 6" in r.json()["error"]["message"]
    r = a.post("/v1/completions", json={"prompt": "x", "n": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = a.post(f"/v1/sequences/{h['id']}/generate", json={"n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_handles_expire_after_their_ttl(a, srv):
    h = a.post("/v1/sequences", json={"prompt": "ephemeral", "ttl": 0.3}).json()
    keep = a.post("/v1/sequences", json={"prompt": "kept"}).json()
    deadline = time.monotonic() + 30
    while a.get("/v1/sequences").json()["data"] != [] and time.monotonic() < deadline:
        ids = [x["id"] for x in a.get("/v1/sequences").json()["data"]]
        if h["id"] not in ids:
            break
        time.sleep(0.1)
    assert a.get(f"/v1/sequences/{h['id']}").status_code == 404
    assert a.get(f"/v1/sequences/{keep['id']}").status_code == 200
    used, live = live_pages_match(srv)
    assert used == live
    r = a.post("/v1/sequences", json={"prompt": "x", "ttl": 10**9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ttl"


SCRIPT = '''program best_of(question, n=3):
    "Q: {question}\\nA:"
    fork n as answer:
        gen text_answer(max_tokens=4, temperature=0.8)
    select answer by logprob
    return text_answer
'''


def test_program_runs_remotely(a, srv):
    import dendrite.dsl as dsl

    r = a.post("/v1/programs/run", json={"script": SCRIPT, "args": {"question": "2+2?"},
                                         "seed": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    want = dsl.loads(SCRIPT)
    direct = srv.on_engine(lambda e: want.run(e, seed=5, question="2+2?").value)
    assert body["result"] == direct and body["gen_tokens"] > 0
    assert live_pages_match(srv)[0] == live_pages_match(srv)[1]


def test_program_errors_name_the_place(a):
    r = a.post("/v1/programs/run", json={"script": "program p(:\n  gen x()\n"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "script"
    assert "<script>:1:" in r.json()["error"]["message"]
    r = a.post("/v1/programs/run", json={"script": SCRIPT, "args": {"nope": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "args"
    assert "nope" in r.json()["error"]["message"]

"""Bad requests get a 4xx that names the field; the engine loses nothing."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import live_pages_match, start_server

from dendrite.server.config import ServerConfig


@pytest.fixture(scope="module")
def srv(tiny_model):
    s = start_server(tiny_model, ServerConfig(max_request_bytes=4096, max_tokens=64,
                                              max_prompt_tokens=300))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def c(srv):
    with srv.client() as client:
        yield client


def _err(r, status=400):
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_malformed_json_is_400(c):
    e = _err(c.post("/v1/completions", content=b'{"prompt": "x",',
                    headers={"content-type": "application/json"}))
    assert "not valid JSON" in e["message"] and e["param"] == "body"
    e = _err(c.post("/v1/completions", content=b"[1, 2]",
                    headers={"content-type": "application/json"}))
    assert e["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "n": True}, "n"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({}, "prompt"),
])
def test_wrong_types_name_the_field(c, body, param):
    e = _err(c.post("/v1/completions", json=body))
    assert e["param"] == param and e["message"].startswith(param)


def test_unknown_fields_are_named(c):
    e = _err(c.post("/v1/completions", json={"prompt": "x", "temprature": 0.5}))
    assert e["param"] == "temprature" and "unknown field" in e["message"]
    e = _err(c.post("/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "x", "mood": 1}]}))
    assert e["param"] == "messages.0.mood"
    e = _err(c.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}))
    assert e["param"] == "messages.0.role"


def test_huge_prompts_and_bodies(c):
    e = _err(c.post("/v1/completions", json={"prompt": "word " * 1000}), 413)
    assert "4096 bytes" in e["message"]

    def chunked():  # no Content-Length: the server counts what arrives
        yield b'{"prompt": "'
        yield b"w" * 5000
        yield b'"}'

    e = _err(c.post("/v1/completions", content=chunked(),
                    headers={"content-type": "application/json"}), 413)
    assert e["param"] == "body"
    e = _err(c.post("/v1/completions", json={"prompt": list(range(1, 400))}))
    assert e["param"] == "prompt" and "at most 300" in e["message"]
    e = _err(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 65}))
    assert e["param"] == "max_tokens" and "64" in e["message"]
    e = _err(c.post("/v1/sequences", json={"prompt": list(range(1, 400))}))
    assert e["param"] == "prompt"


def test_invalid_schemas_and_grammars(c):
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    e = _err(c.post("/v1/completions", json={"prompt": "x", "response_format": rf}))
    assert e["param"] == "response_format.json_schema.schema"
    e = _err(c.post("/v1/completions", json={"prompt": "x", "regex": "(unclosed"}))
    assert e["param"] == "regex"
    e = _err(c.post("/v1/completions", json={"prompt": "x", "grammar": "start: undefined_rule"}))
    assert e["param"] == "grammar"
    e = _err(c.post("/v1/completions", json={"prompt": "x", "response_format":
                                             {"type": "json_schema"}}))
    assert e["param"] == "response_format.json_schema"
    e = _err(c.post("/v1/completions", json={"prompt": "x", "regex": "a",
                                             "response_format": {"type": "json_object"}}))
    assert "at most one" in e["message"]


def test_unsupported_options_are_refused_by_name(c):
    e = _err(c.post("/v1/completions", json={"prompt": "x", "presence_penalty": 0.5}))
    assert e["param"] == "presence_penalty"
    e = _err(c.post("/v1/completions", json={"prompt": "x", "echo": True}))
    assert e["param"] == "echo"


_json = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20)
                     | st.floats(allow_nan=False) | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
_fields = st.sampled_from(["prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                           "logprobs", "stream", "response_format", "regex", "model", "messages",
                           "top_k", "user", "bogus"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/sequences"]),
       body=st.dictionaries(_fields, _json, max_size=5))
def test_fuzzed_bodies_never_crash_the_server(c, srv, path, body):
    """Any JSON body is a 2xx or a 4xx with a message; never a 5xx, never a leak."""
    if "max_tokens" not in body:
        body["max_tokens"] = 2  # keep the accepted ones short
    r = c.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert r.json()["error"]["message"]
    elif path == "/v1/sequences":
        c.delete(f"/v1/sequences/{r.json()['id']}")


def test_after_all_that_no_page_leaked_and_the_engine_works(c, srv):
    used, live = live_pages_match(srv)
    assert used == live == 0
    r = c.post("/v1/completions", json={"prompt": "still fine", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_grammar_errors_found_only_when_the_engine_compiles_are_400(c, srv):
    """An unknown special token is known only with the tokenizer, at submit: still a
    400 naming the field (completions, chat, streaming and a handle's generate)."""
    bad = 'start: <|nope|> "a"'
    e = _err(c.post("/v1/completions", json={"prompt": "x", "grammar": bad, "max_tokens": 4}))
    assert e["param"] == "grammar" and "unknown special token" in e["message"]
    rf = {"type": "grammar", "grammar": bad}
    e = _err(c.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "response_format": rf, "stream": True}))
    assert e["param"] == "response_format.grammar" and "<|nope|>" in e["message"]
    e = _err(c.post("/v1/completions", json={"prompt": "x", "n": 3, "grammar": bad}))
    assert e["param"] == "grammar"
    h = c.post("/v1/sequences", json={"prompt": "x"}).json()
    e = _err(c.post(f"/v1/sequences/{h['id']}/generate", json={"grammar": bad}))
    assert e["param"] == "grammar"
    # the handle is unchanged and usable
    r = c.post(f"/v1/sequences/{h['id']}/generate", json={"max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["sequence"]["num_tokens"] == h["num_tokens"] + 2
    c.delete(f"/v1/sequences/{h['id']}")
    used, live = live_pages_match(srv)
    assert used == live


def test_a_bug_is_an_openai_shaped_500_and_the_server_lives_on(c, srv):
    """An exception that is not a bad request (here: the engine's tokenizer breaks)
    answers a JSON 500 instead of dropping the connection."""
    def broken(*a, **k):
        raise RuntimeError("tokenizer exploded")

    real = srv.engine.encode
    srv.on_engine(lambda e: setattr(e, "encode", broken))
    try:
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    finally:
        srv.on_engine(lambda e: setattr(e, "encode", real))
    e = _err(r, 500)
    assert e["type"] == "server_error" and "tokenizer exploded" in e["message"]
    assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200

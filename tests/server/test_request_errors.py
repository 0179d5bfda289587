"""A request the engine finishes with an error (non-finite logits) is answered as an
error naming the cause, streaming or not, and the server goes on serving."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import live_pages_match, start_server


@pytest.fixture(scope="module")
def nan_srv(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("nan_model") / "llama"
    shutil.copytree(tiny_model, d)
    w = load_file(str(d / "model.safetensors"))
    w["model.norm.weight"] = torch.full_like(w["model.norm.weight"], float("nan"))
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    s = start_server(d)
    yield s
    s.stop()


def test_nan_logits_are_a_500_naming_the_cause_not_a_stop(nan_srv):
    with nan_srv.client() as c:
        for _ in range(2):  # the server lives on after the first failure
            r = c.post("/v1/completions", json={"model": "llama", "prompt": "hi", "max_tokens": 4,
                                                "n": 2})
            assert r.status_code == 500, r.text
            err = r.json()["error"]
            assert err["type"] == "server_error"
            assert "non-finite logits" in err["message"], err
    used, live = live_pages_match(nan_srv)
    assert used == live


def test_nan_logits_end_a_stream_with_an_error_event(nan_srv):
    with nan_srv.client() as c:
        with c.stream("POST", "/v1/completions", json={"model": "llama", "prompt": "hi",
                                                        "max_tokens": 4, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    bodies = [json.loads(e) for e in events if e != "[DONE]"]
    assert any("error" in b and "non-finite logits" in b["error"]["message"] for b in bodies), bodies
    assert not any(ch.get("finish_reason") == "stop"
                   for b in bodies for ch in b.get("choices", [])), bodies

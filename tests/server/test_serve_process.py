"""`dendrite serve` as a user runs it: a subprocess on 127.0.0.1, a request,
then a stop signal while handles and a stream are live; and /health, /metrics."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import start_server


def _metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name: value}; every sample has a HELP and a TYPE line."""
    out, helped, typed = {}, set(), set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("gauge", "counter"), line
            typed.add(name)
        elif line:
            name, value = line.split(" ")
            assert re.fullmatch(r"[a-z_]+", name), line
            out[name] = float(value)
    assert set(out) == helped == typed
    return out


@pytest.fixture()
def served(tiny_model):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_PROXY": "127.0.0.1"}
    p = subprocess.Popen([sys.executable, "-m", "dendrite.cli", "serve", "--model",
                          str(tiny_model), "--port", "0", "--device", "cpu"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    url = None
    for line in p.stderr:
        err.append(line)
        m = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
        if m:
            url = m.group(1)
            break
    assert url, "".join(err)
    rest = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    rest.start()
    yield p, url, err, rest
    if p.poll() is None:
        p.kill()
        p.wait()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_answers_then_stops_cleanly_with_live_handles(served, sig):
    p, url, err, rest = served
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        deadline = time.monotonic() + 60
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert c.get("/health").json()["status"] == "ok"
        r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4,
                                            "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        h = c.post("/v1/sequences", json={"prompt": "A tree"}).json()
        c.post(f"/v1/sequences/{h['id']}/fork", json={"n": 3}).raise_for_status()
        # a stream that is still generating when the signal comes
        with c.stream("POST", "/v1/completions", json={
                "prompt": "Once", "max_tokens": 4000, "ignore_eos": True, "stream": True}) as s:
            lines = s.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert '"choices"' in first, first
            t0 = time.monotonic()
            p.send_signal(sig)
            rc = p.wait(timeout=30)
            elapsed = time.monotonic() - t0
    rest.join(10)
    text = "".join(err)
    assert rc == 0, text
    assert elapsed < 10, elapsed
    assert "Traceback" not in text and "Error" not in text.replace("errors", ""), text
    assert "released 4 live handle(s), 0 page(s) in use" in text
    assert "[dendrite] server stopped" in text


def test_health_and_metrics_move_with_requests_and_forks(tiny_model):
    srv = start_server(tiny_model)
    try:
        with srv.client() as c:
            assert c.get("/health").json() == {"status": "ok", "model": tiny_model.name}
            r = c.get("/metrics")
            assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
            m0 = _metrics(r.text)
            assert m0["dendrite_requests_running"] == 0 == m0["dendrite_requests_queued"]
            assert m0["dendrite_kv_pages_used"] + m0["dendrite_kv_pages_free"] == \
                m0["dendrite_kv_pages_total"]
            assert m0["dendrite_generation_tokens_per_second"] == 0

            # while a stream runs: one running request; pages in use grow
            with c.stream("POST", "/v1/completions", json={
                    "prompt": "Once upon a time " * 8, "max_tokens": 3000, "ignore_eos": True,
                    "stream": True}) as s:
                lines = s.iter_lines()  # kept: a dropped iterator closes the stream
                assert next(lines).startswith("data: ")
                mid = _metrics(c.get("/metrics").text)
                assert mid["dendrite_requests_running"] == 1
                assert mid["dendrite_kv_pages_used"] > m0["dendrite_kv_pages_used"]
            # the stream closed early: its request is cancelled
            deadline = time.monotonic() + 10
            while _metrics(c.get("/metrics").text)["dendrite_requests_running"] != 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            # the handle and the fork: live sequences, pages held, the fork counter
            h = c.post("/v1/sequences", json={"prompt": "A tree of thought " * 4}).json()
            c.post(f"/v1/sequences/{h['id']}/fork", json={"n": 5}).raise_for_status()
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 6, "n": 2,
                                                "ignore_eos": True})
            assert r.status_code == 200
            m1 = _metrics(c.get("/metrics").text)
        assert m1["dendrite_sequences_live"] == 6
        assert m1["dendrite_forks_total"] >= m0["dendrite_forks_total"] + 5 + 2
        assert m1["dendrite_requests_total"] >= m0["dendrite_requests_total"] + 2
        assert m1["dendrite_generation_tokens_total"] >= 12 + 1
        assert m1["dendrite_generation_tokens_per_second"] > 0
        assert m1["dendrite_kv_pages_used"] > m0["dendrite_kv_pages_used"]
        assert m1["dendrite_kv_pages_free"] == \
            m1["dendrite_kv_pages_total"] - m1["dendrite_kv_pages_used"]
        assert m1["dendrite_requests_running"] == 0
        assert m1["dendrite_engine_steps_total"] > m0["dendrite_engine_steps_total"]
    finally:
        srv.stop()

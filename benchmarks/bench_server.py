"""Benchmark `dendrite serve` over loopback HTTP.

Throughput (generated tokens/s) and p50/p99 request latency at 1, 8 and 64
concurrent clients, streaming and not; and one best-of-8 request three ways:
`n=8`, 8 separate requests, and one fork call (POST /v1/sequences, fork 8,
8 generates). The server runs in this process (uvicorn on 127.0.0.1, one
engine thread); clients are threads with httpx.

    python benchmarks/bench_server.py --model DIR [--quick] [--out results.json]

Prints a markdown table; --quick uses the tiny model and small counts (a CPU
smoke run).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _start(model: str | None, device: str | None):
    import uvicorn

    from dendrite.engine import Engine
    from dendrite.server.app import create_app
    from dendrite.server.config import ServerConfig

    engine = Engine(model, device=device)
    app = create_app(engine, ServerConfig(max_fork=64, max_handles_per_key=256))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    return engine, server, thread, f"http://127.0.0.1:{port}"


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _one(client, body: dict, stream: bool) -> int:
    """One completion; returns its generated token count."""
    if not stream:
        r = client.post("/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]
    n = 0
    with client.stream("POST", "/v1/completions",
                       json={**body, "stream": True,
                             "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                d = json.loads(line[6:])
                if "error" in d:
                    raise RuntimeError(d["error"]["message"])
                if d.get("usage"):
                    n = d["usage"]["completion_tokens"]
    return n


def load(url: str, clients: int, requests: int, max_tokens: int, stream: bool) -> dict:
    import httpx

    lat: list[float] = []
    toks = [0]
    lock = threading.Lock()

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, timeout=600, trust_env=False) as c:
            for k in range(i, requests, clients):
                t = time.perf_counter()
                n = _one(c, {"prompt": f"Request {k}: once upon a time", "max_tokens": max_tokens,
                             "temperature": 0.8, "seed": k, "ignore_eos": True}, stream)
                with lock:
                    lat.append(time.perf_counter() - t)
                    toks[0] += n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(worker, range(clients)))
    wall = time.perf_counter() - t0
    return {"clients": clients, "stream": stream, "requests": requests, "tokens": toks[0],
            "seconds": wall, "tokens_per_s": toks[0] / wall, "p50_s": _pct(lat, 0.5),
            "p99_s": _pct(lat, 0.99)}


def best_of_8(url: str, prompt: str, max_tokens: int) -> list[dict]:
    import httpx

    body = {"max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True}
    out = []
    with httpx.Client(base_url=url, timeout=600, trust_env=False) as c:
        t = time.perf_counter()
        c.post("/v1/completions", json={"prompt": prompt, "n": 8, "seed": 1, **body}
               ).raise_for_status()
        out.append({"way": "n=8", "seconds": time.perf_counter() - t})

        t = time.perf_counter()
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda i: _one(c, {"prompt": prompt, "seed": 1 + i, **body}, False),
                        range(8)))
        out.append({"way": "8 separate requests", "seconds": time.perf_counter() - t})

        t = time.perf_counter()
        h = c.post("/v1/sequences", json={"prompt": prompt}).json()
        kids = c.post(f"/v1/sequences/{h['id']}/fork", json={"n": 8}).json()["data"]

        def gen(i: int) -> None:
            c.post(f"/v1/sequences/{kids[i]['id']}/generate",
                   json={"seed": 1 + i, **body}).raise_for_status()

        with ThreadPoolExecutor(8) as ex:
            list(ex.map(gen, range(8)))
        out.append({"way": "fork: sequences + fork + 8 generates",
                    "seconds": time.perf_counter() - t})
        for k in [h, *kids]:
            c.delete(f"/v1/sequences/{k['id']}")
    return out


def table(res: dict) -> str:
    lines = ["| clients | stream | requests | tokens/s | p50 latency (s) | p99 latency (s) |",
             "|---:|:---:|---:|---:|---:|---:|"]
    for r in res["load"]:
        lines.append(f"| {r['clients']} | {'yes' if r['stream'] else 'no'} | {r['requests']} | "
                     f"{r['tokens_per_s']:.1f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} |")
    lines += ["", f"Best-of-8 ({res['best_of_8_prompt_tokens']}-character prompt, "
                  f"{res['max_tokens']} tokens each):", "",
              "| way | seconds |", "|:---|---:|"]
    for r in res["best_of_8"]:
        lines.append(f"| {r['way']} | {r['seconds']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model dir (default: the built-in model; "
                                                  "--quick: the tiny model)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny model, small counts (CPU smoke)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    model = args.model
    tmp = None
    if args.quick and model is None:
        from dendrite.tiny_model import build_tiny_model

        tmp = tempfile.TemporaryDirectory()
        model = str(build_tiny_model(Path(tmp.name) / "tiny", "llama"))
    max_tokens = 8 if args.quick else 128
    per_client = 2 if args.quick else 4
    engine, server, thread, url = _start(model, args.device)
    try:
        res: dict = {"model": str(engine.model_dir), "device": str(engine.device),
                     "quick": args.quick, "max_tokens": max_tokens, "load": []}
        for clients in (1, 8, 64):
            for stream in (False, True):
                res["load"].append(load(url, clients, clients * per_client, max_tokens, stream))
        prompt = "Think step by step about a tree of thought. " * (4 if args.quick else 64)
        res["best_of_8_prompt_tokens"] = len(prompt)
        res["best_of_8"] = best_of_8(url, prompt, max_tokens)
    finally:
        server.should_exit = True
        thread.join(60)
        engine.close()
        if tmp is not None:
            tmp.cleanup()
    print(table(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

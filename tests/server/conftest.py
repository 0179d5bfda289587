"""A live server on 127.0.0.1 (uvicorn in a background thread) over a tiny model."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from dendrite.tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random-weight llama with a real trained tokenizer and a chat template."""
    return build_tiny_model(tmp_path_factory.mktemp("server_model"), "llama")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    engine: Any
    worker: Any
    server: Any
    thread: threading.Thread

    def client(self, key: str | None = None, **kw) -> "httpx.Client":
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kw)

    def on_engine(self, fn):
        """Run `fn(engine)` on the engine thread (the only one allowed to touch it)."""
        return self.worker.call_sync(lambda: fn(self.engine))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def start_server(model_dir, config=None, **engine_kw) -> LiveServer:
    import uvicorn

    from dendrite.engine import Engine
    from dendrite.server.app import create_app

    engine = Engine(model_dir, device="cpu", **engine_kw)
    app = create_app(engine, config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", engine, app.state.worker, server, thread)


def live_pages_match(srv: LiveServer) -> tuple[int, int]:
    """(pages in use, pages of live handles) once the prefix cache is emptied: equal
    when every request released its sequences."""
    import numpy as np

    def count(engine):
        if engine.cache is not None:
            engine.cache.clear()
        pages = set()
        for h in srv.worker.handles.values():
            pages.update(np.asarray(engine.tree.pages(h.seq.node)).tolist())
        return engine.pool.used, len(pages)

    return srv.on_engine(count)

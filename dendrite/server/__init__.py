"""An OpenAI-compatible HTTP server with fork handles (`dendrite serve`).

    app = create_app(Engine(model_dir), ServerConfig(api_keys=("k",)))

One engine thread owns the engine (`EngineWorker`); the FastAPI app turns
requests into commands for it and streams tokens back. See docs/server.md.
"""

from dendrite.server.config import ServerConfig
from dendrite.server.errors import ApiError

__all__ = ["ApiError", "ServerConfig", "create_app", "serve_main"]


def create_app(*args, **kwargs):
    """`dendrite.server.app.create_app` (imported lazily: FastAPI is an extra)."""
    from dendrite.server.app import create_app as _create

    return _create(*args, **kwargs)


def serve_main(argv):
    """`dendrite serve` (see dendrite.server.cli)."""
    from dendrite.server.cli import serve_main as _main

    return _main(argv)

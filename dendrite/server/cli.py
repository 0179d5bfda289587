"""``dendrite serve --model DIR --port 8000 [--api-key KEY] [limits]``.

`add_arguments` and `run` are the `serve` subcommand of the `dendrite` command
(dendrite/cli.py), which gives it the CLI's exit-status rule: 2 for a bad
command line or a missing server extra (found before the model loads), 1 for
a model dir that fails to load, 0 after a clean stop. SIGINT and SIGTERM are
the normal way to stop a server: both shut it down gracefully (requests in
flight get a 503 event, live handles are released) and exit 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, Sequence

from dendrite.cli_common import (UsageError, check_device, check_model_dir, positive_int,
                                 run_command)
from dendrite.server.config import ServerConfig

__all__ = ["add_arguments", "run", "serve_main"]

#: What a user without the server's dependencies is told (one line, exit 2).
MISSING_EXTRA = ('{name} is missing; install the server extra: pip install ".[serve]" in the '
                 'checkout, or pip install fastapi uvicorn')


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port: {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535 (0: any free port), got {v}")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be finite and > 0, got {text}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``dendrite serve`` (none of them imports the server's dependencies)."""
    d = ServerConfig()
    p.add_argument("--model", default=None,
                   help="local HuggingFace-format model dir (default: the built-in model)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0: any free)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send (default: the model dir's name)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept this bearer key (repeatable); none: no auth")
    p.add_argument("--num-pages", type=positive_int, default=None,
                   help="KV cache pages (default: auto)")
    p.add_argument("--max-request-bytes", type=positive_int, default=d.max_request_bytes,
                   help=f"largest request body (default {d.max_request_bytes})")
    p.add_argument("--max-tokens", type=positive_int, default=d.max_tokens,
                   help=f"largest max_tokens a request may ask for (default {d.max_tokens})")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                   help="longest prompt accepted (default: model context / KV pool)")
    p.add_argument("--max-handles-per-key", type=positive_int, default=d.max_handles_per_key,
                   help=f"live fork handles per API key (default {d.max_handles_per_key})")
    p.add_argument("--max-fork", type=positive_int, default=d.max_fork,
                   help=f"largest fork fan-out and largest n (default {d.max_fork})")
    p.add_argument("--handle-ttl", type=_seconds, default=d.handle_ttl,
                   help=f"seconds a handle lives after its last use (default {d.handle_ttl:g})")
    p.add_argument("--max-program-seconds", type=_seconds, default=d.max_program_seconds,
                   help=f"longest /v1/programs/run (default {d.max_program_seconds:g})")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default info)")


def _quiet_signals(server_cls: type, on_stop: Any) -> type:
    """uvicorn's Server, but a SIGINT/SIGTERM that stopped it is not re-raised
    afterwards: stopping a server that way is a success, not an interruption.
    `on_stop()` runs at the first signal, so that open streams end (with a 503
    event) before uvicorn's graceful-shutdown timeout would cancel them."""

    class Server(server_cls):  # type: ignore[misc,valid-type]
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            if not getattr(self, "_told", False):
                self._told = True
                print(f"[dendrite] signal {sig}: stopping", file=sys.stderr, flush=True)
                on_stop()
            self._captured_signals.clear()

    return Server


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until stopped; errors are raised for `run_command`."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UsageError(MISSING_EXTRA.format(name=e.name or "a dependency")) from None
    check_model_dir(args.model)
    check_device(args.device)
    try:
        config = ServerConfig(api_keys=tuple(args.api_key), model_name=args.model_name,
                              max_request_bytes=args.max_request_bytes,
                              max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                              max_handles_per_key=args.max_handles_per_key,
                              max_fork=args.max_fork, handle_ttl=args.handle_ttl,
                              max_program_seconds=args.max_program_seconds)
    except ValueError as e:
        raise UsageError(str(e)) from None
    logging.basicConfig(level=args.log_level.upper(), format="[dendrite] %(message)s")

    from dendrite.engine import Engine
    from dendrite.server.app import create_app

    t0 = time.perf_counter()
    engine = Engine(args.model, device=args.device, num_pages=args.num_pages)
    try:
        app = create_app(engine, config)
        server = _quiet_signals(uvicorn.Server, app.state.worker.stop_soon)(uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.log_level,
            timeout_graceful_shutdown=3))
        loaded = time.perf_counter() - t0

        # The real port (--port 0 picks one) is known once the socket is bound.
        async def _announce() -> None:
            port = args.port
            for s in getattr(server, "servers", []):
                for sock in s.sockets:
                    port = sock.getsockname()[1]
            print(f"[dendrite] model {engine.model_dir} on {engine.device} loaded in "
                  f"{loaded:.1f}s; serving on http://{args.host}:{port}", file=sys.stderr,
                  flush=True)

        original_startup = server.startup

        async def startup(sockets: Any = None) -> None:
            await original_startup(sockets=sockets)
            if server.started:
                await _announce()

        server.startup = startup  # type: ignore[method-assign]
        server.run()
        if not server.started:
            # uvicorn logged why (e.g. the port is taken) and returned.
            raise OSError(f"could not serve on {args.host}:{args.port} (see the log above)")
    finally:
        engine.close()
    print("[dendrite] server stopped", file=sys.stderr, flush=True)
    return 0


def serve_main(argv: Sequence[str] | None = None) -> int:
    """``python -m dendrite.server``: the same as ``dendrite serve``."""
    p = argparse.ArgumentParser(prog="dendrite serve", usage="%(prog)s [options]",
                                description="Serve a model over an OpenAI-compatible HTTP API "
                                            "with fork handles (docs/server.md).")
    add_arguments(p)
    p.add_argument("--traceback", action="store_true",
                   help="show the full traceback of an error instead of one line")
    try:
        args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return run_command(lambda: run(args), prog="dendrite serve", traceback=args.traceback)

"""``dendrite serve --model DIR --port 8000 [--api-key KEY] [limits]``."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from dendrite.server.config import ServerConfig


def _parser() -> argparse.ArgumentParser:
    d = ServerConfig()
    p = argparse.ArgumentParser(prog="dendrite serve",
                                description="Serve a model over an OpenAI-compatible HTTP API "
                                            "with fork handles (docs/server.md).")
    p.add_argument("--model", default=None,
                   help="local HuggingFace-format model dir (default: the built-in model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send (default: the model dir's name)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept this bearer key (repeatable); none: no auth")
    p.add_argument("--num-pages", type=int, default=None, help="KV cache pages (default: auto)")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted (default: model context / KV pool)")
    p.add_argument("--max-handles-per-key", type=int, default=d.max_handles_per_key,
                   help="live fork handles per API key")
    p.add_argument("--max-fork", type=int, default=d.max_fork,
                   help="largest fork fan-out and largest n")
    p.add_argument("--handle-ttl", type=float, default=d.handle_ttl,
                   help="seconds a handle lives after its last use")
    p.add_argument("--max-program-seconds", type=float, default=d.max_program_seconds)
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    return p


def serve_main(argv: list[str]) -> int:
    """Entry point of ``dendrite serve``; returns the process exit status."""
    args = _parser().parse_args(list(argv))
    try:
        import uvicorn

        from dendrite.server.app import create_app
    except ImportError as e:
        print(f"dendrite serve: {e.name} is missing; install the server extra: "
              "pip install 'dendrite[serve]'", file=sys.stderr)
        return 2
    try:
        config = ServerConfig(api_keys=tuple(args.api_key), model_name=args.model_name,
                              max_request_bytes=args.max_request_bytes,
                              max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                              max_handles_per_key=args.max_handles_per_key,
                              max_fork=args.max_fork, handle_ttl=args.handle_ttl,
                              max_program_seconds=args.max_program_seconds)
    except ValueError as e:
        print(f"dendrite serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="[dendrite] %(message)s")
    from dendrite.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(args.model, device=args.device, num_pages=args.num_pages)
    print(f"[dendrite] model {engine.model_dir} on {engine.device} loaded in "
          f"{time.perf_counter() - t0:.1f}s; serving on http://{args.host}:{args.port}",
          file=sys.stderr, flush=True)
    app = create_app(engine, config)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        engine.close()
    print("[dendrite] server stopped", file=sys.stderr, flush=True)
    return 0

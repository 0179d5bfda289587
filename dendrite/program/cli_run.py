"""``dendrite run script.dendrite --model DIR --arg question=... [--tree out.html] [--seed N]``.

Compiles the script, runs its program on an engine with a progress line on
stderr, prints the result and a summary of the explored tree, and optionally
writes the tree as a self-contained HTML page.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from dendrite.program.program import Param, Program


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dendrite run",
        description="Run a .dendrite search script (or a standard one: tot, mcts, beam, self_consistency).",
    )
    p.add_argument("script", help="path of a .dendrite file, or the name of a standard script")
    p.add_argument("--model", default=None, help="local HuggingFace-format model dir (default: the built-in model)")
    p.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                   help="a program argument (repeatable); NAME=@file reads the value from a file")
    p.add_argument("--program", default=None, help="which program of the script to run (default: the first)")
    p.add_argument("--seed", type=int, default=0, help="run seed; every branch's seed derives from it (default 0)")
    p.add_argument("--tree", default=None, metavar="OUT.html", help="write a picture of the explored tree")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--max-nodes", type=int, default=40, help="nodes shown in the tree summary")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def resolve_script(name: str) -> Path:
    """A path as given, else a standard script by name."""
    p = Path(name)
    if p.exists():
        return p
    from dendrite.program import dsl_module

    try:
        return dsl_module().standard_script(name)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such script: {name}") from None


def convert_arg(param: Param, text: str) -> Any:
    """Convert a command-line value by the type of the parameter's default."""
    if text.startswith("@") and len(text) > 1 and Path(text[1:]).is_file():
        text = Path(text[1:]).read_text()
    d = param.default
    if isinstance(d, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--arg {param.name}: expected true/false, got {text!r}")
    if isinstance(d, int):
        return int(text)
    if isinstance(d, float):
        return float(text)
    if isinstance(d, (list, dict)):
        return json.loads(text)
    return text


def parse_args(program: Program, pairs: Sequence[str]) -> dict[str, Any]:
    """``["name=value", ...]`` to program arguments (names checked)."""
    by_name = {p.name: p for p in program.params}
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--arg needs NAME=VALUE, got {pair!r}")
        k, v = pair.split("=", 1)
        k = k.strip()
        if k not in by_name:
            raise ValueError(
                f"program {program.name} has no parameter {k!r} (parameters: {', '.join(by_name) or 'none'})"
            )
        out[k] = convert_arg(by_name[k], v)
    missing = [p.name for p in program.params if p.required and p.name not in out]
    if missing:
        raise ValueError(f"missing --arg for {', '.join(missing)}")
    return out


def format_value(value: Any) -> str:
    """How a program's return value prints."""
    from dendrite.program.state import State

    if isinstance(value, State):
        return value.text
    if isinstance(value, list):
        return "\n".join(format_value(v) for v in value)
    return str(value)


def _jsonable(value: Any) -> Any:
    from dendrite.program.state import State

    if isinstance(value, State):
        return {"text": value.text, "captures": {k: _jsonable(v) for k, v in value.captures.items()}}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def run_script_main(argv: Sequence[str]) -> int:
    """Entry point of ``dendrite run``; returns the process exit status."""
    args = _parser().parse_args(list(argv))
    from dendrite.program import dsl_module

    dsl = dsl_module()

    try:
        path = resolve_script(args.script)
        program = dsl.load(path, name=args.program)
        prog_args = parse_args(program, args.arg)
    except dsl.ScriptError as e:
        print(e.format(), file=sys.stderr)
        return 2
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"dendrite run: {e}", file=sys.stderr)
        return 2

    from dendrite.engine import Engine
    from dendrite.program.progress import Progress

    engine = Engine(args.model, device=args.device)
    progress = None if args.quiet else Progress()
    try:
        result = program.run(engine, seed=args.seed, progress=progress, **prog_args)
    except dsl.ScriptError as e:
        if progress is not None:
            progress.close()
        print(e.format(), file=sys.stderr)
        return 1
    if progress is not None:
        progress.close(_RunInfo(result))

    if args.json:
        print(json.dumps({"result": _jsonable(result.value), "steps": result.steps,
                          "nodes": len(result.tree), "gen_tokens": result.gen_tokens}, indent=2))
    else:
        print(format_value(result.value))
        print()
        print(result.tree.summary(max_nodes=args.max_nodes))
        print(f"{result.steps} engine steps, {result.gen_tokens} generated tokens, {result.seconds:.2f}s")
    if args.tree:
        from dendrite.tree_view import write_html

        out = write_html(result.tree, args.tree, title=f"{program.name} · {path.name}",
                         result=format_value(result.value))
        print(f"tree written to {out}", file=sys.stderr)
    return 0


class _RunInfo:
    """What `Progress.close` reads, taken from a finished result."""

    def __init__(self, result: Any):
        self.steps = result.steps
        self.tree = result.tree
        self.gen_tokens = result.gen_tokens
        self.elapsed = result.seconds

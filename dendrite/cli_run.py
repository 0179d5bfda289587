"""``dendrite run script.dendrite --model DIR --arg question=... [--tree out.html] [--seed N]``.

Compiles the script, runs its program on an engine with a progress line on
stderr, prints the result and a summary of the explored tree, and optionally
writes the tree as a self-contained HTML page.

Everything the command line names is checked before the model loads (a bad
--tree path costs no search); errors follow `dendrite.cli`'s exit-status rule.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from dendrite.program.program import Param, Program


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``dendrite run`` (values range-checked by argparse)."""
    from dendrite.cli_common import (
        add_kv_dtype_argument,
        add_quantization_argument,
        add_speculative_argument,
        add_tensor_parallel_argument,
        positive_int,
        seed_int,
    )
    from dendrite.program.runtime import DEFAULT_MAX_STEPS

    p.add_argument("script", help="path of a .dendrite file, or the name of a standard script "
                        "(tot, mcts, beam, self_consistency)")
    p.add_argument("--model", default=None, help="local HuggingFace-format model dir (default: the built-in model)")
    p.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                   help="a program argument (repeatable); NAME=@file reads the value from a file, "
                        "NAME=@@text passes the literal @text")
    p.add_argument("--program", default=None, help="which program of the script to run (default: the first)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="run seed; every branch's seed derives from it (default 0)")
    p.add_argument("--tree", default=None, metavar="OUT.html", help="write a picture of the explored tree")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add_kv_dtype_argument(p)
    add_quantization_argument(p)
    add_tensor_parallel_argument(p)
    add_speculative_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--max-nodes", type=positive_int, default=40,
                   help="nodes shown in the tree summary (default 40)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--stream", action="store_true",
                   help="print each gen's text to stdout as it is generated (only the first "
                        "branch: the root and every fork's first child), before the result; "
                        "no progress line; not with --json")
    p.add_argument("--max-steps", type=positive_int, default=None, metavar="N",
                   help="stop the run with an error after N engine steps "
                        f"(default {DEFAULT_MAX_STEPS}, so a runaway script ends)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dendrite run",
        usage="%(prog)s [options] SCRIPT [--arg NAME=VALUE ...]",
        description="Run a .dendrite search script (or a standard one: tot, mcts, beam, self_consistency).",
    )
    add_arguments(p)
    p.add_argument("--traceback", action="store_true",
                   help="show the full traceback of an error instead of one line")
    return p


def resolve_script(name: str) -> Path:
    """A path as given, else a standard script by name.

    Raises FileNotFoundError (neither) or IsADirectoryError (a directory)."""
    p = Path(name)
    if p.is_dir():
        raise IsADirectoryError(f"{name}: is a directory, not a .dendrite script")
    if p.exists():
        return p
    import dendrite.dsl as dsl

    try:
        return dsl.standard_script(name)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such script: {name}") from None


def _read_value(name: str, text: str) -> str:
    """``@file`` -> the file's text; ``@@text`` -> the literal ``@text``."""
    if text.startswith("@@"):
        return text[1:]
    if text.startswith("@") and len(text) > 1:
        path = text[1:]
        try:
            return Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ValueError(f"--arg {name}=@{path}: cannot read {path}: {why} "
                             f"(write @@ for a literal @)") from None
    return text


def convert_arg(param: Param, text: str) -> Any:
    """Convert a command-line value by the type of the parameter's default;
    a ValueError names the argument."""
    text = _read_value(param.name, text)
    d = param.default
    if isinstance(d, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--arg {param.name}: expected true/false, got {text!r}")
    if isinstance(d, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--arg {param.name}: expected an integer, got {text!r}") from None
    if isinstance(d, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--arg {param.name}: expected a number, got {text!r}") from None
    if isinstance(d, (list, dict)):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--arg {param.name}: not valid JSON ({e.msg} at column {e.colno}): "
                             f"{text!r}") from None
    return text


def parse_args(program: Program, pairs: Sequence[str]) -> dict[str, Any]:
    """``["name=value", ...]`` to program arguments (names checked); a ValueError
    names the bad argument."""
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
        if k in out:
            raise ValueError(f"--arg {k} given twice")
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
    """Entry point of ``dendrite run``; returns the process exit status (the
    rule of `dendrite.cli`: 2 bad command line, 1 failed run, 130 interrupted)."""
    from dendrite.cli_common import run_command

    try:
        args = _parser().parse_args(list(argv))
    except SystemExit as e:  # --help or argparse's usage error, already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return run_command(lambda: run(args), prog="dendrite run", traceback=args.traceback)


def _load(args: argparse.Namespace) -> tuple[Path, Program, dict[str, Any]]:
    """The script, its program and the program's arguments, or a UsageError."""
    from dendrite.cli_common import UsageError
    import dendrite.dsl as dsl

    try:
        path = resolve_script(args.script)
        program = dsl.load(path, name=args.program)
        return path, program, parse_args(program, args.arg)
    except dsl.ScriptError as e:
        raise UsageError(e.format(), plain=True) from e
    except (OSError, KeyError, ValueError) as e:
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, OSError) and args.script not in text:
            text = f"{args.script}: {text}"
        raise UsageError(str(text)) from e


def run(args: argparse.Namespace) -> int:
    """Run parsed ``dendrite run`` flags; errors propagate for `dendrite.cli.run_command`.

    Everything the command line names (script, --arg, --tree, --model,
    --device) is checked before the model loads."""
    from dendrite.cli_common import (
        check_device,
        check_model_dir,
        check_output_file,
        check_quantization_args,
    )

    from dendrite.cli_common import UsageError

    if args.stream and args.json:
        raise UsageError("--stream prints text to stdout, which --json keeps for the JSON "
                         "result: give one of them")
    check_quantization_args(args)
    path, program, prog_args = _load(args)
    if args.tree:
        check_output_file(args.tree, "--tree")
    check_model_dir(args.model)
    check_device(args.device)

    from dendrite.engine import Engine
    from dendrite.program.progress import Progress

    engine = Engine(args.model, device=args.device, kv_dtype=args.kv_dtype,
                    quantization=args.quantization, quantize_lm_head=args.quantize_lm_head,
                    tensor_parallel=args.tensor_parallel,
                    speculative=args.speculative)
    progress = None if args.quiet or args.stream else Progress()
    stream = _StreamPrinter() if args.stream else None
    try:
        result = program.run(engine, seed=args.seed, progress=progress,
                             max_steps=args.max_steps, on_text=stream, **prog_args)
        if stream is not None:
            stream.end()
        if progress is not None:
            progress.close(_RunInfo(result))
            progress = None
        _report(args, program, path, result)
    finally:
        if progress is not None:  # an error or Ctrl-C: clear the live line
            progress.close()
        engine.close()
    return 0


def _report(args: argparse.Namespace, program: Program, path: Path, result: Any) -> None:
    """Print the result (text or JSON) and write the --tree page."""
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


class _StreamPrinter:
    """``on_text`` of ``dendrite run --stream``: writes the first branch's gen
    text to stdout as it comes. Other branches would interleave mid-line, so
    only the root and, at every fork, its first child print (a tree path
    "0.k1.j1.k2.j2..." whose every child index j is 0)."""

    def __init__(self) -> None:
        self.wrote = False

    def __call__(self, state: Any, name: str, delta: str) -> None:
        if any(j != "0" for j in state.node.path.split(".")[2::2]):
            return
        sys.stdout.write(delta)
        sys.stdout.flush()
        self.wrote = True

    def end(self) -> None:
        """End the streamed text with a blank line before the result."""
        if self.wrote:
            sys.stdout.write("\n\n")
            sys.stdout.flush()


class _RunInfo:
    """What `Progress.close` reads, taken from a finished result."""

    def __init__(self, result: Any):
        self.steps = result.steps
        self.tree = result.tree
        self.gen_tokens = result.gen_tokens
        self.elapsed = result.seconds

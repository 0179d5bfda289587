"""The `dendrite` command: generate, run a search script, the fork demo, or serve.

Errors never print a traceback. Exit status, one rule for every subcommand:

- 0: success.
- 2: the command line is wrong, found before any model loads: argparse's own
  errors (usage line + one error line: unknown subcommand or flag, missing
  prompt, a number that does not parse), a flag value out of range, a path
  named on the command line that does not exist or cannot be written, a
  script that does not compile (its file:line:col message with a caret), a bad
  ``--arg``. Printed as one line ``dendrite <cmd>: error: <what and where>``.
- 1: a well-formed command failed while running: a model dir that does not
  load, an engine error (ValueError/TypeError for a bad value, LeafTooLarge,
  NaN logits), a script's run-time error (located at file:line:col), an
  OSError. One clean message.
- 130: interrupted (Ctrl-C); 141: stdout was closed by its reader
  (``dendrite generate ... | head``), quietly.
- 70 (EX_SOFTWARE): any other exception, i.e. a bug in dendrite: one line with
  the exception and a hint to rerun with ``--traceback``.

``--traceback`` (before or after the subcommand) lets any exception propagate
with its full traceback instead.

Imports stay lazy: ``dendrite --help`` does not import torch.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence

from dendrite.cli_common import (  # noqa: F401 - re-exported: the subcommands' shared part
    EXIT_BUG,
    UsageError,
    _float_in,
    add_kv_dtype_argument,
    add_quantization_argument,
    add_speculative_argument,
    add_tensor_parallel_argument,
    check_device,
    check_model_dir,
    check_output_file,
    check_quantization_args,
    non_negative_int,
    positive_int,
    run_command,
    seed_int,
)

__all__ = ["UsageError", "build_parser", "check_device", "check_model_dir",
           "check_output_file", "main", "run_command"]

# -- generate ----------------------------------------------------------------------


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default=None,
                   help="local HuggingFace-format model dir (default: the built-in model)")
    p.add_argument("--max-tokens", type=non_negative_int, default=64,
                   help="most tokens to generate (default 64)")
    p.add_argument("--temperature", default=0.0,
                   type=_float_in("float", lambda v: 0 <= v < math.inf, "finite and >= 0"),
                   help="0 = greedy (default)")
    p.add_argument("--top-p", default=1.0,
                   type=_float_in("float", lambda v: 0 < v <= 1, "in (0, 1]"),
                   help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--top-k", type=int, default=-1, help="keep the k likeliest tokens; <= 0: all")
    p.add_argument("--seed", type=seed_int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template")
    add_kv_dtype_argument(p)
    add_quantization_argument(p)
    add_tensor_parallel_argument(p)
    add_speculative_argument(p)


def _generate(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise UsageError("the prompt is empty")
    check_quantization_args(args)
    check_model_dir(args.model)
    check_device(args.device)

    from dendrite.engine import Engine
    from dendrite.sampling import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens)
    t0 = time.perf_counter()
    engine = Engine(args.model, device=args.device, kv_dtype=args.kv_dtype,
                    quantization=args.quantization, quantize_lm_head=args.quantize_lm_head,
                    tensor_parallel=args.tensor_parallel,
                    speculative=args.speculative)
    try:
        print(f"[dendrite] model {engine.model_dir} on {engine.device} "
              f"loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        prompt = args.prompt
        if args.chat:
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        seq = engine.new_sequence(prompt, add_bos=not args.chat)
        if seq.num_tokens == 0:
            raise ValueError("the prompt encodes to no tokens and the model has no BOS token")
        _stream(engine, engine.submit(seq, params), seq.num_tokens)
    finally:
        engine.close()
    return 0


def _stream(engine, handle, prompt_len: int) -> None:
    """Step `handle` to the end, writing its text to stdout as it grows (never half
    a multi-byte character) and a prefill/summary line to stderr."""
    tty = sys.stderr.isatty()
    shown = ""
    t_start = time.perf_counter()
    t_first = None
    while not handle.done:
        engine.step()
        if not handle.token_ids:
            if tty:
                done = prompt_len - len(handle.seq.pending)
                print(f"\r[dendrite] prefill {done}/{prompt_len} tokens", end="",
                      file=sys.stderr)
            continue
        if t_first is None:
            t_first = time.perf_counter()
            if tty:
                print("\r\033[K", end="", file=sys.stderr)
        text = engine.tokenizer.decode(handle.token_ids, skip_special_tokens=True)
        if not handle.done and text.endswith("\ufffd"):
            continue  # half a multi-byte character: wait for the rest
        final = handle.result.text if handle.done else text
        if final.startswith(shown):
            sys.stdout.write(final[len(shown):])
            sys.stdout.flush()
            shown = final
    if handle.error is not None:
        if shown:
            print(file=sys.stdout)
        raise handle.error
    t_end = time.perf_counter()
    n = len(handle.token_ids)
    decode_s = t_end - (t_first or t_end)
    print(file=sys.stdout)
    print(f"[dendrite] {prompt_len} prompt tokens, {n} generated "
          f"({handle.result.finish_reason}); first token "
          f"{((t_first or t_end) - t_start) * 1e3:.0f} ms, "
          f"{(n - 1) / decode_s if n > 1 and decode_s > 0 else 0:.1f} tok/s", file=sys.stderr)
    if "spec_steps" in engine.stats:
        st = engine.stats
        print(f"[dendrite] speculative: {st['spec_steps']} draft-and-verify steps, "
              f"{st['spec_accepted']} of {st['spec_drafted']} draft tokens accepted, "
              f"mean acceptance length {st['spec_mean_accept_len']:.2f}", file=sys.stderr)


# -- run and demo (their modules own their flags) -------------------------------------


def _add_run(p: argparse.ArgumentParser) -> None:
    from dendrite.cli_run import add_arguments

    add_arguments(p)


def _run(args: argparse.Namespace) -> int:
    from dendrite.cli_run import run

    return run(args)


def _add_demo(p: argparse.ArgumentParser) -> None:
    from dendrite.demo import add_arguments

    add_arguments(p)


def _demo(args: argparse.Namespace) -> int:
    from dendrite.demo import run

    return run(args)


def _add_serve(p: argparse.ArgumentParser) -> None:
    from dendrite.server.cli import add_arguments

    add_arguments(p)


def _serve(args: argparse.Namespace) -> int:
    from dendrite.server.cli import run

    return run(args)


#: name -> (add its flags, run it, help, usage). The usage lines are short so
#: that an argparse error is two lines: usage, then the error.
COMMANDS: dict[str, tuple[Callable, Callable, str, str]] = {
    "generate": (_add_generate, _generate, "generate text from a prompt (streams tokens)",
                 "%(prog)s [options] PROMPT"),
    "run": (_add_run, _run, "run a .dendrite search script",
            "%(prog)s [options] SCRIPT [--arg NAME=VALUE ...]"),
    "demo": (_add_demo, _demo, "fork a 128K-token context 1000 times; print latency and pages",
             "%(prog)s [options]"),
    "serve": (_add_serve, _serve, "serve an OpenAI-compatible HTTP API with fork handles",
              "%(prog)s [options]"),
}


def _traceback_flag(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument("--traceback", action="store_true", default=default,
                   help="show the full traceback of an error instead of one line")


def build_parser() -> argparse.ArgumentParser:
    """The `dendrite` parser: one subparser per command."""
    top = argparse.ArgumentParser(prog="dendrite", description=(
        "Dendrite: LLM inference with O(1) forks of a paged KV tree."))
    _traceback_flag(top, False)
    subs = top.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}",
                              required=True)
    for name, (add, run, help_, usage) in COMMANDS.items():
        p = subs.add_parser(name, help=help_, usage=usage,
                            description=help_[0].upper() + help_[1:] + ".")
        add(p)
        # SUPPRESS: a --traceback before the subcommand is not reset by this one.
        _traceback_flag(p, argparse.SUPPRESS)
        p.set_defaults(_run=run)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dendrite` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or argparse's usage error (2), already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return run_command(lambda: args._run(args), prog=f"dendrite {args.command}",
                       traceback=args.traceback)


if __name__ == "__main__":
    sys.exit(main())

"""What every `dendrite` subcommand shares: the exit-status rule, argparse value
types, checks made before any model loads, and `run_command`, which turns an
exception into one message and an exit status (the rule is in `dendrite.cli`).

Its own module so that the subcommands (`dendrite.cli_run`, `dendrite.demo`)
and `dendrite.cli`, which dispatches to them, all import it without a circle.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["EXIT_BUG", "KV_DTYPE_CHOICES", "QUANTIZATION_CHOICES", "UsageError", "add_kv_dtype_argument",
           "add_quantization_argument", "add_speculative_argument", "add_tensor_parallel_argument",
           "check_device",
           "check_model_dir", "check_quantization_args", "check_output_file", "non_negative_int", "positive_int",
           "run_command", "seed_int"]

#: `--kv-dtype` values, names of dendrite.model.kv_cache.KV_DTYPES spelled out here so
#: that `dendrite --help` imports no torch (tests/cli/test_cli.py checks them).
KV_DTYPE_CHOICES = ("auto", "fp8_e4m3", "int4", "int3")

#: Exit status of an internal error (sysexits.h EX_SOFTWARE).
EXIT_BUG = 70


class UsageError(Exception):
    """A bad command line found before any work starts (exit 2).

    `plain`: print the message as is (a located script error), without the
    ``dendrite <cmd>: error:`` prefix."""

    def __init__(self, message: str, *, plain: bool = False) -> None:
        super().__init__(message)
        self.plain = plain


# -- argparse value types (their ValueError becomes "argument --x: invalid ...") --


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low or (high is not None and v >= high):
            bound = f">= {low}" if high is None else f"in [{low}, {high:#x})"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return v

    parse.__name__ = "int"
    return parse


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(0)(text)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(1)(text)


def seed_int(text: str) -> int:
    """argparse type: a seed in [0, 2**64) (seeds key a 64-bit hash)."""
    return _int_at_least(0, 1 << 64)(text)


def _float_in(name: str, ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if math.isnan(v) or not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v

    parse.__name__ = name
    return parse


# -- checks before any model loads (exit 2) -----------------------------------------


def add_kv_dtype_argument(p: argparse.ArgumentParser) -> None:
    """`--kv-dtype {auto,fp8_e4m3,int4,int3}`: the engine's KV pool format
    (`Engine(kv_dtype=...)`)."""
    p.add_argument("--kv-dtype", choices=KV_DTYPE_CHOICES, default="auto",
                   help="KV cache format: auto (the model dtype), fp8_e4m3 "
                        "(1 byte an element, per-layer scales), int4 / int3 (rotated "
                        "4- / 3-bit codes with a scale per token and head; default auto)")


#: `--quantization` values: dendrite.quant.scheme.CHOICES spelled out here so that
#: `dendrite --help` imports no torch (tests/cli/test_cli.py checks them).
QUANTIZATION_CHOICES = ("none", "fp8", "mxfp8")


def add_quantization_argument(p: argparse.ArgumentParser) -> None:
    """`--quantization {none,fp8,mxfp8}`: how the projection weights are stored
    (`Engine(quantization=...)`); unset: as the checkpoint is. And
    `--quantize-lm-head` (`Engine(quantize_lm_head=True)`)."""
    p.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default=None,
                   help="attention/MLP weights: none (dense), fp8 (e4m3, 128x128 block "
                        "scales), mxfp8 (e4m3, power-of-two scales per 32); default: as the "
                        "checkpoint is")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="quantize the output projection too, in --quantization's format "
                        "(needs --quantization fp8 or mxfp8)")


def check_quantization_args(args: argparse.Namespace) -> None:
    """A UsageError when `--quantize-lm-head` comes without a format to take."""
    if args.quantize_lm_head and args.quantization not in ("fp8", "mxfp8"):
        raise UsageError("--quantize-lm-head needs --quantization fp8 or mxfp8 (the format "
                         "the output projection takes)")


def add_tensor_parallel_argument(p: argparse.ArgumentParser) -> None:
    """`--tensor-parallel N`: shard the model over N processes, one per device
    (`Engine(tensor_parallel=N)`, docs/scaling.md)."""
    p.add_argument("--tensor-parallel", type=positive_int, default=1, metavar="N",
                   help="shard the model over N processes, one per GPU (cuda:0..N-1; on the "
                        "CPU N processes); default 1")


def speculative_spec(value: str):
    """argparse type of `--speculative`: the `SpeculativeConfig` of a spec string
    (None for "off"); a draft model directory must exist (it loads later)."""
    from dendrite.speculative.config import SpeculativeConfig

    try:
        config = SpeculativeConfig.parse(value)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("speculative: ")) from None
    if config is not None and config.draft_model is not None \
            and not Path(config.draft_model).is_dir():
        raise argparse.ArgumentTypeError(f"draft model directory {config.draft_model} "
                                         f"does not exist")
    return config


def add_speculative_argument(p: argparse.ArgumentParser) -> None:
    """`--speculative SPEC`: speculative decoding (`Engine(speculative=...)`,
    docs/speculative.md)."""
    p.add_argument("--speculative", type=speculative_spec, default=None, metavar="SPEC",
                   help="speculative decoding, exact: off (default), ngram[:k=4,n=3,...] "
                        "(prompt lookup) or model:DIR[,k=4,...] (a draft model with the same "
                        "tokenizer); options in docs/speculative.md")


def check_model_dir(path: str | None) -> None:
    """`--model` names an existing directory (its contents are the loader's job)."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--model {path}: directory does not exist")
    if not p.is_dir():
        raise UsageError(f"--model {path}: not a directory")


def check_device(name: str | None) -> None:
    """`--device` is cpu, cuda or cuda:N, and CUDA (that GPU) is there when asked for.

    torch is imported only for a CUDA device."""
    if name is None or name == "cpu":
        return
    kind, colon, index = name.partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise UsageError(f"--device {name!r}: unknown device (choose cpu, cuda or cuda:N)")
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine "
                         f"(torch {torch.__version__}); use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                         f"CUDA device(s)")


def check_output_file(path: str, flag: str) -> None:
    """`path` can be written: its directory exists and is writable, and it is not
    itself a directory. Checked before the work whose result it will hold."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a directory")
    if not parent.exists():
        raise UsageError(f"{flag} {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(p if p.exists() else parent, os.W_OK):
        raise UsageError(f"{flag} {path}: permission denied")


# -- running a command ------------------------------------------------------------


def _known_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this input/model/run failed", not "dendrite has a bug".

    Looked up in modules already imported (an error cannot come from a module
    that never loaded), so this imports nothing."""
    found: list[type[BaseException]] = [ValueError, TypeError, OSError, MemoryError]
    for mod, names in (("dendrite.engine", ("ModelOutputError",)),
                       ("dendrite.model.config", ("ModelLoadError",)),
                       ("dendrite.grammar.errors", ("GrammarViolation",)),
                       ("dendrite.kv", ("OutOfPages",)),
                       ("torch", ("OutOfMemoryError",))):
        m = sys.modules.get(mod)
        for n in names:
            t = getattr(m, n, None) if m is not None else None
            if isinstance(t, type) and issubclass(t, BaseException):
                found.append(t)
    return tuple(found)


def _script_error_type() -> type[BaseException] | None:
    m = sys.modules.get("dendrite.dsl.errors")  # never loaded: no script ran
    return getattr(m, "ScriptError", None)


def _is_script_error(exc: BaseException) -> bool:
    t = _script_error_type()
    return t is not None and isinstance(exc, t)


def run_command(fn: Callable[[], int], *, prog: str, traceback: bool = False) -> int:
    """Run `fn` and turn whatever it raises into a message and an exit status
    (see the module docstring); with `traceback`, re-raise instead."""
    try:
        return fn()
    except KeyboardInterrupt:
        if traceback:
            raise
        sys.stderr.write(f"\n{prog}: interrupted\n")
        return 130
    except BrokenPipeError:
        # stdout closed by the reader (`dendrite generate ... | head`): not an error.
        # Point stdout at devnull so the interpreter's final flush does not fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it
    except Exception as e:  # noqa: BLE001 - every error gets one message, by the rule above
        if traceback:
            raise
        sys.stdout.flush()
        if isinstance(e, UsageError):
            print(str(e) if e.plain else f"{prog}: error: {e}", file=sys.stderr)
            return 2
        if _is_script_error(e):
            print(e.format(), file=sys.stderr)  # file:line:col, source line, caret
            return 1
        if isinstance(e, _known_errors()):
            print(f"{prog}: error: {_describe(e)}", file=sys.stderr)
            return 1
        print(f"{prog}: internal error: {type(e).__name__}: {e}\n"
              f"this is a bug in dendrite; rerun with --traceback for details", file=sys.stderr)
        return EXIT_BUG


def _describe(e: BaseException) -> str:
    """One line for a known error; an OSError without its file gets its strerror."""
    text = str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return " ".join(line.strip() for line in text.splitlines())

"""Shared pieces of the issue-16 benchmark scripts (bench_tot_gsm8k, bench_wall).

Model resolution (a dir, ``default`` = SmolLM2-135M-Instruct via
dendrite.default_model, ``tiny`` = the deterministic tiny model), device and
dtype choice, environment facts, a wall-clock budget, chat turns derived from
the model's own chat template, HF transformers loading, and the result file
(JSON written after every row, so a timeout keeps what was measured, plus a
markdown table printed and saved beside it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e`
    sys.path.append(str(REPO))

import torch  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- arguments -------------------------------------------------------------------------


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="HF model dir; 'default' = SmolLM2-135M-Instruct (dendrite.default_model), "
                        "'tiny' = the tiny random-weight test model")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto",
                   help="bfloat16, float16, float32; auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--out", type=Path, required=True,
                   help="JSON result file (a .md table is written beside it)")
    p.add_argument("--quick", action="store_true",
                   help="smallest settings that still run every row (CPU smoke test)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds; rows that would start after this are skipped and marked so")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers rows")


def resolve_model(spec: str) -> Path:
    """A model dir from ``--model``: a path, 'default' or 'tiny'."""
    if spec == "default":
        from dendrite.default_model import default_model_dir

        return Path(default_model_dir())
    if spec == "tiny":
        from dendrite.tiny_model import build_tiny_model

        return build_tiny_model(Path(tempfile.gettempdir()) / "dendrite-bench-tiny-llama", "llama")
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {spec}: no config.json there (give a HF model dir, 'default' or 'tiny')")
    return path


def model_warning(spec: str, model_dir: Path) -> str | None:
    """A note when ``--model default`` fell back to the tiny random model."""
    from dendrite.default_model import TINY_NAME

    if spec == "default" and model_dir.name.startswith(TINY_NAME):
        return ("--model default fell back to the tiny random-weight model (SmolLM2 is not "
                "installed here): these figures are not those of a real model")
    return None


def resolve_device(spec: str | None) -> torch.device:
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {spec}: CUDA is not available here")
    return dev


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        dt = getattr(torch, spec)
    except AttributeError:
        dt = None
    if not isinstance(dt, torch.dtype):
        raise SystemExit(f"--dtype {spec}: not a torch dtype (bfloat16, float16, float32)")
    return dt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no HF rows
        return False
    return True


def env_info(model_dir: Path, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "model_dir": str(model_dir),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    for mod in ("transformers", "flashinfer", "triton"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent is a fact to record, not an error
            info[mod] = None
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        info["model"] = {k: cfg.get(k) for k in ("architectures", "hidden_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads",
                                                   "vocab_size", "tie_word_embeddings")}
        src = model_dir / "dendrite_source.json"
        if src.is_file():
            info["model_source"] = json.loads(src.read_text())
    except (OSError, ValueError):
        pass
    return info


# -- budget ----------------------------------------------------------------------------


class Budget:
    """Wall-clock budget of one script run (None = unlimited)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def allows(self, need: float = 0.0) -> bool:
        return self.left() > need


# -- chat turns ------------------------------------------------------------------------


class ChatTemplateUnusable(ValueError):
    """The model's chat template cannot be split into per-turn pieces."""


@dataclass(frozen=True)
class ChatTurns:
    """Multi-turn text pieces from a model's chat template (SGLang's sgl.user /
    sgl.assistant as appended text):

    * ``first(c)``  the conversation's start up to the assistant's generation
      prompt, with user message ``c`` (system prompt, if the template adds one);
    * ``turn(c)``   after a closed assistant turn: the next user message ``c``
      and the assistant's generation prompt;
    * ``end``       what closes an assistant turn after its generated text
      (appended after every generation, EOS or not, as SGLang does).
    """

    first: Callable[[str], str]
    turn: Callable[[str], str]
    end: str
    templated: bool

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "ChatTurns":
        if getattr(tokenizer, "chat_template", None) is None:
            return cls(first=lambda c: f"User: {c}\nAssistant:",
                       turn=lambda c: f"\nUser: {c}\nAssistant:", end="", templated=False)

        def render(msgs: list[tuple[str, str]], gen: bool) -> str:
            return tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in msgs], add_generation_prompt=gen)

        q, a = "QUESTION", "ANSWER"
        start = render([("user", q)], True)
        closed = render([("user", q), ("assistant", a)], False)
        if not closed.startswith(start + a):
            raise ChatTemplateUnusable(
                "the chat template does not render an assistant reply as generation prompt + "
                "text + end; give the benchmark a model whose template does")
        end = closed[len(start) + len(a):]

        def turn(c: str) -> str:
            full = render([("user", q), ("assistant", a), ("user", c)], True)
            if not full.startswith(closed):
                raise ChatTemplateUnusable(
                    "the chat template rewrites earlier turns when a new one is added")
            return full[len(closed):]

        turn("probe")  # fail here, not inside a timed run
        return cls(first=lambda c: render([("user", c)], True), turn=turn, end=end, templated=True)


# -- HF transformers -------------------------------------------------------------------


def load_hf(model_dir: Path, device: torch.device, dtype: torch.dtype):
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval()


def hf_cache_kwarg(model: Any) -> str:
    """``cache`` on transformers that renamed it (5.2x), else ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def hf_fork_generate(model: Any, ctxs: list[list[int]], width: int, gen_config: Any,
                     pad_id: int, device: torch.device) -> tuple[list[list[int]], Any]:
    """HF's strongest fork: prefill each context once, then sample ``width`` children of each.

    The contexts are left-padded into one batch; all but their last token are
    prefilled into one DynamicCache, which `batch_repeat_interleave(width)`
    copies per child; one batched `generate()` then runs every child from the
    cache (it computes only the last token of each context anew). Returns the
    ``len(ctxs) * width`` generated id lists, children of a context together
    (EOS and padding included: the caller cuts them), and generate's output.
    """
    from transformers import DynamicCache

    b, L = len(ctxs), max(len(c) for c in ctxs)
    ids = torch.full((b, L), pad_id, dtype=torch.long)
    mask = torch.zeros((b, L), dtype=torch.long)
    for i, c in enumerate(ctxs):
        ids[i, L - len(c):] = torch.tensor(c)
        mask[i, L - len(c):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    kw = hf_cache_kwarg(model)
    cache = DynamicCache()
    with torch.no_grad():
        if L > 1:
            model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                  use_cache=True, logits_to_keep=1, **{kw: cache})
        cache.batch_repeat_interleave(width)
        out = model.generate(ids.repeat_interleave(width, 0),
                             attention_mask=mask.repeat_interleave(width, 0),
                             generation_config=gen_config, **{kw: cache})
    seqs = out.sequences if hasattr(out, "sequences") else out
    return seqs[:, L:].tolist(), out


# -- results ---------------------------------------------------------------------------


class Results:
    """Rows of one benchmark; saved as JSON (+ markdown) after every change."""

    def __init__(self, name: str, out: Path, args: argparse.Namespace, env: dict[str, Any]):
        self.out = out
        self.data: dict[str, Any] = {
            "benchmark": name,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "env": env,
            "rows": [],
            "notes": [],
        }
        self.render: Callable[[dict[str, Any]], str] = lambda d: ""
        out.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.data["rows"]

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        self.rows.append(row)
        self.save()
        return row

    def note(self, text: str) -> None:
        log(f"note: {text}")
        self.data["notes"].append(text)
        self.save()

    def save(self) -> None:
        tmp = self.out.with_suffix(self.out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.out)
        self.out.with_suffix(".md").write_text(self.render(self.data))

    def finish(self) -> None:
        self.save()
        print(self.render(self.data), flush=True)


def fmt(x: Any, spec: str = ".2f", none: str = "—") -> str:
    if x is None:
        return none
    if isinstance(x, (int, float)):
        return format(x, spec)
    return str(x)


def md_table(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right or set()
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def env_line(env: dict[str, Any]) -> str:
    dev = env.get("gpu") or f"CPU ({env.get('cpu_count')} cores)"
    return (f"{env.get('date_utc')}, {dev}, torch {env.get('torch')}, transformers "
            f"{env.get('transformers')}, flashinfer {env.get('flashinfer')}; model "
            f"{env.get('model_dir')} ({env.get('dtype')})")


def start(name: str, a: Any, render: Any) -> tuple[torch.device, torch.dtype, Path, "Budget", "Results"]:
    """What every benchmark's main does first: resolve --device/--dtype/--model,
    start the --budget clock and the results file (noting a tiny-model fallback)."""
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    model_dir = resolve_model(a.model)
    res = Results(name, a.out, a, env_info(model_dir, device, dtype))
    res.render = render
    if warning := model_warning(a.model, model_dir):
        res.note(warning)
    return device, dtype, model_dir, Budget(a.budget), res

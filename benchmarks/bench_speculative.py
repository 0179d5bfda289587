"""Speculative decoding (issue 18): acceptance length and speedup vs plain decode.

    python benchmarks/bench_speculative.py --out results/spec.json            # GPU or CPU
    python benchmarks/bench_speculative.py --out /tmp/s.json --quick --model tiny   # smoke test

Three parts, each a table:

* ``rule``: the cost of one verify step against one plain decode step, for
  B branches of k+1 draft tokens (a drafter proposing tokens that are never
  right, speculation forced on). A branch pays off when its acceptance
  length exceeds t_verify / t_plain (plus the drafting time): the break-even
  acceptance length per B, the measurement behind `SpeculativeConfig`'s
  `break_even` and `max_rows`.
* ``ngram``: prompt lookup on a repetitive task (a few-shot "copy the text
  exactly" prompt ending in a block of code to copy), 1 and 16 branches.
* ``draft``: a draft model. ``self``: the target drafts for itself
  (acceptance upper bound: every draft agrees under greedy; its speed means
  nothing, the draft costs as much as the target). ``controlled``: a target
  made from the draft by appending ``--extra-layers`` decoder layers (copies
  of the draft's layers) whose output projections (o_proj, down_proj) are
  Gaussian noise of ``--noise`` times the std of the copied weight: at
  noise 0 those layers add exactly zero to the residual stream, so the
  target computes the draft's logits (acceptance 100%) at the cost of a
  model ``(layers + extra) / layers`` times deeper; more noise moves the
  target's argmax away from the draft's, lowering acceptance. Acceptance is
  thus controlled and measured, and the speedup is that of a cheap draft for
  an expensive target. At noise 0 the target also runs prompt lookup (n-gram
  k=8) on the copy task: the ``ngram`` rows again, on a target whose step is
  bound by its weights and launches rather than by the host. With
  ``--target wide`` the controlled target is the draft widened instead
  (`wide_target`: hidden size and heads x ``--wide-factor``, an MLP of
  ``--wide-intermediate`` neurons, zeros around the draft's weights; noise
  on a copy of the draft's neurons): a target whose step costs what a
  large model's does, its bytes (SmolLM2-135M x4 with 28672 neurons: 13 GB
  of bf16 weights, 8B-class), rather than 8x the kernels of a small one.

Every speculative row checks exactness: its tokens must equal the plain
run's (column ``same``). Speedup is plain wall time / speculative wall time
for the same work (same prompt, branches, max_tokens, greedy).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_common as C
import torch

from dendrite.engine import Engine
from dendrite.sampling import SamplingParams
from dendrite.speculative import NgramDrafter, SpeculativeConfig
from dendrite.speculative.tree import DraftTree

CODE = '''def fork(node, n):
    """Return n children of node; each shares its parent's pages."""
    children = []
    for i in range(n):
        child = Node(parent=node, index=i)
        node.children.append(child)
        children.append(child)
    return children
'''

# A few-shot copy task as plain text (no chat template): SmolLM2-135M follows
# this format (it copies, and keeps copying), where an instruction to copy in
# a chat turn makes it summarize the code instead.
COPY_TASK = ("Copy the text exactly.\n\nText: The cat sat on the mat.\nCopy: The cat sat on "
             "the mat.\n\nText: " + CODE + "\nCopy: ")
STORY_TASK = "Write a short story about a robot who learns to paint."


class NeverRight(NgramDrafter):
    """Proposes k copies of token 0 (never what the model says): speculation
    forced on, nothing accepted — the verify step's cost alone."""

    def propose(self, keys, contexts, shape, depths):
        return [DraftTree([0] * d, list(range(-1, d - 1)), [1.0] * d) for d in depths]


def prompt_ids(engine: Engine, text: str) -> list[int]:
    try:
        return engine.encode(engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}]), add_bos=False)
    except Exception:  # noqa: BLE001 - no chat template (or no jinja2): the raw text
        return engine.encode(text)


def run_once(engine: Engine, ids: list[int], branches: int, max_tokens: int,
             first_temperature: float = 0.0) -> tuple[list[list[int]], float, int]:
    """Generate on `branches` forks of `ids` (branch 0 at `first_temperature`,
    default greedy; the others sampled at 0.7, seeded); (tokens, seconds,
    generated tokens)."""
    root = engine.new_sequence(ids, add_bos=False)
    engine.flush([root])
    seqs = root.fork(branches) if branches > 1 else [root]
    params = [SamplingParams(temperature=first_temperature if i == 0 else 0.7, seed=i,
                             max_tokens=max_tokens) for i in range(branches)]
    C.sync(engine.device)
    t0 = time.perf_counter()
    res = engine.generate(seqs, params)
    C.sync(engine.device)
    dt = time.perf_counter() - t0
    for s in seqs:
        s.release()
    root.release()
    if engine.cache is not None:
        engine.cache.clear()
    return [r.token_ids for r in res], dt, sum(len(r.token_ids) for r in res)


def spec_stats(engine: Engine, before: dict[str, Any]) -> dict[str, Any]:
    d = {k: engine.stats.get(k, 0) - before.get(k, 0)
         for k in ("spec_steps", "spec_rows", "spec_drafted", "spec_accepted", "spec_off_steps",
                   "steps")}
    d["accept_len"] = (d["spec_accepted"] + d["spec_rows"]) / d["spec_rows"] \
        if d["spec_rows"] else None
    return d


def measure(res: C.Results, case: str, label: str, engine: Engine, ids: list[int],
            branches: int, max_tokens: int, plain: dict | None, reps: int,
            temperature: float = 0.0, exact: bool = True) -> dict:
    """Time a generation (best of `reps`) and record its row; `exact`: its tokens
    must equal `plain`'s (False for drawn drafts: the same distribution only)."""
    run_once(engine, ids, branches, min(max_tokens, 8), temperature)  # warm-up
    best, toks, n = None, None, 0
    before = dict(engine.stats)
    for _ in range(reps):
        toks, dt, n = run_once(engine, ids, branches, max_tokens, temperature)
        best = dt if best is None else min(best, dt)
    st = spec_stats(engine, before)
    row = {"case": case, "config": label, "branches": branches, "tokens": n,
           "seconds": best, "tok_s": n / best, "accept_len": st["accept_len"],
           "spec_steps": st["spec_steps"] // reps, "steps": st["steps"] // reps,
           "off_steps": st["spec_off_steps"] // reps,
           "drafted": st["spec_drafted"] // reps, "accepted": st["spec_accepted"] // reps,
           "break_even": engine.stats.get("spec_break_even")}
    if plain is not None:
        row["speedup"] = plain["seconds"] / best
        if exact:
            row["same"] = toks == plain["_tokens"]
    row["_tokens"] = toks
    C.log(f"{case} {label} B={branches}: {n / best:.1f} tok/s, accept_len "
          f"{C.fmt(st['accept_len'])}, speedup {C.fmt(row.get('speedup'))}, "
          f"same={row.get('same')}, break-even {C.fmt(row['break_even'])}")
    res.add({k: v for k, v in row.items() if not k.startswith("_")})
    return row


def controlled_target(draft_dir: Path, out: Path, extra: int, noise: float, seed: int) -> Path:
    """The draft plus `extra` appended layers whose output projections are noise
    (see the module docstring)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in draft_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json" \
                and not f.name.endswith(".index.json"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((draft_dir / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    cfg["num_hidden_layers"] = n + extra
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(draft_dir.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    g = torch.Generator().manual_seed(seed)
    for i in range(extra):
        src = f"model.layers.{i % n}."
        for k in [k for k in list(weights) if k.startswith(src)]:
            w = weights[k].clone()
            if k.endswith(("o_proj.weight", "down_proj.weight")):
                std = float(weights[k].float().std())
                w = (torch.randn(w.shape, generator=g) * noise * std).to(w.dtype)
            weights[f"model.layers.{n + i}." + k[len(src):]] = w
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def wide_target(draft_dir: Path, out: Path, factor: int, intermediate: int, noise: float,
                seed: int) -> Path:
    """The draft widened `factor` times (hidden size, query and KV heads) with an
    MLP of `intermediate` neurons, computing the draft's function at noise 0.

    A target that costs what a large model costs per token (its bytes) while
    its acceptance stays controlled, unlike `controlled_target`'s deep stack
    of small layers, whose step is bound by kernel count. The draft's weights
    sit in the first rows/columns, everything else is zero: padded hidden
    dimensions stay zero through every layer, padded heads read zero queries
    and write through zero o_proj columns, padded neurons have zero
    down_proj columns. RMSNorm averages over the wider hidden size, so
    `mean(x^2)` shrinks by `factor`: eps is divided by `factor` and the norm
    weights by sqrt(factor), which is exact in binary floating point when
    `factor` is a power of 4 (2, 4, 8... would round the norm weights).
    At `noise` > 0 the first `draft intermediate` padded neurons are a copy
    of the draft's with down_proj columns of Gaussian noise x std: the
    target's argmax moves off the draft's, lowering acceptance.
    """
    from safetensors.torch import load_file, save_file

    if factor < 1 or factor & (factor - 1) or (factor.bit_length() - 1) % 2:
        raise ValueError(f"wide_target: factor must be a power of 4, got {factor}")
    cfg = json.loads((draft_dir / "config.json").read_text())
    h, i0 = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    d = cfg.get("head_dim") or h // heads
    if intermediate < 2 * i0:
        raise ValueError(f"wide_target: intermediate {intermediate} must be >= 2 x the draft's {i0}")
    out.mkdir(parents=True, exist_ok=True)
    for f in draft_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json" \
                and not f.name.endswith(".index.json"):
            shutil.copy(f, out / f.name)
    hw = h * factor
    cfg.update(hidden_size=hw, intermediate_size=intermediate, num_attention_heads=heads * factor,
               num_key_value_heads=kv * factor, head_dim=d, rms_norm_eps=cfg["rms_norm_eps"] / factor)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(draft_dir.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    g = torch.Generator().manual_seed(seed)
    norm_scale = factor ** -0.5  # a power of 2: exact
    wide: dict[str, torch.Tensor] = {}
    for k, w in weights.items():
        if k.endswith(("layernorm.weight", "model.norm.weight")):
            t = torch.zeros(hw, dtype=w.dtype)
            t[:h] = w * norm_scale
        elif k.endswith(("q_norm.weight", "k_norm.weight")):
            t = w.clone()  # per head_dim: unchanged
        elif k.endswith(("embed_tokens.weight", "lm_head.weight")):
            t = torch.zeros(w.shape[0], hw, dtype=w.dtype)
            t[:, :h] = w
        elif k.endswith(("gate_proj.weight", "up_proj.weight")):
            t = torch.zeros(intermediate, hw, dtype=w.dtype)
            t[:i0, :h] = w
            if noise:
                t[i0:2 * i0, :h] = w
        elif k.endswith("down_proj.weight"):
            t = torch.zeros(hw, intermediate, dtype=w.dtype)
            t[:h, :i0] = w
            if noise:
                std = float(w.float().std())
                t[:h, i0:2 * i0] = (torch.randn(h, i0, generator=g) * noise * std).to(w.dtype)
        elif k.endswith("o_proj.weight"):
            t = torch.zeros(hw, w.shape[1] * factor, dtype=w.dtype)
            t[:h, :w.shape[1]] = w
        elif k.endswith("o_proj.bias"):
            t = torch.zeros(hw, dtype=w.dtype)
            t[:h] = w
        elif k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            t = torch.zeros(w.shape[0] * factor, hw, dtype=w.dtype)
            t[:w.shape[0], :h] = w
        elif k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            t = torch.zeros(w.shape[0] * factor, dtype=w.dtype)
            t[:w.shape[0]] = w
        else:
            raise ValueError(f"wide_target: no rule to widen {k}")
        wide[k] = t
    save_file(wide, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def render(d: dict) -> str:
    out = [(f"# Speculative decoding (issue 18)\n\n{C.env_line(d['env'])}\n\n"
            f"`{d['command']}`\n")]
    rule = [r for r in d["rows"] if r["case"] == "rule"]
    if rule:
        out.append("\n## Verify step vs plain decode step (break-even acceptance length)\n\n")
        out.append(C.md_table(
            ["branches", "k", "plain step ms", "verify step ms", "break-even accept len"],
            [[str(r["branches"]), str(r["k"]), C.fmt(r["plain_ms"]), C.fmt(r.get("verify_ms")),
              C.fmt(r.get("break_even"))] for r in rule], right={0, 1, 2, 3, 4}))
    rows = [r for r in d["rows"] if r["case"] != "rule"]
    if rows:
        out.append("\n## Acceptance and speed\n\n")
        out.append(C.md_table(
            ["case", "config", "branches", "tokens", "tok/s", "accept len", "spec steps",
             "off steps", "speedup", "same"],
            [[r["case"], r["config"], str(r["branches"]), str(r["tokens"]), C.fmt(r["tok_s"], ".1f"),
              C.fmt(r.get("accept_len")), str(r["spec_steps"]), str(r["off_steps"]),
              C.fmt(r.get("speedup")), str(r.get("same", "—"))] for r in rows],
            right={2, 3, 4, 5, 6, 7, 8}))
    for note in d["notes"]:
        out.append(f"\n- {note}")
    return "".join(out) + "\n"


def rule_rows(res: C.Results, engine_kw: dict, model_dir: Path, ids: list[int],
              batch_sizes: list[int], k: int, steps: int) -> None:
    """Time plain decode steps and forced verify steps of k+1 tokens per branch."""
    for label, spec in (("plain", None), ("verify", SpeculativeConfig(
            drafter=NeverRight(), num_draft=k, break_even=0.0, max_rows=1 << 20))):
        eng = Engine(model_dir, speculative=spec, **engine_kw)
        for b in batch_sizes:
            root = eng.new_sequence(ids, add_bos=False)
            eng.flush([root])
            seqs = root.fork(b)
            hs = [eng.submit(s, SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True))
                  for s in seqs]
            for _ in range(2):  # warm-up
                eng.step()
            C.sync(eng.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                eng.step()
            C.sync(eng.device)
            ms = (time.perf_counter() - t0) / steps * 1e3
            for h in hs:
                eng.cancel(h)
            for s in seqs:
                s.release()
            root.release()
            if label == "plain":
                res.rows.append({"case": "rule", "branches": b, "k": k, "plain_ms": ms})
            else:
                r = next(r for r in res.rows if r["case"] == "rule" and r["branches"] == b)
                r["verify_ms"] = ms
                r["break_even"] = ms / r["plain_ms"]
                C.log(f"rule B={b} k={k}: plain {r['plain_ms']:.2f} ms, verify {ms:.2f} ms")
            res.save()
        eng.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(p)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--branches", default="1,16", help="comma-separated branch counts")
    p.add_argument("--k", type=int, default=4, help="draft tokens per path")
    p.add_argument("--extra-layers", type=int, default=None,
                   help="controlled target: layers appended to the draft (default 7x its layers)")
    p.add_argument("--noise", default="0,0.3,1",
                   help="controlled target: noise levels of the appended layers' projections")
    p.add_argument("--target", choices=("deep", "wide"), default="deep",
                   help="controlled target: the draft with appended layers (deep) or widened "
                        "to large-model bytes per token (wide; see wide_target)")
    p.add_argument("--wide-factor", type=int, default=4,
                   help="wide target: hidden size and heads x this (a power of 4)")
    p.add_argument("--wide-intermediate", type=int, default=None,
                   help="wide target: MLP neurons (default: 12.4 x the wide hidden size, "
                        "28672 for SmolLM2-135M: ~13 GB of bf16 weights, 8B-class)")
    p.add_argument("--parts", default="rule,ngram,self,controlled",
                   help="which parts to measure (comma-separated)")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions per row (best kept)")
    p.add_argument("--rule-branches", default="1,2,4,8,16,32",
                   help="branch counts of the rule table")
    a = p.parse_args(argv)
    device, dtype, model_dir, budget, res = C.start("bench_speculative", a, render)
    torch.manual_seed(a.seed)
    quick = a.quick
    reps = 1 if quick else a.reps
    max_tokens = 12 if quick else a.max_tokens
    branches = [1, 4] if quick else [int(x) for x in a.branches.split(",")]
    parts = set(a.parts.split(","))
    # A fixed pool per engine: several engines live in this process at once, and
    # the default (a share of the memory free at start-up) would let the first
    # take what the next one's weights need. 16 branches x (prompt + 128) < 4K tokens.
    engine_kw: dict[str, Any] = {"device": str(device), "dtype": dtype,
                                 "num_pages": 1024 if device.type == "cpu" else 2048}
    base = Engine(model_dir, **engine_kw)
    copy_ids = base.encode(COPY_TASK)
    story_ids = prompt_ids(base, STORY_TASK)
    base.close()

    if "rule" in parts:
        rule_rows(res, engine_kw, model_dir, story_ids,
                  [1, 4] if quick else [int(x) for x in a.rule_branches.split(",")],
                  a.k, 2 if quick else 10)

    if "ngram" in parts:
        plain_eng = Engine(model_dir, **engine_kw)
        specs = {"ngram k=4": SpeculativeConfig(num_draft=4),
                 "ngram k=8": SpeculativeConfig(num_draft=8),
                 "ngram k=4 w=2": SpeculativeConfig(num_draft=4, width=2),
                 # The rule's max_rows lifted: what speculating at 16 branches costs
                 # or gains (16 x 4 tokens = 64 rows, still one CUDA graph).
                 "ngram k=3 max_rows=16": SpeculativeConfig(num_draft=3, max_rows=16)}
        if quick:
            specs = {"ngram k=4 w=2": specs["ngram k=4 w=2"]}
        engines = {label: Engine(model_dir, speculative=s, **engine_kw)
                   for label, s in specs.items()}
        for b in branches:
            if not budget.allows():
                res.note(f"ngram B={b}: skipped (budget)")
                continue
            plain = measure(res, "ngram-repeat", "off", plain_eng, copy_ids, b, max_tokens,
                            None, reps)
            for label, eng in engines.items():
                measure(res, "ngram-repeat", label, eng, copy_ids, b, max_tokens, plain, reps)
        for eng in [plain_eng, *engines.values()]:
            eng.close()

    if "self" in parts:
        plain_eng = Engine(model_dir, **engine_kw)
        self_eng = Engine(model_dir, speculative=SpeculativeConfig(
            method="model", draft_model=str(model_dir), num_draft=a.k), **engine_kw)
        plain = measure(res, "self-draft", "off", plain_eng, story_ids, 1, max_tokens, None, reps)
        measure(res, "self-draft", f"model k={a.k}", self_eng, story_ids, 1, max_tokens, plain,
                reps)
        # Sampling at 0.8: the draft's best tokens (proposed) against drafts
        # drawn from its softmax at 0.8 (rejection sampling).
        plain = measure(res, "self-draft T=0.8", "off", plain_eng, story_ids, 1, max_tokens,
                        None, reps, temperature=0.8)
        measure(res, "self-draft T=0.8", f"model k={a.k} proposed", self_eng, story_ids, 1,
                max_tokens, plain, reps, temperature=0.8)
        self_eng.close()
        drawn_eng = Engine(model_dir, speculative=SpeculativeConfig(
            method="model", draft_model=str(model_dir), num_draft=a.k, draft_temperature=0.8),
            **engine_kw)
        measure(res, "self-draft T=0.8", f"model k={a.k} drawn", drawn_eng, story_ids, 1,
                max_tokens, plain, reps, temperature=0.8, exact=False)
        drawn_eng.close()
        plain_eng.close()

    if "controlled" in parts:
        cfg = json.loads((model_dir / "config.json").read_text())
        layers = cfg["num_hidden_layers"]
        extra = a.extra_layers if a.extra_layers is not None else (2 if quick else 7 * layers)
        hw = a.wide_factor * cfg["hidden_size"]
        wide_i = a.wide_intermediate or (2 * cfg["intermediate_size"] if quick else max(
            2 * cfg["intermediate_size"], 256 * round(12.4 * hw / 256)))
        noises = [float(x) for x in a.noise.split(",")][: 1 if quick else None]
        for noise in noises:
            if not budget.allows():
                res.note(f"controlled noise={noise}: skipped (budget)")
                continue
            tmp = Path(tempfile.mkdtemp())
            if a.target == "deep":
                tdir = controlled_target(model_dir, tmp / f"spec-target-{extra}-{noise}",
                                         extra, noise, a.seed)
                res.note(f"controlled target {tdir.name}: the draft's {layers} layers + {extra} "
                         f"appended layers, output projections noise {noise} x std")
            else:
                tdir = wide_target(model_dir, tmp / f"spec-wide-{noise}", a.wide_factor, wide_i,
                                   noise, a.seed)
                gb = sum(f.stat().st_size for f in tdir.glob("*.safetensors")) / 1e9
                res.note(f"controlled target {tdir.name}: the draft widened {a.wide_factor}x "
                         f"(hidden {cfg['hidden_size'] * a.wide_factor}, MLP {wide_i}, "
                         f"{gb:.1f} GB of weights), extra neurons' down_proj noise {noise} x std")
            t_plain = Engine(tdir, **engine_kw)
            t_spec = Engine(tdir, speculative=SpeculativeConfig(
                method="model", draft_model=str(model_dir), num_draft=a.k), **engine_kw)
            for b in branches:
                plain = measure(res, f"controlled noise={noise}", "off", t_plain, story_ids, b,
                                max_tokens, None, reps)
                measure(res, f"controlled noise={noise}", f"model k={a.k}", t_spec, story_ids, b,
                        max_tokens, plain, reps)
            t_spec.close()
            if noise == 0 and budget.allows():
                t_ngram = Engine(tdir, speculative=SpeculativeConfig(num_draft=8), **engine_kw)
                for b in branches:
                    plain = measure(res, "controlled ngram-repeat", "off", t_plain, copy_ids, b,
                                    max_tokens, None, reps)
                    measure(res, "controlled ngram-repeat", "ngram k=8", t_ngram, copy_ids, b,
                            max_tokens, plain, reps)
                t_ngram.close()
            t_plain.close()
            shutil.rmtree(tmp, ignore_errors=True)
            if device.type == "cuda":  # the next target loads beside nothing
                import gc

                gc.collect()
                torch.cuda.empty_cache()
    res.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quantization accuracy gates (issue 17): perplexity, top-1 agreement, greedy GSM8K, KV capacity.

Each configuration builds its own `Engine` on the same model dir and dtype
(normally bfloat16) with the options of its name:

    bf16        nothing quantized (the reference: the first configuration listed)
    fp8kv       Engine(kv_dtype="fp8_e4m3")     FP8 KV cache
    int4kv      Engine(kv_dtype="int4")         4-bit KV cache
    fp8w        Engine(quantization="fp8")      FP8 weights
    mxfp8w      Engine(quantization="mxfp8")    MXFP8 weights
    fp32        Engine(dtype="float32")         not quantized: bf16's own rounding, for scale
    head        Engine(quantize_lm_head=True)   the output projection too (with fp8w/mxfp8w)
    a+b         both (one KV part, one weight part), e.g. fp8kv+fp8w

An engine that does not accept a configuration's options (not built yet, or
not on this device) makes a row "not available: <error>", not a crash; a
measurement that fails after the engine was built is reported as "error".

Measures, per configuration:

* Perplexity of a fixed text through the engine's forced-token scoring
  (`Engine.submit_score`): GSM8K test questions and answers concatenated
  (question, newline, answer, blank line) in file order, tokenized once
  without special tokens; the first --tokens ids, cut into windows of
  --window; each window is its own sequence whose first token is context and
  whose others are scored. Prefill writes the KV in the tested format and
  every position's attention reads it back from the paged cache.
* Top-1 agreement with the reference, from the top-2 logprobs the scoring
  returns at each scored position. A position is *decidable* when the
  reference's top-1 logprob beats its top-2 by more than --margin nats
  (default 0.1); agreement is the share of decidable positions whose top-1
  token is the reference's (the count is printed; all positions too).
* Greedy GSM8K accuracy on the first --gsm8k questions: the question as the
  user turn of the model's chat template (plain "Question: ...\\nAnswer:"
  when it has none), temperature 0, at most --gsm8k-max-tokens tokens; the
  answer is the last number of the output (`dendrite.program.answers.number`),
  correct when it equals the number after '####'.

Gates (|ppl delta| against the reference): fp8kv within 1% and top-1
agreement >= 99% on decidable positions; fp8w (and mxfp8w, also FP8 weights)
within 2%. Other configurations are reported, not gated.

KV capacity (computed, nothing allocated): bytes per token of each KV format
from the engine's bytes per page (`KVCache.bytes_per_page`; for the measured
model, the built engine's `memory_stats()["bytes_per_page"]` when it ran),
and what --kv-budget-gib holds: the longest context, and how many live
branches of --branch-tokens own tokens each fit beside one shared
--prefix-tokens prefix. For the measured model and a Llama-3.1-8B shape.

Writes --out (JSON, after every row) and a .md table beside it.

    python benchmarks/bench_quant.py --model default --out quant.json
    python benchmarks/bench_quant.py --model tiny --device cpu --tokens 256 --window 64 \\
        --gsm8k 2 --gsm8k-max-tokens 8 --configs bf16,bf16 --out /tmp/q.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from pathlib import Path
from typing import Any

import bench_common as bc
import torch

DATA = bc.HERE / "data" / "gsm8k_test_200.jsonl"  # = the first 200 lines of GSM8K test.jsonl

#: Each configuration part and the Engine options it sets.
PARTS: dict[str, dict[str, Any]] = {
    "bf16": {},
    "fp8kv": {"kv_dtype": "fp8_e4m3"},
    "int4kv": {"kv_dtype": "int4"},
    "fp8w": {"quantization": "fp8"},
    "mxfp8w": {"quantization": "mxfp8"},
    # The output projection too (with fp8w or mxfp8w: it takes their format).
    "head": {"quantize_lm_head": True},
    # Not a quantization: float32 model and KV, the floor of what bf16 itself changes.
    "fp32": {"dtype": "float32"},
}
DEFAULT_CONFIGS = "bf16,fp8kv,fp8w,fp8kv+fp8w,int4kv,mxfp8w"

#: config -> (max |ppl delta| %, min top-1 agreement % or None)
GATES: dict[str, tuple[float, float | None]] = {
    "fp8kv": (1.0, 99.0),
    "fp8w": (2.0, None),
    "mxfp8w": (2.0, None),
}

#: KV formats of the capacity table: name -> (engine kv_dtype, bits per element
#: used when the engine cannot say: the payload only, no scales).
KV_FORMATS: dict[str, tuple[str | None, float]] = {
    "bf16": (None, 16.0),
    "fp8_e4m3": ("fp8_e4m3", 8.0),
    "int4": ("int4", 4.0),
}

#: Llama-3.1-8B's KV shape (config.json of meta-llama/Llama-3.1-8B).
LLAMA_8B_KV = {"name": "Llama-3.1-8B shape", "num_layers": 32, "num_kv_heads": 8, "head_dim": 128}


# -- configurations --------------------------------------------------------------------


def config_kwargs(name: str) -> dict[str, Any]:
    """The Engine options of a configuration name ('fp8kv+fp8w' -> both parts')."""
    kwargs: dict[str, Any] = {}
    for part in name.split("+"):
        if part not in PARTS:
            raise ValueError(f"--configs: unknown configuration part {part!r} in {name!r}; "
                             f"allowed: {', '.join(PARTS)} (joined with '+')")
        for k, v in PARTS[part].items():
            if k in kwargs and kwargs[k] != v:
                raise ValueError(f"--configs: {name!r} sets {k} twice ({kwargs[k]!r} and {v!r})")
            kwargs[k] = v
    return kwargs


def parse_configs(spec: str) -> list[str]:
    names = [c.strip() for c in spec.split(",") if c.strip()]
    if not names:
        raise ValueError("--configs: give at least one configuration, e.g. bf16,fp8kv")
    for n in names:
        config_kwargs(n)
    return names


def build_engine(model_dir: Path, device: torch.device, dtype: torch.dtype, kwargs: dict[str, Any],
                 **engine_args: Any) -> tuple[Any, str | None]:
    """(engine, None), or (None, why) when the engine does not accept `kwargs`."""
    from dendrite.engine import Engine

    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", dtype)
    try:
        return Engine(model_dir, device=str(device), dtype=dtype, **kwargs, **engine_args), None
    except Exception as e:  # noqa: BLE001 - any refusal is a row, not a crash
        return None, f"{type(e).__name__}: {e}"


def free_engine(engine: Any) -> None:
    if engine is not None:
        engine.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- data ------------------------------------------------------------------------------


def load_gsm8k(path: Path) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    if not rows or not {"question", "answer"} <= set(rows[0]):
        raise SystemExit(f"--data {path}: expected JSON lines with 'question' and 'answer'")
    return rows


def ppl_text(rows: list[dict[str, str]]) -> str:
    return "".join(f"{r['question']}\n{r['answer']}\n\n" for r in rows)


def gsm8k_label(answer: str) -> float | int | None:
    from dendrite.program.answers import number

    return number(answer.split("####")[-1]) if "####" in answer else None


def windows(ids: list[int], n_tokens: int, window: int) -> list[list[int]]:
    ids = ids[:n_tokens]
    out = [ids[i:i + window] for i in range(0, len(ids), window)]
    return [w for w in out if len(w) >= 2]  # one context token + at least one scored


def cpu_study_setup(model_dir: Path, n_tokens: int, window: int, skip: int = 0
                    ) -> tuple[list[list[int]], Any]:
    """The studies' harness (study_fp8_*.py): the perplexity text's windows
    (after `skip` tokens) and a factory of bf16 CPU engines whose pool holds
    them all, `engine(**options)`."""
    from dendrite.engine import Engine
    from dendrite.model.loader import load_config, load_tokenizer

    tok = load_tokenizer(model_dir, load_config(model_dir))
    ids = tok.encode(ppl_text(load_gsm8k(DATA)), add_special_tokens=False)
    wins = windows(ids[skip:], n_tokens, window)
    num_pages = sum(-(-len(w) // 16) for w in wins) + 64

    def engine(**kw: Any) -> Any:
        return Engine(model_dir, device="cpu", dtype=torch.bfloat16, num_pages=num_pages,
                      page_size=16, max_batch_tokens=2048, prefix_cache=False, **kw)

    return wins, engine


# -- measurements ----------------------------------------------------------------------


def score(engine: Any, wins: list[list[int]]) -> dict[str, list]:
    """Logprob of every scored token, and the top-2 (id, logprob) at its position."""
    handles = []
    for w in wins:
        seq = engine.new_sequence(w[:1], add_bos=False)
        handles.append(engine.submit_score(seq, w[1:], logprobs=2))
    engine.run(handles)
    lps: list[float] = []
    top: list[list[tuple[int, float]]] = []
    for h in handles:
        lps += h.result.logprobs
        top += [list(map(tuple, t)) for t in h.result.top_logprobs]
        h.seq.release()
    return {"lps": lps, "top": top}


def ppl_of(lps: list[float]) -> float:
    return math.exp(-sum(lps) / len(lps))


#: Margins (nats) of the agreement-by-margin table, besides --margin.
MARGINS = (0.1, 0.25, 0.5, 1.0)


def agreement(ref_top: list, top: list, margin: float) -> dict[str, Any]:
    """Top-1 agreement with the reference on decidable positions (ref gap > margin) and all,
    and by margin (`by_margin`: margin -> [decidable positions, agreement %])."""
    assert len(ref_top) == len(top)
    same = [r[0][0] == t[0][0] for r, t in zip(ref_top, top)]
    gaps = [r[0][1] - r[1][1] if len(r) > 1 else math.inf for r in ref_top]

    def at(m: float) -> tuple[int, float | None]:
        dec = [s for s, g in zip(same, gaps) if g > m]
        return len(dec), (100.0 * sum(dec) / len(dec) if dec else None)

    decidable, pct = at(margin)
    return {"decidable": decidable, "positions": len(ref_top), "top1_agree_pct": pct,
            "top1_agree_all_pct": 100.0 * sum(same) / len(same) if same else None,
            "by_margin": {str(m): list(at(m)) for m in sorted({*MARGINS, margin})}}


def gsm8k_prompts(tokenizer: Any, questions: list[str]) -> tuple[list[str], bool]:
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                              add_generation_prompt=True) for q in questions], True
    return [f"Question: {q}\nAnswer:" for q in questions], False


def run_gsm8k(engine: Any, prompts: list[str], labels: list, max_tokens: int) -> dict[str, Any]:
    from dendrite.program.answers import number
    from dendrite.sampling import SamplingParams

    # The template's text carries its own special tokens: no extra BOS.
    seqs = [engine.new_sequence(p, add_bos=False) for p in prompts]
    handles = [engine.submit(s, SamplingParams(temperature=0.0, max_tokens=max_tokens))
               for s in seqs]
    engine.run(handles)
    answers = [number(h.result.text) for h in handles]
    correct = [a is not None and lab is not None and float(a) == float(lab)
               for a, lab in zip(answers, labels)]
    out = {"n": len(prompts), "correct": sum(correct), "acc_pct": 100.0 * sum(correct) / len(prompts),
           "answers": answers, "gen_tokens": sum(len(h.result.token_ids) for h in handles)}
    for s in seqs:
        s.release()
    return out


# -- KV capacity -----------------------------------------------------------------------


def kv_page_bytes(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
                  fmt_name: str) -> tuple[int, str]:
    """(bytes of one KV page in format `fmt_name`, where the figure comes from).

    The engine's own page arithmetic: `KVCache.bytes_per_page` at the pool's
    storage dtype (`kv_format`) for bf16 / FP8, `QuantKVCache.bytes_per_page`
    (codes + per-group scales and mins) for the N-bit formats; a formula
    (payload only) where those functions are not there.
    """
    from dendrite.model.kv_cache import KVCache

    _, bits = KV_FORMATS[fmt_name]
    shape = (num_layers, page_size, num_kv_heads)
    try:
        if fmt_name == "bf16":
            return KVCache.bytes_per_page(*shape, head_dim, torch.bfloat16), \
                "KVCache.bytes_per_page"
        if fmt_name.startswith("fp8"):
            from dendrite.model.kv_cache import kv_format

            storage = kv_format(fmt_name).storage_dtype(torch.bfloat16)
            name = str(storage).removeprefix("torch.")
            return (KVCache.bytes_per_page(*shape, head_dim, storage),
                    f"KVCache.bytes_per_page ({name}, per-layer scales)")
        from dendrite.model.kv_quant import kv_quant_format
        from dendrite.model.kv_quant_cache import QuantKVCache

        qf = kv_quant_format(fmt_name, head_dim)
        return (QuantKVCache.bytes_per_page(*shape, qf),
                f"QuantKVCache.bytes_per_page (group {qf.group_size}, fp16 scale+min)")
    except (ImportError, AttributeError, ValueError, TypeError) as e:
        why = f"{type(e).__name__}: {e}"
    per_page = math.ceil(num_layers * 2 * page_size * num_kv_heads * head_dim * bits / 8)
    return per_page, f"formula, payload only ({why})"


def capacity_rows(shapes: list[dict[str, Any]], page_size: int, budget_gib: float,
                  prefix_tokens: int, branch_tokens: int,
                  engine_bytes: dict[str, int]) -> list[dict[str, Any]]:
    """Bytes/token, longest context and live branches in the budget, per shape and format.

    `engine_bytes`: bytes per page a built engine reported, per KV format, for
    the first shape (the measured model); it wins over the computed figure.
    """
    budget = int(budget_gib * (1 << 30))
    rows = []
    for i, sh in enumerate(shapes):
        for fmt_name in KV_FORMATS:
            per_page, source = kv_page_bytes(sh["num_layers"], page_size, sh["num_kv_heads"],
                                             sh["head_dim"], fmt_name)
            if i == 0 and fmt_name in engine_bytes:
                if engine_bytes[fmt_name] != per_page:
                    source += f" (computed {per_page})"
                per_page, source = engine_bytes[fmt_name], "engine memory_stats"
            pages = budget // per_page
            prefix_pages = -(-prefix_tokens // page_size)
            branch_pages = -(-branch_tokens // page_size)
            rows.append({"model": sh["name"], "kv": fmt_name, "bytes_per_page": per_page,
                         "bytes_per_token": per_page / page_size, "source": source,
                         "max_context": pages * page_size,
                         "max_branches": max(0, (pages - prefix_pages) // branch_pages)})
    return rows


# -- report ----------------------------------------------------------------------------


def gate_verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r["config"] not in GATES:
            continue
        max_ppl, min_agree = GATES[r["config"]]
        need = f"abs(ppl Δ) <= {max_ppl}%" + (f", top-1 >= {min_agree}%" if min_agree else "")
        if r.get("ppl_delta_pct") is None or (min_agree and r.get("top1_agree_pct") is None):
            why = r.get("status", "ok")
            verdict = f"not measured ({'no reference' if why == 'ok' else why})"
        else:
            ok = abs(r["ppl_delta_pct"]) <= max_ppl
            if min_agree:
                ok = ok and r["top1_agree_pct"] >= min_agree
            verdict = "PASS" if ok else "FAIL"
        out.append({"config": r["config"], "gate": need, "verdict": verdict})
    return out


def render(d: dict[str, Any]) -> str:
    a = d["args"]
    out = ["## Quantization accuracy (issue 17)\n",
           f"{bc.env_line(d['env'])}\n",
           (f"Perplexity: {d.get('ppl_tokens', '?')} scored tokens ({a['tokens']} tokens in "
            f"windows of {a['window']}); top-1 agreement on positions where the reference's top-1 "
            f"beats its top-2 by > {a['margin']} nats; GSM8K: {a['gsm8k']} questions, greedy, "
            f"<= {a['gsm8k_max_tokens']} tokens.\n")]
    header = ["config", "ppl", "ppl Δ %", "top-1 agree % (decidable)", "decidable / positions",
              "top-1 agree % (all)", "GSM8K acc %", "GSM8K Δ pts", "same answer as ref",
              "KV bytes/token", "status"]
    table = []
    for r in d["rows"]:
        g = r.get("gsm8k") or {}
        table.append([
            r["config"] + (" (ref)" if r.get("reference") else "")
            + (" *" if r.get("cpu_emulation") and r.get("status") == "ok" else ""),
            bc.fmt(r.get("ppl"), ".4f"), bc.fmt(r.get("ppl_delta_pct"), "+.3f"),
            bc.fmt(r.get("top1_agree_pct"), ".2f"),
            f"{r['decidable']} / {r['positions']}" if r.get("decidable") is not None else "—",
            bc.fmt(r.get("top1_agree_all_pct"), ".2f"),
            f"{g['acc_pct']:.1f} ({g['correct']}/{g['n']})" if g else "—",
            bc.fmt(r.get("gsm8k_delta_pts"), "+.1f"),
            f"{r['gsm8k_same']}/{g['n']}" if r.get("gsm8k_same") is not None else "—",
            bc.fmt(r.get("kv_bytes_per_token"), ".0f"),
            r.get("status", "ok"),
        ])
    out.append(bc.md_table(header, table, right={1, 2, 3, 5, 6, 7, 9}))
    if any(r.get("cpu_emulation") and r.get("status") == "ok" for r in d["rows"]):
        out.append("\n\\* CPU emulation: quantized formats stored and converted with torch's "
                   "float8/int dtypes on the CPU, not the GPU kernels.\n")
    by = [r for r in d["rows"] if r.get("by_margin")]
    if by:
        ms = list(by[0]["by_margin"])
        out.append("\nTop-1 agreement % by decidability margin (decidable positions):\n\n")
        out.append(bc.md_table(["config", *[f"gap > {m} nats" for m in ms]],
                               [[r["config"], *[f"{bc.fmt(r['by_margin'][m][1], '.2f')} "
                                                f"({r['by_margin'][m][0]})" for m in ms]]
                                for r in by], right=set(range(1, len(ms) + 1))))
    if d.get("gates"):
        out.append("\n" + bc.md_table(["config", "gate", "verdict"],
                                      [[g["config"], g["gate"], g["verdict"]] for g in d["gates"]]))
    if d.get("capacity"):
        c = d["capacity_args"]
        out.append(f"\nKV capacity in {c['budget_gib']} GiB of KV (page {c['page_size']}; branches: "
                   f"{c['branch_tokens']} own tokens each over one shared {c['prefix_tokens']}-token "
                   f"prefix):\n\n")
        out.append(bc.md_table(
            ["model", "KV", "bytes/token", "max context (tokens)", "max live branches", "source"],
            [[r["model"], r["kv"], f"{r['bytes_per_token']:.1f}", f"{r['max_context']:,}",
              f"{r['max_branches']:,}", r["source"]] for r in d["capacity"]], right={2, 3, 4}))
    for n in d["notes"]:
        out.append(f"\nNote: {n}\n")
    return "".join(out)


# -- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default",
                   help="HF model dir; 'default' = SmolLM2-135M-Instruct, 'tiny' = the tiny model")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="bfloat16", help="model dtype of every configuration")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"comma-separated; parts {', '.join(PARTS)} joined with '+'; the first "
                        f"is the reference (default {DEFAULT_CONFIGS})")
    p.add_argument("--tokens", type=int, default=16384, help="perplexity text length in tokens")
    p.add_argument("--window", type=int, default=1024, help="perplexity window (tokens)")
    p.add_argument("--margin", type=float, default=0.1,
                   help="nats by which the reference's top-1 must beat its top-2 (decidable)")
    p.add_argument("--gsm8k", type=int, default=100, help="GSM8K questions (0: skip)")
    p.add_argument("--gsm8k-max-tokens", type=int, default=256)
    p.add_argument("--data", type=Path, default=DATA, help="GSM8K JSON lines (question, answer)")
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--kv-budget-gib", type=float, default=8.0)
    p.add_argument("--prefix-tokens", type=int, default=32768)
    p.add_argument("--branch-tokens", type=int, default=1024)
    p.add_argument("--out", type=Path, required=True,
                   help="JSON result file (a .md table is written beside it)")
    a = p.parse_args(argv)
    a.budget = None
    for name in ("tokens", "window", "gsm8k_max_tokens", "max_batch_tokens", "prefix_tokens",
                 "branch_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.gsm8k < 0:
        p.error(f"--gsm8k must be >= 0, got {a.gsm8k}")
    if not (a.margin >= 0 and a.kv_budget_gib > 0):
        p.error("--margin must be >= 0 and --kv-budget-gib > 0")
    try:
        a.config_list = parse_configs(a.configs)
    except ValueError as e:
        p.error(str(e))
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    device, dtype, model_dir, _, res = bc.start("bench_quant", a, render)
    from dendrite.model.loader import load_config, load_tokenizer

    cfg = load_config(model_dir)
    tok = load_tokenizer(model_dir, cfg)
    data = load_gsm8k(a.data)
    ids = tok.encode(ppl_text(data), add_special_tokens=False)
    if len(ids) < a.tokens:
        res.note(f"the text has only {len(ids)} tokens: --tokens {a.tokens} capped")
    wins = windows(ids, a.tokens, a.window)
    res.data["ppl_tokens"] = sum(len(w) - 1 for w in wins)
    qs = data[:a.gsm8k]
    if a.gsm8k > len(data):
        res.note(f"--gsm8k {a.gsm8k}: the data has {len(data)} questions; all are used")
    prompts, templated = gsm8k_prompts(tok, [q["question"] for q in qs])
    labels = [gsm8k_label(q["answer"]) for q in qs]
    res.data["gsm8k_chat_template"] = templated
    # Pages for every window at once, or every question's prompt + output at once.
    need = max(sum(-(-len(w) // 16) for w in wins),
               sum(-(-(len(tok.encode(p, add_special_tokens=False)) + a.gsm8k_max_tokens) // 16)
                   for p in prompts))
    num_pages = need + 64

    ref: dict[str, Any] | None = None
    engine_bytes: dict[str, int] = {}
    for i, name in enumerate(a.config_list):
        kwargs = config_kwargs(name)
        row: dict[str, Any] = {"config": name, "options": kwargs, "reference": i == 0,
                               "cpu_emulation": device.type == "cpu" and bool(
                                   {"kv_dtype", "quantization"} & set(kwargs))}
        bc.log(f"{name}: building the engine with {kwargs or 'no options'}")
        t0 = time.perf_counter()
        engine, why = build_engine(model_dir, device, dtype, kwargs, num_pages=num_pages,
                                   page_size=16, max_batch_tokens=a.max_batch_tokens)
        if engine is None:
            row["status"] = f"not available: {why}"
            bc.log(f"{name}: {row['status']}")
            res.add(row)
            continue
        try:
            bpp = engine.memory_stats()["bytes_per_page"]
            row["kv_bytes_per_token"] = bpp / engine.page_size
            kv_fmt = kwargs.get("kv_dtype") or "bf16"
            if engine.page_size == 16 and (kv_fmt != "bf16"
                                           or engine.runner.dtype == torch.bfloat16):
                engine_bytes.setdefault(kv_fmt, bpp)
            with torch.inference_mode():
                s = score(engine, wins)
                row["ppl"] = ppl_of(s["lps"])
                row["score_s"] = time.perf_counter() - t0
                bc.log(f"{name}: ppl {row['ppl']:.4f} ({row['score_s']:.0f} s)")
                if ref is not None and ref.get("score"):
                    row["ppl_delta_pct"] = 100.0 * (row["ppl"] / ref["ppl"] - 1.0)
                    row.update(agreement(ref["score"]["top"], s["top"], a.margin))
                    row["mean_abs_dlogprob"] = sum(
                        abs(x - y) for x, y in zip(s["lps"], ref["score"]["lps"])) / len(s["lps"])
                elif i == 0:
                    row["ppl_delta_pct"] = 0.0
                if qs:
                    t1 = time.perf_counter()
                    g = run_gsm8k(engine, prompts, labels, a.gsm8k_max_tokens)
                    row["gsm8k_s"] = time.perf_counter() - t1
                    row["gsm8k"] = g
                    bc.log(f"{name}: GSM8K {g['correct']}/{g['n']} ({row['gsm8k_s']:.0f} s)")
                    if ref is not None and ref.get("gsm8k"):
                        row["gsm8k_delta_pts"] = g["acc_pct"] - ref["gsm8k"]["acc_pct"]
                        row["gsm8k_same"] = sum(x == y for x, y in
                                                zip(g["answers"], ref["gsm8k"]["answers"]))
            row["status"] = "ok"
            if i == 0:
                ref = {"ppl": row["ppl"], "score": s, "gsm8k": row.get("gsm8k")}
        except Exception as e:  # noqa: BLE001 - a failing configuration is a row
            row["status"] = f"error: {type(e).__name__}: {e}"
            bc.log(f"{name}: {row['status']}")
        finally:
            free_engine(engine)
        res.add(row)
    if a.config_list and ref is None:
        res.note(f"the reference configuration {a.config_list[0]!r} did not run: no deltas")

    res.data["gates"] = gate_verdicts(res.rows)
    shapes = [{"name": f"{model_dir.name}", "num_layers": cfg.num_layers,
               "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim}, LLAMA_8B_KV]
    res.data["capacity_args"] = {"budget_gib": a.kv_budget_gib, "page_size": 16,
                                 "prefix_tokens": a.prefix_tokens, "branch_tokens": a.branch_tokens}
    res.data["capacity"] = capacity_rows(shapes, 16, a.kv_budget_gib, a.prefix_tokens,
                                         a.branch_tokens, engine_bytes)
    res.finish()
    return res.data


if __name__ == "__main__":
    main()

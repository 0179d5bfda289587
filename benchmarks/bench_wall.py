"""User-visible wall time through the public API, Dendrite and HF transformers side by side.

Cases (each after one untimed warm-up; median and min of --reps timed runs;
the prefix cache is cleared before every run, so no run reuses another's prompt):

  single      one stream: `Engine.generate` of --tokens tokens (greedy,
              ignore_eos) after a chat-formatted GSM8K question. ms/token =
              wall / tokens, everything the caller waits for (tokenizing,
              prefill, host work, sampling, detokenizing); decode ms/token =
              (wall(N tokens) - wall(1 token)) / (N - 1); TTFT = wall(1 token).
              On CUDA also the share of the copy-bandwidth roofline: a
              device-to-device copy measured in the same run gives bytes/s
              (read + write), and decode reads per token the weights (tied
              embeddings once; an untied input embedding is a gather, not
              counted) plus the KV cache at the mean context length, on
              wall time and (Dendrite) on GPU busy time: the kernels'
              summed durations (torch.profiler) over one N-token run less a
              one-token run, per decoded token.
              HF: `generate(min_new_tokens=N)` with the dynamic cache, and
              (--hf-static, default on CUDA) the static cache, which
              transformers compiles.
  best_of_16  16 samples of --bo-tokens tokens (temperature 1, ignore_eos)
              after a --bo-prompt-token prompt (GSM8K text), the best kept by
              mean logprob: `dendrite.search.best_of_n.run`. HF: `generate(
              num_return_sequences=16)` (which prefills the prompt 16 times) and
              a prompt-prefilled-once variant (DynamicCache repeated 16x).
  dsl         a shipped .dendrite script end to end through the public program
              API (`load_script(standard_script(...)).run(engine, ...)`):
              tot.dendrite (fork 3, keep 2, depth 2, then a regex-constrained
              answer) and self_consistency.dendrite (n=8), on a GSM8K question.
              No HF row: it has no program layer to compare.

    python benchmarks/bench_wall.py --model DIR --out wall.json
    python benchmarks/bench_wall.py --model tiny --device cpu --quick --out /tmp/wall.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import bench_common as bc
import torch

DATA = bc.HERE / "data" / "gsm8k_test_200.jsonl"
#: Seconds the static-cache row may need (compiling two cache lengths, then the runs):
#: it starts only with that much --budget left, as a timeout would lose it anyway.
STATIC_NEED_S = 90.0


def gsm8k_questions(n: int) -> list[str]:
    lines = DATA.read_text().splitlines()
    return [json.loads(x)["question"] for x in lines[:n]]


def timed(fn: Callable[[], Any], reps: int, device: torch.device,
          before: Callable[[], None] | None = None) -> tuple[list[float], Any]:
    """Wall seconds of ``reps`` calls (CUDA synchronised); ``before`` runs untimed."""
    out, ts = None, []
    for _ in range(reps):
        if before is not None:
            before()
        bc.sync(device)
        t0 = time.perf_counter()
        out = fn()
        bc.sync(device)
        ts.append(time.perf_counter() - t0)
    return ts, out


def summary(ts: list[float]) -> dict[str, float]:
    return {"wall_s": statistics.median(ts), "wall_min_s": min(ts), "reps": len(ts)}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 29) -> float | None:
    """Device-to-device copy bandwidth, bytes/s counting read + write (CUDA only)."""
    if device.type != "cuda":
        return None
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        y.copy_(x)
    stop.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(stop) / 1e3 / reps
    del x, y
    torch.cuda.empty_cache()
    return 2 * nbytes / seconds


def weight_bytes_per_token(model_dir: Path, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes decode reads per token, all parameter bytes) at ``dtype``, from the
    safetensors headers: every weight once, except an untied input embedding
    (a one-row gather)."""
    from safetensors import safe_open

    cfg = json.loads((model_dir / "config.json").read_text())
    elem = torch.empty((), dtype=dtype).element_size()
    total = embed = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n * elem
                if k.endswith("embed_tokens.weight"):
                    embed = n * elem
    tied = cfg.get("tie_word_embeddings", False)
    return (total if tied else total - embed), total


# -- Dendrite cases --------------------------------------------------------------------


def dendrite_single(engine, prompt: str, tokens: int, reps: int, device) -> dict[str, Any]:
    from dendrite.sampling import SamplingParams

    def run(n: int) -> Callable[[], int]:
        def go() -> int:
            seq = engine.new_sequence(prompt)
            try:
                (res,) = engine.generate(seq, SamplingParams(max_tokens=n, temperature=0.0,
                                                             ignore_eos=True))
            finally:
                seq.release()
            return len(res.token_ids)
        return go

    clear = (lambda: engine.cache.clear()) if engine.cache is not None else None
    run(tokens)()  # warm-up
    t1, _ = timed(run(1), reps, device, clear)
    tn, got = timed(run(tokens), reps, device, clear)
    row = single_row("Dendrite", "Engine.generate", t1, tn, got)
    if device.type == "cuda":
        # GPU busy time, apart from the wall: prefill and first token counted
        # from a one-token run, as the wall's decode figure does.
        if clear is not None:
            clear()
        busy_1 = gpu_busy_seconds(run(1), device)
        if clear is not None:
            clear()
        busy_n = gpu_busy_seconds(run(tokens), device)
        row["gpu_decode_ms_per_token"] = 1e3 * (busy_n - busy_1) / max(got - 1, 1)
    return row


def gpu_busy_seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Sum of the CUDA kernel durations of one `fn()` (torch.profiler): the time
    the GPU was busy, whatever the host did in between."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        bc.sync(device)
    return sum(e.self_device_time_total for e in prof.key_averages()
               if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA) / 1e6


def single_row(system: str, mode: str, t1: list[float], tn: list[float], got: int) -> dict[str, Any]:
    wall, first = statistics.median(tn), statistics.median(t1)
    return {"case": "single", "system": system, "mode": mode, "tokens": got, **summary(tn),
            "ms_per_token": 1e3 * wall / got, "ttft_ms": 1e3 * first,
            "decode_ms_per_token": 1e3 * (wall - first) / max(got - 1, 1),
            "tok_per_s": got / wall}


def dendrite_best_of(engine, prompt: str, n: int, tokens: int, reps: int, device,
                     seed: int) -> dict[str, Any]:
    from dendrite.search import best_of_n

    step = dict(max_tokens=tokens, temperature=1.0, ignore_eos=True, stop=None)

    def go():
        return best_of_n.run(engine, prompt=prompt, n=n, step=step, seed=seed)

    clear = (lambda: engine.cache.clear()) if engine.cache is not None else None
    go()  # warm-up
    ts, r = timed(go, reps, device, clear)
    return {"case": f"best_of_{n}", "system": "Dendrite", "mode": "search.best_of_n.run",
            "gen_tokens": r.gen_tokens, **summary(ts), "engine_steps": r.steps,
            "tok_per_s": r.gen_tokens / statistics.median(ts)}


def dendrite_dsl(engine, script: str, args: dict[str, Any], reps: int, device,
                 seed: int) -> dict[str, Any]:
    import dendrite.dsl as dsl

    path = dsl.standard_script(script)
    prog = dsl.load_script(str(path))
    clear = (lambda: engine.cache.clear()) if engine.cache is not None else None
    prog.run(engine, seed=seed, **args)  # warm-up (grammar compile, graph buckets)
    ts, r = timed(lambda: prog.run(engine, seed=seed, **args), reps, device, clear)
    wall = statistics.median(ts)
    shown = {k: v for k, v in args.items() if k != "question"}
    return {"case": "dsl", "system": "Dendrite", "mode": f"{path.name} {shown}",
            "gen_tokens": r.gen_tokens, "engine_steps": r.steps, "nodes": len(r.tree),
            **summary(ts), "tok_per_s": r.gen_tokens / wall,
            "ms_per_engine_step": 1e3 * wall / max(r.steps, 1), "value": repr(r.value)[:40]}


# -- HF cases --------------------------------------------------------------------------


def hf_config(max_tokens: int, pad: int, sample: bool, n: int = 1, **kw):
    import transformers

    s = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    return transformers.GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                         pad_token_id=pad, num_return_sequences=n, **s, **kw)


def hf_single(model, ids: list[int], tokens: int, reps: int, device, pad: int,
              static: bool) -> dict[str, Any]:
    x = torch.tensor([ids], device=device)
    extra = dict(cache_implementation="static") if static else {}

    def run(n: int):
        cfg = hf_config(n, pad, sample=False, **extra)

        def go() -> int:
            with torch.no_grad():
                out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)
            return out.shape[1] - x.shape[1]
        return go

    t0 = time.perf_counter()
    run(tokens)()  # warm-up (for the static cache: compilation, per cache length)
    run(1)()
    run(tokens)()
    warm = time.perf_counter() - t0
    t1, _ = timed(run(1), reps, device)
    tn, got = timed(run(tokens), reps, device)
    # transformers compiles the static-cache forward by itself on accelerators only
    mode = ("generate, static cache" + (" (compiled)" if device.type != "cpu" else ", not compiled on CPU")
            if static else "generate, dynamic cache")
    row = single_row("HF transformers", mode, t1, tn, got)
    row["warmup_s"] = warm
    return row


def hf_best_of(model, ids: list[int], n: int, tokens: int, reps: int, device, pad: int,
               prefill_once: bool) -> dict[str, Any]:
    """Best of ``n`` by mean token logprob, as best_of_n picks."""
    x = torch.tensor([ids], device=device)

    def pick(seqs: torch.Tensor, scores: tuple) -> int:
        logp = torch.stack(scores, 1).float().log_softmax(-1)  # [n, T, V]
        lp = logp.gather(-1, seqs[:, -len(scores):, None]).squeeze(-1)
        return int(lp.mean(1).argmax())

    if prefill_once:
        cfg = hf_config(tokens, pad, sample=True, output_scores=True, return_dict_in_generate=True)

        def go() -> int:
            gens, out = bc.hf_fork_generate(model, [ids], n, cfg, pad, device)
            pick(out.sequences, out.scores)
            return len(gens)
        mode = f"prompt prefilled once, DynamicCache repeated x{n}, one generate"
    else:
        cfg = hf_config(tokens, pad, sample=True, n=n, output_scores=True,
                        return_dict_in_generate=True)

        def go() -> int:
            with torch.no_grad():
                out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)
            pick(out.sequences, out.scores)
            return out.sequences.shape[0]
        mode = f"generate(num_return_sequences={n})"

    go()  # warm-up
    ts, got = timed(go, reps, device)
    return {"case": f"best_of_{n}", "system": "HF transformers", "mode": mode,
            "gen_tokens": got * tokens, **summary(ts), "tok_per_s": got * tokens / statistics.median(ts)}


# -- report ----------------------------------------------------------------------------


def render(d: dict[str, Any]) -> str:
    env = d.get("env", {})
    out = [f"# User-visible wall time through the public API\n",
           f"{bc.env_line(env)}. Command: `{d.get('command')}`\n"]
    bw = env.get("copy_bandwidth_Bps")
    if bw:
        out.append(f"Copy bandwidth (read + write) {bw / 1e12:.2f} TB/s; decode reads "
                   f"{env.get('weight_bytes_per_token', 0) / 1e6:.1f} MB of weights per token.\n")
    rows = []
    for r in d["rows"]:
        if r.get("skipped") or r.get("error"):
            rows.append([r["case"], r["system"], r.get("mode", ""), "—", "—", "—", "—", "—",
                         r.get("skipped") or r.get("error", "")])
            continue
        single = r["case"] == "single"
        rows.append([
            r["case"], r["system"], r["mode"],
            bc.fmt(r["wall_s"] * 1e3, ",.1f") + f" (min {r['wall_min_s'] * 1e3:,.1f})",
            bc.fmt(r.get("ms_per_token"), ".3f") if single else "",
            bc.fmt(r.get("decode_ms_per_token"), ".3f") if single else "",
            bc.fmt(r.get("tok_per_s"), ",.0f"),
            bc.fmt(r.get("pct_roofline"), ".0f", "") + ("%" if r.get("pct_roofline") else ""),
            (f"TTFT {r['ttft_ms']:.1f} ms, {r['tokens']} tokens" + (
                f"; GPU busy {r['gpu_decode_ms_per_token']:.3f} ms/token = "
                f"{r['pct_roofline_gpu']:.0f}% of the roofline"
                if r.get("pct_roofline_gpu") else "") if single else
             f"{r.get('gen_tokens')} tokens" + (f", {r['engine_steps']} engine steps, "
                                               f"{r['ms_per_engine_step']:.2f} ms/step"
                                               if "ms_per_engine_step" in r else "")),
        ])
    out.append(bc.md_table(["case", "system", "mode", "wall ms (median)", "ms/token",
                            "decode ms/token", "tok/s", "% copy-BW roofline", "notes"],
                           rows, right={3, 4, 5, 6, 7}))
    if d.get("notes"):
        out.append("\n" + "\n".join(f"* {n}" for n in d["notes"]) + "\n")
    return "\n".join(out)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_common_args(p)
    p.add_argument("--cases", default="single,best_of,dsl", help="comma list of single, best_of, dsl")
    p.add_argument("--tokens", type=int, default=256, help="single-stream tokens")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--bo-n", type=int, default=16)
    p.add_argument("--bo-prompt-tokens", type=int, default=2048)
    p.add_argument("--bo-tokens", type=int, default=64)
    p.add_argument("--dsl-step-tokens", type=int, default=32, help="tot.dendrite step_tokens")
    p.add_argument("--dsl-max-tokens", type=int, default=48, help="self_consistency max_tokens")
    p.add_argument("--hf-static", choices=("auto", "on", "off"), default="auto",
                   help="HF static-cache single-stream row (auto: on CUDA only)")
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.reps, a.bo_prompt_tokens, a.bo_tokens = 8, 1, 64, 4
        a.dsl_step_tokens, a.dsl_max_tokens = 4, 4
    a.cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = [c for c in a.cases if c not in ("single", "best_of", "dsl")]
    if bad:
        p.error(f"--cases: unknown {', '.join(bad)} (single, best_of, dsl)")
    for name in ("tokens", "reps", "bo_n", "bo_prompt_tokens", "bo_tokens", "dsl_step_tokens",
                 "dsl_max_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


def long_prompt(tokenizer, n_tokens: int) -> tuple[str, int]:
    """GSM8K questions joined until ``n_tokens`` tokens, cut there (text, actual tokens)."""
    qs = gsm8k_questions(200)
    text, i = "", 0
    while len(tokenizer.encode(text)) < n_tokens:
        text += qs[i % len(qs)] + "\n"
        i += 1
    ids = tokenizer.encode(text)[:n_tokens]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text, len(tokenizer.encode(text))


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    device, dtype, model_dir, budget, res = bc.start("wall", a, render)
    env = res.data["env"]
    env["copy_bandwidth_Bps"] = copy_bandwidth(device)
    env["weight_bytes_per_token"], env["weight_bytes"] = weight_bytes_per_token(model_dir, dtype)

    from dendrite.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(model_dir, device=str(device), dtype=dtype)
    env["engine_load_s"] = round(time.perf_counter() - t0, 2)
    tok = engine.tokenizer
    kv_per_token = engine.memory_stats()["bytes_per_page"] / engine.page_size
    env["kv_bytes_per_token"] = kv_per_token
    chat = bc.ChatTurns.from_tokenizer(tok)
    question = gsm8k_questions(1)[0]
    single_prompt = chat.first(question)
    single_ids = tok.encode(single_prompt)
    bo_prompt, bo_len = long_prompt(tok, a.bo_prompt_tokens)
    env["single_prompt_tokens"], env["bo_prompt_tokens"] = len(single_ids), bo_len

    def roofline(row: dict[str, Any]) -> dict[str, Any]:
        bw = env["copy_bandwidth_Bps"]
        if bw and row.get("decode_ms_per_token"):
            ctx = len(single_ids) + row["tokens"] / 2
            nbytes = env["weight_bytes_per_token"] + kv_per_token * ctx
            row["bytes_per_token"] = nbytes
            row["roofline_ms_per_token"] = 1e3 * nbytes / bw
            row["pct_roofline"] = 100 * row["roofline_ms_per_token"] / row["decode_ms_per_token"]
            if row.get("gpu_decode_ms_per_token"):
                row["pct_roofline_gpu"] = (100 * row["roofline_ms_per_token"]
                                           / row["gpu_decode_ms_per_token"])
        return row

    def attempt(case: str, system: str, fn: Callable[[], dict[str, Any]], need: float = 0) -> None:
        if not budget.allows(need):
            res.add({"case": case, "system": system, "skipped": f"out of --budget (needs ~{need:.0f} s)"
                     if need else "out of --budget"})
            return
        try:
            row = fn()
        except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
            res.add({"case": case, "system": system, "error": f"{type(e).__name__}: {e}"[:300]})
            bc.log(f"{case} {system} failed: {e!r}")
            return
        bc.log(f"{case} {system} {row.get('mode', '')}: {row['wall_s'] * 1e3:.1f} ms")
        res.add(roofline(row))

    if "single" in a.cases:
        attempt("single", "Dendrite",
                lambda: dendrite_single(engine, single_prompt, a.tokens, a.reps, device))
    if "best_of" in a.cases:
        attempt(f"best_of_{a.bo_n}", "Dendrite",
                lambda: dendrite_best_of(engine, bo_prompt, a.bo_n, a.bo_tokens, a.reps, device,
                                         a.seed))
    if "dsl" in a.cases:
        attempt("dsl", "Dendrite", lambda: dendrite_dsl(
            engine, "tot", dict(question=question, step_tokens=a.dsl_step_tokens), a.reps,
            device, a.seed))
        attempt("dsl", "Dendrite", lambda: dendrite_dsl(
            engine, "self_consistency", dict(question=question, n=8, max_tokens=a.dsl_max_tokens),
            a.reps, device, a.seed))
    engine.close()
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if not a.no_hf and bc.hf_available():
        model = bc.load_hf(model_dir, device, dtype)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        bo_ids = tok.encode(bo_prompt)
        if "single" in a.cases:
            attempt("single", "HF transformers",
                    lambda: hf_single(model, single_ids, a.tokens, a.reps, device, pad, False))
        if "best_of" in a.cases:
            for once in (False, True):
                attempt(f"best_of_{a.bo_n}", "HF transformers", lambda once=once: hf_best_of(
                    model, bo_ids, a.bo_n, a.bo_tokens, a.reps, device, pad, once))
        static = a.hf_static == "on" or (a.hf_static == "auto" and device.type == "cuda")
        if "single" in a.cases and static:  # last: compiling may take most of a budget
            attempt("single", "HF transformers",
                    lambda: hf_single(model, single_ids, a.tokens, a.reps, device, pad, True),
                    need=STATIC_NEED_S)
    elif not a.no_hf:
        res.note("transformers is not importable: no HF rows")
    res.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())

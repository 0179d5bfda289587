"""GPU benchmark: Dendrite vs HF transformers on a Llama-3.2-1B-shaped random model.

Stages (each its own process in benchmarks/gpu_run.sh, so one that hangs or
crashes costs only itself; each writes `$OUT/bench_<stage>.json`):

    build            config + random bf16 weights (seeded, generated on the GPU)
    dendrite         copy bandwidth (roofline), prefill, decode: eager, CUDA graph
    dendrite-compile decode with the CUDA graph over a torch.compile'd forward
    hf               transformers generate (default attention, dynamic cache)
    hf-static        transformers generate with the static cache (auto-compiled)
    report           merge the JSON files, print and save a markdown table

Definitions. Decode tok/s is single stream (batch 1), greedy, after a
128-token prompt. "per-token sync" reads every token back to the host before
the next step (what the engine does); "pipelined" keeps tokens on the device
and lets the host prepare step n+1 while the GPU runs step n; "replay only"
times back-to-back graph replays (GPU time per token). Prefill tok/s is one
2048-token prompt. Roofline: weight bytes / measured device-to-device copy
bandwidth (bytes read + written), i.e. the time to stream the weights once
per token at the rate a copy achieves.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL_DIR = Path(os.environ.get("DENDRITE_BENCH_MODEL", "/tmp/dendrite-llama-1b"))
PAGE_SIZE = 16
NUM_PAGES = 512  # 8192 tokens; the last page is the CUDA-graph pad page
DECODE_PROMPT = 128

#: Llama-3.2-1B's shape (hidden 2048, 16 layers, 32/8 heads, head_dim 64, ...).
LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "attention_bias": False,
    "mlp_bias": False, "pretraining_tp": 1, "initializer_range": 0.02, "use_cache": True,
}


# -- helpers -------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save(out: Path, stage: str, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_{stage}.json").write_text(json.dumps(data, indent=2))
    log(f"{stage}: {json.dumps(data)}")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, reps: int, warmup: int = 1) -> float:
    """Median wall seconds of `fn()` with the device synchronized around each call."""
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def env_info() -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cuda": torch.version.cuda}
    for mod in ("flashinfer", "transformers", "triton"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - report, don't fail
            info[mod] = f"unavailable ({type(e).__name__})"
    return info


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus written."""
    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(ts)


# -- build ---------------------------------------------------------------------------
def write_random_llama(out: Path, cfg: dict, device: str | torch.device,
                       seed: int) -> dict[str, torch.Tensor]:
    """A Llama model dir of shape `cfg` in `out`: the tiny tokenizer, config.json
    (with its BOS/EOS ids) and seeded random bf16 weights (N(0, 0.02), norms
    ~1; an lm_head unless the embeddings are tied) drawn on `device`; returns
    the weights."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from dendrite.tiny_model import BOS, EOS, build_tokenizer

    build_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    cfg = dict(cfg, bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS))
    h, i, v, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    hq, hkv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    g = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape, std=0.02, mean=0.0):
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std + mean
        return t.to(torch.bfloat16).cpu()

    w = {"model.embed_tokens.weight": normal(v, h), "model.norm.weight": normal(h, mean=1.0)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = normal(h, mean=1.0)
        w[p + "post_attention_layernorm.weight"] = normal(h, mean=1.0)
        for name, rows, cols in (("self_attn.q_proj", hq, h), ("self_attn.k_proj", hkv, h),
                                 ("self_attn.v_proj", hkv, h), ("self_attn.o_proj", h, hq),
                                 ("mlp.gate_proj", i, h), ("mlp.up_proj", i, h),
                                 ("mlp.down_proj", h, i)):
            w[p + name + ".weight"] = normal(rows, cols)
    if not cfg.get("tie_word_embeddings", False):
        w["lm_head.weight"] = normal(v, h)
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
         "do_sample": False}, indent=2))
    return w


def stage_build(args, res: dict) -> None:
    """Config, tokenizer and seeded random bf16 weights of the 1B shape (`--tiny`: a
    smoke-test shape) in MODEL_DIR."""
    cfg = dict(LLAMA_1B)
    if args.tiny:  # smoke-test shape for machines without a GPU
        cfg.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
    w = write_random_llama(MODEL_DIR, cfg, args.device, args.seed)
    res.update(model_dir=str(MODEL_DIR),
               weight_bytes=sum(t.numel() * t.element_size() for t in w.values()),
               params=sum(t.numel() for t in w.values()))


# -- dendrite ------------------------------------------------------------------------
class OneSeq:
    """Page bookkeeping of one sequence on pages 0, 1, 2, ... (engine-like metadata)."""

    def __init__(self, runner) -> None:
        self.runner, self.n = runner, 0

    def meta(self, count: int):
        from dendrite.attention.base import build_attention_metadata

        start, self.n = self.n, self.n + count
        pages = (self.n + PAGE_SIZE - 1) // PAGE_SIZE
        pos = list(range(start, self.n))
        return build_attention_metadata(
            pos, pos, [0, count], [0, pages], list(range(pages)),
            [self.n - (pages - 1) * PAGE_SIZE], page_size=PAGE_SIZE, device="cuda",
            validate=False)  # page p holds tokens [16p, 16p + 16): slot == position


def _decode_loops(graphs, runner, prompt: torch.Tensor, n: int) -> dict:
    """Time a graph runner: per-token sync (with and without plan reuse),
    pipelined, replay only; plus the host cost of the pieces of a step."""
    res = {}

    def start() -> tuple[OneSeq, torch.Tensor]:
        seq = OneSeq(runner)
        logits = runner.run(prompt, seq.meta(len(prompt)))
        return seq, logits.argmax(-1)

    from graph_variants import set_skip_redundant_plans

    for mode in ("sync", "sync_replan", "pipelined"):
        set_skip_redundant_plans(graphs, mode != "sync_replan")
        seq, tok = start()
        plans0 = graphs.planner_calls
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            _, tok = graphs.run(tok, seq.meta(1))
            if mode != "pipelined":
                tok = torch.tensor([int(tok.item())])  # the engine reads each token
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        res[f"decode_{mode}_tok_s"] = n / dt
        res[f"decode_{mode}_ms"] = 1e3 * dt / n
        res[f"decode_{mode}_planner_calls"] = graphs.planner_calls - plans0
    set_skip_redundant_plans(graphs, True)

    # Host cost (GPU idle): building the metadata, and graphs.run() up to the launch.
    seq, tok = start()
    t0 = time.perf_counter()
    metas = [seq.meta(1) for _ in range(64)]
    res["host_meta_us"] = 1e6 * (time.perf_counter() - t0) / 64
    host = []
    for m in metas:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, tok = graphs.run(tok, m)
        host.append(time.perf_counter() - t0)
    res["host_run_us"] = 1e6 * statistics.median(host)

    for _ in range(5):
        graphs.replay(1)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        graphs.replay(1)
    b.record()
    b.synchronize()
    res["replay_ms"] = a.elapsed_time(b) / n
    res["replay_tok_s"] = 1e3 / res["replay_ms"]
    res.update(_profile_replay(graphs))
    return res


def _profile_replay(graphs, steps: int = 10) -> dict:
    """Kernel-level breakdown of graph replays (logged; summary returned)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                graphs.replay(1)
            torch.cuda.synchronize()
        rows = []
        for e in prof.key_averages():
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0)
            if t > 0:
                rows.append((t / steps, e.count / steps, e.key))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        log(f"profile: {sum(r[1] for r in rows):.0f} kernels/step, {total:.0f} us kernel time/step")
        for us, cnt, name in rows[:30]:
            log(f"  {us:8.1f} us/step {cnt:6.1f}x  {name[:110]}")
        return {"profile_kernels_per_step": sum(r[1] for r in rows),
                "profile_kernel_us_per_step": total,
                "profile_top": [[round(us, 1), cnt, name[:110]] for us, cnt, name in rows[:30]]}
    except Exception as e:  # noqa: BLE001 - profiling is a bonus
        log(f"profile failed: {e!r}")
        return {"profile_error": repr(e)}


def _check_against_eager(graphs, runner, prompt: torch.Tensor, steps: int = 8) -> dict:
    """Graph logits vs eager logits on the same history: max rel error, top-1 agreement."""
    seq = OneSeq(runner)
    tok = runner.run(prompt, seq.meta(len(prompt))).argmax(-1)
    errs, agree = [], []
    for _ in range(steps):
        meta = seq.meta(1)
        eager = runner.run(tok, meta)
        logits, g_tok = graphs.run(tok, meta)
        errs.append(((logits - eager).abs().amax() / eager.abs().amax()).item())
        agree.append(bool((g_tok == eager.argmax(-1)).all()))
        tok = g_tok.clone()
    return {"check_relerr_max": max(errs), "check_top1_agree": sum(agree) / len(agree)}


def load_runner():
    from dendrite.model.runner import ModelRunner

    runner = ModelRunner(MODEL_DIR, device="cuda", dtype=torch.bfloat16, num_pages=NUM_PAGES,
                         page_size=PAGE_SIZE, attention="flashinfer")
    return runner


def stage_dendrite(args, res: dict) -> None:
    from graph_variants import GreedyGraphRunner

    res.update(env_info())
    bw = copy_bandwidth()
    res["copy_bw_bytes_s"] = bw
    t0 = time.perf_counter()
    runner = load_runner()
    res["load_s"] = time.perf_counter() - t0
    res["weight_bytes"] = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    res["params"] = sum(p.numel() for p in runner.model.parameters())
    res["roofline_ms"] = 1e3 * res["weight_bytes"] / bw
    res["roofline_tok_s"] = 1e3 / res["roofline_ms"]
    res["backend"] = type(runner.backend).__name__
    g = torch.Generator(device="cpu").manual_seed(1)
    vocab = runner.config.vocab_size

    # Prefill: one long prompt (the first call JIT-builds FlashInfer's prefill kernels).
    long_prompt = torch.randint(0, vocab, (args.prefill_len,), generator=g).cuda()
    t0 = time.perf_counter()
    runner.run(long_prompt, OneSeq(runner).meta(args.prefill_len))
    torch.cuda.synchronize()
    res["prefill_first_call_s"] = time.perf_counter() - t0
    meta = OneSeq(runner).meta(args.prefill_len)  # same pages each rep: rewrites the same KV
    dt = median_time(lambda: runner.run(long_prompt, meta), reps=10, warmup=2)
    res["prefill_ms"] = 1e3 * dt
    res["prefill_tok_s"] = args.prefill_len / dt
    res["prefill_tflops"] = 2 * res["params"] * args.prefill_len / dt / 1e12
    log(f"prefill {res['prefill_tok_s']:.0f} tok/s")
    save(args.out, "dendrite", res)

    # Eager decode (no graph), per-token sync like the engine.
    prompt = torch.randint(0, vocab, (DECODE_PROMPT,), generator=g).cuda()
    seq = OneSeq(runner)
    tok = runner.run(prompt, seq.meta(DECODE_PROMPT)).argmax(-1)
    t0 = time.perf_counter()
    runner.run(tok, seq.meta(1))  # JIT-builds the decode kernels
    torch.cuda.synchronize()
    res["decode_first_call_s"] = time.perf_counter() - t0
    n_eager = max(16, args.decode_tokens // 4)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_eager):
        tok = torch.tensor([int(runner.run(tok, seq.meta(1)).argmax(-1).item())])
    dt = time.perf_counter() - t0
    res["eager_decode_tok_s"] = n_eager / dt
    res["eager_decode_ms"] = 1e3 * dt / n_eager
    log(f"eager decode {res['eager_decode_tok_s']:.1f} tok/s")
    save(args.out, "dendrite", res)

    # CUDA graph decode, bucket 1 (greedy tokens taken in the graph).
    graphs = GreedyGraphRunner(runner.model, runner.kv_cache, runner.backend,
                               max_batch_size=1, buckets=(1,), kernels=runner.kernels)
    t0 = time.perf_counter()
    graphs.capture()
    res["graph_capture_s"] = time.perf_counter() - t0
    res.update({f"graph_{k}": v for k, v in _check_against_eager(graphs, runner, prompt).items()})
    res.update({f"graph_{k}": v for k, v in
                _decode_loops(graphs, runner, prompt, args.decode_tokens).items()})
    log(f"graph decode {res['graph_decode_pipelined_tok_s']:.1f} tok/s pipelined, "
        f"{res['graph_decode_sync_tok_s']:.1f} sync, replay {res['graph_replay_ms']:.3f} ms")
    save(args.out, "dendrite", res)
    if args.batch_sizes:
        res["graph_batched"] = _batched(runner, args)


def _batched(runner, args) -> dict:
    """Aggregate decode tok/s at a few batch sizes (replay only), for context."""
    from dendrite.attention.base import build_attention_metadata
    from graph_variants import GreedyGraphRunner

    sizes = [int(s) for s in args.batch_sizes.split(",")]
    graphs = GreedyGraphRunner(runner.model, runner.kv_cache, runner.backend,
                               max_batch_size=max(sizes), buckets=sizes, kernels=runner.kernels)
    graphs.capture()
    out = {}
    # Tree-search shape: every row shares a 240-token prefix (15 pages) and
    # owns its last page, where it writes its token (256 tokens of context).
    shared, ctx = 15, 256
    for bs in sizes:
        own = [shared + b for b in range(bs)]
        indices = [p for b in range(bs) for p in list(range(shared)) + [own[b]]]
        meta = build_attention_metadata(
            [ctx - 1] * bs, [p * PAGE_SIZE + PAGE_SIZE - 1 for p in own], list(range(bs + 1)),
            [b * (shared + 1) for b in range(bs + 1)], indices, [PAGE_SIZE] * bs,
            page_size=PAGE_SIZE, device="cuda", validate=False)
        graphs.run(torch.zeros(bs, dtype=torch.int64, device="cuda"), meta)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(50):
            graphs.replay(bs)
        b.record()
        b.synchronize()
        ms = a.elapsed_time(b) / 50
        out[str(bs)] = {"step_ms": ms, "tok_s": bs * 1e3 / ms}
    log(f"batched replay: {out}")
    return out


def stage_dendrite_compile(args, res: dict, mode: bool | str = True) -> None:
    from graph_variants import CompiledGraphRunner

    runner = load_runner()
    g = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(0, runner.config.vocab_size, (DECODE_PROMPT,), generator=g).cuda()
    seq = OneSeq(runner)
    runner.run(runner.run(prompt, seq.meta(DECODE_PROMPT)).argmax(-1), seq.meta(1))  # JIT
    graphs = CompiledGraphRunner(runner.model, runner.kv_cache, runner.backend,
                                 max_batch_size=1, buckets=(1,), kernels=runner.kernels,
                                 mode=mode if isinstance(mode, str) else None)
    t0 = time.perf_counter()
    graphs.capture()
    res["compile_capture_s"] = time.perf_counter() - t0
    log(f"compiled capture {res['compile_capture_s']:.1f} s")
    res.update({f"compiled_{k}": v for k, v in _check_against_eager(graphs, runner, prompt).items()})
    res.update({f"compiled_{k}": v for k, v in
                _decode_loops(graphs, runner, prompt, args.decode_tokens).items()})
    log(f"compiled graph decode {res['compiled_decode_pipelined_tok_s']:.1f} tok/s pipelined")


def stage_warmup(args, res: dict) -> None:
    """JIT-build FlashInfer's kernels for the benchmark's shapes.

    Runs in the background while the native module and the weights are built,
    so it uses FlashInfer directly (no `import dendrite`); the wrappers are
    set up as `FlashInferBackend` sets them up, so they build the same
    modules. FlashInfer's file locks make later users wait for the build.
    """
    import flashinfer

    c = LLAMA_1B
    hq, hkv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    bf16, dev = torch.bfloat16, "cuda"
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device=dev)
    kv = torch.randn(2, 4, PAGE_SIZE, hkv, d, device=dev, dtype=bf16)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    t0 = time.perf_counter()
    if args.kind == "decode":
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=False)
        w.plan(i32(0, 2), i32(0, 1).to(dev), i32(4), hq, hkv, d, PAGE_SIZE, window_left=-1,
               q_data_type=bf16, kv_data_type=bf16, sm_scale=d ** -0.5)
        w.run(torch.randn(1, hq, d, device=dev, dtype=bf16), (kv[0], kv[1]))
    else:
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="auto")
        w.plan(i32(0, 20), i32(0, 2), i32(0, 1).to(dev), i32(4), hq, hkv, d, PAGE_SIZE,
               causal=True, window_left=-1, q_data_type=bf16, kv_data_type=bf16,
               sm_scale=d ** -0.5)
        w.run(torch.randn(20, hq, d, device=dev, dtype=bf16), (kv[0], kv[1]))
    torch.cuda.synchronize()
    log(f"warmup {args.kind}: {time.perf_counter() - t0:.1f} s")


# -- transformers --------------------------------------------------------------------
def stage_hf(args, res: dict, static: bool = False) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, dtype=torch.bfloat16).to(args.device).eval()
    res.update(attn_implementation=model.config._attn_implementation,
               transformers=transformers.__version__)
    g = torch.Generator(device="cpu").manual_seed(1)
    vocab = model.config.vocab_size
    kw = {"cache_implementation": "static"} if static else {}

    def generate(ids, n):
        gc = transformers.GenerationConfig(max_new_tokens=n, do_sample=False,
                                           eos_token_id=None, pad_token_id=0, **kw)
        with torch.no_grad():
            return model.generate(ids, generation_config=gc)

    if not static:
        ids = torch.randint(0, vocab, (1, args.prefill_len), generator=g).to(args.device)
        with torch.no_grad():
            dt = median_time(lambda: model(input_ids=ids, logits_to_keep=1), reps=10, warmup=2)
        res["prefill_ms"] = 1e3 * dt
        res["prefill_tok_s"] = args.prefill_len / dt
        log(f"hf prefill {res['prefill_tok_s']:.0f} tok/s")

    n = args.hf_decode_tokens
    ids = torch.randint(0, vocab, (1, DECODE_PROMPT), generator=g).to(args.device)
    t0 = time.perf_counter()
    out = generate(ids, n + 1)  # warm-up (the static cache compiles here)
    sync()
    res["warmup_s"] = time.perf_counter() - t0
    res["generated_tokens"] = int(out.shape[1] - DECODE_PROMPT)  # < n + 1 only on an EOS
    t1 = median_time(lambda: generate(ids, 1), reps=3, warmup=1)
    tn = median_time(lambda: generate(ids, n + 1), reps=2, warmup=0)
    res["decode_ms"] = 1e3 * (tn - t1) / n
    res["decode_tok_s"] = 1e3 / res["decode_ms"]
    log(f"hf{' static' if static else ''} decode {res['decode_tok_s']:.1f} tok/s")


# -- report --------------------------------------------------------------------------
def stage_report(args) -> str:
    def load(stage):
        p = args.out / f"bench_{stage}.json"
        return json.loads(p.read_text()) if p.exists() else {}

    d, c, hf, hs, b = (load("dendrite"), load("dendrite-compile"), load("hf"),
                       load("hf-static"), load("build"))
    at = load("dendrite-autotune")
    roof = d.get("roofline_tok_s")

    def fmt(x, spec=".1f"):
        return "—" if x is None else format(x, spec)

    def row(system, mode, tok_s, prefill=None, note=""):
        ms = None if tok_s is None else 1e3 / tok_s
        pct = None if (tok_s is None or not roof) else 100 * tok_s / roof
        return (f"| {system} | {mode} | {fmt(tok_s)} | {fmt(ms, '.3f')} | {fmt(pct, '.0f')}"
                f" | {fmt(prefill, '.0f')} | {note} |")

    lines = [
        f"Llama-3.2-1B-shaped random bf16 model ({fmt(d.get('params', b.get('params')), ',')} "
        f"params, {fmt((d.get('weight_bytes') or 0) / 1e9, '.3f')} GB of weights), "
        f"batch 1, greedy, {DECODE_PROMPT}-token prompt for decode, "
        f"{args.prefill_len}-token prompt for prefill.",
        "",
        f"Date: {d.get('date', '?')}; device: {d.get('device', '?')}; torch {d.get('torch', '?')} "
        f"(CUDA {d.get('cuda', '?')}); flashinfer {d.get('flashinfer', '?')}; "
        f"transformers {d.get('transformers', hf.get('transformers', '?'))}.",
        f"Copy bandwidth (read + write): {fmt((d.get('copy_bw_bytes_s') or 0) / 1e12, '.2f')} TB/s; "
        f"roofline {fmt(d.get('roofline_ms'), '.3f')} ms/token = {fmt(roof)} tok/s.",
        "Decode modes: 'per-token sync' reads each token back before the next step (the "
        "engine's loop); 'pipelined' keeps tokens on the device; 'replay only' is GPU time. "
        "Random weights give near-flat logits, so fused (fp32-intermediate) kernels flip some "
        "near-tied argmaxes vs eager bf16.",
        "",
        "| system | mode | decode tok/s | ms/token | % of roofline | prefill tok/s | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    if c:
        lines += [
            row("Dendrite", "CUDA graph + torch.compile, pipelined",
                c.get("compiled_decode_pipelined_tok_s"),
                note=f"vs eager: top-1 {fmt(c.get('compiled_check_top1_agree'), '.2f')}, logit "
                     f"rel. err {fmt(c.get('compiled_check_relerr_max'), '.3f')}"),
            row("Dendrite", "CUDA graph + torch.compile, per-token sync",
                c.get("compiled_decode_sync_tok_s"), note="engine-like step"),
            row("Dendrite", "CUDA graph + torch.compile, per-token sync, re-plan every step",
                c.get("compiled_decode_sync_replan_tok_s")),
            row("Dendrite", "CUDA graph + torch.compile, replay only (GPU time)",
                c.get("compiled_replay_tok_s")),
        ]
    if at.get("compiled_replay_tok_s"):
        lines += [
            row("Dendrite", "CUDA graph + torch.compile max-autotune, pipelined",
                at.get("compiled_decode_pipelined_tok_s"),
                note=f"compile+capture {fmt(at.get('compile_capture_s'))} s; vs eager: top-1 "
                     f"{fmt(at.get('compiled_check_top1_agree'), '.2f')}, logit rel. err "
                     f"{fmt(at.get('compiled_check_relerr_max'), '.3f')}"),
            row("Dendrite", "CUDA graph + torch.compile max-autotune, replay only",
                at.get("compiled_replay_tok_s")),
        ]
    if d:
        lines += [
            row("Dendrite", "CUDA graph, pipelined", d.get("graph_decode_pipelined_tok_s"),
                note=f"vs eager: top-1 {fmt(d.get('graph_check_top1_agree'), '.2f')}, logit "
                     f"rel. err {fmt(d.get('graph_check_relerr_max'), '.3f')}"),
            row("Dendrite", "CUDA graph, per-token sync", d.get("graph_decode_sync_tok_s")),
            row("Dendrite", "CUDA graph, per-token sync, re-plan every step",
                d.get("graph_decode_sync_replan_tok_s")),
            row("Dendrite", "CUDA graph, replay only (GPU time)", d.get("graph_replay_tok_s")),
            row("Dendrite", "eager (FlashInfer, no graph)", d.get("eager_decode_tok_s"),
                d.get("prefill_tok_s"), "prefill: FlashInfer paged prefill"),
        ]
    if hf:
        lines.append(row("HF transformers", f"generate, {hf.get('attn_implementation')}, "
                         "dynamic cache", hf.get("decode_tok_s"), hf.get("prefill_tok_s")))
    if hs:
        lines.append(row("HF transformers", "generate, static cache (auto-compiled)",
                         hs.get("decode_tok_s"), note=f"warm-up {fmt(hs.get('warmup_s'))} s"))
    lines.append(row("Roofline", "weights / copy bandwidth", roof))
    for name, x, pre in (("CUDA graph", d, "graph_"), ("CUDA graph + torch.compile", c,
                                                            "compiled_")):
        if x.get(pre + "host_run_us") is not None:
            lines += ["", f"{name}: {fmt(x.get(pre + 'profile_kernels_per_step'), '.0f')} kernels "
                      f"and {fmt(x.get(pre + 'profile_kernel_us_per_step'), '.0f')} us of kernel "
                      f"time per token; host per step: metadata "
                      f"{fmt(x.get(pre + 'host_meta_us'), '.0f')} us, graphs.run() "
                      f"{fmt(x.get(pre + 'host_run_us'), '.0f')} us; planner calls in "
                      f"{args.decode_tokens} steps: {x.get(pre + 'decode_sync_planner_calls')} "
                      f"(re-plan mode {x.get(pre + 'decode_sync_replan_planner_calls')})."]
    if d.get("graph_batched"):
        lines += ["", "Batched decode, CUDA graph replay only, rows sharing a 240-token "
                  "prefix (256-token contexts): " + ", ".join(
            f"B={k}: {v['tok_s']:.0f} tok/s ({v['step_ms']:.2f} ms/step)"
            for k, v in d["graph_batched"].items())]
    stages = (("dendrite", d), ("dendrite-compile", c), ("hf", hf), ("hf-static", hs),
              ("dendrite-autotune", at))
    missing = [s for s, x in stages if not x]
    if missing:
        lines += ["", f"Stages that did not run: {', '.join(missing)}."]
    for s, x in stages:
        if x.get("error"):
            lines += [f"Stage {s} stopped early: {x['error'].splitlines()[0][:300]}"]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.md").write_text(text)
    print(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=["build", "warmup", "dendrite", "dendrite-compile",
                                      "dendrite-autotune", "hf", "hf-static", "report"])
    ap.add_argument("--kind", choices=["decode", "prefill"], default="decode",
                    help="warmup: which FlashInfer kernels to JIT-build")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--hf-decode-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda", help="cpu only for smoke tests (build, hf)")
    ap.add_argument("--tiny", action="store_true", help="smoke-test shape (build stage)")
    ap.add_argument("--batch-sizes", default="1,8,32,64",
                    help="comma-separated batch sizes for the batched replay table ('' = skip)")
    args = ap.parse_args()
    if args.stage == "report":
        stage_report(args)
        return
    torch.manual_seed(args.seed)
    fn = {"build": stage_build, "dendrite": stage_dendrite, "warmup": stage_warmup,
          "dendrite-compile": stage_dendrite_compile, "hf": stage_hf,
          "dendrite-autotune": lambda a, r: stage_dendrite_compile(
              a, r, mode="max-autotune-no-cudagraphs"),
          "hf-static": lambda a, r: stage_hf(a, r, static=True)}[args.stage]
    # `timeout` sends SIGTERM: leave through `finally` so what was measured is saved.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    res: dict = {}
    try:
        with torch.inference_mode() if args.stage.startswith("dendrite") else torch.no_grad():
            fn(args, res)
    except BaseException as e:
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        raise
    finally:
        if args.stage != "warmup":
            save(args.out, args.stage, res)


if __name__ == "__main__":
    main()

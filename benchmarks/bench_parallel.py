"""Tensor parallel and data-parallel replicas (issue 20): TP=1 vs TP=2, replicas x1 vs x2.

Sections (``--sections``, default all):

  plan       CPU: cost of handing a StepPlan to a follower: the packed bytes
             over a socket (what dendrite.parallel.channel does) vs pickling
             the dataclass over the same socket vs
             ``torch.distributed.broadcast_object_list`` over gloo (2 processes).
  allreduce  CUDA, >= 2 GPUs: one all-reduce of decode-sized bf16 messages
             (1, 16, 64 rows x hidden), NCCL vs torch's symmetric-memory
             one-shot all-reduce, each replayed from a CUDA graph of 50 ops;
             the symm-mem result is checked against NCCL's first.
  decode     TP=1 vs TP=2: single-stream decode ms/token and the ms per step
             of 16 branches forked off one prompt, on a Llama-3.1-8B-shaped
             model (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336,
             vocab 128256, bf16) with random weights made on each GPU
             (``random_weights``: no 16 GB written or read), CUDA graphs on.
             ``--quick``: the tiny model's shape on the CPU (gloo).
  replicas   the ToT GSM8K "deep" workload (benchmarks/bench_tot_gsm8k.py) over
             ``Replicas`` x1 and x2 (one engine per GPU), questions routed by
             prompt; wall time and generated tokens/s.

    python benchmarks/bench_parallel.py --out par.json            # 2 GPUs
    python benchmarks/bench_parallel.py --quick --device cpu --out /tmp/par.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import pickle
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import bench_common as bc
import bench_tot_gsm8k as T
from dendrite.program import program

LLAMA_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                head_dim=128, rope_theta=500000.0, max_position_embeddings=131072)


def model_dir_for(shape: str) -> Path:
    """A model dir with config.json of `shape` ('8b' or 'tiny'), the tiny
    tokenizer, and no weights (every rank makes random ones)."""
    from dendrite.tiny_model import LLAMA3_ROPE_SCALING, build_tiny_model

    d = Path(tempfile.gettempdir()) / f"dendrite-bench-parallel-{shape}"
    build_tiny_model(d, "llama", dtype="bfloat16" if shape == "8b" else "float32")
    if shape == "8b":
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(LLAMA_8B, rope_scaling=LLAMA3_ROPE_SCALING)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


# -- plan transport ----------------------------------------------------------------------


def sample_plan(rows: int, pages_per_row: int):
    from dendrite.model.step import StepPlan

    i32 = np.int32
    return StepPlan(
        input_ids=np.arange(rows, dtype=i32), positions=np.arange(rows, dtype=np.int64) + 900,
        slot_mapping=np.arange(rows, dtype=np.int64) * 16,
        qo_indptr=np.arange(rows + 1, dtype=i32),
        kv_indptr=np.arange(rows + 1, dtype=i32) * pages_per_row,
        kv_indices=np.arange(rows * pages_per_row, dtype=i32),
        kv_last_page_len=np.full(rows, 5, dtype=i32), copies=np.zeros((0, 3), dtype=i32),
        sample_rows=np.arange(rows, dtype=np.int64))


def _object_peer(port: int, iters: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2)
    for _ in range(iters):
        obj = [None]
        dist.broadcast_object_list(obj, src=0)
    dist.destroy_process_group()


def bench_plan(iters: int) -> list[dict[str, Any]]:
    import multiprocessing as mp

    import torch.distributed as dist

    from dendrite.parallel.channel import pack_plan, unpack_plan

    rows = []
    a, b = socket.socketpair()
    for nrows, ppr in ((1, 64), (16, 64), (64, 256)):
        plan = sample_plan(nrows, ppr)
        for how in ("packed", "pickle"):
            t0 = time.perf_counter()
            for _ in range(iters):
                msg = pack_plan(plan) if how == "packed" else pickle.dumps(plan)
                a.sendall(len(msg).to_bytes(8, "little") + msg)
                n = int.from_bytes(b.recv(8), "little")
                buf = bytearray()
                while len(buf) < n:
                    buf += b.recv(n - len(buf))
                got = unpack_plan(buf)[0] if how == "packed" else pickle.loads(buf)
            us = (time.perf_counter() - t0) / iters * 1e6
            assert np.array_equal(got.kv_indices, plan.kv_indices)
            rows.append({"section": "plan", "rows": nrows, "pages": nrows * ppr,
                         "method": f"{how} bytes over a socket (in-process)", "us": us,
                         "bytes": len(msg)})
    a.close()
    b.close()
    # broadcast_object_list over a 2-process gloo group (rank 0's side timed)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    plan = sample_plan(16, 64)
    peer = mp.get_context("spawn").Process(target=_object_peer, args=(port, iters + 5))
    peer.start()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
    for _ in range(5):
        dist.broadcast_object_list([plan], src=0)
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.broadcast_object_list([plan], src=0)
    us = (time.perf_counter() - t0) / iters * 1e6
    dist.destroy_process_group()
    peer.join(30)
    rows.append({"section": "plan", "rows": 16, "pages": 16 * 64,
                 "method": "broadcast_object_list (gloo, 2 processes)", "us": us, "bytes": None})
    return rows


# -- all-reduce ----------------------------------------------------------------------------


def _allreduce_worker(rank: int, port: int, hidden: int, out: str) -> None:
    import torch.distributed as dist

    from dendrite.parallel.allreduce import make_all_reduce

    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, device_id=dev)
    rows = []
    kinds = {"nccl": make_all_reduce("nccl", dev)}
    try:
        kinds["symm_mem"] = make_all_reduce("symm_mem", dev, dtype=torch.bfloat16,
                                            max_numel=64 * hidden)
    except Exception as e:  # torch build without it
        rows.append({"section": "allreduce", "method": "symm_mem", "error": repr(e)})
    for n in (1, 16, 64):
        x = torch.randn(n, hidden, device=dev, dtype=torch.bfloat16) * (rank + 1)
        ref = kinds["nccl"](x.clone())
        for kind, fn in kinds.items():
            got = fn(x.clone())
            ok = bool(torch.allclose(got.float(), ref.float(), atol=1e-2, rtol=1e-2))
            y = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    y = fn(y)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(50):
                    y = fn(y)
            g.replay()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                g.replay()
            end.record()
            torch.cuda.synchronize()
            rows.append({"section": "allreduce", "method": kind, "rows": n,
                         "bytes": n * hidden * 2, "us": start.elapsed_time(end) * 1e3 / 1000,
                         "matches_nccl": ok})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def bench_allreduce(hidden: int) -> list[dict[str, Any]]:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return [{"section": "allreduce", "skipped": "needs 2 CUDA devices"}]
    import torch.multiprocessing as tmp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mktemp(suffix=".json")
    tmp.spawn(_allreduce_worker, args=(port, hidden, out), nprocs=2, join=True)
    return json.loads(Path(out).read_text())


# -- decode --------------------------------------------------------------------------------


def _decode(engine, device: torch.device, prompt: int, gen: int, branches: int) -> dict:
    from dendrite.sampling import SamplingParams

    ids = [10 + i % 400 for i in range(prompt)]
    greedy = functools.partial(SamplingParams, temperature=0, ignore_eos=True)
    s = engine.new_sequence(ids)
    engine.generate([s], greedy(max_tokens=8))  # prefill + warm-up
    bc.sync(device)
    t0, st0 = time.perf_counter(), engine.stats["steps"]
    engine.generate([s], greedy(max_tokens=gen))
    bc.sync(device)
    single = (time.perf_counter() - t0) / max(1, engine.stats["steps"] - st0)
    kids = s.fork(branches)
    engine.generate(kids, SamplingParams(temperature=0.8, seed=1, max_tokens=4, ignore_eos=True))
    bc.sync(device)
    t0, st0 = time.perf_counter(), engine.stats["steps"]
    engine.generate(kids, SamplingParams(temperature=0.8, seed=2, max_tokens=gen,
                                         ignore_eos=True))
    bc.sync(device)
    step = (time.perf_counter() - t0) / max(1, engine.stats["steps"] - st0)
    for k in kids:
        k.release()
    s.release()
    return {"single_ms_per_token": single * 1e3, f"branch{branches}_ms_per_step": step * 1e3}


def bench_decode(a: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from dendrite.engine import Engine
    from dendrite.model.runner import ModelRunner
    from dendrite.parallel import start_tensor_parallel
    from dendrite.parallel.sharding import random_shard

    d = model_dir_for("tiny" if a.quick else "8b")
    cuda = device.type == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    pages = 64 if a.quick else 2048
    prompt, gen = (16, 4) if a.quick else (512, 128)
    rows = []
    for tp in (1, 2):
        if cuda and torch.cuda.device_count() < tp:
            rows.append({"section": "decode", "tp": tp, "skipped": f"needs {tp} GPUs"})
            continue
        for kind in (("auto",) if tp == 1 or not cuda else ("nccl", "symm_mem")):
            t0 = time.perf_counter()
            if tp == 1:
                runner = ModelRunner(random_shard(d, 0, 1, device, dtype), device=device,
                                     num_pages=pages, cuda_graphs=cuda)
            else:
                runner = start_tensor_parallel(d, 2, device=device.type, dtype=dtype,
                                               num_pages=pages, cuda_graphs=cuda,
                                               random_weights=True, all_reduce=kind)
            built = time.perf_counter() - t0
            engine = Engine(runner=runner)
            try:
                r = _decode(engine, device, prompt, gen, 16)
            finally:
                engine.close()
                if hasattr(runner, "close"):
                    runner.close()
                del engine, runner
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            rows.append({"section": "decode", "tp": tp, "all_reduce": kind,
                         "shape": "tiny" if a.quick else "llama-3.1-8b", "build_s": built, **r})
            bc.log(f"decode tp={tp} {kind}: {r}")
    base = next((r for r in rows if r.get("tp") == 1 and "skipped" not in r), None)
    for r in rows:
        if base and r.get("tp") == 2 and "skipped" not in r:
            r["single_speedup"] = base["single_ms_per_token"] / r["single_ms_per_token"]
            r["branch16_speedup"] = base["branch16_ms_per_step"] / r["branch16_ms_per_step"]
    return rows


# -- replicas ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _chat(model_dir: str) -> bc.ChatTurns:
    from dendrite.model.loader import load_tokenizer

    return bc.ChatTurns.from_tokenizer(load_tokenizer(model_dir))


@program
def tot_deep(s, question: str, model_dir: str, max_tokens: int):
    """bench_tot_gsm8k's per-question program (the "deep" workload), importable by
    a replica process: the chat turns are rebuilt there from the tokenizer."""
    from dendrite.search import tot_frontier

    wl, chat = T.WORKLOADS["deep"], _chat(model_dir)

    def step(name: str):
        def run(st) -> None:
            st.gen(name, max_tokens=max_tokens, temperature=wl.temperature)
            st += chat.end

        return run

    turns = wl.user_turns(question)
    leaves = tot_frontier(s, width=wl.width, depth=wl.depth, label="turn",
                          level_prompts=[chat.first(turns[0])] + [chat.turn(t) for t in turns[1:]],
                          step=[step(n) for n in wl.names])
    return [leaf.text for leaf in leaves]


def bench_replicas(a: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from dendrite.parallel.replicas import Replicas

    model_dir = str(bc.resolve_model(a.model))
    n_q = 1 if a.quick else a.questions
    max_tokens = 4 if a.quick else 256
    questions, labels = T.load_questions(T.DATA, n_q + 2)
    warm, questions, labels = questions[:2], questions[2:], labels[2:]
    rows = []
    for n in (1, 2):
        if device.type == "cuda" and torch.cuda.device_count() < n:
            rows.append({"section": "replicas", "replicas": n, "skipped": f"needs {n} GPUs"})
            continue
        devices = [f"cuda:{i}" for i in range(n)] if device.type == "cuda" else ["cpu"] * n
        kw = {"num_pages": 256} if a.quick else {}
        with Replicas(model_dir, n, devices=devices, **kw) as reps:
            reps.run_batch(tot_deep, [dict(question=q, model_dir=model_dir, max_tokens=8)
                                      for q in warm], seed=0, key=lambda x: x["question"])
            reps.clear_cache()
            batch = [dict(question=q, model_dir=model_dir, max_tokens=max_tokens)
                     for q in questions]
            t0 = time.perf_counter()
            res = reps.run_batch(tot_deep, batch, seed=a.seed, key=lambda x: x["question"])
            wall = time.perf_counter() - t0
        per_replica = {}
        for r in res:
            per_replica[r.replica] = r.gen_tokens  # (a replica's total, the same on each)
        tokens = sum(per_replica.values())
        preds = [T.majority([T.answer_value(t) for t in r.value]) for r in res]
        rows.append({"section": "replicas", "replicas": n, "questions": len(batch),
                     "max_tokens": max_tokens, "wall_s": wall, "gen_tokens": tokens,
                     "tok_per_s": tokens / wall, **T.score(preds, labels)})
        bc.log(f"replicas x{n}: {wall:.2f} s, {tokens} tokens")
    ok = [r for r in rows if "skipped" not in r]
    if len(ok) == 2:
        ok[1]["speedup"] = ok[0]["wall_s"] / ok[1]["wall_s"]
    return rows


# -- main ----------------------------------------------------------------------------------


def render(rows: list[dict[str, Any]]) -> str:
    out = ["# bench_parallel", ""]
    for section in ("plan", "allreduce", "decode", "replicas"):
        part = [r for r in rows if r.get("section") == section]
        if not part:
            continue
        keys = list(dict.fromkeys(k for r in part for k in r if k != "section"))
        out += [f"## {section}", "", "| " + " | ".join(keys) + " |",
                "| " + " | ".join("---" for _ in keys) + " |"]
        for r in part:
            cells = [(f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")))
                     for k in keys]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="CPU smoke run of every section")
    p.add_argument("--sections", default="plan,allreduce,decode,replicas")
    p.add_argument("--model", default="default", help="replicas section: model dir, "
                   "'default' or 'tiny'")
    p.add_argument("--questions", type=int, default=16, help="replicas: GSM8K questions")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    device = bc.resolve_device(a.device)
    sections = a.sections.split(",")
    unknown = set(sections) - {"plan", "allreduce", "decode", "replicas"}
    if unknown:
        raise SystemExit(f"--sections: unknown {', '.join(sorted(unknown))} "
                         "(plan, allreduce, decode, replicas)")
    rows: list[dict[str, Any]] = []
    env = {"torch": torch.__version__, "device": str(device),
           "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
           "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "command": " ".join(sys.argv)}

    def save() -> None:
        a.out.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
        a.out.with_suffix(".md").write_text(render(rows))

    if "plan" in sections:
        rows += bench_plan(50 if a.quick else 2000)
        save()
    if "allreduce" in sections:
        rows += bench_allreduce(LLAMA_8B["hidden_size"])
        save()
    if "decode" in sections:
        rows += bench_decode(a, device)
        save()
    if "replicas" in sections:
        rows += bench_replicas(a, device)
        save()
    print(render(rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())

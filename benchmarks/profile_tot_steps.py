"""Where a batched ToT run's engine steps go: CUDA-graph replays vs eager forwards.

Runs SGLang's tree_of_thought workload (the program of `bench_tot_gsm8k.py`)
on N questions at once and classifies every `ModelRunner.execute` call by the
path it took (a replayed decode graph, or an eager forward) and its size
(rows, new tokens). Pass 1 runs untouched and gives the wall time and the step
mix; pass 2 synchronizes the device around every step (lookahead then cannot
overlap: its total is larger) and gives each kind's time per step. With
`--cprofile` pass 1 also prints the host's Python hot spots.

    python3 benchmarks/profile_tot_steps.py --model DIR --questions 8 --max-tokens 64
    python3 benchmarks/profile_tot_steps.py --model tiny --device cpu --questions 2 --max-tokens 8
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
import bench_tot_gsm8k as tot  # noqa: E402


class StepLog:
    """Wraps a runner's graph and eager paths; records (kind, rows, tokens, seconds)."""

    def __init__(self, runner, device, timed: bool) -> None:
        self.steps: list[tuple[str, int, int, float]] = []
        self.device, self.timed = device, timed
        self._runner = runner
        self._eager = runner.run
        runner.run = self._wrap("eager", self._eager, lambda ids, meta, *a, **k: meta)
        self._graph = runner.graphs.run if runner.graphs is not None else None
        if self._graph is not None:
            runner.graphs.run = self._wrap("graph", self._graph, lambda ids, meta, **k: meta)

    def _wrap(self, kind, fn, meta_of):
        def call(*args, **kwargs):
            meta = meta_of(*args, **kwargs)
            rows, tokens = meta.num_seqs, meta.num_tokens
            if self.timed:
                bc.sync(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.timed:
                bc.sync(self.device)
            self.steps.append((kind, rows, tokens, time.perf_counter() - t0))
            return out
        return call

    def restore(self) -> None:
        del self._runner.run
        if self._graph is not None:
            del self._runner.graphs.run

    def table(self) -> str:
        groups: dict[tuple[str, str], list[tuple[int, int, float]]] = defaultdict(list)
        for kind, rows, tokens, s in self.steps:
            size = "decode" if rows == tokens else "with prefill"
            band = "<=64 rows" if rows <= 64 else ">64 rows"
            groups[(f"{kind}, {size}", band)].append((rows, tokens, s))
        lines = ["| path | rows | steps | mean rows | mean tokens | ms/step | total s |",
                 "|---|---|---:|---:|---:|---:|---:|"]
        for (path, band), v in sorted(groups.items()):
            n = len(v)
            lines.append(f"| {path} | {band} | {n} | {sum(r for r, _, _ in v) / n:.1f} | "
                         f"{sum(t for _, t, _ in v) / n:.1f} | "
                         f"{1e3 * sum(s for _, _, s in v) / n:.3f} | "
                         f"{sum(s for _, _, s in v):.3f} |")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="model dir, 'default' or 'tiny'")
    ap.add_argument("--device", default=None)
    ap.add_argument("--workload", default="v0", choices=sorted(tot.WORKLOADS))
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cprofile", action="store_true", help="Python hot spots of pass 1")
    a = ap.parse_args(argv)

    from dendrite.engine import Engine

    device = bc.resolve_device(a.device)
    model_dir = bc.resolve_model(a.model)
    engine = Engine(model_dir, device=str(device), dtype=bc.resolve_dtype("auto", device))
    chat = bc.ChatTurns.from_tokenizer(engine.tokenizer)
    questions, _ = tot.load_questions(tot.DATA, a.questions)
    wl = tot.WORKLOADS[a.workload]
    prog = tot.make_program()
    batch = [dict(question=q, wl=wl, chat=chat, max_tokens=a.max_tokens) for q in questions]
    prog.run_batch(engine, [dict(b, max_tokens=2) for b in batch], seed=a.seed)  # warm-up

    print(f"{a.workload}, {a.questions} questions in flight, max_tokens {a.max_tokens}, "
          f"{device}, model {model_dir}")
    for timed in (False, True):
        if engine.cache is not None:
            engine.cache.clear()
        log = StepLog(engine.runner, device, timed)
        prof = cProfile.Profile() if a.cprofile and not timed else None
        bc.sync(device)
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        res = prog.run_batch(engine, batch, seed=a.seed)
        if prof is not None:
            prof.disable()
        bc.sync(device)
        wall = time.perf_counter() - t0
        log.restore()
        label = "pass 2, device synchronized around each step" if timed else "pass 1, as run"
        print(f"\n{label}: wall {wall:.3f} s, {len(log.steps)} steps, "
              f"{res[0].gen_tokens} generated tokens, {res[0].gen_tokens / wall:,.0f} tok/s")
        print(log.table())
        if prof is not None:
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(35)
            print(out.getvalue())
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

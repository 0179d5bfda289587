"""Data-parallel replicas: a batch of programs spread over N engine processes.

    with Replicas(model_dir, 2) as reps:              # one engine per GPU (or CPU)
        results = reps.run_batch(prog, [{"question": q} for q in qs], seed=0)

Each replica is a process holding its own `Engine` (on `cuda:i`, or the CPU)
that runs its share of the batch as one `run_batch`, so its instances share
engine steps. Instance `i` gets seed `seed + i` wherever it runs, so the
results are those of `prog.run_batch(engine, batch, seed=seed)` on one engine
(same tokens), returned in input order as `ReplicaResult`s (the value and
root text, not the live states: they stay in their process).

Routing is prefix-affinity with bounded load: an instance's key (by default
its arguments; `key=` picks e.g. the prompt) is tokenized and its first
`prefix_tokens` tokens, cut at a page boundary, are hashed; instances with
the same hash form a group that goes, whole, to the first replica in that
hash's rendezvous order (a fixed per-hash order of the replicas) whose load
stays within `ceil(len(batch) / N * (1 + slack))`, else to the least loaded.
Equal prompts therefore land on the same replica, where the radix cache
serves the shared prefix; different prompts spread evenly.

The program must be importable by the worker: a module-level `@program`
(the object is sent by its module and name). This module sits at the
program layer of the package (it runs programs); the rest of
dendrite.parallel at the model layer.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import multiprocessing as mp
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ReplicaResult", "Replicas", "route"]


@dataclass(frozen=True)
class ReplicaResult:
    """One instance's outcome, as it crosses back from its replica."""

    value: Any
    text: str  # the root state's text
    steps: int  # engine steps of that replica's whole share of the batch
    seconds: float
    gen_tokens: int
    replica: int
    summary: Any = None  # `summarize(ProgramResult)`, run in the replica


def _hash(data: bytes, salt: int = -1) -> int:
    h = hashlib.blake2b(data, digest_size=8, salt=salt.to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little")


def route(prefix_keys: Sequence[bytes], n: int, slack: float = 0.25) -> list[int]:
    """Replica of each instance from its prefix key (see the module docstring)."""
    if n < 1:
        raise ValueError(f"replicas must be >= 1, got {n}")
    groups: dict[bytes, list[int]] = {}
    for i, k in enumerate(prefix_keys):
        groups.setdefault(k, []).append(i)
    cap = math.ceil(len(prefix_keys) / n * (1 + slack))
    load = [0] * n
    out = [0] * len(prefix_keys)
    for k, members in groups.items():  # first-seen order: deterministic
        order = sorted(range(n), key=lambda r: _hash(k, r), reverse=True)
        pick = next((r for r in order if load[r] + len(members) <= cap), None)
        if pick is None:
            pick = min(range(n), key=lambda r: (load[r], order.index(r)))
        load[pick] += len(members)
        for i in members:
            out[i] = pick
    return out


def _program_ref(program: Any) -> tuple[str, str]:
    fn = getattr(program, "fn", None)
    mod, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    try:
        found = importlib.import_module(mod) if mod else None
        for part in name.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError, TypeError):
        found = None
    if found is not program:
        raise TypeError(f"program must be a module-level @program (importable by the replica "
                        f"processes), got {program!r}")
    return mod, name


def _resolve(ref: tuple[str, str]) -> Any:
    obj: Any = importlib.import_module(ref[0])
    for part in ref[1].split("."):
        obj = getattr(obj, part)
    return obj


def _run_share(engine: Any, program: Any, items: list[tuple[int, dict, int | None]],
               run_kw: dict, summarize: Callable | None, replica: int) -> list:
    """`program.run_batch` over this replica's instances, each with its own seed."""
    from dendrite.program.program import ProgramResult, check_sampling_defaults
    from dendrite.program.runtime import ProgressStop, Runtime

    bound = [program.bind(a) for _, a, _ in items]
    rt = Runtime(engine, max_steps=run_kw.get("max_steps"),
                 max_branches=run_kw.get("max_branches"),
                 gen_defaults=check_sampling_defaults(run_kw.get("sampling") or {}))
    roots = [rt.new_root(s) for _, _, s in items]
    try:
        if len(bound) == 1:
            values = [program.fn(roots[0], **bound[0])]
        else:
            values = rt.run_tasks([(lambda r=r, a=a: program.fn(r, **a))
                                   for r, a in zip(roots, bound)])
        rt.drain()
    except ProgressStop as stop:
        raise stop.exc from None
    finally:
        rt.release_all()
    out = []
    for (i, _, _), v, r, a in zip(items, values, roots, bound):
        res = ProgramResult(v, r, rt.tree, rt.steps, rt.elapsed, rt.gen_tokens, a)
        out.append((i, ReplicaResult(v, r.text, rt.steps, rt.elapsed, rt.gen_tokens, replica,
                                     summarize(res) if summarize else None)))
    return out


def _replica_main(index: int, model_dir: str, device: str, engine_kw: dict, threads: int,
                  conn: Any) -> None:
    """Entry point of a replica process: an engine, then a loop over tasks."""
    try:
        import torch

        if device == "cpu":
            torch.set_num_threads(threads)
        from dendrite.engine import Engine

        engine = Engine(model_dir, device=device, **engine_kw)
        conn.send(("ready", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg[0] == "stop":
                return
            if msg[0] == "clear_cache":
                if engine.cache is not None:
                    engine.cache.clear()
                conn.send(("ok", None))
                continue
            _, ref, items, run_kw, summarize = msg
            try:
                res = _run_share(engine, _resolve(ref), items, run_kw, summarize, index)
                conn.send(("ok", res))
            except BaseException:
                conn.send(("error", traceback.format_exc()))
    finally:
        engine.close()


class Replicas:
    """N engine processes; `run_batch` spreads programs over them.

    Args:
        model_dir: the model every replica loads.
        n: number of replicas.
        devices: one per replica; default `cuda:i` when there are n CUDA
            devices, else "cpu" for all.
        prefix_tokens: tokens of an instance's key hashed for routing (cut
            down to whole pages of `page_size`).
        slack: a replica may take up to (1 + slack) times its even share.
        engine_kw: further `Engine` arguments (num_pages, page_size, ...).
    """

    def __init__(self, model_dir: str | Path, n: int, *, devices: Sequence[str] | None = None,
                 prefix_tokens: int = 256, slack: float = 0.25, **engine_kw: Any) -> None:
        import torch

        from dendrite.model.devices import check_int
        from dendrite.model.loader import load_tokenizer

        n = check_int("replicas", n, 1)
        self.prefix_tokens = check_int("prefix_tokens", prefix_tokens, 1)
        if not (isinstance(slack, (int, float)) and slack >= 0):
            raise ValueError(f"slack must be a number >= 0, got {slack!r}")
        if devices is None:
            cuda = torch.cuda.is_available() and torch.cuda.device_count() >= n
            devices = [f"cuda:{i}" for i in range(n)] if cuda else ["cpu"] * n
        if len(devices) != n:
            raise ValueError(f"devices must name {n} devices, got {len(devices)}")
        self.n, self.slack, self.devices = n, float(slack), list(devices)
        self.page_size = int(engine_kw.get("page_size", 16))
        self.tokenizer = load_tokenizer(model_dir)  # for routing keys; cheap
        # (no more threads than this process uses: a spinning pool on a shared box
        # slows a small model's step many times over)
        threads = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // n))
        ctx = mp.get_context("spawn")
        self._procs, self._conns = [], []
        try:
            for i, dev in enumerate(self.devices):
                mine, theirs = ctx.Pipe()
                p = ctx.Process(target=_replica_main, name=f"dendrite-replica{i}", daemon=True,
                                args=(i, str(model_dir), dev, engine_kw, threads, theirs))
                p.start()
                theirs.close()
                self._procs.append(p)
                self._conns.append(mine)
            for i in range(n):
                self._expect(i, "ready")
        except BaseException:
            self.close()
            raise

    def _expect(self, i: int, kind: str) -> Any:
        try:
            got, detail = self._conns[i].recv()
        except EOFError:
            self._procs[i].join(1)
            raise RuntimeError(f"replica {i} (pid {self._procs[i].pid}) exited with code "
                               f"{self._procs[i].exitcode}") from None
        if got == "error":
            raise RuntimeError(f"replica {i} failed:\n{detail}")
        assert got == kind, (got, kind)
        return detail

    def prefix_key(self, text: str) -> bytes:
        """The routing hash input of `text`: its first whole pages of tokens
        (all of it when shorter than one page)."""
        ids = self.tokenizer.encode(text)
        keep = min(len(ids), self.prefix_tokens) // self.page_size * self.page_size
        return repr(ids[:keep] if keep else ids).encode()

    def route(self, keys: Sequence[str]) -> list[int]:
        """Replica of each key (see the module docstring)."""
        return route([self.prefix_key(k) for k in keys], self.n, self.slack)

    def run_batch(self, program: Any, batch: Sequence[Mapping[str, Any]], *,
                  seed: int | None = None, key: Callable[[Mapping[str, Any]], str] | None = None,
                  summarize: Callable[[Any], Any] | None = None,
                  **run_kw: Any) -> list[ReplicaResult]:
        """`program.run_batch(engine, batch, seed=seed)` across the replicas.

        `key(args)` is the text routed on (default: the repr of the arguments);
        `summarize(ProgramResult)` runs in the replica (picklable, module-level)
        and its return value is `ReplicaResult.summary`. `run_kw`:
        `sampling`, `max_steps`, `max_branches` as in `Program.run_batch`
        (bounds are per replica)."""
        if not self._conns:
            raise RuntimeError("replicas are closed")
        bad = set(run_kw) - {"sampling", "max_steps", "max_branches"}
        if bad:
            raise TypeError(f"run_batch got unexpected argument(s) {', '.join(sorted(bad))} "
                            "(allowed: sampling, max_steps, max_branches)")
        ref = _program_ref(program)
        batch = [dict(a) for a in batch]
        keys = [key(a) if key else repr(sorted(a.items(), key=lambda kv: kv[0]))
                for a in batch]
        where = self.route(keys)
        shares: list[list] = [[] for _ in range(self.n)]
        for i, (a, r) in enumerate(zip(batch, where)):
            shares[r].append((i, a, None if seed is None else int(seed) + i))
        busy = [r for r in range(self.n) if shares[r]]
        for r in busy:
            self._conns[r].send(("run", ref, shares[r], run_kw, summarize))
        out: list[ReplicaResult | None] = [None] * len(batch)
        errors = []
        for r in busy:  # collect every reply, so no pipe is left out of step
            try:
                for i, res in self._expect(r, "ok"):
                    out[i] = res
            except RuntimeError as e:
                errors.append(e)
        if errors:
            raise errors[0]
        return out  # type: ignore[return-value]

    def clear_cache(self) -> None:
        """Empty every replica's prefix cache (benchmarks: rows do not share)."""
        for c in self._conns:
            c.send(("clear_cache",))
        for i in range(self.n):
            self._expect(i, "ok")

    @property
    def pids(self) -> list[int]:
        """Process ids of the replicas."""
        return [p.pid for p in self._procs]

    def close(self) -> None:
        """Stop every replica and wait for it (idempotent)."""
        for c in self._conns:
            try:
                c.send(("stop",))
            except OSError:
                pass
        for p in self._procs:
            p.join(20)
            if p.is_alive():
                p.terminate()
                p.join(5)
        for c in self._conns:
            c.close()
        self._conns, self._procs = [], []

    def __enter__(self) -> Replicas:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Start a tensor-parallel runner: one process per rank, rank 0 the caller.

`start_tensor_parallel(model_dir, n, ...)` (what `Engine(model_dir,
tensor_parallel=n)` calls) returns rank 0's `TensorParallelRunner`:

1. It checks `n` against config.json (heads, KV heads and MLP width must
   divide) and the devices, before anything starts.
2. It spawns ranks 1..n-1 (`multiprocessing`, spawn context, daemonic);
   every rank loads only its shard (`load_shard`). Rank 0 waits until each
   worker reports it loaded (or failed: its traceback becomes rank 0's
   error; or died: its exit code), so a bad checkpoint never leaves a rank
   waiting in a collective.
3. The ranks join the group (gloo on the CPU, NCCL on `cuda:<rank>`), agree
   on the KV pool size (the smallest any rank can hold: page ids must be
   valid everywhere), build their runners together (CUDA graphs are captured
   in lockstep: the all-reduces are inside them) and connect the plan
   channel. Followers then run `follow` until rank 0 closes.

Under `torchrun` (its RANK/WORLD_SIZE/... variables set, WORLD_SIZE == n)
nothing is spawned: every process is one rank. On rank 0 `Engine(...)`
returns as usual; on the others it serves rank 0's steps and then ends the
process (`SystemExit(0)`) once rank 0 closes its engine.

Shutdown: `close()` (Engine.close) sends stop, joins the workers (then
terminates what is left) and leaves the group; it also runs at interpreter
exit. A watcher thread notices a worker that exits on its own: the next
step raises `WorkerDied`, and on NCCL the group is aborted so a collective
waiting for the dead rank returns instead of hanging until the timeout.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dendrite.kernels.config import KernelConfig
from dendrite.model.loader import load_config
from dendrite.model.runner import ModelRunner, default_num_pages
from dendrite.parallel.allreduce import ALL_REDUCE_KINDS, make_all_reduce
from dendrite.parallel.channel import STOP, PlanChannel
from dendrite.parallel.group import (
    DEFAULT_TIMEOUT_S,
    TPGroup,
    init_group,
    rank_device,
    torchrun_env,
)
from dendrite.parallel.runner import TensorParallelRunner, WorkerDied, follow
from dendrite.parallel.sharding import check_tensor_parallel, load_shard, random_shard

__all__ = ["RankSpec", "WorkerError", "start_tensor_parallel"]

log = logging.getLogger(__name__)

#: Seconds `close()` waits for a worker to exit before terminating it.
JOIN_TIMEOUT_S = 20.0


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed while starting (its traceback is the message)."""


@dataclass(frozen=True)
class RankSpec:
    """What every rank builds (picklable: it travels to the spawned workers)."""

    model_dir: str
    device: str = "cpu"  # "cpu" or "cuda" (rank r takes cuda:r)
    dtype: str | None = None
    num_pages: int | None = None
    page_size: int = 16
    attention: str = "auto"
    kernels: KernelConfig | None = None
    cuda_graphs: bool = False
    cascade: str = "auto"
    all_reduce: str = "auto"
    random_weights: bool = False  # benchmarks: config.json's shape, random weights
    seed: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S


def _build_rank(spec: RankSpec, rank: int, world: int, local_rank: int, init_method: str,
                loaded_hook: Callable[[], None]) -> tuple[TPGroup, ModelRunner]:
    device = rank_device(spec.device, local_rank)
    if spec.random_weights:
        loaded = random_shard(spec.model_dir, rank, world, device, spec.dtype, spec.seed)
    else:
        loaded = load_shard(spec.model_dir, rank, world, device, spec.dtype)
    loaded_hook()
    group = init_group(rank, world, device, init_method, spec.timeout_s)
    cfg = loaded.config
    # The largest tensor a decode step all-reduces: a graph bucket of rows.
    reduce = make_all_reduce(spec.all_reduce, device, dtype=loaded.dtype,
                             max_numel=64 * cfg.hidden_size)
    for layer in loaded.model.model.layers:
        layer.all_reduce = reduce
    num_pages = spec.num_pages
    if num_pages is None:  # every rank must hold every page id rank 0 hands out
        n = default_num_pages(cfg, spec.page_size, loaded.dtype, device)
        t = torch.tensor([n], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        num_pages = int(t.item())
    cls = TensorParallelRunner if rank == 0 else ModelRunner
    runner = cls(loaded, device=device, dtype=loaded.dtype, num_pages=num_pages,
                 page_size=spec.page_size, attention=spec.attention, kernels=spec.kernels,
                 cuda_graphs=spec.cuda_graphs, cascade=spec.cascade)
    return group, runner


def _worker_main(spec: RankSpec, rank: int, world: int, init_method: str, conn: Any) -> None:
    """Entry point of a spawned rank."""
    group = channel = None
    try:
        if spec.device == "cpu":  # share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        group, runner = _build_rank(spec, rank, world, rank, init_method,
                                    lambda: conn.send(("loaded", None)))
        channel = PlanChannel.connect(dist.distributed_c10d._get_default_store(), rank)
        conn.send(("ready", None))
    except BaseException:  # noqa: BLE001 - any failure, KeyboardInterrupt too, goes to rank 0 first
        try:
            conn.send(("error", traceback.format_exc()))
        finally:
            if group is not None:
                group.destroy()
        raise SystemExit(1) from None
    try:
        follow(runner, channel)
    finally:
        channel.close()
        group.destroy()


@dataclass
class _Worker:
    rank: int
    proc: Any  # multiprocessing.Process
    conn: Any  # receiving end of its status pipe

    def describe(self) -> str:
        return f"tensor-parallel rank {self.rank} (pid {self.proc.pid})"


@dataclass
class _Workers:
    """The spawned ranks, a watcher thread, and the shutdown."""

    workers: list[_Worker]
    backend: str = "gloo"
    closing: bool = False
    died: str | None = None
    channel: PlanChannel | None = None
    group: TPGroup | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start_watch(self) -> None:
        t = threading.Thread(target=self._watch, name="dendrite-tp-watch", daemon=True)
        t.start()

    def _watch(self) -> None:
        from multiprocessing.connection import wait

        pending = {w.proc.sentinel: w for w in self.workers}
        while pending:
            for s in wait(list(pending)):
                w = pending.pop(s)
                with self._lock:
                    if self.closing:
                        return
                    self.died = self.died or (
                        f"{w.describe()} exited with code {_exit_code(w.proc)}")
                log.error("%s", self.died)
                if self.backend == "nccl":  # unblock collectives waiting for it
                    try:
                        dist.distributed_c10d._abort_process_group()
                    except Exception:  # best effort: the timeout still ends them
                        log.exception("could not abort the process group")

    def dead(self) -> str | None:
        return self.died

    def wait_for(self, stage: str) -> None:
        """Block until every worker reported `stage`; raise its error or its death."""
        for w in self.workers:
            while True:
                if w.conn.poll(0.1):
                    try:
                        kind, detail = w.conn.recv()
                    except EOFError:
                        kind, detail = "died", None
                    if kind == stage:
                        break
                    if kind == "error":
                        raise WorkerError(f"{w.describe()} failed while starting:\n{detail}")
                elif not w.proc.is_alive():
                    self._raise_died(w, stage)

    def alive_check(self) -> None:
        """Raise WorkerDied if a worker exited (called while rank 0 waits for them)."""
        for w in self.workers:
            if not w.proc.is_alive() and not w.conn.poll():
                self._raise_died(w, "connected")

    @staticmethod
    def _raise_died(w: _Worker, stage: str) -> None:
        raise WorkerDied(f"{w.describe()} exited with code {_exit_code(w.proc)} "
                         f"while starting (before it {stage})")

    def shutdown(self) -> None:
        with self._lock:
            if self.closing:
                return
            self.closing = True
        if self.channel is not None:
            try:
                self.channel.send(STOP)
            except OSError:
                pass  # a follower already gone
            self.channel.close()
        for w in self.workers:
            w.proc.join(JOIN_TIMEOUT_S)
            if w.proc.is_alive():
                log.warning("%s did not stop; terminating it", w.describe())
                w.proc.terminate()
                w.proc.join(5)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(5)
            w.conn.close()
        if self.group is not None:
            self.group.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(model_dir: str | Path, tp: object, device: str, attention: object,
           all_reduce: str) -> int:
    if not isinstance(attention, str):
        raise TypeError("tensor parallel needs attention given by name "
                        "('auto', 'reference', 'flashinfer'), not a backend instance")
    if all_reduce not in ALL_REDUCE_KINDS:
        raise ValueError(f"all_reduce must be one of {', '.join(ALL_REDUCE_KINDS)}, "
                         f"got {all_reduce!r}")
    n = check_tensor_parallel(tp, load_config(model_dir))
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"tensor parallel runs on 'cpu' or 'cuda', got device {device!r}")
    if dev.type == "cuda" and dev.index not in (None, 0):
        raise ValueError(f"tensor parallel takes cuda:0..cuda:{n - 1}; pass device='cuda', "
                         f"not {device!r}")
    if dev.type == "cuda" and torch.cuda.device_count() < n:
        raise ValueError(f"tensor_parallel {n} needs {n} CUDA devices, "
                         f"{torch.cuda.device_count()} visible")
    return n


def start_tensor_parallel(model_dir: str | Path, tensor_parallel: int, *,
                          device: str = "cpu", dtype: Any = None,
                          num_pages: int | None = None, page_size: int = 16,
                          attention: str = "auto", kernels: KernelConfig | None = None,
                          cuda_graphs: bool = False, cascade: str = "auto",
                          all_reduce: str = "auto", random_weights: bool = False,
                          seed: int = 0,
                          timeout_s: float = DEFAULT_TIMEOUT_S) -> TensorParallelRunner:
    """Rank 0's runner over `tensor_parallel` ranks (see the module docstring).

    The model arguments are `ModelRunner`'s; `device` is "cpu" or "cuda"
    (rank r on cuda:r). `all_reduce`: see dendrite/parallel/allreduce.py.
    `random_weights`: config.json's shape with random weights (benchmarks)."""
    device = str(device)
    n = _check(model_dir, tensor_parallel, device, attention, all_reduce)
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    spec = RankSpec(str(model_dir), "cuda" if device.startswith("cuda") else device, dtype,
                    num_pages, page_size, attention, kernels, cuda_graphs, cascade, all_reduce,
                    random_weights, seed, timeout_s)
    env = torchrun_env()
    if env is not None:
        return _start_torchrun(spec, n, env)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    workers = _Workers([])
    try:
        for r in range(1, n):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker_main, args=(spec, r, n, init_method, send),
                            name=f"dendrite-tp-rank{r}", daemon=True)
            p.start()
            send.close()
            workers.workers.append(_Worker(r, p, recv))
        group, runner = _build_rank(spec, 0, n, 0, init_method,
                                    lambda: workers.wait_for("loaded"))
        workers.group, workers.backend = group, group.backend
        workers.start_watch()
        workers.channel = PlanChannel.serve(dist.distributed_c10d._get_default_store(), n,
                                            check=workers.alive_check)
        workers.wait_for("ready")
    except BaseException:
        workers.shutdown()
        raise
    runner.attach(n, workers.channel, workers.dead, workers.shutdown)
    weakref.finalize(runner, workers.shutdown)
    return runner


def _start_torchrun(spec: RankSpec, n: int, env: tuple[int, int, int]) -> TensorParallelRunner:
    rank, world, local_rank = env
    if world != n:
        raise ValueError(f"tensor_parallel {n} under torchrun needs WORLD_SIZE {n}, "
                         f"got {world} (data parallel across engines: dendrite.parallel"
                         ".replicas)")
    group, runner = _build_rank(spec, rank, world, local_rank, "env://", lambda: None)
    store = dist.distributed_c10d._get_default_store()
    if rank != 0:
        channel = PlanChannel.connect(store, rank)
        try:
            follow(runner, channel)
        finally:
            channel.close()
            group.destroy()
        raise SystemExit(0)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    host = "127.0.0.1" if local_world == world else socket.gethostbyname(socket.gethostname())
    channel = PlanChannel.serve(store, world, host=host)
    state = _Workers([], backend=group.backend, channel=channel, group=group)
    runner.attach(n, channel, state.dead, state.shutdown)
    weakref.finalize(runner, state.shutdown)
    return runner


def _exit_code(proc, wait_s: float = 1.0) -> int | None:
    """`proc`'s exit code, waiting up to `wait_s` for it: its pipe closes just
    before it can be reaped, and another thread joining it at the same moment
    (the owner of the Process object) can make our own reap see nothing yet."""
    deadline = time.monotonic() + wait_s
    proc.join(wait_s)
    while proc.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc.exitcode

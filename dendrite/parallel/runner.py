"""Rank 0's tensor-parallel runner, and the loop every other rank runs.

`ModelRunner.execute(plan)` is the seam. Rank 0's engine builds a `StepPlan`
as with one GPU; `TensorParallelRunner.execute` first sends it to every
follower (dendrite/parallel/channel.py), then runs it. A follower (`follow`)
receives each plan and runs the same `ModelRunner.execute` on its own shard:
the same eager-or-graph decision (it depends on the plan and the runner's
settings only), hence the same collectives in the same order. Its logits
are discarded: lm_head is replicated and only rank 0 samples.

A follower that is gone makes rank 0's next `execute` raise `WorkerDied`
(naming the rank and its exit code), as does every later one: the engine
cannot step without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist

from dendrite.model.runner import ModelRunner, StepPlan
from dendrite.parallel.channel import STOP, PlanChannel, pack_plan, unpack_plan

#: How long a failed step waits for the watcher to name a dead worker (it
#: waits up to 1 s for the exit code) before the raw error is raised instead.
DEATH_NOTICE_S = 2.0

__all__ = ["TensorParallelRunner", "WorkerDied", "follow"]

log = logging.getLogger(__name__)


class WorkerDied(RuntimeError):
    """A tensor-parallel rank exited: its engine cannot step any more."""


class TensorParallelRunner(ModelRunner):
    """A `ModelRunner` over rank 0's shard that sends every plan to the followers.

    Built like a `ModelRunner` (from rank 0's `LoadedModel`, see
    dendrite/parallel/launch.py); `attach` gives it the plan channel, a
    `dead()` check naming a rank that exited (or None) and the shutdown.
    """

    tensor_parallel: int = 1
    _channel: PlanChannel | None = None
    _dead: Callable[[], str | None] = staticmethod(lambda: None)
    _shutdown: Callable[[], None] | None = None

    def attach(self, world_size: int, channel: PlanChannel, dead: Callable[[], str | None],
               shutdown: Callable[[], None]) -> None:
        """Wire the runner to its followers (after every rank has built its runner)."""
        self.tensor_parallel = world_size
        self._channel, self._dead, self._shutdown = channel, dead, shutdown

    def _check(self) -> None:
        if self._channel is None:
            raise RuntimeError("tensor-parallel runner is closed")
        why = self._dead()
        if why is not None:
            raise WorkerDied(f"{why}; this engine cannot step any more: close it and "
                             "create a new one")

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Send `plan` to the followers, then run it here (`ModelRunner.execute`)."""
        self._check()
        try:
            self._channel.send(pack_plan(plan))
            if isinstance(plan.input_ids, torch.Tensor):  # launched ahead: ids on the device
                ids = plan.input_ids.to(torch.int64).contiguous()
                dist.broadcast(ids, 0)
                plan = replace(plan, input_ids=ids)
            return super().execute(plan)
        except (OSError, RuntimeError) as e:
            if isinstance(e, WorkerDied):
                raise
            # A collective or the channel can fail a moment before the watcher
            # thread has the dead worker's exit code: give it that moment.
            why = self._dead()
            deadline = time.monotonic() + DEATH_NOTICE_S
            while why is None and time.monotonic() < deadline:
                time.sleep(0.01)
                why = self._dead()
            if why is None:
                raise
            raise WorkerDied(f"{why}; this engine cannot step any more: close it and "
                             "create a new one") from e

    def close(self) -> None:
        """Stop the followers, wait for them, leave the group (idempotent)."""
        shutdown, self._shutdown, self._channel = self._shutdown, None, None
        if shutdown is not None:
            shutdown()


def follow(runner: ModelRunner, channel: PlanChannel) -> None:
    """A follower's loop: run each plan rank 0 sends until it says stop or is gone."""
    while True:
        msg = channel.recv()
        if msg is None or msg == STOP:
            return
        plan, fed = unpack_plan(msg)
        if fed:
            ids = torch.empty(len(plan.positions), dtype=torch.int64, device=runner.device)
            dist.broadcast(ids, 0)
            plan = replace(plan, input_ids=ids)
        try:
            runner.execute(plan)
        except Exception:  # rank 0 met the same error (same plan, same checks)
            log.exception("tensor-parallel follower: a step failed")

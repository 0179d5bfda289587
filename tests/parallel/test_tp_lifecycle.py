"""Tensor-parallel processes: bad sizes are refused before anything starts,
close() leaves no process behind, and a worker that dies makes the next step
fail with a clear error instead of a hang."""

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch.distributed as dist
from tp_fixtures import one_torch_thread, tp_model_dir  # noqa: F401 (fixtures)

from dendrite.engine import Engine
from dendrite.parallel import WorkerDied
from dendrite.sampling import SamplingParams


def _tp_children():
    return [p for p in mp.active_children() if p.name.startswith("dendrite-tp-rank")]


@pytest.mark.parametrize("tp, err, match", [
    (3, ValueError, r"tensor_parallel 3 does not divide the model's num_attention_heads 4, "
                    r"num_key_value_heads 2.*allowed: 1, 2"),
    (4, ValueError, r"tensor_parallel 4 does not divide the model's num_key_value_heads 2"),
    (0, ValueError, r"tensor_parallel must be >= 1, got 0"),
    ("2", TypeError, r"tensor_parallel must be an int"),
    (2.0, TypeError, r"tensor_parallel must be an int"),
])
def test_bad_sizes_refused_before_spawning(tp_model_dir, tp, err, match):
    with pytest.raises(err, match=match):
        Engine(tp_model_dir, device="cpu", num_pages=64, tensor_parallel=tp)
    assert not _tp_children()
    assert not dist.is_initialized()


@pytest.mark.parametrize("kw, match", [
    (dict(kv_dtype="fp8_e4m3"), "kv_dtype='fp8_e4m3' with tensor_parallel > 1"),
    (dict(quantization="fp8"), "quantization='fp8' is not supported with tensor_parallel"),
    (dict(speculative="ngram"), "speculative decoding with tensor_parallel > 1"),
])
def test_options_tp_does_not_run_yet_are_refused_before_spawning(tp_model_dir, kw, match):
    if "speculative" in kw:
        from dendrite.speculative import SpeculativeConfig

        kw = dict(speculative=SpeculativeConfig.parse(kw["speculative"]))
    with pytest.raises(ValueError, match=match):
        Engine(tp_model_dir, device="cpu", num_pages=64, tensor_parallel=2, **kw)
    assert not _tp_children()


def test_tp_with_ready_runner_refused(tp_model_dir):
    one = Engine(tp_model_dir, device="cpu", num_pages=64)
    with pytest.raises(ValueError, match="tensor_parallel applies to the runner the engine"):
        Engine(runner=one.runner, tensor_parallel=2)
    one.close()


def test_close_leaves_no_process(tp_model_dir):
    e = Engine(tp_model_dir, device="cpu", num_pages=64, tensor_parallel=2)
    kids = _tp_children()
    assert len(kids) == 1 and kids[0].is_alive()
    pid = kids[0].pid
    e.generate([e.new_sequence("red green")], SamplingParams(max_tokens=4, temperature=0))
    e.close()
    assert not _tp_children()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # exited and reaped
    assert not dist.is_initialized()
    e.close()  # idempotent


def test_dead_worker_is_a_clear_error(tp_model_dir):
    e = Engine(tp_model_dir, device="cpu", num_pages=64, tensor_parallel=2)
    (kid,) = _tp_children()
    os.kill(kid.pid, signal.SIGKILL)
    kid.join(10)
    t0 = time.monotonic()
    with pytest.raises(WorkerDied, match=r"rank 1 \(pid \d+\) exited with code -9"):
        for _ in range(3):  # (the first send may still be buffered by the kernel)
            e.generate([e.new_sequence("red green")], SamplingParams(max_tokens=4))
    assert time.monotonic() - t0 < 30
    e.close()
    assert not _tp_children()
    assert not dist.is_initialized()

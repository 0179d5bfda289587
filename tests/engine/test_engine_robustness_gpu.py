"""The engine's failure paths on CUDA (graphs, lookahead, the fused sampler):
NaN logits fail only the requests they belong to, forked leaves preempted in a
small pool recompute exactly, and concurrent callers get their seeded tokens."""

from __future__ import annotations

import threading

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from dendrite.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("m"), "llama", seed=4, hidden_size=256,
                            heads=4, kv_heads=2, num_layers=2, dtype="bfloat16")


def _engine(model_dir, **kw):
    from dendrite.engine import Engine

    kw.setdefault("num_pages", 512)
    return Engine(model_dir, device="cuda", dtype=torch.bfloat16, **kw)


def _fork_run(e, kids=4, max_tokens=32):
    from dendrite.sampling import SamplingParams

    root = e.new_sequence([1 + (i * 7) % 300 for i in range(377)])
    branches = root.fork(kids)
    out = e.generate(branches, [SamplingParams(temperature=0.8, seed=7 + i, max_tokens=max_tokens,
                                               ignore_eos=True) for i in range(kids)])
    for b in branches:
        b.release()
    root.release()
    return [r.token_ids for r in out]


@pytest.mark.parametrize("lookahead", [False, True])
def test_forked_leaves_preempted_on_cuda_match_a_roomy_pool(model_dir, lookahead):
    roomy = _engine(model_dir, lookahead=lookahead)
    want = _fork_run(roomy)
    roomy.close()
    tight = _engine(model_dir, num_pages=31, lookahead=lookahead)  # one page pads graphs
    got = _fork_run(tight)
    assert tight.stats["preemptions"] > 0
    assert got == want
    tight.close()


@pytest.mark.parametrize("lookahead", [False, True])
def test_nan_logits_fail_the_request_on_cuda(model_dir, lookahead):
    from dendrite.engine import ModelOutputError
    from dendrite.sampling import SamplingParams

    e = _engine(model_dir, lookahead=lookahead)
    s = e.new_sequence("The fox jumps")
    with torch.no_grad():
        for name, p in e.runner.model.named_parameters():
            if name.endswith("norm.weight") and "layers" not in name:
                p[0] = float("nan")
    h = e.submit(s, SamplingParams(temperature=0.8, seed=0, max_tokens=8, ignore_eos=True))
    with pytest.raises(ModelOutputError, match="NaN"):
        e.run([h])
    assert h.result.finish_reason == "error"
    s.release()
    e.close()
    assert e.pool.used == 0 or e.cache is not None


def test_four_threads_on_one_cuda_engine(model_dir):
    from dendrite.sampling import SamplingParams

    e = _engine(model_dir)
    params = [SamplingParams(temperature=0.9, seed=3 + i, max_tokens=16, ignore_eos=True)
              for i in range(4)]
    want = []
    for i in range(4):
        s = e.new_sequence(f"thread {i} says")
        want.append(e.generate(s, params[i])[0].token_ids)
        s.release()
    got, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                s = e.new_sequence(f"thread {i} says")
                tokens = e.generate(s, params[i])[0].token_ids
                assert got.setdefault(i, tokens) == tokens
                s.release()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert [got[i] for i in range(4)] == want
    e.close()

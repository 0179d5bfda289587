"""The engine on FP8 / MXFP8 weights (CPU): generate and fork behave as on dense weights."""

from __future__ import annotations

import pytest

from dendrite import Engine, SamplingParams
from dendrite.quant import weight_format
from dendrite.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m"), "llama", seed=5)


@pytest.mark.parametrize("quant", ["fp8", "mxfp8"])
def test_generate_and_fork_on_quantized_weights(model_dir, quant):
    eng = Engine(model_dir, device="cpu", num_pages=64, quantization=quant)
    try:
        assert weight_format(eng.runner.model) == quant
        params = [SamplingParams(temperature=0.8, seed=s, max_tokens=8) for s in (1, 2, 3)]
        root = eng.new_sequence("Question: what is 6 * 7?\nAnswer:")
        kids = root.fork(3)
        forked = [r.token_ids for r in eng.generate(kids, params)]
        # A forked branch draws what an unforked run with its seed draws.
        alone = [eng.generate([eng.new_sequence("Question: what is 6 * 7?\nAnswer:")], [p])[0]
                 .token_ids for p in params]
        assert forked == alone
        assert all(len(t) == 8 for t in forked) and len({tuple(t) for t in forked}) > 1
        [greedy] = eng.generate([eng.new_sequence("The quick brown fox")],
                                [SamplingParams(temperature=0, max_tokens=6)])
        assert greedy.finish_reason in ("length", "eos")
    finally:
        eng.close()


def test_engine_refuses_a_bad_quantization_before_loading(model_dir):
    with pytest.raises(ValueError, match="quantization must be None or one of none, fp8, mxfp8"):
        Engine(model_dir, device="cpu", quantization="nf4")

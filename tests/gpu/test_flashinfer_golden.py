"""GPU golden tests: Dendrite + FlashInfer in bf16 vs HF transformers on the same GPU.

For each family a tiny random-weight model (head_dim 64, a size FlashInfer
builds kernels for) runs transformers' greedy `generate` in bf16. Dendrite
then reads the same sequences teacher-forced (prompt prefilled in chunks,
staggered so steps mix prefill and decode rows, then one HF token per step)
through the FlashInfer backend, and again through the torch reference
backend. Both precisions are bf16, so ids are not bit-identical; the bar is
top-1 agreement >= 99% over the generated positions, and the logits'
relative error is reported (and bounded loosely).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from dendrite.testing import LLAMA3_ROPE_SCALING, build_tiny_model  # noqa: E402

from gpu_helpers import hf_greedy, rel_err, report, teacher_forced_logits  # noqa: E402

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

N_NEW = 64
PAGE_SIZE = 16
DTYPE = torch.bfloat16
PROMPTS = [
    "The quick brown fox",
    "Question: How many clips did Natalia sell altogether?\nAnswer:",
    '{"name": "Ada", "tags": ["math", "engines"], "ok": true} Let\'s think step by step.',
    "",  # BOS only
]
CHUNKS = [3, 64, 7, 1]
STARTS = [0, 0, 2, 5]
SHAPE = dict(hidden_size=256, heads=4, kv_heads=2, head_dim=64, num_layers=3,
             intermediate_size=512, dtype="bfloat16")

VARIANTS = {
    "llama": dict(family="llama", seed=1),
    "mistral": dict(family="mistral", seed=2),
    "qwen2": dict(family="qwen2", seed=3),
    "qwen3": dict(family="qwen3", seed=4),
    "llama3_rope_tied": dict(family="llama", seed=5, rope_scaling=LLAMA3_ROPE_SCALING,
                             max_position_embeddings=131072, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def prompt_ids(tmp_path_factory):
    from dendrite.model.tokenizer import Tokenizer
    d = build_tiny_model(tmp_path_factory.mktemp("tok"), "llama")
    tok = Tokenizer(d)
    return [[tok.bos_token_id] + tok.encode(p, add_special_tokens=False) for p in PROMPTS]


def _runner(model_dir, attention):
    from dendrite.model.runner import ModelRunner
    return ModelRunner(model_dir, device="cuda", dtype=DTYPE, num_pages=128,
                       page_size=PAGE_SIZE, attention=attention)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_flashinfer_matches_transformers(variant, tmp_path, prompt_ids):
    pytest.importorskip("flashinfer")
    model_dir = build_tiny_model(tmp_path / variant, **VARIANTS[variant], **SHAPE)
    expected = hf_greedy(model_dir, prompt_ids, N_NEW, DTYPE)
    hf_ids = [ids for ids, _ in expected]

    fi_runner = _runner(model_dir, "flashinfer")
    assert type(fi_runner.backend).__name__ == "FlashInferBackend"
    fi = teacher_forced_logits(fi_runner, prompt_ids, hf_ids, CHUNKS, STARTS)
    del fi_runner
    ref = teacher_forced_logits(_runner(model_dir, "reference"), prompt_ids, hf_ids,
                                CHUNKS, STARTS)

    hf_lg = torch.cat([lg.to("cuda") for _, lg in expected])
    fi_lg, ref_lg = torch.cat(fi), torch.cat(ref)
    ids = torch.tensor([t for seq in hf_ids for t in seq], device="cuda")
    agree_hf = (fi_lg.argmax(-1) == ids).float().mean().item()
    agree_ref = (fi_lg.argmax(-1) == ref_lg.argmax(-1)).float().mean().item()
    ref_agree_hf = (ref_lg.argmax(-1) == ids).float().mean().item()
    e_hf, e_ref = rel_err(fi_lg, hf_lg), rel_err(fi_lg, ref_lg)
    report(f"golden_{variant}", positions=int(ids.numel()),
           top1_fi_vs_hf=agree_hf, top1_fi_vs_ref=agree_ref, top1_ref_vs_hf=ref_agree_hf,
           relerr_fi_vs_hf_max=e_hf.max().item(), relerr_fi_vs_hf_mean=e_hf.mean().item(),
           relerr_fi_vs_ref_max=e_ref.max().item(), relerr_fi_vs_ref_mean=e_ref.mean().item())
    assert agree_hf >= 0.99, f"{variant}: top-1 agreement with transformers {agree_hf:.3f}"
    assert agree_ref >= 0.99, f"{variant}: top-1 agreement with the reference {agree_ref:.3f}"
    # bf16 end to end: a few percent of the largest logit, not more.
    assert e_hf.mean().item() < 3e-2 and e_ref.mean().item() < 3e-2

"""Golden tests: Dendrite's paged model vs HF transformers, fp32 on the CPU.

Each variant builds a tiny random-weight model dir, runs transformers'
`generate` (greedy, 64 new tokens) per prompt, and runs the same prompts
through Dendrite as several sequences batched in every step: prompts are
prefilled in chunks of different sizes and start at different steps, so steps
mix prefill chunks with decodes. Token ids must be identical and every step's
logits close (max |a - b| / max |b| < 1e-4).
"""

from __future__ import annotations

import pytest
import torch
from model_paging import Pager, run_step

from dendrite.model.runner import ModelRunner
from dendrite.tiny_model import LLAMA3_ROPE_SCALING, build_tiny_model

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

N_NEW = 64
PAGE_SIZE = 4  # small pages: every sequence crosses many page boundaries
PROMPTS = [
    "The quick brown fox",
    "Question: How many clips did Natalia sell altogether?\nAnswer:",
    '{"name": "Ada", "tags": ["math", "engines"], "ok": true} Let\'s think step by step.',
    "",  # BOS only: a one-token prompt
]
CHUNKS = [3, 64, 7, 1]  # prefill chunk per sequence
STARTS = [0, 0, 2, 5]  # step at which each sequence joins

VARIANTS = {
    "llama": {"family": "llama", "seed": 1},
    # window 16 < the longest prompt + 64: attention both inside and past the window
    "mistral_sliding": {"family": "mistral", "seed": 2, "sliding_window": 16},
    "qwen2_tied_sharded": {"family": "qwen2", "seed": 3, "tie_word_embeddings": True, "shards": 2},
    "qwen3": {"family": "qwen3", "seed": 4, "head_dim": 32},  # head_dim != hidden / heads
    # Llama-3 rope scaling, MHA, a bf16 checkpoint (upcast to fp32 by both sides)
    "llama3_rope_mha_bf16": {
        "family": "llama",
        "seed": 5,
        "rope_scaling": LLAMA3_ROPE_SCALING,
        "max_position_embeddings": 131072,
        "kv_heads": 4,
        "dtype": "bfloat16",
    },
    "llama_tied_bias": {
        "family": "llama",
        "seed": 6,
        "tie_word_embeddings": True,
        "attention_bias": True,
    },
}


def hf_greedy(model_dir, prompts: list[list[int]]) -> list[tuple[list[int], torch.Tensor]]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # eos off so every run is N_NEW long; an explicit all-ones attention mask,
    # else generate() masks prompt tokens that equal pad_token_id.
    # (set on the model's own config: generate() treats None arguments as unset).
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 2
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            r = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=N_NEW,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
            assert r.sequences.shape[1] == len(ids) + N_NEW
            out.append((r.sequences[0, len(ids) :].tolist(), torch.cat(r.logits).float()))
    return out


def dendrite_greedy(
    runner: ModelRunner, prompts: list[list[int]], chunks=CHUNKS, starts=STARTS
) -> list[tuple[list[int], torch.Tensor]]:
    """Greedy decode of all prompts at once, mixed prefill/decode steps."""
    pager = Pager(runner.num_pages, runner.page_size)
    sids = [pager.new() for _ in prompts]
    pending = [list(p) for p in prompts]
    gen: list[list[int]] = [[] for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    step = 0
    while any(len(g) < N_NEW for g in gen):
        batch, who = [], []
        for j, sid in enumerate(sids):
            if step < starts[j] or len(gen[j]) == N_NEW:
                continue
            if pending[j]:
                toks, pending[j] = pending[j][: chunks[j]], pending[j][chunks[j] :]
            else:
                toks = [gen[j][-1]]
            batch.append((sid, toks))
            who.append(j)
        out = run_step(runner, pager, batch)
        for row, j in enumerate(who):
            if not pending[j]:  # prompt complete: this row predicts the next token
                gen[j].append(int(out[row].argmax()))
                logits[j].append(out[row])
        step += 1
    return [(g, torch.stack(lg)) for g, lg in zip(gen, logits)]


@pytest.fixture(scope="module")
def tokenizer_ids(tmp_path_factory):
    from dendrite.model.tokenizer import Tokenizer

    d = build_tiny_model(tmp_path_factory.mktemp("tok"), "llama")
    tok = Tokenizer(d)
    return [[tok.bos_token_id] + tok.encode(p) for p in PROMPTS]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_transformers(variant, tmp_path, tokenizer_ids):
    model_dir = build_tiny_model(tmp_path / variant, **VARIANTS[variant])
    expected = hf_greedy(model_dir, tokenizer_ids)
    runner = ModelRunner(
        model_dir, device="cpu", num_pages=256, page_size=PAGE_SIZE, attention="reference"
    )
    assert runner.dtype == torch.float32
    got = dendrite_greedy(runner, tokenizer_ids)
    for j, ((hf_ids, hf_logits), (ids, lg)) in enumerate(zip(expected, got)):
        assert ids == hf_ids, f"prompt {j}: tokens diverge at {_first_diff(ids, hf_ids)}"
        rel = ((lg - hf_logits).abs().amax(-1) / hf_logits.abs().amax(-1)).max().item()
        assert rel < 1e-4, f"prompt {j}: logits relative error {rel:.2e}"
        # Not a vacuous test: the random model is decisive, not near-uniform.
        top2 = hf_logits.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).median() > 0.1


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

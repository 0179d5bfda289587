"""Mask plumbing: packing, batched fills into chosen rows, vocab padding, overlap, caching."""

from __future__ import annotations

import pytest
import torch
from grammar_sampling import MODEL_VOCAB

from dendrite.grammar import (
    Constraint,
    GrammarTokenizer,
    MaskWorker,
    apply_masks,
    fill_masks,
    grammar_status,
    unpack_bitmask,
)


def _reference_allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Bit-by-bit unpack, the slow obvious way."""
    out = torch.zeros(bitmask.shape[0], vocab, dtype=torch.bool)
    for b in range(bitmask.shape[0]):
        for i in range(min(vocab, 32 * bitmask.shape[1])):
            out[b, i] = bool((int(bitmask[b, i // 32]) >> (i % 32)) & 1)
    return out


def test_unpack_matches_reference_including_sign_bit_and_padding():
    g = torch.Generator().manual_seed(0)
    bm = torch.randint(-(2**31), 2**31 - 1, (3, 4), generator=g, dtype=torch.int64).to(torch.int32)
    bm[0, 0] = -1  # all bits, including the sign bit
    for vocab in (100, 128, 150):  # narrower, exact, wider than 4 words
        assert torch.equal(unpack_bitmask(bm, vocab), _reference_allowed(bm, vocab))


def test_apply_masks_sets_disallowed_to_neg_inf_and_keeps_the_rest():
    bm = torch.tensor([[0b1010, 0], [-1, -1]], dtype=torch.int32)
    logits = torch.arange(2 * 70, dtype=torch.float32).view(2, 70)
    orig = logits.clone()
    apply_masks(logits, bm)
    allowed = _reference_allowed(bm, 70)
    assert torch.equal(logits[allowed], orig[allowed])
    assert torch.isneginf(logits[~allowed]).all()
    # ids past the mask width (64) are padding: never allowed, even in all-ones rows
    assert torch.isneginf(logits[1, 64:]).all() and not torch.isinf(logits[1, :64]).any()


def test_apply_masks_on_selected_rows():
    bm = torch.tensor([[0b1]], dtype=torch.int32)
    logits = torch.zeros(3, 32)
    apply_masks(logits, bm, rows=[2])
    assert not torch.isinf(logits[:2]).any()
    assert logits[2, 0] == 0 and torch.isneginf(logits[2, 1:]).all()


def test_fill_masks_writes_only_named_rows(gtok):
    a = Constraint(choices=["yes"]).matcher(gtok)
    b = Constraint(regex="[0-9]").matcher(gtok)
    bm = gtok.allocate_bitmask(4)
    fill_masks([a, b], bm, rows=[3, 1])
    assert (bm[0] == -1).all() and (bm[2] == -1).all()  # untouched: unconstrained rows
    allowed = unpack_bitmask(bm, gtok.vocab_size)
    assert allowed[3].nonzero().flatten().tolist() == a.allowed_tokens()
    assert allowed[1].nonzero().flatten().tolist() == b.allowed_tokens()
    digits = {gtok.decode([t]) for t in b.allowed_tokens()}
    assert digits and all(d.isdigit() for d in digits)


def test_fill_masks_checks_shape(gtok):
    m = Constraint(regex="a").matcher(gtok)
    with pytest.raises(ValueError, match="words"):
        fill_masks([m], torch.zeros(1, gtok.mask_words + 1, dtype=torch.int32))
    with pytest.raises(ValueError):
        fill_masks([m], torch.zeros(1, gtok.mask_words, dtype=torch.int64))
    with pytest.raises(IndexError):
        fill_masks([m, m.fork()], gtok.allocate_bitmask(1), rows=[0, 1])


def test_padded_model_vocab_never_allows_padding(gtok):
    assert gtok.vocab_size == MODEL_VOCAB > gtok.tokenizer_vocab_size
    m = Constraint(json_schema={"type": "string"}).matcher(gtok)
    bm = gtok.allocate_bitmask(1)
    fill_masks([m], bm)
    allowed = unpack_bitmask(bm, MODEL_VOCAB)[0]
    assert allowed[: gtok.tokenizer_vocab_size].any()
    assert not allowed[gtok.tokenizer_vocab_size :].any()


def test_model_vocab_narrower_than_tokenizer(hf_tokenizer, eos_id):
    """Masks keep the tokenizer's width; logits of the model's width still mask."""
    small = GrammarTokenizer(hf_tokenizer, eos_id, vocab_size=500)
    assert small.vocab_size == 512 and small.mask_words == 16
    m = Constraint(regex="[a-z]+").matcher(small)
    bm = small.allocate_bitmask(1)
    fill_masks([m], bm)
    logits = torch.zeros(1, 500)
    apply_masks(logits, bm)
    ok = (~torch.isinf(logits[0])).nonzero().flatten().tolist()
    assert ok == [t for t in m.allowed_tokens() if t < 500]


def test_tokenizer_sources_agree(hf_tokenizer, tokenizer_dir, eos_id):
    a = GrammarTokenizer(hf_tokenizer, eos_id)
    b = GrammarTokenizer(tokenizer_dir, [eos_id])
    c = GrammarTokenizer((tokenizer_dir / "tokenizer.json").read_text(), eos_id)
    masks = []
    for tok in (a, b, c):
        m = Constraint(regex="[a-z]+ [0-9]").matcher(tok)
        masks.append(m.allowed_tokens())
        assert tok.eos_token_ids == (eos_id,)
    assert masks[0] == masks[1] == masks[2] and masks[0]


def test_compiled_once_per_spec_and_tokenizer(hf_tokenizer, eos_id):
    tok = GrammarTokenizer(hf_tokenizer, eos_id)
    c1 = Constraint(json_schema={"type": "integer"})
    c2 = Constraint(json_schema='{"type": "integer"}')
    assert c1 == c2 and hash(c1) == hash(c2)
    c1.compile(tok)
    m1, m2 = c1.matcher(tok), c2.matcher(tok)
    assert len(tok._cache) == 1
    m1.consume(tok.ll.tokenize_str("7")[0])  # matchers are independent copies
    assert m2.num_tokens == 0 and not m2.is_accepting() and m1.is_accepting()


def test_mask_worker_overlaps_and_matches_inline(gtok):
    c = Constraint(json_schema={"type": "array", "items": {"type": "integer"}})
    ms = [c.matcher(gtok) for _ in range(16)]
    for i, m in enumerate(ms[1:], 1):
        m.consume_many(gtok.ll.tokenize_str("[" + "1," * i))
    inline = gtok.allocate_bitmask(16)
    fill_masks(ms, inline, parallel=False)
    pooled = gtok.allocate_bitmask(16)
    fill_masks(ms, pooled, parallel=True)
    assert torch.equal(inline, pooled)
    bg = gtok.allocate_bitmask(16)
    with MaskWorker() as worker:
        fut = worker.submit(ms, bg)
        # Main thread keeps working (stands in for the GPU forward).
        x = torch.randn(256, 256)
        for _ in range(5):
            x = x @ x.T / 256
        fut.result(timeout=30)
    assert torch.equal(inline, bg)


def test_status_rules(gtok):
    m = Constraint(regex="[0-9]+").matcher(gtok)
    assert grammar_status(m, "eos") == "incomplete"  # empty output is not a match
    m.consume(gtok.ll.tokenize_str("4")[0])
    assert grammar_status(m, "eos") == "complete"
    assert grammar_status(m, "stop") == "complete"
    assert grammar_status(m, "length") == "incomplete"  # could have continued
    assert grammar_status(None, "length") == "incomplete"
    assert grammar_status(None, "eos") == "complete"


def test_same_matcher_in_two_rows_in_parallel(gtok):
    """llguidance's pool borrows each matcher once; a repeat used to fail ("Already borrowed")."""
    m = Constraint(regex="[0-9]+ ?").matcher(gtok)
    other = Constraint(regex="[a-z]").matcher(gtok)
    inline = gtok.allocate_bitmask(3, pin_memory=False)
    fill_masks([m, other, m], inline, rows=[2, 1, 0], parallel=False)
    pooled = gtok.allocate_bitmask(3, pin_memory=False)
    fill_masks([m, other, m], pooled, rows=[2, 1, 0], parallel=True)
    assert torch.equal(inline, pooled) and torch.equal(pooled[0], pooled[2])

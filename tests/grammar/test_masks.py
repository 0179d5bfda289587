"""Mask plumbing: packing, batched fills into chosen rows, vocab padding, overlap, caching."""

from __future__ import annotations

import threading
from dataclasses import dataclass

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
from dendrite.grammar.matcher import Matcher


@dataclass
class Row:
    """A step's row, as the engine's request handles are to `MaskWorker`."""

    matcher: Matcher | None


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


def test_unpack_takes_bool_masks_and_refuses_other_dtypes():
    allowed = torch.tensor([[True, False, True], [False, True, True]])
    assert torch.equal(unpack_bitmask(allowed, 2), allowed[:, :2])
    wider = unpack_bitmask(allowed, 5)  # ids past the mask: never allowed
    assert torch.equal(wider[:, :3], allowed) and not wider[:, 3:].any()
    with pytest.raises(TypeError, match="packed int32 or bool, not torch.int64"):
        unpack_bitmask(torch.zeros(1, 2, dtype=torch.int64), 64)


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


def _array_matchers(gtok, n: int) -> list[Matcher]:
    """`n` matchers of one grammar, each at a different position."""
    c = Constraint(json_schema={"type": "array", "items": {"type": "integer"}})
    ms = [c.matcher(gtok) for _ in range(n)]
    for i, m in enumerate(ms[1:], 1):
        m.consume_many(gtok.ll.tokenize_str("[" + "1," * i))
    return ms


def _expected(gtok, matchers: list[Matcher | None]) -> torch.Tensor:
    """fill_masks of the constrained rows; unconstrained rows all-allowed."""
    bm = gtok.allocate_bitmask(len(matchers), pin_memory=False)
    rows = [i for i, m in enumerate(matchers) if m is not None]
    fill_masks([matchers[i] for i in rows], bm, rows)
    return bm


def test_llguidance_pool_matches_the_calling_thread(gtok):
    ms = _array_matchers(gtok, 16)
    inline = gtok.allocate_bitmask(16)
    fill_masks(ms, inline)
    pooled = gtok.allocate_bitmask(16)
    fill_masks(ms, pooled, threads=2)
    assert torch.equal(inline, pooled)
    assert not torch.equal(inline[0], inline[1])  # the rows differ: a real check


def test_threads_must_be_a_count(gtok):
    m = Constraint(regex="a").matcher(gtok)
    with pytest.raises(ValueError, match="fill_masks: threads must be >= 0"):
        fill_masks([m], gtok.allocate_bitmask(1), threads=-1)
    with pytest.raises(TypeError, match="fill_masks: threads must be an int"):
        fill_masks([m], gtok.allocate_bitmask(1), threads=True)
    with pytest.raises(TypeError, match="MaskWorker: threads must be an int"):
        MaskWorker(threads=1.5)


def test_mask_worker_fills_on_its_thread_while_the_caller_works(gtok):
    ms = _array_matchers(gtok, 16)
    rows = [Row(m) for m in ms]
    with MaskWorker() as worker:
        fut = worker.start(rows)
        # The calling thread keeps working (stands in for the CPU forward).
        x = torch.randn(256, 256)
        for _ in range(5):
            x = x @ x.T / 256
        bitmask = fut.result(timeout=30)
        assert any(t.name.startswith("dendrite-mask") for t in threading.enumerate())
        assert torch.equal(bitmask, _expected(gtok, ms))
        assert torch.equal(worker.fill(rows), bitmask)  # on the calling thread


def test_mask_worker_reuses_prefetched_rows_of_the_same_owners(gtok):
    """A step's masks: prefetched rows of the same owners, fresh rows for new
    owners, -1 for unconstrained rows; equal to fill_masks of the matchers."""
    ms = [Constraint(regex=r).matcher(gtok) for r in ("[0-9]+", "[a-z]+", "yes|no")]
    a, b, c = (Row(m) for m in ms)
    free = Row(None)
    with MaskWorker(threads=2) as worker:
        assert worker.start([free]) is None and worker.fill([free]) is None
        # Steady state: the prefetched future itself.
        worker.prefetch([a, b])
        steady = worker.start([a, b]).result(timeout=30)
        assert torch.equal(steady, _expected(gtok, ms[:2]))
        # Rows reordered, an unconstrained row and a new owner mixed in.
        worker.prefetch([a, b])
        mixed = worker.start([b, free, c, a]).result(timeout=30)
        assert torch.equal(mixed, _expected(gtok, [ms[1], None, ms[2], ms[0]]))
        assert (mixed[1] == -1).all() and len({tuple(r.tolist()) for r in mixed}) == 4
        assert torch.equal(worker.fill([b, free, c, a]), mixed)


def test_mask_worker_never_serves_a_row_prefetched_for_another_owner(gtok):
    """The engine gives a resumed grammar (same matcher) a new request handle
    and may advance the matcher by forced tokens in between: a prefetch keyed
    by the matcher would then hand out the stale mask."""
    m = Constraint(regex="ab[0-9]").matcher(gtok)
    before = _expected(gtok, [m])
    first, second = Row(m), Row(m)
    with MaskWorker() as worker:
        worker.prefetch([first])
        worker.settle()  # done: the matcher may be touched now
        m.consume_many(m.forced_tokens())
        assert m.num_tokens > 0
        now = worker.start([second]).result(timeout=30)
    assert torch.equal(now, _expected(gtok, [m]))
    assert not torch.equal(now, before)


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
    fill_masks([m, other, m], inline, rows=[2, 1, 0])
    pooled = gtok.allocate_bitmask(3, pin_memory=False)
    fill_masks([m, other, m], pooled, rows=[2, 1, 0], threads=2)
    assert torch.equal(inline, pooled) and torch.equal(pooled[0], pooled[2])

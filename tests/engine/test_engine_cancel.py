"""`Engine.cancel(handle)`: the request ends with "abort", its sequence stays the
caller's and continues exactly, the other requests go on, and no page leaks
(the `make_engine` fixture checks the pool at teardown)."""

import pytest

from dendrite.kv import check_invariants
from dendrite.sampling import SamplingParams

PROMPT = "Question: Natalia sold clips to 48 of her friends"


def _params(max_tokens: int, seed: int = 3) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, ignore_eos=True)


def test_cancel_ends_the_request_and_the_sequence_continues_exactly(make_engine):
    e = make_engine()
    want = e.generate(e.new_sequence(PROMPT), _params(30))[0].token_ids
    other_want = e.generate(e.new_sequence("Once upon a time"), _params(30, seed=4))[0].token_ids

    s = e.new_sequence(PROMPT)
    other = e.new_sequence("Once upon a time")
    prompt = list(s.tokens)
    h = e.submit(s, _params(30))
    h_other = e.submit(other, _params(30, seed=4))
    while len(h.token_ids) < 7:
        e.step()
    if e.lookahead:  # the next step is already queued with this request's row
        assert e._ahead is not None and any(x is s for x in e._ahead.seqs)
    assert e.cancel(h) is True
    r = h.result
    assert h.done and r.finish_reason == "abort" and not r.complete
    assert r.token_ids == want[:len(r.token_ids)] and len(r.token_ids) >= 7
    assert s.tokens == prompt + r.token_ids  # what was generated stays in the sequence
    assert not s.released and s.handle is h
    assert e.cancel(h) is False and h.result is r  # already finished: nothing changes

    e.run([h_other])  # the other request is untouched
    assert h_other.result.token_ids == other_want
    assert h.result is r and len(r.token_ids) == len(h.token_ids)

    # The caller still owns the sequence: it continues where the request stopped,
    # drawing what the uncancelled run drew (draws depend on seed and position).
    # (Stepped a bounded number of times: a sequence left without its last token
    # pending would never be scheduled again.)
    h2 = e.submit(s, _params(30 - len(r.token_ids)))
    for _ in range(100):
        if h2.done:
            break
        e.step()
    assert h2.done and r.token_ids + h2.result.token_ids == want
    check_invariants(e.pool, [e.tree], [e.cache])
    s.release()
    other.release()


def test_cancel_before_the_first_step_and_then_fork(make_engine):
    e = make_engine()
    s = e.new_sequence(PROMPT)
    h = e.submit(s, _params(10))
    assert e.cancel(h)
    assert h.result.finish_reason == "abort" and h.result.token_ids == []
    e.step()  # stepping on is fine (the idle prompt may prefill)
    kids = s.fork(2)
    rs = e.generate(kids, _params(5))
    assert rs[0].token_ids == rs[1].token_ids
    check_invariants(e.pool, [e.tree], [e.cache])


def test_cancel_with_every_row_in_flight_frees_pages_on_release(make_engine):
    e = make_engine(num_pages=64)
    root = e.new_sequence(PROMPT)
    kids = root.fork(4)
    hs = [e.submit(k, _params(40, seed=i)) for i, k in enumerate(kids)]
    for _ in range(6):
        e.step()
    used = e.pool.used
    for h in hs:
        assert e.cancel(h)
    # Cancelling allocates nothing (it may give back a page a queued token opened).
    assert e.pool.used <= used
    assert e.step() == []  # a step still queued completes, its rows dropped
    assert all(h.result.finish_reason == "abort" for h in hs)
    for k in kids:
        k.release()
    root.release()
    check_invariants(e.pool, [e.tree], [e.cache])


def test_cancel_rejects_what_is_not_its_handle(make_engine):
    e, f = make_engine(), make_engine()
    h = f.submit(f.new_sequence(PROMPT), _params(4))
    with pytest.raises(TypeError, match="GenHandle"):
        e.cancel(h.seq)
    with pytest.raises(ValueError, match="another engine"):
        e.cancel(h)
    assert not h.done
    f.run([h])
    h.seq.release()

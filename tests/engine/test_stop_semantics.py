"""Stop strings and stop tokens: what the text holds (cut before the stop string
by default, through it with include_stop), what the sequence holds (every
sampled token), which stop matched; and `TextDeltas`, the streaming view.

Greedy decoding on the tiny model makes a stop string appear on cue: a first
run without stops shows the text, and a stop string is taken from it.
"""

import pytest

from dendrite.sampling import SamplingParams
from dendrite.stopping import TextDeltas

PROMPT = "Q: "
N = 24


def greedy(e, **kw):
    seq = e.new_sequence(PROMPT)
    (r,) = e.generate([seq], SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, **kw))
    return seq, r


def token_texts(e, ids):
    return [e.tokenizer.decode([t]) for t in ids]


def spanning_stop(e, ids):
    """A stop string across a token boundary: the end of one token's text and
    the start of the next's (both plain ASCII), first seen at that boundary."""
    full = e.tokenizer.decode(ids)
    texts = token_texts(e, ids)
    for i in range(1, len(ids) - 1):
        a, b = texts[i], texts[i + 1]
        if a.isascii() and b.isascii() and a.strip() and b.strip():
            stop = a[-1] + b[0]
            prefix = e.tokenizer.decode(ids[:i + 2])
            if full.find(stop) == len(prefix) - len(b) - 1:
                return stop, i + 1
    pytest.skip("the tiny model's greedy text has no two ASCII tokens in a row")


def test_stop_string_is_cut_from_text_but_its_tokens_stay(make_engine):
    e = make_engine()
    _, free = greedy(e)
    stop, last = spanning_stop(e, free.token_ids)
    full = free.text

    seq, r = greedy(e, stop=stop)
    assert r.finish_reason == "stop" and r.matched_stop == stop
    assert r.text == full[:full.find(stop)]
    # The tokens that spelled the stop string were sampled and kept: the
    # sequence (the model's context) ends with them.
    assert r.token_ids == free.token_ids[:last + 1]
    assert seq.tokens[-len(r.token_ids):] == r.token_ids

    _, inc = greedy(e, stop=stop, include_stop=True)
    assert inc.finish_reason == "stop" and inc.matched_stop == stop
    assert inc.text == full[:full.find(stop) + len(stop)]
    assert inc.token_ids == r.token_ids


def test_first_of_several_stops_and_stop_token_ids(make_engine):
    e = make_engine()
    _, free = greedy(e)
    stop, _ = spanning_stop(e, free.token_ids)
    _, r = greedy(e, stop=["never in this text \x00", stop])
    assert r.matched_stop == stop

    tok = free.token_ids[3]
    _, t = greedy(e, stop_token_ids=[tok])
    first = free.token_ids.index(tok)
    assert t.finish_reason == "stop" and t.matched_stop == tok
    assert t.token_ids == free.token_ids[:first + 1]


def test_no_stop_matched_reports_none(make_engine):
    e = make_engine()
    _, r = greedy(e, stop="never in this text \x00")
    assert r.finish_reason == "length" and r.matched_stop is None


def test_include_stop_must_be_a_bool():
    with pytest.raises(TypeError, match="include_stop must be a bool"):
        SamplingParams(include_stop="yes")


def deltas_of(e, ids, stop, include_stop, final):
    """Feed `ids` one token at a time, then finish with `final`."""
    td = TextDeltas(e.tokenizer, stop, include_stop)
    out = [td.feed(ids[:k]) for k in range(1, len(ids) + 1)]
    out.append(td.finish(final))
    return out


@pytest.mark.parametrize("include_stop", [False, True])
def test_text_deltas_join_to_the_final_text_and_show_no_stop(make_engine, include_stop):
    e = make_engine(lookahead=False)
    _, free = greedy(e)
    stop, _ = spanning_stop(e, free.token_ids)
    _, r = greedy(e, stop=stop, include_stop=include_stop)
    deltas = deltas_of(e, r.token_ids, [stop], include_stop, r.text)
    assert "".join(deltas) == r.text
    shown = ""
    for d in deltas[:-1]:
        shown += d
        # Never half a multi-byte character (the tiny model's bytes make many).
        assert not d.endswith("\ufffd") or "\ufffd" in r.text
        if not include_stop:
            assert stop not in shown and not shown.endswith(stop[0])


def test_text_deltas_hold_back_half_characters(make_engine):
    e = make_engine(lookahead=False)
    # "é" and "€" are 2 and 3 bytes: byte-level tokens split them.
    text = "café 5€ ok"
    ids = e.encode(text, add_bos=False)
    assert e.tokenizer.decode(ids) == text
    assert any(e.tokenizer.decode([t]) == "\ufffd" for t in ids), "no character is split"
    deltas = deltas_of(e, ids, [], False, text)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # A character split over tokens arrives whole, in one delta.
    assert any("€" in d for d in deltas) and any("é" in d for d in deltas)

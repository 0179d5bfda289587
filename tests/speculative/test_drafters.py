"""Drafters: prompt lookup, the draft model's tokenizer check, the config's string form."""

import numpy as np
import pytest

from dendrite.engine import Engine
from dendrite.speculative import (
    ModelDrafter,
    NgramDrafter,
    SpeculativeConfig,
    TokenizerMismatch,
    TreeShape,
)


def test_ngram_lookup_longest_suffix_first():
    d = NgramDrafter(n_min=1, n_max=3)
    seq = np.array([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3])
    # Suffix [1 2 3] was followed by 9 once and 7 once: equal counts, the most recent first.
    assert d.lookup(seq, 2) == [(7, 0.5), (9, 0.5)]
    assert d.lookup(np.array([4, 5, 6]), 2) == []  # no earlier occurrence
    [tree] = d.propose(["k"], [[1, 2, 3, 4, 1, 2]], TreeShape(depth=3), [3])
    assert tree.tokens == [3, 4, 1]


def test_ngram_arguments_are_checked():
    with pytest.raises(ValueError, match="n_min"):
        NgramDrafter(n_min=0)
    with pytest.raises(ValueError, match="n_min \\(4\\) must be <= n_max \\(2\\)"):
        NgramDrafter(n_min=4, n_max=2)


def other_tokenizer(src, dst, swap=True):
    """A copy of `src`'s tokenizer files with two token ids swapped (`swap`) or
    another EOS token."""
    import json
    import shutil

    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(src / name, dst / name)
    if swap:
        tok = json.loads((dst / "tokenizer.json").read_text())
        vocab = tok["model"]["vocab"]
        a, b = sorted(vocab, key=vocab.get)[100:102]
        vocab[a], vocab[b] = vocab[b], vocab[a]
        (dst / "tokenizer.json").write_text(json.dumps(tok))
    else:
        cfg = json.loads((dst / "tokenizer_config.json").read_text())
        cfg["eos_token"] = "<|pad|>"
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_model_drafter_other_tokenizer_is_a_clear_error(tmp_path, target_dir):
    swapped = other_tokenizer(target_dir, tmp_path / "swapped")
    eos = other_tokenizer(target_dir, tmp_path / "eos", swap=False)
    e = Engine(target_dir, device="cpu", num_pages=64)
    try:
        with pytest.raises(TokenizerMismatch, match="another tokenizer than the target.*2 "
                                                    "with another id or missing; e.g. token"):
            ModelDrafter(swapped, tokenizer=e.tokenizer)
        with pytest.raises(TokenizerMismatch, match="EOS ids differ"):
            ModelDrafter(eos, tokenizer=e.tokenizer)
        with pytest.raises(TokenizerMismatch):
            Engine(target_dir, device="cpu", num_pages=64,
                   speculative=SpeculativeConfig(method="model", draft_model=str(swapped)))
    finally:
        e.close()


def test_parse_spec_strings():
    assert SpeculativeConfig.parse("off") is None
    c = SpeculativeConfig.parse("ngram:k=6,n=4,width=2")
    assert (c.method, c.num_draft, c.ngram_max, c.width) == ("ngram", 6, 4, 2)
    m = SpeculativeConfig.parse("model:/x/y,k=3,tree=dynamic,budget=8")
    assert (m.draft_model, m.num_draft, m.tree, m.budget) == ("/x/y", 3, "dynamic", 8)


@pytest.mark.parametrize("spec,match", [
    ("beam", "unknown method 'beam'"),
    ("model", "needs a directory"),
    ("ngram:k=x", "k must be an int"),
    ("ngram:depth=3", "unknown option 'depth'"),
    ("ngram:k=0", "num_draft must be an int >= 1"),
    ("ngram:tree=beam", "tree must be one of static, dynamic"),
    ("ngram:k", "must be key=value"),
])
def test_bad_spec_strings(spec, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.parse(spec)


def test_engine_takes_a_config_not_a_string(target_dir):
    with pytest.raises(TypeError, match="speculative must be a dendrite.speculative"):
        Engine(target_dir, device="cpu", num_pages=64, speculative="ngram")


def test_engine_close_releases_the_draft_models_pages_and_drops_it(make_engine, other_dir):
    from dendrite.sampling import SamplingParams
    from dendrite.speculative import SpeculativeConfig

    e = make_engine(speculative=SpeculativeConfig.parse(f"model:{other_dir}"))
    drafter = e._spec.drafter
    s = e.new_sequence("a b c a b c a b")
    e.generate(s, SamplingParams(max_tokens=8, temperature=0))
    assert drafter.pool.used > 0  # the draft model keeps the branch's context
    spec = e._spec
    e.close()
    assert drafter.pool.used == 0
    assert spec.drafter is None and e._spec is None  # its weights go with the engine

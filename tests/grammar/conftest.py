"""Fixtures for grammar tests: a real BPE tokenizer and a random-logits sampler."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from grammar_sampling import MODEL_VOCAB, Gen, closing_bias, run

from dendrite.grammar import GrammarTokenizer
from dendrite.tiny_model import EOS, build_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def eos_id(hf_tokenizer) -> int:
    return hf_tokenizer.token_to_id(EOS)


@pytest.fixture(scope="session")
def gtok(hf_tokenizer, eos_id) -> GrammarTokenizer:
    return GrammarTokenizer(hf_tokenizer, eos_id, vocab_size=MODEL_VOCAB)


@pytest.fixture
def sample(gtok) -> Callable[..., list[Gen]]:
    """`sample(constraint, n, seed=, max_tokens=, ...) -> list[Gen]`."""

    def _sample(
        constraint, n: int, *, seed: int, max_tokens: int = 128, bias_strength: float = 0.0, **kw
    ):
        gen = torch.Generator().manual_seed(seed)
        bias = closing_bias(gtok, bias_strength) if bias_strength else None
        gens = [Gen(constraint.matcher(gtok)) for _ in range(n)]
        return run(gens, gtok, gen, max_tokens=max_tokens, bias=bias, **kw)

    return _sample

"""`KernelConfig.grammar_threads`: the llguidance pool size of the engine's mask
fills, defaulted from DENDRITE_GRAMMAR_THREADS (the engine side is in
tests/engine/test_engine_grammar.py)."""

from __future__ import annotations

import pytest

from dendrite.kernels.config import KernelConfig


def test_from_env_reads_a_thread_count():
    assert KernelConfig.from_env({}).grammar_threads == 0  # no pool: the calling thread
    assert KernelConfig.from_env({"DENDRITE_GRAMMAR_THREADS": ""}).grammar_threads == 0
    assert KernelConfig.from_env({"DENDRITE_GRAMMAR_THREADS": " 4 "}).grammar_threads == 4
    assert KernelConfig.torch_only().grammar_threads == 0


@pytest.mark.parametrize("raw", ["-1", "two", "1.5", "on"])
def test_bad_thread_counts_name_the_variable(raw):
    with pytest.raises(ValueError, match=rf"DENDRITE_GRAMMAR_THREADS must be an int >= 0 "
                                         rf"\(0 = no thread pool\), got '{raw}'"):
        KernelConfig.from_env({"DENDRITE_GRAMMAR_THREADS": raw})


@pytest.mark.parametrize("value", [True, 2.0, "2"])
def test_field_must_be_an_int(value):
    with pytest.raises(TypeError, match="KernelConfig.grammar_threads must be an int, got"):
        KernelConfig(grammar_threads=value)


def test_field_must_not_be_negative():
    with pytest.raises(ValueError, match=r"KernelConfig.grammar_threads must be >= 0 "
                                         r"\(0 = no thread pool\), got -1"):
        KernelConfig(grammar_threads=-1)

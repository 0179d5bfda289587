"""Loading HF model dirs: configs, clear errors, tokenizer, chat template, dtypes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from dendrite.model import (
    ChatTemplateError,
    MissingFileError,
    ModelConfig,
    ModelLoadError,
    Tokenizer,
    UnsupportedModelError,
    load,
    load_config,
)
from dendrite.model.runner import ModelRunner
from dendrite.tiny_model import LLAMA3_ROPE_SCALING, build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("base"), "llama", seed=0)


@pytest.fixture
def copy(tiny, tmp_path):
    def make():
        d = tmp_path / "m"
        shutil.copytree(tiny, d)
        return d

    return make


def edit_config(d, **kw):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


# -- clear errors ------------------------------------------------------------------


def test_missing_dir_and_config(tmp_path, copy):
    with pytest.raises(MissingFileError, match="does not exist"):
        load(tmp_path / "nope")
    d = copy()
    (d / "config.json").unlink()
    with pytest.raises(MissingFileError, match="config.json"):
        load(d)


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "Qwen3MoeForCausalLM"])
def test_unsupported_architecture_is_named(copy, arch):
    d = copy()
    edit_config(d, architectures=[arch], model_type="whatever")
    with pytest.raises(UnsupportedModelError, match=arch) as e:
        load(d)
    assert "LlamaForCausalLM" in str(e.value)  # and says what is supported


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"hidden_act": "gelu"}, "gelu"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"torch_dtype": "float8"}, "float8"),
    ],
)
def test_unsupported_features_are_named(copy, kw, match):
    d = copy()
    edit_config(d, **kw)
    with pytest.raises(UnsupportedModelError, match=match):
        load(d)


def test_missing_weights(copy):
    d = copy()
    (d / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match="safetensors"):
        load(d)
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(MissingFileError, match="pytorch_model.bin"):
        load(d)


def test_missing_shard_is_named(tmp_path):
    d = build_tiny_model(tmp_path / "s", "qwen2", shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MissingFileError, match="model-00002-of-00002"):
        load(d)


def test_missing_tensor_is_named(copy):
    from safetensors.torch import load_file, save_file

    d = copy()
    w = load_file(d / "model.safetensors")
    del w["model.layers.1.mlp.up_proj.weight"]
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load(d)


def test_missing_tokenizer(copy):
    d = copy()
    (d / "tokenizer.json").unlink()
    with pytest.raises(MissingFileError, match="tokenizer.json"):
        load(d)


# -- config parsing ----------------------------------------------------------------


def test_config_families_and_transformers5_keys():
    base = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "vocab_size": 10,
        "intermediate_size": 8,
    }
    q2 = ModelConfig.from_hf(
        {
            **base,
            "architectures": ["Qwen2ForCausalLM"],
            "use_sliding_window": True,
            "sliding_window": 32,
            "max_window_layers": 1,
        }
    )
    assert q2.qkv_bias and not q2.o_bias and q2.sliding_windows == (None, 32, 32)
    q3 = ModelConfig.from_hf(
        {
            **base,
            "model_type": "qwen3",
            "head_dim": 32,
            "sliding_window": 32,
            "use_sliding_window": False,
        }
    )
    assert q3.qk_norm and q3.head_dim == 32 and q3.num_kv_heads == 4
    assert q3.sliding_windows == (None,) * 3 and q3.architecture == "Qwen3ForCausalLM"
    m = ModelConfig.from_hf(
        {**base, "architectures": ["MistralForCausalLM"], "sliding_window": None}
    )
    assert m.sliding_windows == (None,) * 3
    # transformers 5 spelling: rope_parameters + dtype
    l5 = ModelConfig.from_hf(
        {
            **base,
            "architectures": ["LlamaForCausalLM"],
            "dtype": "bfloat16",
            "rope_parameters": {**LLAMA3_ROPE_SCALING, "rope_theta": 5e5},
        }
    )
    assert l5.rope_theta == 5e5 and l5.rope_scaling["rope_type"] == "llama3"
    assert l5.dtype == torch.bfloat16
    l4 = ModelConfig.from_hf(
        {
            **base,
            "architectures": ["LlamaForCausalLM"],
            "rope_theta": 5e5,
            "rope_scaling": LLAMA3_ROPE_SCALING,
        }
    )
    assert (l4.rope_theta, l4.rope_scaling) == (l5.rope_theta, l5.rope_scaling)


def test_eos_ids_merge_generation_config(copy):
    d = copy()
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    cfg = load_config(d)
    assert cfg.eos_token_ids == (1, 4)
    tok = Tokenizer(d, eos_token_ids=cfg.eos_token_ids)
    assert tok.eos_token_ids == (1, 4) and tok.bos_token_id == 0


# -- tokenizer ---------------------------------------------------------------------

TEXTS = ["The quick brown fox", '  {"a": [1, 2]}\n\tünïcödé 🌳', "<|user|>hi<|assistant|>"]


def test_tokenizer_matches_transformers(tiny):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tiny)
    tok = Tokenizer(tiny)
    for t in TEXTS:
        assert tok.encode(t) == hf.encode(t)
        assert tok.decode(tok.encode(t)) == hf.decode(hf.encode(t), skip_special_tokens=True)
    msgs = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )


def test_add_bos_token_and_missing_chat_template(copy):
    d = copy()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = True
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer(d)
    assert tok.encode("hi")[0] == tok.bos_token_id
    assert tok.encode("hi", add_special_tokens=False)[0] != tok.bos_token_id
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    )
    assert Tokenizer(d).apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


# -- dtypes and runner -----------------------------------------------------------------


def prefill(runner, ids):
    t = len(ids)
    pages = np.arange((t + runner.page_size - 1) // runner.page_size)
    meta = runner.build_metadata(
        np.arange(t),
        np.arange(t),
        [0, t],
        [0, len(pages)],
        pages,
        [t - (len(pages) - 1) * runner.page_size],
    )
    return runner.run(ids, meta, logits_indices=np.arange(t))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_tracks_transformers(tiny, dtype):
    transformers = pytest.importorskip("transformers")
    ids = list(range(3, 40))
    tdt = getattr(torch, dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=tdt).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    runner = ModelRunner(tiny, dtype=dtype, num_pages=32, attention="reference")
    assert runner.dtype == tdt and runner.kv_cache.kv.dtype == tdt
    out = prefill(runner, ids)
    assert out.dtype == torch.float32
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert ((out - ref).abs().max() / ref.abs().max()) < 0.05


def test_half_checkpoint_defaults_to_fp32_on_cpu(tmp_path):
    d = build_tiny_model(tmp_path / "bf", "qwen3", dtype="bfloat16")
    loaded = load(d)
    assert loaded.config.dtype == torch.bfloat16 and loaded.dtype == torch.float32
    assert load(d, dtype="bfloat16").dtype == torch.bfloat16


def test_runner_logit_rows_and_tied_head(tmp_path):
    d = build_tiny_model(tmp_path / "t", "llama", tie_word_embeddings=True)
    runner = ModelRunner(d, num_pages=16, attention="reference")
    m = runner.model
    assert m.lm_head is None and m.lm_head_weight is m.model.embed_tokens.weight
    all_rows = prefill(runner, [0, 5, 6, 7, 8])
    t = 5
    meta = runner.build_metadata(np.arange(t), np.arange(t), [0, t], [0, 1], [0], [t])
    last = runner.run([0, 5, 6, 7, 8], meta)  # default: last token of each sequence
    torch.testing.assert_close(last, all_rows[-1:])
    assert runner.vocab_size == all_rows.shape[1]


def test_build_tiny_model_is_deterministic(tmp_path):
    a = build_tiny_model(tmp_path / "a", "qwen2", seed=3, shards=2)
    b = build_tiny_model(tmp_path / "b", "qwen2", seed=3, shards=2)
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = build_tiny_model(tmp_path / "c", "qwen2", seed=3)
    d = build_tiny_model(tmp_path / "d", "qwen2", seed=4)
    assert (c / "model.safetensors").read_bytes() != (d / "model.safetensors").read_bytes()


def test_padded_vocab(tmp_path):
    d = build_tiny_model(tmp_path / "p", "qwen2", vocab_size=640)
    loaded = load(d)
    assert loaded.config.vocab_size == 640 and loaded.tokenizer.vocab_size == 512


def test_chat_template_without_jinja2_is_a_clear_error(tiny, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 -> ImportError
    tok = Tokenizer(tiny)
    assert tok.encode("still works")
    with pytest.raises(ChatTemplateError, match="jinja2"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])

"""Broken model directories and bad runner arguments: one clear error each.

Every case corrupts a copy of a real tiny model directory the way downloads
and hand edits do (truncated weights, a tensor of the wrong shape or dtype,
invalid JSON, a missing tokenizer, ...) and checks the exception type and
that its one-line message names the file and, where there is one, the tensor
or key. A few cases also go through the `dendrite generate` command.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dendrite.model import (
    KVCache,
    MissingFileError,
    ModelLoadError,
    ModelRunner,
    UnsupportedModelError,
    load,
)
from dendrite.model.devices import device_memory
from dendrite.tiny_model import LLAMA3_ROPE_SCALING, build_tiny_model

WEIGHTS = "model.safetensors"
UP = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("errors") / "llama", "llama", seed=0)


@pytest.fixture
def model_dir(tiny, tmp_path) -> Path:
    """A fresh copy of the tiny model to break."""
    return Path(shutil.copytree(tiny, tmp_path / "m"))


def edit_config(d: Path, drop: tuple[str, ...] = (), **kw) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    for k in drop:
        del cfg[k]
    (d / "config.json").write_text(json.dumps(cfg))


def edit_weights(d: Path, **tensors) -> None:
    """Rewrite model.safetensors with some tensors replaced (None deletes)."""
    w = load_file(str(d / WEIGHTS))
    for name, t in tensors.items():
        name = name.replace("__", ".")
        if t is None:
            del w[name]
        else:
            w[name] = t
    save_file(w, str(d / WEIGHTS), metadata={"format": "pt"})


def load_error(d: Path, kind: type[Exception] = ModelLoadError, *needles: str) -> str:
    """load(d) raises `kind` (always a ValueError) with one line naming every needle."""
    with pytest.raises(kind) as info:
        load(d)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# -- 1. the directory ------------------------------------------------------------------


def test_directory_missing_not_a_directory_or_without_config(tmp_path, model_dir):
    load_error(tmp_path / "nope", MissingFileError, str(tmp_path / "nope"), "does not exist")
    (tmp_path / "file").write_text("x")
    load_error(tmp_path / "file", ModelLoadError, str(tmp_path / "file"), "not a directory")
    (model_dir / "config.json").unlink()
    err = load_error(model_dir, MissingFileError, str(model_dir / "config.json"))
    assert "HuggingFace model directory" in err


# -- 2. config.json --------------------------------------------------------------------


def test_config_invalid_json_names_file_line_and_column(model_dir):
    (model_dir / "config.json").write_text('{\n  "hidden_size": 64,\n  "vocab_size": 512,,\n}')
    load_error(model_dir, ModelLoadError, f"{model_dir / 'config.json'}:3:21:", "invalid JSON")


def test_config_not_an_object(model_dir):
    (model_dir / "config.json").write_text("[1, 2]")
    load_error(model_dir, ModelLoadError, "config.json", "expected a JSON object", "list")


def test_config_missing_required_keys_are_named(model_dir):
    edit_config(model_dir, drop=("hidden_size", "num_hidden_layers"))
    load_error(model_dir, ModelLoadError, "config.json", "hidden_size", "num_hidden_layers")


@pytest.mark.parametrize(
    "kw, needles",
    [
        ({"hidden_size": 66, "head_dim": None}, ["hidden_size 66", "num_attention_heads 4"]),
        ({"num_hidden_layers": 0}, ["num_hidden_layers", ">= 1", "0"]),
        ({"vocab_size": -5}, ["vocab_size", "-5"]),
        ({"intermediate_size": "128"}, ["intermediate_size", "integer", "'128'"]),
        ({"hidden_size": 64.5}, ["hidden_size", "integer"]),
        ({"num_key_value_heads": 3}, ["num_attention_heads 4", "num_key_value_heads 3"]),
        ({"head_dim": 15}, ["head_dim 15", "even"]),
        ({"rms_norm_eps": -1e-6}, ["rms_norm_eps", "positive"]),
        ({"rope_theta": "big"}, ["rope_theta", "positive"]),
        ({"max_position_embeddings": 0}, ["max_position_embeddings"]),
        ({"eos_token_id": 10**6}, ["eos_token_id", "1000000", "vocab_size=512"]),
        ({"bos_token_id": -1}, ["bos_token_id", "-1"]),
        ({"architectures": "LlamaForCausalLM"}, ["architectures", "list"]),
        (
            {"rope_scaling": {k: v for k, v in LLAMA3_ROPE_SCALING.items() if k != "factor"}},
            ["rope_scaling", "factor"],
        ),
        (
            {"rope_scaling": {**LLAMA3_ROPE_SCALING, "high_freq_factor": 1.0}},
            ["high_freq_factor", "low_freq_factor"],
        ),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else None,
)
def test_config_bad_values_are_named(model_dir, kw, needles):
    edit_config(model_dir, **kw)
    load_error(model_dir, ModelLoadError, str(model_dir / "config.json"), *needles)


def test_generation_config_bad_json_and_bad_eos(model_dir):
    path = model_dir / "generation_config.json"
    path.write_text('{"eos_token_id": [1, }')
    load_error(model_dir, ModelLoadError, f"{path}:1:22:")
    path.write_text('{"eos_token_id": [1, 99999]}')
    load_error(model_dir, ModelLoadError, str(path), "eos_token_id", "99999")


# -- 3. architecture -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, named",
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
        ({"architectures": None, "model_type": "phi3"}, "phi3"),
        ({"architectures": None, "model_type": None}, "names no architecture"),
    ],
)
def test_unknown_architecture_lists_the_supported(model_dir, kw, named):
    edit_config(model_dir, **kw)
    err = load_error(model_dir, UnsupportedModelError, str(model_dir / "config.json"), named)
    for family in ("Llama", "Mistral", "Qwen2", "Qwen3"):
        assert f"{family}ForCausalLM" in err


def test_quantized_checkpoint_is_refused(model_dir):
    edit_config(model_dir, quantization_config={"quant_method": "gptq", "bits": 4})
    load_error(model_dir, UnsupportedModelError, "config.json", "quantized", "gptq")


# -- 4. the safetensors files ------------------------------------------------------------


def test_no_safetensors_files(model_dir):
    (model_dir / WEIGHTS).unlink()
    load_error(model_dir, MissingFileError, "no *.safetensors", str(model_dir))


@pytest.mark.parametrize("keep", [0.5, 0.999, 20, 0])
def test_truncated_safetensors_names_the_file(model_dir, keep):
    path = model_dir / WEIGHTS
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:n])
    load_error(model_dir, ModelLoadError, str(path), "not a valid safetensors file")


def test_garbage_safetensors_names_the_file(model_dir):
    path = model_dir / WEIGHTS
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    load_error(model_dir, ModelLoadError, str(path), "not a valid safetensors file")


@pytest.fixture
def sharded(tmp_path) -> Path:
    return build_tiny_model(tmp_path / "sharded", "qwen2", shards=2)


def test_index_names_a_missing_shard(sharded):
    (sharded / "model-00002-of-00002.safetensors").unlink()
    shard = "model-00002-of-00002.safetensors"
    load_error(sharded, MissingFileError, "model.safetensors.index.json", shard)


def test_index_misplaces_a_tensor(sharded):
    index = sharded / "model.safetensors.index.json"
    spec = json.loads(index.read_text())
    name = next(n for n, f in spec["weight_map"].items() if f.startswith("model-00001"))
    spec["weight_map"][name] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps(spec))
    load_error(sharded, ModelLoadError, str(index), name, "model-00001-of-00002.safetensors")


def test_index_invalid_json(sharded):
    index = sharded / "model.safetensors.index.json"
    index.write_text('{"weight_map": ')
    load_error(sharded, ModelLoadError, f"{index}:1:16:", "invalid JSON")


def test_tensor_stored_in_two_files(model_dir):
    w = load_file(str(model_dir / WEIGHTS))
    save_file({UP: w[UP]}, str(model_dir / "extra.safetensors"))
    load_error(model_dir, ModelLoadError, UP, "extra.safetensors", WEIGHTS, "twice")


# -- 5. tensors ------------------------------------------------------------------------


def test_wrong_shape_names_tensor_file_expected_and_got(model_dir):
    edit_weights(model_dir, **{UP.replace(".", "__"): torch.zeros(64, 64)})
    load_error(model_dir, ModelLoadError, UP, str(model_dir / WEIGHTS), "(64, 64)", "(128, 64)")


def test_wrong_shape_in_a_fused_qkv_slice(model_dir):
    edit_weights(model_dir, model__layers__0__self_attn__k_proj__weight=torch.zeros(33, 64))
    load_error(model_dir, ModelLoadError, "model.layers.0.self_attn.k_proj.weight", "(33, 64)",
               "(32, 64)", WEIGHTS)


@pytest.mark.parametrize(
    "tensor, spelled",
    [
        (torch.zeros(128, 64, dtype=torch.int32), "I32"),
        (torch.zeros(128, 64, dtype=torch.bool), "BOOL"),
        (torch.zeros(128, 64, dtype=torch.uint8), "U8"),
    ],
)
def test_dtype_that_cannot_be_cast(model_dir, tensor, spelled):
    edit_weights(model_dir, **{UP.replace(".", "__"): tensor})
    load_error(model_dir, ModelLoadError, UP, str(model_dir / WEIGHTS), spelled, "cannot be cast")


def test_castable_dtypes_load(model_dir):
    w = load_file(str(model_dir / WEIGHTS))
    edit_weights(model_dir, **{UP.replace(".", "__"): w[UP].to(torch.float64)})
    loaded = load(model_dir)
    assert torch.equal(loaded.model.model.layers[1].mlp.gate_up_proj.weight[128:], w[UP])


def test_missing_tensor_names_it_and_the_files_searched(model_dir):
    edit_weights(model_dir, **{UP.replace(".", "__"): None})
    load_error(model_dir, ModelLoadError, UP, WEIGHTS, str(model_dir))


def test_unknown_tensors_are_a_warning_not_an_error(model_dir, caplog):
    edit_weights(
        model_dir,
        model__layers__0__self_attn__q_proj__bias=torch.zeros(64),  # no attention_bias
        model__layers__9__mlp__up_proj__weight=torch.zeros(128, 64),  # no layer 9
        vision_tower__proj=torch.zeros(3),
    )
    with caplog.at_level(logging.WARNING, logger="dendrite.model.loader"):
        loaded = load(model_dir)
    assert loaded.model is not None
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in ("model.layers.0.self_attn.q_proj.bias", "model.layers.9.mlp.up_proj.weight",
                 "vision_tower.proj"):
        assert name in warned


# -- 6. tokenizer ----------------------------------------------------------------------


def test_tokenizer_missing(model_dir):
    (model_dir / "tokenizer.json").unlink()
    load_error(model_dir, MissingFileError, str(model_dir / "tokenizer.json"))


@pytest.mark.parametrize("content", ["{not json", "", "half"])
def test_tokenizer_corrupt_names_the_file(model_dir, content):
    path = model_dir / "tokenizer.json"
    if content == "half":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_text(content)
    load_error(model_dir, ModelLoadError, str(path), "not a valid tokenizer file")


def test_tokenizer_config_invalid_json(model_dir):
    path = model_dir / "tokenizer_config.json"
    path.write_text('{"bos_token": "<|bos|>"\n "eos_token": 1}')
    load_error(model_dir, ModelLoadError, f"{path}:2:2:", "invalid JSON")


def test_tokenizer_larger_than_the_vocab(model_dir):
    edit_config(model_dir, vocab_size=500)
    err = load_error(model_dir, ModelLoadError, "tokenizer.json", "config.json", "500", "512")
    assert "vocab_size" in err


# -- 7. runner and KV cache arguments --------------------------------------------------


@pytest.mark.parametrize(
    "kw, exc, needles",
    [
        ({"num_pages": 0}, ValueError, ["num_pages", ">= 1"]),
        ({"num_pages": -3}, ValueError, ["num_pages", "-3"]),
        ({"num_pages": 2.5}, TypeError, ["num_pages", "int"]),
        ({"page_size": 0}, ValueError, ["page_size", ">= 1"]),
        ({"page_size": True}, TypeError, ["page_size"]),
        ({"num_pages": 2**28, "page_size": 16}, ValueError, ["num_pages * page_size", "int32"]),
        ({"device": "tpu"}, ValueError, ["device", "'tpu'", "'cpu', 'cuda' or 'cuda:N'"]),
        ({"device": "mps"}, ValueError, ["device", "'mps'", "'cpu', 'cuda' or 'cuda:N'"]),
        ({"device": "cuda:x"}, ValueError, ["device", "'cuda:x'"]),
        ({"device": "cuda:7"}, ValueError, ["device", "'cuda:7'"]),
        ({"dtype": "float17"}, ValueError, ["dtype", "'float17'", "float32, float16, bfloat16"]),
        ({"dtype": torch.int8}, ValueError, ["dtype", "int8", "float32, float16, bfloat16"]),
        ({"attention": "flash"}, ValueError, ["attention", "'flash'", "reference"]),
    ],
    ids=str,
)
def test_runner_arguments_fail_before_loading(tmp_path, kw, exc, needles):
    # The directory does not exist: each argument error must come first.
    if kw.get("device", "").startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(exc) as info:
        ModelRunner(tmp_path / "not-loaded", **kw)
    assert not isinstance(info.value, ModelLoadError)
    for n in needles:
        assert n in str(info.value), (n, str(info.value))


@pytest.mark.parametrize(
    "kw, needles",
    [({"device": "tpu"}, ["device 'tpu'"]), ({"dtype": "float17"}, ["dtype 'float17'"]),
     ({"dtype": torch.float64}, ["dtype torch.float64"])],
    ids=str,
)
def test_load_arguments_fail_before_reading(tmp_path, kw, needles):
    with pytest.raises(ValueError) as info:
        load(tmp_path / "not-read", **kw)
    assert not isinstance(info.value, ModelLoadError)
    for n in needles:
        assert n in str(info.value), (n, str(info.value))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_runner_cuda_without_cuda(tmp_path):
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available"):
        ModelRunner(tmp_path / "not-loaded", device="cuda")


def _per_page(tiny, page_size=16) -> int:
    # 2 layers, 2 KV heads of 16, float32
    return KVCache.bytes_per_page(2, page_size, 2, 16, torch.float32)


def test_runner_num_pages_beyond_memory_fails_before_loading(tiny):
    total = device_memory(torch.device("cpu"))
    assert total is not None
    pages = total // _per_page(tiny) + 1
    with pytest.raises(ValueError, match=rf"num_pages {pages} needs .* at most {pages - 1} pages"):
        ModelRunner(tiny, device="cpu", num_pages=pages)


def test_runner_good_arguments_still_run(tiny):
    r = ModelRunner(tiny, device=torch.device("cpu"), dtype="torch.float32", num_pages=8,
                    page_size=4, attention="reference")
    assert r.num_pages == 8 and r.page_size == 4 and r.dtype == torch.float32


@pytest.mark.parametrize(
    "args, exc, needles",
    [
        ((0, 8, 16, 2, 16, torch.float32, "cpu"), ValueError, ["num_layers"]),
        ((2, 0, 16, 2, 16, torch.float32, "cpu"), ValueError, ["num_pages"]),
        ((2, 8, -1, 2, 16, torch.float32, "cpu"), ValueError, ["page_size"]),
        ((2, 8, 16, 0, 16, torch.float32, "cpu"), ValueError, ["num_kv_heads"]),
        ((2, 8, 16, 2, 0, torch.float32, "cpu"), ValueError, ["head_dim"]),
        ((2, 8, 16, 2, 16, "float17", "cpu"), ValueError, ["dtype", "float17"]),
        ((2, 8, 16, 2, 16, None, "cpu"), TypeError, ["dtype"]),
        ((2, 8, 16, 2, 16, torch.float32, "tpu"), ValueError, ["device", "tpu"]),
        ((2, 2**28, 16, 2, 16, torch.float32, "cpu"), ValueError, ["num_pages * page_size"]),
    ],
    ids=str,
)
def test_kv_cache_arguments(args, exc, needles):
    with pytest.raises(exc) as info:
        KVCache(*args)
    for n in needles:
        assert n in str(info.value), (n, str(info.value))


def test_kv_cache_beyond_memory_fails_without_allocating():
    per_page = KVCache.bytes_per_page(2, 16, 2, 16, torch.float32)
    pages = device_memory(torch.device("cpu")) // per_page + 1
    with pytest.raises(ValueError, match=f"num_pages {pages} needs"):
        KVCache(2, pages, 16, 2, 16, torch.float32, "cpu")


# -- through the command line ------------------------------------------------------------

#: `dendrite generate`'s status for a model dir that does not load. dendrite/cli.py
#: documents 1 ("a well-formed command failed while running: a model dir that
#: does not load"); exit 2 is for command lines found bad before any model loads.
LOAD_ERROR_EXIT = 1


def _break_truncate(d: Path) -> tuple[str, ...]:
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    return (str(d / WEIGHTS),)


def _break_shape(d: Path) -> tuple[str, ...]:
    edit_weights(d, **{UP.replace(".", "__"): torch.zeros(64, 64)})
    return (str(d / WEIGHTS), UP, "(64, 64)", "(128, 64)")


def _break_config_key(d: Path) -> tuple[str, ...]:
    edit_config(d, drop=("vocab_size",))
    return (str(d / "config.json"), "vocab_size")


def _break_tokenizer(d: Path) -> tuple[str, ...]:
    (d / "tokenizer.json").write_text("{not json")
    return (str(d / "tokenizer.json"),)


@pytest.mark.parametrize("breaker", [_break_truncate, _break_shape, _break_config_key,
                                     _break_tokenizer], ids=lambda f: f.__name__[7:])
def test_cli_generate_reports_one_line(model_dir, breaker):
    needles = breaker(model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run(
        [sys.executable, "-m", "dendrite.cli", "generate", "--model", str(model_dir),
         "--device", "cpu", "hi"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == LOAD_ERROR_EXIT, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("dendrite generate: error: "), out.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert out.stdout == ""

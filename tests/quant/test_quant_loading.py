"""Loading FP8 / MXFP8 projection weights: quantized at load, pre-quantized
checkpoints (HF FineGrainedFP8 and compressed-tensors layouts written here with
safetensors), logits against the dense model, and clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dendrite.model import ModelLoadError, UnsupportedModelError, load
from dendrite.model.runner import ModelRunner
from dendrite.quant import QuantLinear, weight_format
from dendrite.quant.formats import FP8, FP8_MAX, quantize, quantize_fp8
from dendrite.tiny_model import build_tiny_model

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = [1, 7, 42, 99, 3, 250, 17, 8]


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """Every projection a multiple of 128 rows: 128 x 128 scale blocks fuse as they are."""
    return build_tiny_model(tmp_path_factory.mktemp("aligned"), "llama", seed=3, hidden_size=128,
                            heads=2, kv_heads=2, head_dim=64, intermediate_size=256)


@pytest.fixture(scope="module")
def unaligned(tmp_path_factory):
    """The default tiny shapes (q 64 rows, k/v 32): fused scales go one per row."""
    return build_tiny_model(tmp_path_factory.mktemp("unaligned"), "qwen2", seed=4)


def _is_proj(name: str) -> bool:
    return name.endswith(".weight") and any(f".{p}." in name for p in PROJ)


def _write_fp8_checkpoint(src, dst, *, block=(128, 128), method="fp8"):
    """`src`'s model with its projections stored in e4m3, as HF FineGrainedFP8
    (`weight_scale_inv` per block, or per tensor when `block` is None) or
    compressed-tensors with per-channel `weight_scale`."""
    shutil.copytree(src, dst)
    (path,) = dst.glob("*.safetensors")
    tensors = load_file(path)
    out = {}
    for name, t in tensors.items():
        if not _is_proj(name):
            out[name] = t
            continue
        if method == "compressed-tensors":  # per output channel
            scale = t.abs().amax(1, keepdim=True).float() / FP8_MAX
            out[name] = (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            out[name + "_scale"] = scale
            out[name.replace(".weight", ".input_scale")] = torch.ones(1)  # ignored
        elif block is None:  # per tensor
            scale = t.abs().amax().float() / FP8_MAX
            out[name] = (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            out[name + "_scale_inv"] = scale.reshape(())
        else:  # (searched scales, as quantizing at load picks them)
            q = quantize_fp8(t, block, search=True)
            out[name], out[name + "_scale_inv"] = q.data, q.scale
    save_file(out, path)
    cfg = json.loads((dst / "config.json").read_text())
    if method == "compressed-tensors":
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                            "symmetric": True, "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                      "dynamic": True}}},
            "ignore": ["lm_head"]}
    else:
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                      "fmt": "e4m3"}
        if block is not None:
            cfg["quantization_config"]["weight_block_size"] = list(block)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _logits(model_dir, quantization=None, quantize_lm_head=False):
    r = ModelRunner(model_dir, num_pages=4, quantization=quantization,
                    quantize_lm_head=quantize_lm_head)
    n = len(PROMPT)
    meta = r.build_metadata(np.arange(n), np.arange(n), np.array([0, n]), np.array([0, 1]),
                            np.array([0]), np.array([n]))
    return r, r.run(torch.tensor(PROMPT), meta, logits_indices=np.arange(n))


def _close_to_dense(got: torch.Tensor, dense: torch.Tensor) -> None:
    """e4m3 keeps 3 mantissa bits (about 2-3% rms error per weight): the
    logits stay within a few percent of the dense model's."""
    rel = float((got - dense).norm() / dense.norm())
    cos = float(torch.nn.functional.cosine_similarity(got, dense).min())
    assert rel < 0.08 and cos > 0.995, (rel, cos)


def _buffers(runner):
    return {n: b for n, b in runner.model.named_buffers() if "weight" in n}


@pytest.mark.parametrize("fmt", ["fp8", "mxfp8"])
@pytest.mark.parametrize("which", ["aligned", "unaligned"])
def test_quantized_at_load_logits_close_to_dense(fmt, which, request):
    d = request.getfixturevalue(which)
    _, dense = _logits(d)
    r, got = _logits(d, fmt)
    assert weight_format(r.model) == fmt
    layer = r.model.model.layers[0]
    for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
              layer.mlp.down_proj):
        assert isinstance(m, QuantLinear) and m.weight.dtype == FP8
    # Embeddings, norms and lm_head stay in the model dtype.
    assert r.model.lm_head.weight.dtype == torch.float32
    assert r.model.model.embed_tokens.weight.dtype == torch.float32
    if fmt == "fp8":
        qkv = layer.self_attn.qkv_proj
        assert qkv.block == ((128, 128) if which == "aligned" else (1, 128))
    if which == "unaligned":  # qwen2: q/k/v biases stay dense
        assert layer.self_attn.qkv_proj.bias.dtype == torch.float32
    _close_to_dense(got, dense)


@pytest.mark.parametrize("which", ["aligned", "unaligned"])
def test_prequantized_fp8_checkpoint_equals_quantize_at_load(which, request, tmp_path):
    d = request.getfixturevalue(which)
    pre = _write_fp8_checkpoint(d, tmp_path / "fp8")
    r_pre, got = _logits(pre)  # quantization=None: as the checkpoint is (fp8)
    r_load, want = _logits(d, "fp8")
    assert weight_format(r_pre.model) == "fp8"
    a, b = _buffers(r_pre), _buffers(r_load)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name].view(torch.uint8) if a[name].dtype == FP8 else a[name],
                           b[name].view(torch.uint8) if b[name].dtype == FP8 else b[name]), name
    assert torch.equal(got, want)
    # "fp8" asked for explicitly: the same.
    assert torch.equal(_logits(pre, "fp8")[1], want)


def test_prequantized_fp8_loads_dense_or_as_mxfp8(aligned, tmp_path):
    pre = _write_fp8_checkpoint(aligned, tmp_path / "fp8")
    _, dense = _logits(aligned)
    r_none, got_none = _logits(pre, "none")
    assert weight_format(r_none.model) == "none"
    # "none": the stored e4m3 dequantized exactly (float32 model on the CPU).
    q = quantize_fp8(load_file(next(aligned.glob("*.safetensors")))[
        "model.layers.1.self_attn.k_proj.weight"])
    w = r_none.model.model.layers[1].self_attn.qkv_proj.weight
    assert torch.equal(w[128:256], q.dequantize())
    _close_to_dense(got_none, dense)
    r_mx, got_mx = _logits(pre, "mxfp8")
    assert weight_format(r_mx.model) == "mxfp8"
    _close_to_dense(got_mx, dense)


def test_prequantized_per_tensor_and_compressed_tensors_channel(unaligned, tmp_path):
    _, dense = _logits(unaligned)
    per_tensor = _write_fp8_checkpoint(unaligned, tmp_path / "t", block=None)
    r, got = _logits(per_tensor)
    qkv = r.model.model.layers[0].self_attn.qkv_proj
    assert qkv.block == (1, 64)  # three per-tensor scales, one row each in the fused grid
    _close_to_dense(got, dense)
    channel = _write_fp8_checkpoint(unaligned, tmp_path / "c", method="compressed-tensors")
    r, got = _logits(channel)
    assert r.model.model.layers[0].mlp.down_proj.block == (1, r.config.intermediate_size)
    _close_to_dense(got, dense)


def _edit(d, **kw):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


def _resave(d, fn):
    (path,) = d.glob("*.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)
    return path


def test_bad_quantized_checkpoints_name_file_and_tensor(aligned, tmp_path):
    pre = _write_fp8_checkpoint(aligned, tmp_path / "a")
    path = _resave(pre, lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale_inv"))
    with pytest.raises(ModelLoadError, match=f"{path}.*model.layers.1.mlp.up_proj.weight "
                                             "has no scale tensor"):
        load(pre)
    pre = _write_fp8_checkpoint(aligned, tmp_path / "b")
    path = _resave(pre, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight_scale_inv":
                                            torch.ones(3, 1)}))
    with pytest.raises(ModelLoadError, match=f"{path}.*o_proj.weight_scale_inv has shape "
                                             r"\(3, 1\)"):
        load(pre)
    # e4m3 weights with no quantization_config: no scales to apply.
    pre = _write_fp8_checkpoint(aligned, tmp_path / "c")
    _edit(pre, quantization_config=None)
    with pytest.raises(ModelLoadError, match=r"proj\.weight has dtype F8_E4M3, which cannot be"):
        load(pre)
    # ... and asking for fp8 says what is missing.
    with pytest.raises(ModelLoadError, match="F8_E4M3.*needs a quantization_config"):
        load(pre, quantization="fp8")


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq'"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "e5m2"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}}, "pack-quantized"),
    ({"quant_method": "compressed-tensors", "config_groups": {
        "g": {"weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}}, "8 bits, type 'int'"),
])
def test_unsupported_quantization_configs_are_named(aligned, tmp_path, qc, match):
    d = tmp_path / "m"
    shutil.copytree(aligned, d)
    _edit(d, quantization_config=qc)
    with pytest.raises(ModelLoadError, match=match) as e:
        load(d)
    assert "config.json" in str(e.value)
    if qc["quant_method"] == "awq":
        assert isinstance(e.value, UnsupportedModelError)


@pytest.mark.parametrize("bad", ["int8", "FP8", 8])
def test_bad_quantization_argument_is_named(aligned, bad):
    with pytest.raises((ValueError, TypeError), match="quantization must be None or one of "
                                                      "none, fp8, mxfp8"):
        ModelRunner(aligned, num_pages=4, quantization=bad)


@pytest.mark.parametrize("fmt", ["fp8", "mxfp8"])
@pytest.mark.parametrize("which", ["aligned", "unaligned"])
def test_quantize_lm_head_quantizes_the_dense_head(fmt, which, request):
    d = request.getfixturevalue(which)
    dense_runner, dense = _logits(d)
    _, body = _logits(d, fmt)
    r, got = _logits(d, fmt, quantize_lm_head=True)
    head = r.model.lm_head
    assert isinstance(head, QuantLinear) and head.format == fmt and head.weight.dtype == FP8
    # The head is the quantized dense head (the tied embedding when tied), and
    # a tied embedding stays dense for the lookup.
    want = quantize(dense_runner.model.lm_head_weight.float(), fmt)
    assert torch.equal(head.weight.view(torch.uint8), want.data.view(torch.uint8))
    assert torch.equal(head.weight_scale, want.scale)
    assert r.model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(r.model.model.embed_tokens.weight,
                       dense_runner.model.model.embed_tokens.weight)
    _close_to_dense(got, dense)
    assert not torch.equal(got, body)  # the head's rounding shows


@pytest.mark.parametrize("quantization", [None, "none"])
def test_quantize_lm_head_needs_a_format(aligned, quantization):
    with pytest.raises(ValueError, match="quantize_lm_head=True needs quantization='fp8' or"):
        ModelRunner(aligned, num_pages=4, quantization=quantization, quantize_lm_head=True)
    with pytest.raises(TypeError, match="quantize_lm_head must be a bool"):
        ModelRunner(aligned, num_pages=4, quantization="fp8", quantize_lm_head="yes")

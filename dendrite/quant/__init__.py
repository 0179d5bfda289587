"""FP8 and MXFP8 weights: formats, the quantized projection module, checkpoint loading.

`formats` quantizes and dequantizes (block-scaled e4m3 with float32 scales,
MXFP8 with e8m0 scales), `scheme` resolves the `quantization` argument
against a checkpoint's `quantization_config`, `linear` is `QuantLinear` (the
projection that computes through dendrite/kernels/fp8_matmul.py on CUDA and
by dequantizing elsewhere), `loading` fills a model's projections from a
checkpoint. docs/quantization.md says what runs natively where.
"""

from dendrite.quant.formats import (
    FORMATS,
    QuantizedWeight,
    dequantize,
    quantize,
    quantize_fp8,
    quantize_mxfp8,
)
from dendrite.quant.linear import QuantLinear, quant_linear, weight_format
from dendrite.quant.scheme import CHOICES, check_quantization

__all__ = [
    "CHOICES",
    "FORMATS",
    "QuantLinear",
    "QuantizedWeight",
    "check_quantization",
    "dequantize",
    "quant_linear",
    "quantize",
    "quantize_fp8",
    "quantize_mxfp8",
    "weight_format",
]

"""The quant pass: int8 quantization (dynamic and static)."""

from onnxopt.passes.quant.quant import Quantize

__all__ = ["Quantize"]

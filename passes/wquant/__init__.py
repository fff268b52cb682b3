"""The wquant pass: weight-only low-bit quantization (4 and 8 bits); ``quant(bits=4)`` is this pass."""

from onnxopt.passes.wquant.wquant import WeightQuantize

__all__ = ["WeightQuantize"]

"""Layout fusions: Pad into Conv and pooling, Transpose into Gemm and MatMul."""

from __future__ import annotations

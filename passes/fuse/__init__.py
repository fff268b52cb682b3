"""The fuse pass: Named fusions."""

from onnxopt.passes.fuse.fuse import Explanation, Fuse

__all__ = ["Explanation", "Fuse"]

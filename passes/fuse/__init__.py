"""The fuse pass: Named fusions."""

from onnxopt.passes.fuse.fuse import Fuse

__all__ = ["Fuse"]

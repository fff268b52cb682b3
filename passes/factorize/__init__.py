from onnxopt.passes.factorize.factorize import Factorize

__all__ = ["Factorize"]

"""Every fuse rule, in the order they are tried on a node (the first that rewrites it wins).

Order matters where two rules anchor on the same op: activations and layout first (they expose
the linear patterns), then the weight folds into Conv/Gemm/MatMul, normalisations, onnxruntime's
contrib fusions (target=ort), and the shape chains last.
"""

from onnxopt.passes.fuse.rules import activation, layout, linear, norm, ort, shape

RULES = (*activation.RULES, *layout.RULES, *linear.RULES, *norm.RULES, *ort.RULES, *shape.RULES)

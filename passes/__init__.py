"""The onnxopt pass library, one folder per pass, named as on the command line:
``from onnxopt.passes import Fold, Prune, Fuse, Quantize, WeightQuantize``.

Every folder here that is a package (and not private, ``_name``) is a pass: importing this package
imports each one, which registers its pass, and re-exports what its ``__all__`` names. Adding a pass
is adding a folder; nothing here changes.
"""

import importlib
import pkgutil

__all__: list[str] = []

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
    if _info.ispkg and not _info.name.startswith("_"):
        _module = importlib.import_module(f"{__name__}.{_info.name}")
        for _name in getattr(_module, "__all__", ()):
            globals()[_name] = getattr(_module, _name)
            __all__.append(_name)

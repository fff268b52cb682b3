"""accuracy_level=auto times the model at two levels: elsewhere than test_level.py the tests get
level 0 and no note, so their outputs do not depend on this machine's load."""

import pytest

from onnxopt.passes.wquant import wquant


@pytest.fixture(autouse=True)
def level_zero(request, monkeypatch):
    if "auto_level" not in request.keywords:
        monkeypatch.setattr(wquant, "measured_level", lambda model, shapes: (0, None))

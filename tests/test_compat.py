"""Old import paths of moved modules keep working for one release, with a DeprecationWarning."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

from slimsearch._compat import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_imports_with_a_deprecation_warning_and_forwards_its_names(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} has moved to"):
        module = importlib.import_module(old)
    home = importlib.import_module(MOVED[old][0])
    public = [n for n in vars(home) if not n.startswith("_") and getattr(home, n).__class__.__name__ != "module"]
    assert public and all(getattr(module, n) is getattr(home, n) for n in public[:20])
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018


def test_renamed_names_and_a_module_that_shadowed_its_function():
    import slimsearch.evaluators as evaluators

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from slimsearch.evaluators.quantize import calibrate, quantize_layers  # noqa: F401
        from slimsearch.evaluators.evaluate import measure_local  # noqa: F401
    assert calibrate.__name__ == "calibrate_activations"
    assert callable(evaluators.evaluate)  # importing the old module path did not take the function's place

"""Old import paths of modules that moved, kept working for one release with a DeprecationWarning.

A meta-path finder answers only for the names in :data:`MOVED`: importing one gives a
module that forwards every attribute to the module(s) the code now lives in. It
imports nothing until such a name is imported, so ``import slimsearch`` stays cheap.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# old module -> the modules its names live in now (looked up in this order)
MOVED: dict[str, tuple[str, ...]] = {
    "slimsearch.evaluators.quantize": ("slimsearch.compress.quant.grid", "slimsearch.compress.quant.sparsity",
                                       "slimsearch.compress.quant.layers", "slimsearch.compress.quantize"),
    "slimsearch.evaluators.deploy": ("slimsearch.deploy.packed_file", "slimsearch.deploy.onnx_int8"),
    "slimsearch.evaluators.pack": ("slimsearch.deploy.pack",),
    "slimsearch.evaluators.onnx_graph": ("slimsearch.deploy.onnx_graph",),
    "slimsearch.evaluators.distill": ("slimsearch.compress.distill",),
    "slimsearch.evaluators.prune": ("slimsearch.structures.channels",),
    "slimsearch.evaluators._channel_graph": ("slimsearch.structures._channel_graph",),
    "slimsearch.evaluators.transformer": ("slimsearch.structures.bert",),
    "slimsearch.storage.jobs": ("slimsearch.jobs.query",),
    "slimsearch.evaluators.evaluate": ("slimsearch.evaluators.candidate", "slimsearch.compress.apply"),
    "slimsearch.job": ("slimsearch.jobs.spec", "slimsearch.jobs.load", "slimsearch.metric_names"),
    "slimsearch.search.job_runner": ("slimsearch.jobs.runner", "slimsearch.jobs.folder", "slimsearch.jobs.worker",
                                     "slimsearch.jobs.log"),
    "slimsearch.search.early_stop": ("slimsearch.jobs.early_stop",),
    "slimsearch.search._front": ("slimsearch.search.samplers.auto", "slimsearch.search.pareto"),
    "slimsearch.hardware_profiles._calibrate": ("slimsearch.hardware_profiles._fit",
                                                "slimsearch.hardware_profiles._fit_report",
                                                "slimsearch.hardware_profiles._measurements"),
}
# (old module, old name) -> the name it has now
RENAMED: dict[tuple[str, str], str] = {
    ("slimsearch.evaluators.quantize", "calibrate"): "calibrate_activations",
    ("slimsearch.search.job_runner", "_cached_task"): "cached_task",
}


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module) -> None:
        targets = [importlib.import_module(name) for name in MOVED[module.__name__]]
        warnings.warn(f"{module.__name__} has moved to {', '.join(t.__name__ for t in targets)}; "
                      "the old path will be removed in the next release", DeprecationWarning, stacklevel=2)

        def __getattr__(name: str):
            name = RENAMED.get((module.__name__, name), name)
            for target in targets:
                if hasattr(target, name):
                    return getattr(target, name)
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")

        module.__getattr__ = __getattr__
        # importing it sets it as its parent's attribute: where that attribute was a function of the
        # module's own name (evaluators.evaluate), the forwarding module calls that function
        short = module.__name__.rpartition(".")[2]
        function = next((getattr(t, short) for t in targets if callable(getattr(t, short, None))), None)
        if function is not None:
            from slimsearch._package import callable_package

            callable_package(module.__name__, function)


def moved_attribute(module: str, name: str, homes: tuple[str, ...]):
    """For a module's ``__getattr__``: ``name``, which moved out of ``module`` into one of ``homes``
    (with a DeprecationWarning); AttributeError when none has it."""
    for home in homes:
        target = importlib.import_module(home)
        if hasattr(target, name):
            warnings.warn(f"{module}.{name} has moved to {home}; the old path will be removed in the next release",
                          DeprecationWarning, stacklevel=3)
            return getattr(target, name)
    raise AttributeError(f"module {module!r} has no attribute {name!r}")


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _Moved) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Moved())

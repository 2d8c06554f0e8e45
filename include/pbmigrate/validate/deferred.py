"""Modules imported on their first use instead of at import time.

GX imports `scipy.stats` and `altair` at the top of one expectation's module (the KL divergence:
its metric and its chart), which validation never builds; they were 0.7-0.9 s of GX's 1.5-2.3 s
import, on the validation task's critical path. A deferred module is a stand-in in `sys.modules`
that imports the real one the moment any of its attributes is read, so code that does use it works
unchanged, and only pays then.

`importlib.util.LazyLoader` is not enough: `import altair as alt` reads the module's `__spec__`,
which makes a lazy module load at once. The stand-in has no spec, so the import system takes it as
loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

_lock = threading.RLock()  # re-entered if the real module's own import reads the stand-in


class Deferred(types.ModuleType):
    """Stands in for a module until an attribute is read; then the real module replaces it."""

    def __getattr__(self, attr: str) -> object:  # only for attributes the stand-in lacks: all of them
        return getattr(load(self.__name__), attr)


def load(name: str) -> types.ModuleType:
    """The real module behind a stand-in (imported once, under a lock: GX is imported in a thread)."""
    with _lock:
        module = sys.modules.get(name)
        if isinstance(module, Deferred):
            del sys.modules[name]
            module = importlib.import_module(name)  # sets the parent package's attribute to it too
        return module if module is not None else importlib.import_module(name)


def defer(name: str) -> bool:
    """Put a stand-in for `name` in `sys.modules` unless it is imported already (or not installed).
    Its parent package is imported for real (for `scipy.stats`, `scipy` alone is cheap) and points at
    the stand-in, so `from scipy import stats` finds it too. Returns whether a stand-in was put."""
    with _lock:
        if name in sys.modules:
            return False
        parent, _, child = name.rpartition(".")
        if parent:
            package = importlib.import_module(parent)
            if child in vars(package):  # not hasattr: scipy's module __getattr__ would import it
                return False
        if importlib.util.find_spec(name) is None:
            return False
        stand_in = Deferred(name)
        sys.modules[name] = stand_in
        if parent:
            setattr(package, child, stand_in)
        return True

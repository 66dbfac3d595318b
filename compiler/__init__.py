"""kiln: a graph compiler and model converter for transformer language models.

The public API is loaded lazily so that ``import kiln.runtime`` on a deployment box pulls in
nothing heavy (no onnx, no tvm, no frontends).
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "compile": ("kiln.driver", "compile"),
    "convert": ("kiln.driver", "convert"),
    "load_model": ("kiln.driver", "load_model"),
    "KilnError": ("kiln.errors", "KilnError"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))

"""compressor: compress trained PyTorch models for edge deployment.

The public API, re-exported here and nothing else. Names resolve on first use
(PEP 562 module `__getattr__`), so `import compressor` and the CLI's `--help` do not pay
for torch, scikit-learn or onnx until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> (module, attribute in it)
_EXPORTS = {
    "Budget": ("compressor.budget", "Budget"),
    "parse_budget": ("compressor.budget", "parse_budget"),
    "parse_sparsity": ("compressor.budget", "parse_sparsity"),
    "Data": ("compressor.data", "Data"),
    "load_data": ("compressor.data", "load_data"),
    "CompressorError": ("compressor.errors", "CompressorError"),
    "CompressorWarning": ("compressor.errors", "CompressorWarning"),
    "InputError": ("compressor.errors", "InputError"),
    "TargetNotReachedError": ("compressor.errors", "TargetNotReachedError"),
    "load_model": ("compressor.io", "load_model"),
    "save_model": ("compressor.io", "save_model"),
    "Method": ("compressor.methods", "Method"),
    "MethodConfig": ("compressor.methods", "MethodConfig"),
    "Result": ("compressor.methods", "Result"),
    "get_method": ("compressor.methods", "get_method"),
    "list_methods": ("compressor.methods", "list_methods"),
    "prune": ("compressor.methods", "prune"),
    "register_method": ("compressor.methods", "register_method"),
    "measure": ("compressor.stats", "measure"),
    "build_model": ("compressor.zoo", "build"),
    "list_archs": ("compressor.zoo", "list_archs"),
}

__all__ = [
    "Budget",
    "CompressorError",
    "CompressorWarning",
    "Data",
    "InputError",
    "Method",
    "MethodConfig",
    "Result",
    "TargetNotReachedError",
    "build_model",
    "get_method",
    "list_archs",
    "list_methods",
    "load_data",
    "load_model",
    "measure",
    "parse_budget",
    "parse_sparsity",
    "prune",
    "register_method",
    "save_model",
]

if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from compressor.budget import Budget, parse_budget, parse_sparsity
    from compressor.data import Data, load_data
    from compressor.errors import (
        CompressorError,
        CompressorWarning,
        InputError,
        TargetNotReachedError,
    )
    from compressor.io import load_model, save_model
    from compressor.methods import (
        Method,
        MethodConfig,
        Result,
        get_method,
        list_methods,
        prune,
        register_method,
    )
    from compressor.stats import measure
    from compressor.zoo import build as build_model
    from compressor.zoo import list_archs


def __getattr__(name: str):
    """Imports the module behind a public name on first access and caches the attribute."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'compressor' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

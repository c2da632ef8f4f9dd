"""Compression methods; importing this package registers the built-in ones."""

import importlib
import pkgutil

from compressor.methods.base import (
    METHODS,
    MaskMethod,
    Method,
    MethodConfig,
    Result,
    get_method,
    list_methods,
    register_method,
)
from compressor.methods.driver import prune

__all__ = [
    "METHODS",
    "MaskMethod",
    "Method",
    "MethodConfig",
    "Result",
    "get_method",
    "list_methods",
    "prune",
    "register_method",
]


def _register_builtin() -> None:
    """Imports every module of this package so its @register_method classes register."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "driver"):
            importlib.import_module(f"{__name__}.{info.name}")


_register_builtin()

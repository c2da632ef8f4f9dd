"""compressor: compress trained PyTorch models for edge deployment.

The public API, re-exported here and nothing else.
"""

from compressor.budget import Budget, parse_budget, parse_sparsity
from compressor.data import Data, load_data
from compressor.errors import CompressorError, CompressorWarning, InputError, TargetNotReachedError
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

__version__ = "0.1.0"

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

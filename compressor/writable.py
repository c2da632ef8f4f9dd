"""Refuse an output format the model cannot be written in before any work is done.

`compress prune` writes a `.pt2` (torch.export) unless told otherwise. A model torch.export
cannot capture (data-dependent Python control flow) would fail only at the very end, after
training; one trial capture at the start costs seconds and says which path works instead.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from compressor.errors import CompressorError, InputError, first_line
from compressor.io import STATE_DICT_SUFFIXES, export_program


def check_savable(
    model: nn.Module, path: str | Path, example_inputs: tuple, model_format: str = ""
) -> None:
    """Raises unless `model` can be saved at `path` by `compressor.io.save_model`.

    A state_dict path (.safetensors, .pt, .pth) always can; a `.pt2` needs torch.export to
    capture the model, tried here once (a model read from a .pt2, `model_format == "pt2"`,
    was captured already). Leaves `model`'s train/eval flags as they were.

    Raises:
        InputError: torch.export cannot capture the model; names why and the fix.
    """
    path = Path(path)
    if path.suffix in STATE_DICT_SUFFIXES or model_format == "pt2":
        return
    flags = [(m, m.training) for m in model.modules()]
    try:
        with torch.no_grad(), _silenced():
            export_program(model, tuple(example_inputs))
    except CompressorError as exc:
        reason = first_line(exc.__cause__ or exc)
        raise InputError(
            f"cannot write {str(path)!r}: torch.export cannot capture {type(model).__name__} "
            f"({reason}); use -o {path.with_suffix('.safetensors')} to save its weights "
            "instead (load them back with --arch)"
        ) from exc
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Swallows what a failed capture prints and logs (the whole graph, as a warning)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield

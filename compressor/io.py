"""Loading and saving models in every format DESIGN.md accepts.

The format is read from the file's content, never its extension: `model.pt` holding an
ExportedProgram loads as one. Writes are atomic (temporary file + rename) and never
touch the file a model was loaded from.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compressor import zoo
from compressor.errors import CompressorError, InputError, first_line
from compressor.lift import lift
from compressor.meta import META_FILE, META_FORMAT, META_VERSION, parse_meta
from compressor.pt2_check import check_program_targets, check_pt2_archive
from compressor.static_batch import check_any_batch
from compressor.user_code import call_spec

STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth")
TO_PT2_HINT = (
    "in Python: torch.export.save(torch.export.export(model.eval(), (example_input,), "
    "dynamic_shapes=({0: torch.export.Dim(\"batch\")},)), 'model.pt2'), "
    "or save model.state_dict() and pass --arch"
)


@dataclass
class Loaded:
    """A model read from disk, with what we know about it."""

    model: nn.Module
    format: str
    input_shape: tuple[int, ...] | None = None
    report: dict | None = None
    meta: dict = field(default_factory=dict)


def detect_format(path: str | Path) -> str:
    """Names the model format held in `path`: pt2, torchscript, torch-save, safetensors, onnx.

    Raises:
        InputError: missing, unreadable or unrecognised file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file {str(path)!r} does not exist")
    with path.open("rb") as handle:
        head = handle.read(16)
    if zipfile.is_zipfile(path):
        return _zip_format(path)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "torch-save"  # legacy (non-zip) torch.save pickle
    if head[:1] == b"\x08":
        return "onnx"
    raise InputError(
        f"{str(path)!r} is not a model file compressor can read (not a .pt2, state_dict, "
        "safetensors or pickled module); it may be corrupt or truncated"
    )


def _zip_format(path: Path) -> str:
    try:
        names = zipfile.ZipFile(path).namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{str(path)!r} is a corrupt archive: {exc}") from None
    if any(name.endswith("/archive_format") for name in names):
        return "pt2"
    if any("/code/" in name for name in names) or any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(name.endswith("data.pkl") for name in names):
        return "torch-save"
    raise InputError(f"{str(path)!r} is a zip archive but not a PyTorch model")


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
) -> Loaded:
    """Loads a model from any supported format (see DESIGN.md "Models in and out").

    Args:
        path: the model file.
        arch: zoo name or `package.module:factory`, needed for state_dicts.
        trust_pickle: allow what runs code from the file: unpickling a whole module, or
            the pickled entries and Python calls of a .pt2 (refused without it).
        input_shape: per-sample input shape, used to build zoo models for their data.
        num_classes: classes of the data, when known (else read from the weights).

    Raises:
        InputError: the file cannot be used as given; the message names the fix.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "pt2":
        return _load_pt2(path, trust_pickle)
    if fmt == "torchscript":
        raise InputError(
            f"{str(path)!r} is a TorchScript archive, which compressor cannot prune; "
            f"export the model instead: {TO_PT2_HINT}"
        )
    if fmt == "onnx":
        raise InputError(f"{str(path)!r} is an ONNX model; ONNX input is not supported yet")
    if fmt == "safetensors":
        return _load_safetensors(path, arch, input_shape, num_classes)
    return _load_torch_save(path, arch, trust_pickle, input_shape, num_classes)


def _load_pt2(path: Path, trust_pickle: bool = False) -> Loaded:
    if not trust_pickle:
        check_pt2_archive(path)
    extra = {META_FILE: ""}
    with warnings.catch_warnings():
        # torch's own deserialiser trips its LeafSpec deprecation; not the user's concern
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")
        try:
            program = torch.export.load(str(path), extra_files=extra)
        except Exception as exc:  # torch raises many types for a damaged archive
            first = first_line(exc)
            raise InputError(f"{str(path)!r} is a damaged .pt2 file: {first}") from None
        if not trust_pickle:
            check_program_targets(program, path)
        model = lift(program)
        check_any_batch(model, str(path), TO_PT2_HINT)
    meta = parse_meta(extra[META_FILE], path)
    shape = meta.get("input_shape") or _program_input_shape(program)
    model.input_shape = tuple(shape) if shape else None
    return Loaded(model, "pt2", model.input_shape, meta.get("report"), meta)


def _program_input_shape(program: torch.export.ExportedProgram) -> list[int] | None:
    for spec in program.graph_signature.input_specs:
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT:
            node = next(n for n in program.graph.nodes if n.name == spec.arg.name)
            val = node.meta.get("val")
            return [int(d) for d in val.shape[1:]] if val is not None else None
    return None


def _load_safetensors(path, arch, input_shape, num_classes) -> Loaded:
    """A state_dict file; the metadata save_model put in it gives its shape and report."""
    state, meta = _read_safetensors(path)
    recorded = meta.get("input_shape")
    shape = input_shape or (tuple(recorded) if recorded else None)
    loaded = _from_state_dict(state, path, arch, shape, num_classes)
    loaded.report = meta.get("report")
    return loaded


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), parse_meta(metadata.get(META_FILE), path)
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{str(path)!r} is a damaged safetensors file: {exc}") from None


def _load_torch_save(path, arch, trust_pickle, input_shape, num_classes) -> Loaded:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise InputError(
                f"{str(path)!r} holds a pickled Python object, and loading it would run code "
                "from the file; pass --trust-pickle if you trust it, or give a .pt2 / "
                f"state_dict ({TO_PT2_HINT})"
            ) from None
        obj = _unpickle(path, exc)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise InputError(f"{str(path)!r} is a damaged PyTorch file: {exc}") from None
    if isinstance(obj, nn.Module):
        return Loaded(obj, "pickle", getattr(obj, "input_shape", None) or input_shape)
    state = _unwrap_state_dict(obj, path)
    return _from_state_dict(state, path, arch, input_shape, num_classes)


def _unpickle(path: Path, first_error: Exception) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # arbitrary code ran; report whatever it raised
        raise InputError(f"could not unpickle {str(path)!r}: {exc}") from None


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise InputError(f"{str(path)!r} holds no state_dict of tensors ({type(obj).__name__})")


def _from_state_dict(state, path, arch, input_shape, num_classes) -> Loaded:
    if arch is None:
        raise InputError(
            f"{str(path)!r} holds weights only (a state_dict); say which model they belong "
            f"to with --arch NAME (one of: {', '.join(zoo.list_archs())}) or "
            "--arch package.module:factory"
        )
    model = build_arch(arch, state, input_shape, num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise InputError(
            f"the weights in {str(path)!r} do not fit --arch {arch}: {detail}"
        ) from None
    return Loaded(model, "state_dict", getattr(model, "input_shape", None), None, {"arch": arch})


def build_arch(
    arch: str,
    state: dict[str, torch.Tensor] | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
) -> nn.Module:
    """Builds `arch` (zoo name or `package.module:factory`) sized for its weights and data."""
    if ":" in arch:
        return _call_factory(arch)
    size = tuple(input_shape[1:]) if input_shape is not None and len(input_shape) == 3 else 28
    probe = zoo.build(arch, in_channels=input_shape[0] if input_shape else 1, input_size=size)
    in_channels, classes = _infer_io(probe, state or {})
    if input_shape is not None:
        in_channels = input_shape[0]
    return zoo.build(
        arch, in_channels=in_channels, num_classes=num_classes or classes, input_size=size
    )


def _infer_io(probe: nn.Module, state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Input channels and classes read off the weights of the probe's first and last layer.

    Uses the probe model's own layer order: a state_dict's key order is not reliable
    (safetensors sorts its keys).
    """
    names = [n for n, p in probe.named_parameters() if n.endswith("weight") and p.dim() >= 2]
    first, last = state.get(names[0]), state.get(names[-1])
    in_channels = first.shape[1] if first is not None and first.dim() == 4 else 1
    classes = last.shape[0] if last is not None else 10
    return in_channels, classes


def _call_factory(spec: str) -> nn.Module:
    model = call_spec(spec, "--arch")
    if not isinstance(model, nn.Module):
        raise InputError(f"--arch {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when `a` and `b` name the same file (following links)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def atomic_write(path: str | Path, write: Callable[[str], None], *, protect: tuple = ()) -> Path:
    """Calls `write(tmp_path)` and renames the result onto `path`.

    A crash leaves either the old file or the new one, never half of one.

    Raises:
        InputError: `path` is one of the `protect`ed inputs, or cannot be written.
        CompressorError: writing failed for another reason (e.g. a full disk).
    """
    path = Path(path)
    for source in protect:
        if source is not None and same_file(path, source):
            raise InputError(
                f"output {str(path)!r} is the input file; choose another path with -o "
                "(compressor never overwrites its input)"
            )
    from compressor.paths import write_error

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
        )
    except OSError as exc:
        raise write_error(path, exc) from exc
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the user's usual mode
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):  # the user's path, not our temporary file's
            raise write_error(path, exc) from exc
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_program(model: nn.Module, example_inputs: tuple) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension, in eval mode.

    Raises:
        CompressorError: the model cannot be exported (e.g. data-dependent control flow).
    """
    model = model.eval()
    dynamic = tuple({0: torch.export.Dim.AUTO} for _ in example_inputs)
    try:
        return torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic)
    except Exception as exc:  # torch.export raises a zoo of error types
        first = first_line(exc)
        raise CompressorError(
            f"torch.export could not capture {type(model).__name__}: {first}; save its weights "
            "instead with an output path ending in .safetensors"
        ) from exc


def save_model(
    model: nn.Module,
    path: str | Path,
    *,
    example_inputs: tuple,
    report: dict | None = None,
    protect: tuple = (),
) -> Path:
    """Saves `model` as a `.pt2` with the report embedded, or as a state_dict.

    A path ending in .safetensors/.pt/.pth writes the state_dict (for models torch.export
    cannot capture); the report then goes into the safetensors metadata or a dict entry.
    """
    path = Path(path)
    # torch.export.save writes a tensor's whole storage: never let a view of a dataset in
    example_inputs = tuple(x.detach().clone() for x in example_inputs)
    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "input_shape": list(example_inputs[0].shape[1:]),
        "report": report,
    }
    if path.suffix in STATE_DICT_SUFFIXES:
        return atomic_write(
            path, lambda tmp: _write_state_dict(model, tmp, path, meta), protect=protect
        )
    program = export_program(model, example_inputs)
    extra = {META_FILE: json.dumps(meta, default=_json_default)}
    return atomic_write(
        path, lambda tmp: torch.export.save(program, tmp, extra_files=extra), protect=protect
    )


def _write_state_dict(model: nn.Module, tmp: str, path: Path, meta: dict) -> None:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, tmp, metadata={META_FILE: json.dumps(meta, default=_json_default)})
    else:
        torch.save(state, tmp)


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__} in a report")

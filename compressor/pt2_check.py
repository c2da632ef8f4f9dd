"""Vet a `.pt2` archive before torch reads it: nothing in it may unpickle or run code.

`torch.export.load` unpickles (`torch.load(weights_only=False)`, `pickle.loads`,
`torch._C._pickle_load_obj`) every weight or constant the archive's own JSON marks as
pickled, custom and opaque constants, and any torch.save payload (sample inputs, legacy
weights) that a weights-only load refuses; it loads AOTInductor shared libraries, falls
back to an older zip layout when the current one fails, and resolves graph node targets
by name, including any callable under `torch`. So the check is an allow-list: an entry
passes only when it is known to be read as raw tensor bytes, JSON, text, or a payload that
loads with `weights_only=True`; everything else is refused, named, unless the user passes
`--trust-pickle`. Graph targets are vetted after loading, before anything runs.
"""

from __future__ import annotations

import io
import json
import math
import operator
import re
import warnings
import zipfile
from pathlib import Path

import torch

from compressor.errors import InputError

# records torch.export.save writes that are read as short strings or never read
_PLAIN_RECORDS = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
}
_MODEL_JSON = re.compile(r"^models/([^/]+)\.json$")
_CONFIG = re.compile(r"^data/(weights|constants)/([^/]+)_(weights|constants)_config\.json$")
# torch.save payloads torch reads with weights_only=True, falling back to unpickling
_ARTIFACT = re.compile(r"^data/(sample_inputs|weights|constants)/[^/]+\.pt$")
_RAW_PREFIX = {"weights": "weight_", "constants": "tensor_"}
_MAX_NAMED = 5
# operator / math functions a program may call; operator.call, methodcaller and friends
# would let a graph call anything, so the list is explicit
_OPERATOR_TARGETS = {
    getattr(operator, name)
    for name in [
        "getitem",
        "add",
        "sub",
        "mul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "neg",
        "pos",
        "abs",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "and_",
        "or_",
        "xor",
        "not_",
        "invert",
        "lshift",
        "rshift",
        "truth",
    ]
}
_TORCH_SYM_TARGETS = {
    torch.sym_not,
    torch.sym_int,
    torch.sym_float,
    torch.sym_ite,
    torch.sym_max,
    torch.sym_min,
    torch.sym_sqrt,
}


def check_pt2_archive(path: Path) -> None:
    """Refuses `path` unless torch can load it without unpickling anything.

    Raises:
        InputError: an entry would be unpickled or cannot be classified (named in the
            message, with `--trust-pickle`), or the archive is damaged.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            problems = _archive_problems(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{str(path)!r} is a damaged .pt2 file: {exc}") from None
    except _Damaged as exc:
        raise InputError(f"{str(path)!r} is a damaged .pt2 file: {exc}") from None
    if problems:
        raise InputError(_refusal(path, problems))


def check_program_targets(program: torch.export.ExportedProgram, path: Path) -> None:
    """Refuses a loaded program whose graph calls anything but operators and arithmetic.

    Raises:
        InputError: a node calls a Python function (named, with `--trust-pickle`).
    """
    problems = []
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
            if not _safe_node(node):
                problems.append(f"graph node {node.name!r} (calls {node.target!r})")
    if problems:
        raise InputError(_refusal(path, problems))


class _Damaged(Exception):
    """An entry torch would parse is malformed."""


def _refusal(path: Path, problems: list[str]) -> str:
    named = "; ".join(problems[:_MAX_NAMED])
    more = f"; and {len(problems) - _MAX_NAMED} more" if len(problems) > _MAX_NAMED else ""
    return (
        f"{str(path)!r} holds entries whose loading could run code from the file: "
        f"{named}{more}; pass --trust-pickle only if you trust the file"
    )


def _safe_node(node: torch.fx.Node) -> bool:
    if node.op in ("placeholder", "output", "get_attr"):
        return True
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return True
    if target in _OPERATOR_TARGETS or target in _TORCH_SYM_TARGETS:
        return True
    return getattr(math, getattr(target, "__name__", ""), None) is target


def _archive_problems(archive: zipfile.ZipFile) -> list[str]:
    names = archive.namelist()
    if len(set(names)) != len(names):
        return ["duplicate entry names (readers disagree on which one counts)"]
    root = names[0].split("/", 1)[0] if names and "/" in names[0] else ""
    problems, raw = [], {}
    for name in names:
        if not root or not name.startswith(root + "/"):
            problems.append(f"{name} (outside the archive's folder)")
            continue
        rel = name[len(root) + 1 :]
        match = _CONFIG.match(rel)
        if match and match.group(1) == match.group(3):
            problems += _config_problems(archive, name, match.group(1), raw)
    named = {problem.split(" (", 1)[0] for problem in problems}
    for name in names:
        rel = name[len(root) + 1 :] if root and name.startswith(root + "/") else None
        if rel is not None and name not in named and not _entry_ok(archive, name, rel, raw):
            problems.append(f"{name} (not an entry compressor can vet)")
    return problems


def _entry_ok(archive: zipfile.ZipFile, name: str, rel: str, raw: dict) -> bool:
    if rel in _PLAIN_RECORDS or rel.endswith("/") or rel.startswith("extra/"):
        return True
    if _MODEL_JSON.match(rel) or _CONFIG.match(rel) or rel in raw:
        return True
    if _ARTIFACT.match(rel):
        return _loads_weights_only(archive.read(name))
    return False


def _config_problems(archive: zipfile.ZipFile, name: str, kind: str, raw: dict) -> list[str]:
    """Problems of one weights/constants config; records its raw tensor files in `raw`."""
    base = name.rsplit("/", 1)[0]
    try:
        config = json.loads(archive.read(name))["config"]
        items = list(config.items())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _Damaged(f"{name} is not a payload config ({exc})") from None
    problems = []
    for fqn, entry in items:
        path_name = entry.get("path_name") if isinstance(entry, dict) else None
        if not isinstance(path_name, str):
            raise _Damaged(f"{name}: entry {fqn!r} has no path_name")
        plain = (
            path_name.startswith(_RAW_PREFIX[kind])
            and entry.get("use_pickle") is False
            and isinstance(entry.get("tensor_meta"), dict)
        )
        if plain:
            raw[f"data/{kind}/{path_name}"] = fqn
        else:
            what = "pickled" if entry.get("use_pickle") else "a pickled object"
            problems.append(f"{base}/{path_name} ({kind[:-1]} {fqn!r}, {what})")
    return problems


def _loads_weights_only(payload: bytes) -> bool:
    """True when torch's weights-only unpickler accepts `payload`, so torch never falls back."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the unpickler's protocol notice
            torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception:  # any refusal means torch would retry with weights_only=False
        return False
    return True

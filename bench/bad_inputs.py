"""Bad inputs a new user or an attacker would try: exit code, the one line, inputs kept.

Every case runs `compress` in a subprocess (the way a user would), in one scratch folder
holding a trained LeNet-5 and the files crafted from it. A case passes when the exit code
is the expected one, the message is one `Error:` line without "internal error", no file
that existed before the case changed (sha256), and no planted payload ran.

    .venv/bin/python -m bench.bad_inputs            # table into bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.common import markdown_table, write_section

ROOT = Path(__file__).resolve().parents[1]
MARKER = "payload-ran"


@dataclass
class Case:
    name: str
    argv: list[str]
    expect: int
    setup: Callable[[Path], None] | None = None
    extra: dict = field(default_factory=dict)


class _Payload:
    """Unpickling this writes a marker file: proof that code from the archive ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _digest_dir(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _rezip(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    """Copies a zip archive, passing each entry through `edit` (None drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)


def _pickled_weight(folder: Path) -> None:
    marker = str(folder / MARKER)

    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("weights/model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("weights/weight_0"):
            buffer = io.BytesIO()
            torch.save(_Payload(marker), buffer)
            return buffer.getvalue()
        return data

    _rezip(folder / "dense.pt2", folder / "evil-weight.pt2", edit)


def _pickled_sample_inputs(folder: Path) -> None:
    marker = str(folder / MARKER)

    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("sample_inputs/model.pt"):
            buffer = io.BytesIO()
            torch.save(_Payload(marker), buffer)
            return buffer.getvalue()
        return data

    _rezip(folder / "dense.pt2", folder / "evil-inputs.pt2", edit)


def _damaged_meta(text: bytes, name: str) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        def edit(entry: str, data: bytes) -> bytes:
            return text if entry.endswith("extra/compressor.json") else data

        _rezip(folder / "dense.pt2", folder / name, edit)

    return setup


def _npz(name: str, **arrays) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        np.savez(folder / name, **arrays)

    return setup


def _bytes(name: str, data: bytes) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        (folder / name).write_bytes(data)

    return setup


def _huge_npz(folder: Path) -> None:
    """An .npz whose x declares 2**40 floats in a few hundred bytes."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1048576, 1, 1024, 1024), }"
    header += " " * (118 - len(header)) + "\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64
    with zipfile.ZipFile(folder / "huge.npz", "w") as z:
        z.writestr("x.npy", npy)


def _images() -> dict:
    x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    return {"x": x, "y": np.arange(64) % 10}


def _with(**changes) -> dict:
    arrays = _images()
    for key, value in changes.items():
        arrays[key] = value(arrays[key].copy()) if callable(value) else value
    return arrays


def _nan(x):
    x[0, 0, 0, :3] = np.nan
    return x


def _inf(x):
    x[1, 0, 0, 0] = np.inf
    return x


def cases() -> list[Case]:
    """The list: inputs a user gets wrong, and files an attacker crafts."""
    p = ["prune", "dense.pt2", "--method", "magnitude-global"]
    s = [*p, "--sparsity", "0.5"]
    return [
        Case("model file missing", ["info", "missing.pt2"], 2),
        Case("model file empty", ["info", "empty.pt2"], 2, _bytes("empty.pt2", b"")),
        Case("model random bytes", ["info", "noise.pt2"], 2, _bytes("noise.pt2", os.urandom(4096))),
        Case("model is a folder", ["info", "."], 2),
        Case("truncated .pt2", ["info", "cut.pt2"], 2, lambda f: _cut(f, "dense.pt2", "cut.pt2")),
        Case("zip that is not a .pt2", ["info", "plain.zip"], 2, _plain_zip),
        Case(".pt2 with a pickled weight", ["info", "evil-weight.pt2"], 2, _pickled_weight),
        Case(
            ".pt2 with pickled sample inputs",
            ["info", "evil-inputs.pt2"],
            2,
            _pickled_sample_inputs,
        ),
        Case(
            ".pt2 pickled weight, prune",
            [*s, "--data", "digits"],
            2,
            _pickled_weight,
            {"model": "evil-weight.pt2"},
        ),
        Case(
            ".pt2 pickled weight, export",
            ["export", "evil-weight.pt2", "--format", "onnx", "-o", "e.onnx"],
            2,
            _pickled_weight,
        ),
        Case(
            "metadata not JSON",
            ["info", "badmeta.pt2"],
            2,
            _damaged_meta(b"{not json", "badmeta.pt2"),
        ),
        Case(
            "metadata wrong type",
            ["info", "listmeta.pt2"],
            2,
            _damaged_meta(b'{"report": [1, 2], "input_shape": "x"}', "listmeta.pt2"),
        ),
        Case("pickled module without flag", ["info", "module.pt"], 2),
        Case("TorchScript file", ["info", "script.pt"], 2),
        Case("state_dict without --arch", ["info", "weights.pt"], 2),
        Case("state_dict, unknown --arch", ["info", "weights.pt", "--arch", "nonet"], 2),
        Case(
            "state_dict, wrong --arch",
            ["info", "weights.pt", "--arch", "resnet20", "--data", "digits"],
            2,
        ),
        Case("--arch module missing", ["info", "weights.pt", "--arch", "nomod_xyz:build"], 2),
        Case(
            "--arch factory missing",
            ["info", "weights.pt", "--arch", "json:no_such_factory"],
            2,
        ),
        Case(
            "safetensors bad header",
            ["info", "bad.safetensors", "--arch", "lenet5"],
            2,
            _bytes("bad.safetensors", struct.pack("<Q", 1 << 40) + b"{}"),
        ),
        Case("--data unknown", [*s, "--data", "cifar1000"], 2),
        Case("--data .npz missing", [*s, "--data", "nothere.npz"], 2),
        Case(
            "--data .npz without x", [*s, "--data", "nox.npz"], 2, _npz("nox.npz", y=np.arange(4))
        ),
        Case("--data NaN inputs", [*s, "--data", "nan.npz"], 2, _npz("nan.npz", **_with(x=_nan))),
        Case("--data Inf inputs", [*s, "--data", "inf.npz"], 2, _npz("inf.npz", **_with(x=_inf))),
        Case(
            "--data labels out of range",
            [*s, "--data", "labels.npz"],
            2,
            _npz("labels.npz", **_with(y=lambda y: y + 20)),
        ),
        Case(
            "--data wrong input shape",
            [*s, "--data", "shape.npz"],
            2,
            _npz("shape.npz", x=np.zeros((8, 3, 5, 5), np.float32), y=np.zeros(8, np.int64)),
        ),
        Case("--data .npz declaring 4 TiB", [*s, "--data", "huge.npz"], 2, _huge_npz),
        Case("--data module missing", [*s, "--data", "nomod_xyz:load"], 2),
        Case("--data fashion-mnist bad dir", [*s, "--data", "fashion-mnist:/nonexistent"], 2),
        Case(
            "eval unlabelled data",
            ["eval", "dense.pt2", "--data", "unl.npz"],
            2,
            _npz("unl.npz", x=_images()["x"]),
        ),
        Case("--budget 0x", [*p, "--budget", "0x", "--data", "digits"], 2),
        Case("--budget abc", [*p, "--budget", "abc", "--data", "digits"], 2),
        Case("--sparsity 1.5", [*p, "--sparsity", "1.5", "--data", "digits"], 2),
        Case("--sparsity -0.1", [*p, "--sparsity", "-0.1", "--data", "digits"], 2),
        Case("--budget and --sparsity", [*s, "--budget", "4x", "--data", "digits"], 2),
        Case("no budget", [*p, "--data", "digits"], 2),
        Case("unknown method", ["prune", "dense.pt2", "--method", "nope", "--sparsity", "0.5"], 2),
        Case("--set unknown key", [*s, "--set", "nokey=1", "--data", "digits"], 2),
        Case(
            "--set wrong type",
            [
                "prune",
                "dense.pt2",
                "--method",
                "gmp",
                "--sparsity",
                "0.5",
                "--set",
                "epochs=abc",
                "--data",
                "digits",
            ],
            2,
        ),
        Case("option of another method", [*s, "--residual", "mixed", "--data", "digits"], 2),
        Case("-o is the input", [*s, "--data", "digits", "-o", "dense.pt2"], 2),
        Case("--report is -o", [*s, "--data", "digits", "-o", "o.pt2", "--report", "o.pt2"], 2),
        Case(
            "--report is the input",
            [*s, "--data", "digits", "-o", "o.pt2", "--report", "dense.pt2"],
            2,
        ),
        Case(
            "--checkpoint is --report",
            [
                "prune",
                "dense.pt2",
                "--method",
                "gmp",
                "--sparsity",
                "0.5",
                "--data",
                "digits",
                "-o",
                "o.pt2",
                "--report",
                "c.ckpt",
                "--checkpoint",
                "c.ckpt",
            ],
            2,
        ),
        Case(
            "-o in a missing folder (created)",
            [*s, "--data", "digits", "-o", "nodir/o.pt2"],
            0,
        ),
        Case("-o under a file", [*s, "--data", "digits", "-o", "dense.pt2/o.pt2"], 2),
        Case(
            "--report under a file",
            [*s, "--data", "digits", "-o", "o2.pt2", "--report", "dense.pt2/r.json"],
            2,
        ),
        Case(
            "--resume missing",
            [
                "prune",
                "dense.pt2",
                "--method",
                "gmp",
                "--sparsity",
                "0.5",
                "--data",
                "digits",
                "--resume",
                "none.ckpt",
            ],
            2,
        ),
        Case(
            "--resume damaged",
            [
                "prune",
                "dense.pt2",
                "--method",
                "gmp",
                "--sparsity",
                "0.5",
                "--data",
                "digits",
                "--resume",
                "bad.ckpt",
            ],
            2,
            _bytes("bad.ckpt", b"PK\x03\x04garbage"),
        ),
        Case(
            "export over an existing file",
            ["export", "dense.pt2", "--format", "onnx", "-o", "exists.onnx"],
            2,
            _bytes("exists.onnx", b"keep me"),
        ),
        Case(
            "export csr with --opset",
            ["export", "dense.pt2", "--format", "csr", "--opset", "13"],
            2,
        ),
        Case("export --block 0x4", ["export", "dense.pt2", "--format", "csr", "--block", "0x4"], 2),
        Case(
            "export --block huge",
            [
                "export",
                "dense.pt2",
                "--format",
                "csr",
                "--block",
                "100000x100000",
                "-o",
                "big.csr.safetensors",
            ],
            2,
        ),
        Case(
            "export -o under a file",
            ["export", "dense.pt2", "--format", "onnx", "-o", "dense.pt2/x.onnx"],
            2,
        ),
        Case(
            "export -o is the input",
            ["export", "dense.pt2", "--format", "onnx", "-o", "dense.pt2", "--force"],
            2,
        ),
        Case(
            "info bad --input-shape",
            ["info", "weights.pt", "--arch", "lenet5", "--input-shape", "1xx8"],
            2,
        ),
        Case(
            "train unlabelled data",
            ["train", "--arch", "lenet5", "--data", "unl.npz", "-o", "t.pt2"],
            2,
            _npz("unl.npz", x=_images()["x"]),
        ),
        Case(
            "train unknown arch", ["train", "--arch", "nonet", "--data", "digits", "-o", "t.pt2"], 2
        ),
        Case(
            "train -o under a file",
            [
                "train",
                "--arch",
                "lenet5",
                "--data",
                "digits",
                "--epochs",
                "1",
                "-o",
                "dense.pt2/t.pt2",
            ],
            2,
        ),
    ]


def _cut(folder: Path, src: str, dst: str) -> None:
    data = (folder / src).read_bytes()
    (folder / dst).write_bytes(data[: len(data) // 2])


def _plain_zip(folder: Path) -> None:
    with zipfile.ZipFile(folder / "plain.zip", "w") as z:
        z.writestr("readme.txt", "hello")


def make_models(folder: Path) -> None:
    """A trained LeNet-5 on digits, as .pt2, state_dict, pickled module and TorchScript."""
    from compressor import zoo
    from compressor.data import load_data
    from compressor.io import save_model
    from compressor.train import train_dense

    torch.manual_seed(0)
    data = load_data("digits", seed=0)
    model = zoo.build("lenet5", in_channels=1, num_classes=10, input_size=8)
    train_dense(model, data.train, epochs=1)
    model.eval()
    save_model(
        model,
        folder / "dense.pt2",
        example_inputs=(data.sample_inputs(2),),
        report={"method": "dense"},
    )
    torch.save(model.state_dict(), folder / "weights.pt")
    torch.save(model, folder / "module.pt")
    torch.jit.trace(model, data.sample_inputs(2)).save(str(folder / "script.pt"))


def run_case(case: Case, folder: Path) -> dict:
    if case.setup is not None:
        case.setup(folder)
    argv = list(case.argv)
    if "model" in case.extra:
        argv[1] = case.extra["model"]
    before = _digest_dir(folder)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", *argv],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.perf_counter() - start
    after = _digest_dir(folder)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    message = errors[-1] if errors else (proc.stderr.strip().splitlines() or [""])[-1]
    ran = (folder / MARKER).exists()
    ok = (
        proc.returncode == case.expect
        and not changed
        and not ran
        and "internal error" not in proc.stderr
        and "Traceback" not in proc.stderr
    )
    return {
        "case": case.name,
        "exit": proc.returncode,
        "expected": case.expect,
        "ok": "yes" if ok else "**NO**",
        "inputs kept": "yes" if not changed else "changed: " + ", ".join(changed),
        "payload ran": "**yes**" if ran else "no",
        "s": f"{seconds:.1f}",
        "message": message.replace("|", "\\|")[:220],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", help="Run the cases whose name contains this text.")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        make_models(base)
        for case in cases():
            if args.only and args.only not in case.name:
                continue
            folder = Path(tmp) / f"case{len(rows)}"
            subprocess.run(["cp", "-r", str(base), str(folder)], check=True)
            rows.append(run_case(case, folder))
            print(f"{rows[-1]['ok']:>6} {rows[-1]['exit']} {case.name}: {rows[-1]['message']}")
    passed = sum(row["ok"] == "yes" for row in rows)
    table = markdown_table(
        rows, ["case", "exit", "expected", "ok", "inputs kept", "payload ran", "message"]
    )
    if not args.only:
        write_section(
            "bad-inputs",
            "## Bad inputs (issue: trust)\n\n"
            f"Command: `.venv/bin/python -m bench.bad_inputs`. {passed} of {len(rows)} cases pass "
            "(expected exit code, one `Error:` line, no internal error or traceback, every file "
            "that existed before the case byte-identical, no planted payload ran).\n\n" + table,
        )
    print(f"{passed} of {len(rows)} cases pass")


if __name__ == "__main__":
    main()

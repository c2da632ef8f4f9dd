"""The "Users' models" matrix: every model class x every method x both export formats.

For each class of model users bring (the test models of tests/models.py, shaped like the
public architectures they stand for), every registered method (and structured GSS) prunes
it on digits at half its budget with the method's smoke settings, then the result is
exported to ONNX (verified in onnxruntime) and to a CSR pack (read back, run). A cell is
OK, or the one line of the error the CLI would print (exit 2 for bad input).

    .venv/bin/python -m bench.model_classes       # table into bench/RESULTS.md
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import markdown_table, write_section
from compressor.budget import Budget
from compressor.data import load_data
from compressor.errors import CompressorError, InputError
from compressor.io import load_model
from compressor.methods import get_method, list_methods, prune
from exporters.csr import export_csr
from exporters.onnx import export_onnx
from tests.models import ConvReluBnPool, FaceStage, ImageNetResNet18, ViewFlattenNet, onnx_mobile

RUNS = [(name, {}) for name in list_methods()] + [("gss", {"variant": "structure"})]


def _static_batch1(folder: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    program = torch.export.export(ViewFlattenNet().eval(), (torch.randn(1, 1, 8, 8),))
    torch.export.save(program, str(folder / "b1.pt2"))
    return load_model(folder / "b1.pt2").model


def _classes(folder: Path) -> dict:
    """name -> (model factory, input size)."""
    return {
        "multi-output (tuple, PReLU)": (lambda: FaceStage(), 8, 0.6),
        "multi-output (dict)": (lambda: FaceStage(as_dict=True), 8, 0.6),
        # 4 conv channels: FLOPs 0.5 is exactly 2 of them; 0.6 is not reachable
        "view-flatten .pt2 exported at batch 1": (lambda: _static_batch1(folder), 8, 0.5),
        "ImageNet-style ResNet-18 (max-pool stem)": (ImageNetResNet18, 32, 0.6),
        "conv-ReLU-BN-pool": (ConvReluBnPool, 16, 0.6),
        "GraphModule of custom op modules (onnx2torch-style)": (onnx_mobile, 8, 0.6),
    }


def _data(size: int, folder: Path):
    digits = load_data("digits", seed=0, limit=256)
    if size == 8:
        return digits
    x, y = map(torch.cat, zip(*digits.train, strict=True))
    path = folder / f"digits-{size}.pt"
    torch.save({"x": F.interpolate(x, size=size), "y": y}, path)
    return load_data(str(path), batch_size=32, seed=0)


def _budget(method: str, config: dict, keep: float) -> Budget:
    cls = get_method(method)
    if config.get("variant") != "structure" and cls.metrics[0] == "weights":
        return Budget("weights", 0.5)
    # the tiny test graphs cannot land within 0.5 % of every FLOPs target; volume where
    # the method offers it, FLOPs otherwise
    metric = "volume" if "volume" in cls.metrics and keep != 0.5 else "flops"
    return Budget(metric, keep)


def cell(make, data, method: str, config: dict, folder: Path, keep: float) -> tuple[str, ...]:
    """(prune, onnx, csr): OK or the error's one line."""
    torch.manual_seed(0)
    cls = get_method(method)
    try:
        result = prune(
            make().eval(),
            method,
            _budget(method, config, keep),
            data,
            seed=0,
            **cls.smoke_config,
            **config,
        )
    except CompressorError as exc:
        code = 2 if isinstance(exc, InputError) else 1
        return f"exit {code}: {str(exc).splitlines()[0][:160]}", "-", "-"
    x = data.sample_inputs(4)
    outcomes = ["OK"]
    for run in (
        lambda: export_onnx(result.model, folder / "m.onnx", (x,)),
        lambda: export_csr(result.model, folder / "m.csr.safetensors", (x,)),
    ):
        try:
            run()
            outcomes.append("OK")
        except CompressorError as exc:
            code = 2 if isinstance(exc, InputError) else 1
            outcomes.append(f"exit {code}: {str(exc).splitlines()[0][:160]}")
    return tuple(outcomes)


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, (make, size, keep) in _classes(folder).items():
            data = _data(size, folder)
            for method, config in RUNS:
                label = method + ("-structure" if config else "")
                prune_cell, onnx_cell, csr_cell = cell(make, data, method, config, folder, keep)
                rows.append(
                    {
                        "model class": name,
                        "method": label,
                        "prune": prune_cell,
                        "onnx": onnx_cell,
                        "csr": csr_cell,
                    }
                )
                print(f"{name} | {label} | {prune_cell} | {onnx_cell} | {csr_cell}", flush=True)
    ok = sum(r["prune"] == r["onnx"] == r["csr"] == "OK" for r in rows)
    write_section(
        "model-classes",
        "## Users' models: model class x method x export\n\n"
        "Command: `.venv/bin/python -m bench.model_classes` (digits, 256 images, each "
        "method's smoke settings; unstructured at 50 % sparsity, structured at 0.6 of the "
        "volume, or of the FLOPs where volume is not offered; the 4-channel view-flatten net "
        f"at 0.5 of the FLOPs, the only fraction its channels reach). {ok} of {len(rows)} cells "
        "prune, export to ONNX (verified in onnxruntime) and to CSR (read back, run) cleanly.\n\n"
        + markdown_table(rows, ["model class", "method", "prune", "onnx", "csr"]),
    )
    print(f"{ok} of {len(rows)} OK")


if __name__ == "__main__":
    main()

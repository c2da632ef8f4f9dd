"""Bytes on disk of a pruned model: our CSR pack against dense, scipy's npz and ONNX COO.

LeNet-5 and ResNet-20, trained briefly on a Fashion-MNIST subset (accuracy does not matter
for sizes), pruned with magnitude-global at 50 / 70 / 90 / 95 % sparsity. For each:

- dense: raw bytes of every state_dict tensor (fp32), no container;
- CSR fp32 / fp16 / int8: our pack's file size (block 1x1; weights packed CSR when that
  is smaller than dense, the rest dense);
- npz: the same CSR weights through `scipy.sparse.save_npz` (default, compressed) and
  uncompressed, one file per matrix, plus the same dense tensors' raw bytes;
- ONNX COO: `export_onnx(..., sparse_initializers=True)` (the whole graph);
- floor: the format's payload with zero overhead, computed from the weights, not from our
  file: for each CSR weight nnz x (4 + index bytes) + row_ptr bytes, plus the dense tensors.

Run: .venv/bin/python -m bench.export_size
"""

from __future__ import annotations

import os

# Small convs spin in OpenMP barriers when the 2 cores are shared; sizes do not depend on it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import io  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import scipy.sparse  # noqa: E402
import torch  # noqa: E402

from bench.common import dense_baseline, markdown_table, write_json, write_section  # noqa: E402
from compressor.masks import prunable_layers  # noqa: E402
from compressor.methods import prune  # noqa: E402
from exporters.csr import export_csr  # noqa: E402
from exporters.csr_format import DTYPES, index_dtype, view_of  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402

COMMAND = ".venv/bin/python -m bench.export_size"
DATA, LIMIT, EPOCHS = "fashion-mnist", 2000, 1
ARCHS = ("lenet5", "resnet20")
SPARSITIES = (0.5, 0.7, 0.9, 0.95)
COLUMNS = [
    "model",
    "sparsity",
    "dense fp32",
    "CSR fp32",
    "CSR fp16",
    "CSR int8",
    "npz",
    "npz (uncompressed)",
    "ONNX COO",
    "floor",
    "CSR fp32 / floor",
    "header",
    "CSR fp32 / npz",
    "CSR fp32 / ONNX COO",
    "CSR fp32 deflated",
]


def csr_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a pack stores as CSR: those whose fp32 CSR is smaller than dense."""
    state = model.state_dict()
    out = {}
    for fqn in prunable_layers(model):
        weight = state[f"{fqn}.weight"]
        if csr_floor(weight) < weight.numel() * 4:
            out[f"{fqn}.weight"] = weight
    return out


def csr_floor(weight: torch.Tensor) -> int:
    """nnz x (4 value bytes + index bytes) + row_ptr bytes (int32) of one weight."""
    rows, cols = view_of(tuple(weight.shape))
    index_bytes = DTYPES[index_dtype(cols)].itemsize
    return int(torch.count_nonzero(weight)) * (4 + index_bytes) + (rows + 1) * 4


def floor_bytes(model: torch.nn.Module) -> int:
    sparse = csr_weights(model)
    dense = sum(
        t.numel() * t.element_size() for k, t in model.state_dict().items() if k not in sparse
    )
    return dense + sum(csr_floor(w) for w in sparse.values())


def npz_bytes(model: torch.nn.Module, compressed: bool) -> int:
    sparse = csr_weights(model)
    total = sum(
        t.numel() * t.element_size() for k, t in model.state_dict().items() if k not in sparse
    )
    for weight in sparse.values():
        matrix = scipy.sparse.csr_matrix(weight.reshape(view_of(tuple(weight.shape))).numpy())
        buffer = io.BytesIO()
        scipy.sparse.save_npz(buffer, matrix, compressed=compressed)
        total += buffer.getbuffer().nbytes
    return total


def measure(arch: str, model: torch.nn.Module, sparsity: float, example, folder: Path) -> dict:
    dense = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    packs = {
        v: export_csr(model, folder / f"{v}.csr", example, values=v)
        for v in ("fp32", "fp16", "int8")
    }
    onnx = export_onnx(model, folder / "m.onnx", example, sparse_initializers=True)
    floor = floor_bytes(model)
    npz = npz_bytes(model, compressed=True)
    fp32 = packs["fp32"].size_bytes
    return {
        "model": arch,
        "sparsity": f"{sparsity:.0%}",
        "dense fp32": dense,
        "CSR fp32": fp32,
        "CSR fp16": packs["fp16"].size_bytes,
        "CSR int8": packs["int8"].size_bytes,
        "npz": npz,
        "npz (uncompressed)": npz_bytes(model, compressed=False),
        "ONNX COO": onnx.size_bytes,
        "floor": floor,
        "CSR fp32 / floor": f"{fp32 / floor:.3f}",
        "header": packs["fp32"].header_bytes,
        "CSR fp32 / npz": f"{fp32 / npz:.3f}",
        "CSR fp32 / ONNX COO": f"{fp32 / onnx.size_bytes:.3f}",
        # zlib at zip's default level: what the pack weighs under the compression npz uses
        "CSR fp32 deflated": len(zlib.compress(packs["fp32"].path.read_bytes(), 6)),
        "_payload_is_floor": fp32 - packs["fp32"].header_bytes == floor,
        "_entries": 3 * len(packs["fp32"].csr_tensors) + packs["fp32"].dense_tensors,
        "_checks": {
            "onnx_max_abs_diff": onnx.max_abs_diff,
            "onnx_tolerance": onnx.tolerance,
            "csr_fp32_exact": packs["fp32"].verification.exact_weights,
            "csr_fp32_output_diff": packs["fp32"].verification.max_output_diff,
            "csr_fp16_weight_error": packs["fp16"].verification.max_weight_error,
            "csr_fp16_output_diff": packs["fp16"].verification.max_output_diff,
            "csr_int8_weight_error": packs["int8"].verification.max_weight_error,
            "csr_int8_output_diff": packs["int8"].verification.max_output_diff,
        },
    }


def run() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            model, data = dense_baseline(arch, DATA, epochs=EPOCHS, limit=LIMIT)
            example = (data.sample_inputs(4),)
            for sparsity in SPARSITIES:
                pruned = prune(model, "magnitude-global", sparsity).model
                rows.append(measure(arch, pruned, sparsity, example, Path(tmp)))
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def checks_table(rows: list[dict]) -> str:
    columns = [
        "model",
        "sparsity",
        "ONNX max abs diff (tolerance)",
        "CSR fp32",
        "CSR fp16 max weight / output error",
        "CSR int8 max weight / output error",
    ]
    out = []
    for row in rows:
        c = row["_checks"]
        out.append(
            {
                "model": row["model"],
                "sparsity": row["sparsity"],
                "ONNX max abs diff (tolerance)": f"{c['onnx_max_abs_diff']:.2g} ({c['onnx_tolerance']:.2g})",
                "CSR fp32": "exact, outputs identical"
                if c["csr_fp32_exact"] and c["csr_fp32_output_diff"] == 0.0
                else "MISMATCH",
                "CSR fp16 max weight / output error": f"{c['csr_fp16_weight_error']:.2g} / {c['csr_fp16_output_diff']:.2g}",
                "CSR int8 max weight / output error": f"{c['csr_int8_weight_error']:.2g} / {c['csr_int8_output_diff']:.2g}",
            }
        )
    return markdown_table(out, columns)


def verdict(rows: list[dict]) -> str:
    """The issue's goals, row by row, in words."""

    def count(test) -> str:
        hits = [r for r in rows if test(r)]
        return f"{len(hits)} of {len(rows)}"

    misses = [
        f"{r['model']} {r['sparsity']} ({r['CSR fp32 / floor']})"
        for r in rows
        if float(r["CSR fp32 / floor"]) > 1.02
    ]
    resnet = [r for r in rows if r["model"] == "resnet20"] or rows
    headers = sorted(r["header"] for r in resnet)
    return "\n".join(
        [
            "Goals (from the issue):",
            f"- fp32 pack within 2 % of the floor: {count(lambda r: float(r['CSR fp32 / floor']) <= 1.02)} "
            f"rows; missed: {', '.join(misses) or 'none'}. In "
            f"{count(lambda r: r['_payload_is_floor'])} rows pack minus header equals the floor to "
            "the byte, so the whole gap is the safetensors header: about 100 bytes of JSON per "
            f"named tensor, and ResNet-20's pack has {resnet[0]['_entries']} of them (every BN "
            "weight, bias, running mean/var and num_batches_tracked is its own entry), "
            f"{headers[0]:,} to {headers[-1]:,} bytes that weigh more as the payload shrinks.",
            f"- smaller than ONNX COO: {count(lambda r: r['CSR fp32'] < r['ONNX COO'])} rows.",
            f"- smaller than scipy.sparse.save_npz: {count(lambda r: r['CSR fp32'] < r['npz'])} rows "
            "against its default (compressed=True); "
            f"{count(lambda r: r['CSR fp32'] < r['npz (uncompressed)'])} rows against "
            "compressed=False. Deflate shrinks npz's int32 indices and float exponents; our pack "
            "is uncompressed by design (mmap-able, no zlib in the C reader). Through the same "
            "zlib, our pack is smaller than the compressed npz in "
            f"{count(lambda r: r['CSR fp32 deflated'] < r['npz'])} rows.",
        ]
    )


def main() -> None:
    rows = run()
    sizes = markdown_table(rows, COLUMNS)
    body = "\n\n".join(
        [
            "## Export sizes (bench/export_size.py)",
            f"Command: `{COMMAND}`. {', '.join(ARCHS)} trained {EPOCHS} epoch on {LIMIT} "
            f"{DATA} images (accuracy is irrelevant to sizes), pruned with magnitude-global. "
            "Bytes on disk. dense = raw state_dict bytes; CSR = our pack (block 1x1, a weight "
            "is CSR when smaller than dense); npz = scipy.sparse.save_npz of the same CSR "
            "weights (default compressed, and uncompressed), one file per matrix, plus the "
            "dense tensors' raw bytes; ONNX COO = the whole .onnx with sparse_initializer "
            "weights (threshold 0.7); floor = the pack's payload with no header, computed "
            "from the weights. header = our safetensors header (names, dtypes, shapes, "
            "offsets, metadata); CSR fp32 deflated = our fp32 pack through zlib (level 6, "
            "zip's default), for comparison with the compressed npz. Sizes do not depend on "
            "the machine (shared, 2 cores).",
            sizes,
            verdict(rows),
            "Verification differences observed while writing the files above:",
            checks_table(rows),
        ]
    )
    print(body)
    write_section("export_size", body)
    write_json("export_size", rows)


if __name__ == "__main__":
    main()

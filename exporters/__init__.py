"""Deployment artefacts, each verified as it is written.

- `export_onnx`: one self-contained `.onnx` graph, checked by onnx.checker and run in
  onnxruntime against PyTorch.
- `export_csr`: a safetensors CSR weight pack (docs/csr-format.md); `exporters.csr.load`
  rebuilds it dense and `exporters.csr.verify` checks it against a model.
"""

from exporters.csr import CsrPack, CsrVerification, export_csr, parse_block
from exporters.csr import load as load_csr
from exporters.csr import verify as verify_csr
from exporters.onnx import OnnxExport, export_onnx

__all__ = [
    "CsrPack",
    "CsrVerification",
    "OnnxExport",
    "export_csr",
    "export_onnx",
    "load_csr",
    "parse_block",
    "verify_csr",
]

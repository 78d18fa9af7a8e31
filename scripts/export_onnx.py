"""Export a compact fmpsr network to ONNX (dynamic batch / height / width, opset >= 17).

    python scripts/export_onnx.py experiments/<name>/export -o model.onnx

Needs the ``onnx`` extra (``pip install .[onnx]``: onnx, onnxruntime, onnxscript). The logic lives in
:mod:`fmpsr.deploy.onnx_export`; the same command is installed as ``fmpsr-export-onnx``.
"""
import os.path as osp
import sys

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fmpsr.deploy.onnx_export import main  # noqa: E402

if __name__ == '__main__':
    from fmpsr.cli import run_cli
    run_cli(main, prog='export_onnx.py', use_return_code=True)

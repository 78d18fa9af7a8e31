"""Upscale images with an exported fmpsr network (Real-ESRGAN-style command line).

    python scripts/inference.py -i inputs/ -o results/ --model experiments/<name>/export
    python scripts/inference.py -i photo.png -o out/ --model export/ --outscale 3.5 --tile 200

The logic lives in :mod:`fmpsr.deploy.inference`; the same command is installed as ``fmpsr-infer``.
Run with ``--help`` for every option.
"""
import os.path as osp
import sys

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fmpsr.deploy.inference import main  # noqa: E402

if __name__ == '__main__':
    from fmpsr.cli import run_cli
    run_cli(main, prog='inference.py', use_return_code=True)

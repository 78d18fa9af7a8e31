"""Test with fmpsr's archs and models: ``python fmpsr/test.py -opt X.yml`` (BasicSR's
``test_pipeline``: PSNR / SSIM on the datasets of the option file)."""
import os.path as osp
import sys

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fmpsr  # noqa: E402,F401
from basicsr.test import test_pipeline  # noqa: E402

if __name__ == '__main__':
    test_pipeline(ROOT)

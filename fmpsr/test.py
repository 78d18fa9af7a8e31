"""Test with fmpsr's archs and models: ``python fmpsr/test.py -opt X.yml`` (BasicSR's
``test_pipeline``: PSNR / SSIM on the datasets of the option file).

Bad input (an option, data set or checkpoint) ends with one line ``fmpsr: error: <what, where, what
would be valid>`` and exit status 2 (:func:`fmpsr.cli.run_cli`); ``FMPSR_TRACEBACK=1`` (or
``--debug``, which also turns on BasicSR's debug mode) shows the traceback.

At the end a run summary is printed and written to ``results/<name>/summary.json``
(:mod:`fmpsr.summary`: PSNR / SSIM of each test set with bicubic beside them)."""
import os.path as osp
import sys

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fmpsr  # noqa: E402,F401
from basicsr.test import test_pipeline  # noqa: E402

from fmpsr.cli import run_cli  # noqa: E402
from fmpsr.summary import summarize_finished_run  # noqa: E402


def main():
    """Test, then print the run summary and write ``summary.json`` into the results folder."""
    test_pipeline(ROOT)
    summarize_finished_run()


if __name__ == '__main__':
    run_cli(main)

"""Train with fmpsr's archs and models: ``python fmpsr/train.py -opt X.yml [--launcher pytorch|slurm]
[--auto_resume] [--debug]`` (BasicSR's ``train_pipeline``)."""
import os.path as osp
import sys

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
if ROOT not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, ROOT)

import fmpsr  # noqa: E402,F401  (patches basicsr, registers archs / models)
from basicsr.train import train_pipeline  # noqa: E402

from fmpsr.pipeline import close_process_group  # noqa: E402

if __name__ == '__main__':
    train_pipeline(ROOT)
    close_process_group()

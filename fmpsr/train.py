"""Train with fmpsr's archs and models: ``python fmpsr/train.py -opt X.yml [--launcher pytorch|slurm]
[--auto_resume] [--debug]`` (BasicSR's ``train_pipeline``).

Bad input (an option, data set or checkpoint) ends with one line ``fmpsr: error: <what, where, what
would be valid>`` and exit status 2 (:func:`fmpsr.cli.run_cli`); ``--debug`` or ``FMPSR_TRACEBACK=1``
shows the traceback.

Before training, glibc is asked to keep freed memory in the process (:mod:`fmpsr.cpu_allocator`; CPU
training steps otherwise page-fault their large tensors in anew every iteration). Any of
glibc's own ``MALLOC_*_`` variables (or ``GLIBC_TUNABLES``) in the environment leaves the choice to them."""
import os.path as osp
import sys

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
if ROOT not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, ROOT)

import fmpsr  # noqa: E402,F401  (patches basicsr, registers archs / models)
from basicsr.train import train_pipeline  # noqa: E402

from fmpsr.cli import run_cli  # noqa: E402
from fmpsr.cpu_allocator import keep_freed_memory  # noqa: E402
from fmpsr.pipeline import close_process_group  # noqa: E402


def main():
    keep_freed_memory()
    train_pipeline(ROOT)
    close_process_group()


if __name__ == '__main__':
    run_cli(main)

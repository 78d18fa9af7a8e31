"""Train with fmpsr's archs and models: ``python fmpsr/train.py -opt X.yml [--launcher pytorch|slurm]
[--auto_resume] [--debug]`` (BasicSR's ``train_pipeline``).

Bad input (an option, data set or checkpoint) ends with one line ``fmpsr: error: <what, where, what
would be valid>`` and exit status 2 (:func:`fmpsr.cli.run_cli`); ``FMPSR_TRACEBACK=1`` (or
``--debug``, which also turns on BasicSR's debug mode) shows the traceback. So does a second run
with the name of a live one (:mod:`fmpsr.run_lock`).

SIGTERM (SLURM preemption, ``scancel``) ends training after the running iteration with a checkpoint
of it (:mod:`fmpsr.run_control`) and exit status 143; ``--auto_resume`` continues from there.
``--deterministic`` (or ``deterministic: true`` in the option file) sets torch's deterministic flags.

Before training, glibc is asked to keep freed memory in the process (:mod:`fmpsr.cpu_allocator`; CPU
training steps otherwise page-fault their large tensors in anew every iteration). Any of
glibc's own ``MALLOC_*_`` variables (or ``GLIBC_TUNABLES``) in the environment leaves the choice to them.

At the end a run summary is printed and written to ``experiments/<name>/summary.json``
(:mod:`fmpsr.summary`: params before / after, PSNR / SSIM with bicubic beside them, the export)."""
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
from fmpsr.run_control import EXIT_STOPPED, TrainingStopped, install_stop_handler  # noqa: E402
from fmpsr.summary import summarize_finished_run  # noqa: E402


def main():
    """Train; returns 0, or 143 when a SIGTERM stopped training (after its checkpoint was written)."""
    keep_freed_memory()
    install_stop_handler()
    try:
        train_pipeline(ROOT)
    except TrainingStopped as stopped:
        close_process_group()
        where = 'its checkpoint is written' if stopped.saved or stopped.iteration else 'nothing was trained yet'
        print(f'fmpsr: {stopped}: {where}; run again with --auto_resume to continue', file=sys.stderr, flush=True)
        return EXIT_STOPPED
    close_process_group()
    summarize_finished_run()   # experiments/<name>/summary.json
    return 0


if __name__ == '__main__':
    run_cli(main, use_return_code=True)

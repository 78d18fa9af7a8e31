"""Compare pruning methods on equal budgets: ``python scripts/compare.py -opt options/compare/<preset>.yml``
[``--jobs N``] [``--dry-run``] [``--report-only``].

Every cell (method x budget x seed, and the scratch baselines) is an ordinary fmpsr run, trained with
``fmpsr/train.py --auto_resume`` and tested with ``fmpsr/test.py``; repeating the command runs only
the cells that have not finished. Outputs: ``results/compare/<preset>/`` (``results.jsonl``,
``report.md``, ``figures/``). See :mod:`fmpsr.compare`.

Errors end with one line ``compare: error: <message>`` and exit status 2. SIGTERM / SIGINT end the
running cells (each writes a checkpoint) and exit with 128 + the signal number; see
:mod:`fmpsr.compare.runner`.
"""
import os.path as osp
import sys

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fmpsr.compare.runner import main  # noqa: E402

if __name__ == '__main__':
    from fmpsr.cli import run_cli
    run_cli(main, prog='compare', use_return_code=True)

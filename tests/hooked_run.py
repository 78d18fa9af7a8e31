"""Run an fmpsr entry point with test-only hooks: ``python tests/hooked_run.py RECORD_DIR SCRIPT ARGS...``.

Used by tests/test_reliability.py (nothing in fmpsr reads these variables). In RECORD_DIR (made if
missing; with torchrun every rank writes its own files, suffix ``.rank<r>``):

* ``writes.txt``: every path given to :func:`fmpsr.pruning.export.atomic_write`, one per line, after
  the file is in place (every module of fmpsr that imported the function by name is patched);
* ``iters.txt``: ``<iteration> <stage> <sha256 of the bare network's state_dict>`` after every
  ``optimize_parameters`` (the iterations this process really ran, and what each rank holds);
* ``opens.txt``: the absolute path of every file opened for writing through Python (``open``, which
  ``torch.save``, matplotlib and json use, and the log files of ``logging``), when opened; files
  written by C code (OpenCV, safetensors) are not seen here (fmpsr writes those through atomic_write);
* ``reached``: written when a held write is reached (see below); the process then blocks forever,
  so a test can SIGKILL it at a state the test chose, without a race against a polling loop.

Environment:
    FMPSR_HOOK_HOLD: a regular expression; the Nth ``atomic_write`` whose path matches it is held.
    FMPSR_HOOK_HOLD_COUNT: N (default 1).
    FMPSR_HOOK_HOLD_WHEN: ``before`` (default: the temporary file is fully written, the rename into
        place has not happened, as if the process died while saving) or ``after`` (the file is in place).
"""
import builtins
import hashlib
import logging
import os
import os.path as osp
import re
import runpy
import sys
import time

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
sys.path.insert(0, ROOT)
_open = builtins.open  # the records themselves are written with the real open


def rank_suffix():
    rank = os.environ.get('RANK')
    return f'.rank{rank}' if rank is not None else ''


def append(record_dir, name, line):
    with _open(osp.join(record_dir, name + rank_suffix()), 'a') as f:
        f.write(line + '\n')
        f.flush()
        os.fsync(f.fileno())


def block_forever(record_dir, path):
    append(record_dir, 'reached', path)
    while True:
        time.sleep(3600)


def record_opens(record_dir):
    """Record every file opened for writing (see the module docstring) in ``opens.txt``."""
    def recording_open(file, mode='r', *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in 'wax+'):
            path = osp.abspath(os.fsdecode(file))
            if not path.startswith(osp.abspath(record_dir) + os.sep):
                append(record_dir, 'opens.txt', path)
        return _open(file, mode, *args, **kwargs)
    builtins.open = recording_open
    logging.FileHandler._builtin_open = staticmethod(recording_open)


def install(record_dir):
    import torch

    import fmpsr  # noqa: F401  (imports every fmpsr model module)
    import basicsr.train
    from fmpsr.pruning import export

    original = export.atomic_write
    pattern = os.environ.get('FMPSR_HOOK_HOLD')
    hold_count = int(os.environ.get('FMPSR_HOOK_HOLD_COUNT', '1'))
    hold_when = os.environ.get('FMPSR_HOOK_HOLD_WHEN', 'before')
    seen = {'matches': 0}

    def matches(path):
        if pattern is None or not re.search(pattern, osp.abspath(path)):
            return False
        seen['matches'] += 1
        return seen['matches'] == hold_count

    def atomic_write(path, write):
        hold = matches(path)

        def held_write(tmp):
            write(tmp)
            if hold and hold_when == 'before':
                block_forever(record_dir, path)
        result = original(path, held_write)
        append(record_dir, 'writes.txt', osp.abspath(path))
        if hold and hold_when == 'after':
            block_forever(record_dir, path)
        return result

    for name, module in list(sys.modules.items()):
        if (name == 'fmpsr' or name.startswith('fmpsr.')) and getattr(module, 'atomic_write', None) is original:
            module.atomic_write = atomic_write

    build_model = basicsr.train.build_model

    def build_recorded_model(opt):
        model = build_model(opt)
        step = model.optimize_parameters

        def optimize_parameters(current_iter):
            step(current_iter)
            net = model.get_bare_model(model.net_g)
            digest = hashlib.sha256()
            for key, value in sorted(net.state_dict().items()):
                digest.update(key.encode())
                flat = value.detach().cpu().contiguous().reshape(-1)
                digest.update((flat.to(torch.uint8) if flat.dtype == torch.bool else flat.view(torch.uint8)).numpy())
            append(record_dir, 'iters.txt', f'{current_iter} {getattr(model, "stage", "-")} {digest.hexdigest()}')
        model.optimize_parameters = optimize_parameters
        return model
    basicsr.train.build_model = build_recorded_model


if __name__ == '__main__':
    record_dir, script, *args = sys.argv[1:]
    os.makedirs(record_dir, exist_ok=True)
    record_opens(record_dir)
    install(record_dir)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name='__main__')

"""Run many fmpsr entry points from one interpreter start: ``python tests/batch_run.py JOBS.json``.

Test-only (nothing in fmpsr uses it). Importing torch, BasicSR and fmpsr costs seconds per process on
a small machine; here they are imported once, then every job runs in a child forked from this process
(a real process of its own: fresh module state, its own exit status, killed alone if it hangs), at
most ``jobs`` at a time. JOBS.json: ``{"jobs": N, "timeout": seconds, "runs": [{"args": [script,
arg, ...], "log": path}, ...]}``; each child runs ``script`` as ``__main__`` with ``args`` as its
command line, stdout and stderr going to ``log``. Prints ``{"status": [exit status per run]}`` as JSON
(a run killed for its timeout: -9).
"""
import json
import os
import os.path as osp
import runpy
import signal
import sys
import time

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
sys.path.insert(0, ROOT)


def child(args, log):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    code = 0
    try:
        sys.argv = list(args)
        runpy.run_path(args[0], run_name='__main__')
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: B902  (reported in the log like an uncaught error)
        import traceback
        traceback.print_exc()
        code = 1
    import atexit
    atexit._run_exitfuncs()  # what the end of a normal interpreter does (fmpsr's run lock removes its file)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(path):
    with open(path) as f:
        spec = json.load(f)
    import torch  # noqa: F401  (imported once, before the forks)

    import fmpsr  # noqa: F401  (first: it makes BasicSR importable with this torchvision)
    import basicsr.test  # noqa: F401
    import basicsr.train  # noqa: F401
    os.chdir(ROOT)
    runs, jobs, timeout = spec['runs'], max(1, int(spec.get('jobs', 1))), float(spec.get('timeout', 600))
    status, running, queue = [None] * len(runs), {}, list(range(len(runs)))
    while queue or running:
        while queue and len(running) < jobs:
            index = queue.pop(0)
            pid = os.fork()
            if pid == 0:
                child(runs[index]['args'], runs[index]['log'])
            running[pid] = (index, time.monotonic())
        pid, code = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for pid, (index, started) in list(running.items()):
                if time.monotonic() - started > timeout:
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
            continue
        index, _ = running.pop(pid)
        status[index] = os.waitstatus_to_exitcode(code)
    print(json.dumps({'status': status}))


if __name__ == '__main__':
    main(sys.argv[1])

"""Kill -9 and resume, for any pruning method: the assertions every method's resume test shares.

A run is held at a chosen training-state write (tests/hooked_run.py: the process blocks inside or
right after ``atomic_write``, so SIGKILL lands at a state the test chose, not when a polling loop
happens to look), killed, and resumed with ``--auto_resume``, as often as the test asks. Each resumed
run must really resume, not silently start again from iteration 1:

* BasicSR's ``Resuming training from epoch: 0, iter: N.`` and fmpsr's ``Resume: skipping the N
  batches`` log lines (in the same process that trains);
* exactly the iterations after the checkpoint ran in it (recorded per iteration by the hook, not read
  from fmpsr's own log);
* no ``experiments/<name>_archived_*`` folder (BasicSR renames the folder of a run that starts anew);
* after every iteration the network (its whole state_dict: weights, masks, indicators, buffers) is bit
  for bit what the uninterrupted reference run held at that iteration, and the method's stage is
  the same;
* the final checkpoint and the export (widths, masks, weights, pruning.json) equal the reference's.
"""
import os
import os.path as osp
import re
import subprocess

import yaml
from conftest import ROOT, run
from test_reliability import assert_same_result, final_state, hooked, recorded_iters, run_until_held


class BackgroundReference:
    """The uninterrupted reference run of the option file ``yml`` (recorded by tests/hooked_run.py into
    ``record``), started now and left to run beside the killed run (the suite has two cores and each
    run uses one thread); calling the object waits for it and returns its [(iteration, stage, digest)]."""

    def __init__(self, yml, record):
        os.makedirs(str(record), exist_ok=True)
        self.record, self.log = record, osp.join(str(record), 'reference_run.log')
        env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
        with open(self.log, 'w') as log:
            self.proc = subprocess.Popen(hooked(record, 'fmpsr/train.py', '-opt', yml), cwd=ROOT, env=env,
                                         stdout=log, stderr=subprocess.STDOUT)

    def __call__(self):
        self.proc.wait(timeout=600)
        with open(self.log) as f:
            assert self.proc.returncode == 0, f'the reference run failed:\n{f.read()[-5000:]}'
        return recorded_iters(self.record)

    def cancel(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def state_write(iteration):
    """The regular expression (on the absolute path) of the training state of ``iteration``."""
    return rf'/training_states/{iteration}\.state$'


def assert_log_resumed(log, from_iter):
    """BasicSR's and fmpsr's resume lines for ``from_iter`` are in ``log`` (every run here is in epoch 0)."""
    assert f'Resuming training from epoch: 0, iter: {from_iter}.' in log, log[-3000:]
    assert f'Resume: skipping the {from_iter} batches of epoch 0 ' in log, log[-3000:]
    logged = [int(i.replace(',', '')) for i in re.findall(r'\[epoch:\s*\d+, iter:\s*([\d,]+), lr:', log)]
    assert all(i > from_iter for i in logged), logged   # BasicSR's iteration lines: none from a restart


def assert_iterations(done, first, last, reference):
    """``done`` (the hook's record of one process) ran exactly iterations first..last, each ending in the
    network and stage the reference run had after it."""
    assert [i for i, _, _ in done] == list(range(first, last + 1)), [i for i, _, _ in done][:5]
    expected = {i: (stage, digest) for i, stage, digest in reference}
    for i, stage, digest in done:
        assert (stage, digest) == expected[i], f'iteration {i} differs from the uninterrupted run'


def export_info(name):
    """pruning.json of a finished run, without the entries that name the run's own folder."""
    with open(osp.join(ROOT, 'experiments', name, 'export', 'pruning.json')) as f:
        info = yaml.safe_load(f)
    return {k: v for k, v in info.items() if name not in repr(v)}


def kill_and_resume(yml, name, record, kills, reference, total_iter, reference_name=None, ignore_info=(),
                    after_first_kill=None):
    """Run the option file ``yml`` (experiment ``name``) under tests/hooked_run.py with ``--auto_resume``,
    SIGKILL it at each of ``kills`` in turn, then let a last run finish; assert that every run after
    the first really resumed (see the module docstring) and, given ``reference_name`` (the finished
    reference run), that the results equal the reference's.

    ``kills``: ``[(held_iter, when, resume_iter, stage)]``: the run is held at the write of the
    training state of ``held_iter`` (``when``: 'after' it is in place, 'before' the rename into place,
    as if the process died while saving); the next run must resume from ``resume_iter`` (``held_iter``
    after, the previous checkpoint before) and the network after ``resume_iter`` was in ``stage``.
    ``reference``: the uninterrupted run's [(iteration, stage, digest)], or a function returning it
    (a :class:`BackgroundReference`), called once the killed runs are done. ``after_first_kill``: a
    function called after the first kill (to change the option file before the run resumes). Returns
    the last run's result. ``ignore_info``: pruning.json entries not compared (options the test changed).
    """
    try:
        return _kill_and_resume(yml, name, record, kills, reference, total_iter, reference_name, ignore_info,
                                after_first_kill)
    finally:
        if hasattr(reference, 'cancel'):
            reference.cancel()


def _kill_and_resume(yml, name, record, kills, reference, total_iter, reference_name, ignore_info, after_first_kill):
    runs, start = [], 0
    for k, (held_iter, when, resume_iter, _) in enumerate(kills):
        folder = osp.join(str(record), f'killed{k}')
        run_until_held(hooked(folder, 'fmpsr/train.py', '-opt', yml, '--auto_resume'), folder,
                       state_write(held_iter), when=when)
        with open(osp.join(folder, 'killed_run.log')) as f:
            runs.append((start, held_iter, recorded_iters(folder), f.read()))
        if when == 'before':                                       # the half-written state is not in place
            assert not osp.exists(osp.join(ROOT, 'experiments', name, 'training_states', f'{held_iter}.state'))
        if k == 0 and after_first_kill is not None:
            after_first_kill()
        start = resume_iter
    folder = osp.join(str(record), 'resumed')
    result = run(hooked(folder, 'fmpsr/train.py', '-opt', yml, '--auto_resume'))
    runs.append((start, total_iter, recorded_iters(folder), result.stdout + result.stderr))
    if callable(reference):
        reference = reference()
    assert [i for i, _, _ in reference] == list(range(1, total_iter + 1))
    stages = {i: stage for i, stage, _ in reference}
    for (_, _, resume_iter, stage) in kills:
        assert stages[resume_iter] == stage, f'the reference was in {stages[resume_iter]!r} at {resume_iter}'
    for first, last, done, log in runs:
        if first:
            assert_log_resumed(log, first)
        assert_iterations(done, first + 1, last, reference)   # killed right at the held write / ran to the end
    archived = [d for d in os.listdir(osp.join(ROOT, 'experiments')) if d.startswith(f'{name}_archived')]
    assert not archived, archived
    tmp = [f for root, _, files in os.walk(osp.join(ROOT, 'experiments', name)) for f in files if f.endswith('.tmp')]
    assert not tmp, tmp                                            # the resumed run removed what a kill left
    if reference_name is not None:
        assert_same_result(final_state(name), final_state(reference_name))
        mine, theirs = export_info(name), export_info(reference_name)
        for key in ignore_info:
            mine.pop(key, None), theirs.pop(key, None)
        assert mine == theirs, [k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)]
    return result

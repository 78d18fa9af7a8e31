"""Run a comparison: every cell is an ordinary fmpsr run, trained and tested as subprocesses.

``python scripts/compare.py -opt options/compare/<preset>.yml [--jobs N] [--dry-run] [--report-only]``

1. The preset is checked (unknown keys, budgets, methods missing from this fmpsr, each cell's model
   ``check_options``) before anything is written.
2. Method cells (method x budget x seed): ``fmpsr/train.py -opt <cell>.yml --auto_resume`` (a killed
   comparison resumes every cell from its last checkpoint), then ``fmpsr/test.py -opt <cell>_test.yml``
   on the exported network.
3. Scratch baselines of each reference cell, once it has finished: the reference's compact widths, and
   uniform-width networks with its params / MACs (:func:`fmpsr.baselines.uniform_network`), all
   trained from random initialisation for the same ``train.total_iter`` (``PrunedSRModel``); the runner
   exports each like a pruning run (``export/net_g.safetensors``, ``pruning.json``).
4. ``results.jsonl``, ``report.md`` and the figures (:mod:`fmpsr.compare.report`).

A cell whose export and test metrics exist is finished and is not run again; one whose training
finished but whose test did not only runs the test. Subprocess output goes to
``results/compare/<preset>/logs/<cell>.{train,test}.log``; wall times to ``cells/<cell>.json``.

Each subprocess runs in its own process group (``start_new_session``). When the runner gets SIGTERM
or SIGINT, or leaves by any error, it sends SIGTERM to every running cell's group (``train.py``
then writes a checkpoint of its last iteration and exits), waits up to ``--grace`` seconds, then
sends SIGKILL; it exits with 128 + the signal number. A runner killed with SIGKILL cannot do this:
its cells keep running, and a rerun refuses a cell whose ``train.py`` still holds its experiment lock
(:mod:`fmpsr.run_lock`), naming the process, instead of training it twice.

Errors (a bad preset, failed cells, a cell still running elsewhere) end with one line
``compare: error: <message>`` and exit status 2, like every fmpsr command (:mod:`fmpsr.cli`).
"""
import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import yaml

from fmpsr.pruning.export import atomic_write, write_json

from .preset import Cell, Preset, PresetError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))


class CellFailed(RuntimeError):
    """A cell's training or test subprocess failed (the message names the cell and its log)."""


class RunnerStopped(BaseException):
    """The runner got SIGTERM or SIGINT (``signum``); raised in the main thread by its handler."""

    def __init__(self, signum):
        super().__init__(f'stopped by {signal.Signals(signum).name}')
        self.signum = signum


DEFAULT_GRACE_S = 60.0


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _write_yaml(path, obj):
    def write(tmp):
        with open(tmp, 'w') as f:
            yaml.safe_dump(obj, f, sort_keys=False)
    atomic_write(path, write)


class Runner:
    """Runs the cells of a :class:`~fmpsr.compare.preset.Preset`.

    Args:
        preset (Preset): the checked preset.
        python (str): the interpreter for the subprocesses. Default: this one.
        jobs (int | None): cells run at once; None: the preset's ``jobs``.
        log (callable): progress messages (str).
    """

    def __init__(self, preset, python=sys.executable, jobs=None, log=print, grace=DEFAULT_GRACE_S):
        self.preset, self.python, self.log = preset, python, log
        self.jobs = jobs or preset.jobs
        self.grace = grace
        self.children = set()
        self.stopping = False
        self.ended = 0  # cells ended by stop()
        self._children_lock = threading.Lock()
        self.root = preset.root
        self.out_dir = preset.out_dir
        self.ran = []
        self.skipped = []

    # ---- paths and state ----
    def exp_dir(self, cell):
        return os.path.join(self.root, 'experiments', self.preset.experiment_name(cell.name))

    def export_dir(self, cell):
        return os.path.join(self.exp_dir(cell), 'export')

    def metrics_path(self, cell):
        return os.path.join(self.root, 'results', f'{self.preset.experiment_name(cell.name)}_test', 'metrics.json')

    def option_path(self, cell, suffix=''):
        return os.path.join(self.out_dir, 'options', f'{cell.name}{suffix}.yml')

    def timing_path(self, cell):
        return os.path.join(self.out_dir, 'cells', f'{cell.name}.json')

    def train_done(self, cell):
        """The export of the end of training exists (methods: ``exported_at_iter`` -1; scratch cells: the
        runner's export, written after training)."""
        path = os.path.join(self.export_dir(cell), 'pruning.json')
        if not os.path.isfile(path) or not os.path.isfile(os.path.join(self.export_dir(cell), 'net_g.safetensors')):
            return False
        if cell.is_pretrain and not os.path.isfile(os.path.join(self.root, self.preset.dense_start_path(cell.seed))):
            return False
        return cell.is_scratch or _read_json(path).get('exported_at_iter') == -1

    def test_done(self, cell):
        path = self.metrics_path(cell)
        return os.path.isfile(path) and set(self.preset.test_sets) <= set(_read_json(path))

    def finished(self, cell):
        return self.train_done(cell) and self.test_done(cell)

    # ---- one cell ----
    def write_options(self, cell):
        """Write the cell's train and test option files; refuse when a started cell's options changed."""
        path = self.option_path(cell)
        if os.path.isfile(path) and os.path.isdir(self.exp_dir(cell)):
            with open(path) as f:
                old = yaml.safe_load(f)
            if old != cell.options:
                raise PresetError(
                    f'cell {cell.name}: its options differ from those it was started with ({path}); to run it '
                    f'again with the new ones, delete {self.exp_dir(cell)} (and results/'
                    f'{self.preset.experiment_name(cell.name)}_test), or restore the preset')
        _write_yaml(path, cell.options)
        _write_yaml(self.option_path(cell, '_test'), self.preset.test_options(cell))

    def _subprocess(self, cell, script, option_path, extra, kind):
        log_path = os.path.join(self.out_dir, 'logs', f'{cell.name}.{kind}.log')
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        cmd = [self.python, script, '-opt', os.path.relpath(option_path, self.root)] + extra
        self.log(f'[compare] {cell.name}: {kind}: {" ".join(cmd[1:])}')
        start = time.time()
        with open(log_path, 'a') as out:
            with self._children_lock:
                if self.stopping:
                    raise CellFailed(f'cell {cell.name}: {kind} not started: the comparison is stopping')
                proc = subprocess.Popen(cmd, cwd=self.root, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # its own process group: ended by stop()
                self.children.add(proc)
            try:
                returncode = proc.wait()
            except BaseException:  # RunnerStopped (a signal) or any error while waiting
                self.stop()  # ends this cell, and every other, before it is forgotten
                raise
            finally:
                with self._children_lock:
                    self.children.discard(proc)
        elapsed = time.time() - start
        if returncode != 0:
            with open(log_path) as f:
                tail = f.read()[-3000:]
            raise CellFailed(f'cell {cell.name}: {kind} failed with exit status {returncode} '
                             f'(log: {log_path}):\n{tail}')
        return elapsed

    def run_cell(self, cell):
        """Train (resuming) and test one cell unless it has finished. Returns True if anything ran."""
        if self.finished(cell):
            return False
        self.write_options(cell)
        timing = _read_json(self.timing_path(cell)) if os.path.isfile(self.timing_path(cell)) else {}
        trained = False
        if not self.train_done(cell):
            from fmpsr.run_lock import is_locked, lock_path, owner
            if is_locked(self.exp_dir(cell)):
                raise CellFailed(
                    f'cell {cell.name}: its training is still running in another process '
                    f'({owner(lock_path(self.exp_dir(cell))) or "lock " + lock_path(self.exp_dir(cell))}), e.g. '
                    'of a comparison killed with SIGKILL; not started twice. Wait for it to end, or stop it '
                    '(SIGTERM to its process group writes a checkpoint), then run the comparison again')
            timing['train_s'] = timing.get('train_s', 0.0) + self._subprocess(
                cell, 'fmpsr/train.py', self.option_path(cell), ['--auto_resume'], 'train')
            if cell.is_scratch:
                self.export_scratch(cell)
            trained = True
        if trained or not self.test_done(cell):
            timing['test_s'] = self._subprocess(cell, 'fmpsr/test.py', self.option_path(cell, '_test'), [], 'test')
        write_json(self.timing_path(cell), timing)
        self.ran.append(cell.name)
        return True

    def export_scratch(self, cell):
        """Export a scratch cell's final network like a pruning run's (safetensors, ``pruning.json``)."""
        import torch
        from basicsr.archs import build_network
        from fmpsr.models.pruned_sr_model import load_checkpoint
        from fmpsr.pruning import PruneRatios, count, save_compact, trace_conv_specs

        from .recount import in_channels_of

        checkpoint = load_checkpoint(os.path.join(self.exp_dir(cell), 'models', 'net_g_latest.pth'))
        network_g = checkpoint.get('network_g') or cell.options['network_g']
        net = build_network(copy.deepcopy(network_g))
        net.load_state_dict(checkpoint['params'], strict=True)
        out = self.export_dir(cell)
        paths = save_compact(out, net, network_g, checkpoint.get('weight_masks'))
        compact = count(trace_conv_specs(net, self.preset.macs_input_size, in_channels_of(network_g)))
        ratios = PruneRatios(self.preset.backbone.original, compact, compact).as_dict()
        write_json(os.path.join(out, 'pruning.json'), {
            'method': 'scratch', 'baseline': cell.baseline, 'reference': cell.reference, 'match': cell.match,
            'exported_at_iter': -1, 'network_g': network_g, 'original_network_g': self.preset.opt['network_g'],
            'ratios': ratios, 'files': paths})
        if cell.is_pretrain:  # the start of the pretrained methods: a plain BasicSR checkpoint (no network_g)
            state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            atomic_write(os.path.join(self.root, self.preset.dense_start_path(cell.seed)),
                         lambda p: torch.save({'params': state}, p))

    # ---- scratch baselines ----
    def scratch_cells(self, reference):
        """The baselines of a finished reference cell (see the module docstring).

        Uniform widths come from :func:`fmpsr.baselines.uniform_network`, aimed at the reference's counts
        recounted from its export (``scratch.match``: nonzero or dense). A baseline with no uniform width
        within ``scratch.tolerance`` is left out, logged and listed in the report.
        """
        from fmpsr.baselines import uniform_network
        from fmpsr.pruning.export import read_network_options

        from .recount import recount_export

        p, s = self.preset, self.preset.scratch
        export = self.export_dir(reference)
        counts = recount_export(export, p.macs_input_size)
        with open(os.path.join(export, 'pruning.json')) as f:
            info = json.load(f)
        network_ref = read_network_options(os.path.join(export, 'net_g.safetensors'))
        cells = []
        for kind in s['baselines']:
            name = p.cell_name(reference.method, reference.target, reference.seed, kind, reference.method)
            match = {'reference': reference.name, 'reference_method': reference.method,
                     'reference_counts': {k: counts[k] for k in ('params_dense', 'params_nonzero', 'macs_dense',
                                                                'macs_nonzero')}}
            if kind == 'same_widths':
                network_g = network_ref
                match.update(metric='widths')
            else:
                metric = 'params' if kind == 'uniform_params' else 'macs'
                target = counts[f'{metric}_{s["match"]}']
                aimed = dict(info, ratios={'pruned_params': target, 'pruned_macs': target})
                try:
                    network_g, found, _ = uniform_network(aimed, 'params' if metric == 'params' else 'flops',
                                                          s['tolerance'])
                except ValueError as e:
                    self.log(f'[compare] warning: {name} left out: {e}')
                    self.skipped.append(f'{name}: {e}')
                    continue
                match.update(metric=metric, counted=s['match'], target_count=int(target),
                             reached_count=found['count'], error=found['relative_error'], within=found['within'],
                             tolerance=s['tolerance'], k=found['k'], k_free=found['k_free'], width=found['width'])
            cell = Cell(name, 'scratch', reference.target, reference.seed,
                        p.scratch_options(name, reference.seed, network_g), baseline=kind,
                        reference=reference.name, match=match)
            cells.append(cell)
        return cells

    # ---- stopping ----
    def stop(self, grace=None):
        """End every running cell: SIGTERM to its process group, SIGKILL to those still running after
        ``grace`` seconds (default: the runner's ``grace``). No new cell starts afterwards.

        Returns:
            int: how many cells were running (also added to ``ended``).
        """
        grace = self.grace if grace is None else grace
        with self._children_lock:
            self.stopping = True
            procs = list(self.children)
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        self.ended += len(procs)
        return len(procs)

    # ---- everything ----
    def _run_all(self, cells):
        failures = []

        def one(cell):
            if self.stopping:
                return
            try:
                self.run_cell(cell)
            except CellFailed as e:
                if not self.stopping:
                    failures.append(e)
                    self.log(f'[compare] FAILED {e}')
        try:
            if self.jobs == 1:
                for cell in cells:
                    one(cell)
            else:
                with ThreadPoolExecutor(self.jobs) as pool:
                    futures = [pool.submit(one, cell) for cell in cells]
                    try:
                        for future in futures:
                            future.result()
                    except BaseException:
                        self.stop()  # before the pool waits for its threads, which wait for the cells
                        raise
        except BaseException:
            self.stop()
            raise
        return failures

    def run(self):
        """Run every unfinished cell, then write the report. Returns the list of all cells.

        Raises:
            CellFailed: one or more cells failed (after every other cell has run and the report of the
                finished ones is written).
        """
        from .report import write_report

        method_cells = self.preset.method_cells()
        pretrain = self.preset.pretrain_cells()
        self.preset.check_cell_options(pretrain + method_cells)
        done = sum(self.finished(c) for c in method_cells)
        self.log(f'[compare] {self.preset.name}: {len(method_cells)} method cells ({done} finished), '
                 f'{self.jobs} at a time; outputs in {os.path.relpath(self.out_dir, self.root)}')
        failures = []
        if pretrain:  # the dense starts first: the pretrained methods' cells load them
            self.log(f'[compare] {len(pretrain)} dense pretraining cell(s) of {self.preset.pretrain["iterations"]} '
                     f'iterations for {", ".join(self.preset.pretrain["methods"])}')
            failures += self._run_all(pretrain)
        failures += self._run_all(method_cells)
        cells = list(method_cells)
        if self.preset.scratch:
            refs = [c for c in method_cells if c.method in self.preset.scratch['reference'] and self.finished(c)]
            scratch = [c for ref in refs for c in self.scratch_cells(ref)]
            self.preset.check_cell_options(scratch)
            failures += self._run_all(scratch)
            cells += scratch
        finished = [c for c in cells if self.finished(c)]
        write_report(self.preset, finished, self)
        self.log(f'[compare] ran {len(self.ran)} cells; {len(finished)} of {len(cells)} finished; '
                 f'report: {os.path.relpath(os.path.join(self.out_dir, "report.md"), self.root)}')
        if failures:
            raise CellFailed(f'{len(failures)} cell(s) failed: ' + '; '.join(str(f).split('\n')[0] for f in failures))
        return cells


def _signal_group(proc, signum):
    """Send ``signum`` to the process group of ``proc`` (started with ``start_new_session``) while its
    leader has not been reaped (so the group id cannot have been reused)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass


def _stop_on_signals(runner):
    """Make SIGTERM / SIGINT raise :class:`RunnerStopped` in the main thread (once); returns a function
    restoring the previous handlers."""
    def handler(signum, frame):
        if not runner.stopping:
            raise RunnerStopped(signum)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(s, h) for s, h in previous.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description='Compare pruning methods on equal budgets (fmpsr).')
    parser.add_argument('-opt', required=True, help='preset, e.g. options/compare/cpu_demo.yml')
    parser.add_argument('--jobs', type=int, default=None, help="cells trained at once (default: the preset's jobs)")
    parser.add_argument('--dry-run', action='store_true',
                        help='check the preset and print the method cells and their pruning keys; run nothing')
    parser.add_argument('--report-only', action='store_true', help='write the report of the finished cells; run nothing')
    parser.add_argument('--grace', type=float, default=DEFAULT_GRACE_S,
                        help='seconds a stopped cell gets to write its checkpoint before SIGKILL (default 60)')
    args = parser.parse_args(argv)
    import fmpsr  # noqa: F401
    from fmpsr.cli import EXIT_BAD_INPUT, error_message

    from .methods import MethodNotAvailable
    try:
        preset = Preset(args.opt, ROOT)
        runner = Runner(preset, jobs=args.jobs, grace=args.grace)
        if args.dry_run:
            pretrain, cells = preset.pretrain_cells(), preset.method_cells()
            preset.check_cell_options(pretrain + cells)
            for cell in pretrain:
                print(f'{cell.name}: dense pretraining of {preset.pretrain["iterations"]} iterations '
                      f'(the start of {", ".join(preset.pretrain["methods"])})')
            for cell in cells:
                keys = {k: v for k, v in cell.options['pruning'].items() if k not in ('type', 'macs_input_size')}
                print(f'{cell.name}: {cell.options["model_type"]} {keys}')
            for reason in preset.unreachable:
                print(f'no cell: {reason}')
            if preset.scratch:
                refs = [c for c in cells if c.method in preset.scratch['reference']]
                baselines = preset.scratch['baselines']
                print(f'and {len(refs) * len(baselines)} scratch cells ({", ".join(baselines)} of each of the '
                      f'{len(refs)} cells of {", ".join(preset.scratch["reference"])}), whose widths are known '
                      'once those cells have finished')
            return 0
        if args.report_only:
            from .report import write_report
            cells = preset.method_cells()
            if preset.scratch:
                cells += [c for ref in cells if ref.method in preset.scratch['reference'] and runner.finished(ref)
                          for c in runner.scratch_cells(ref)]
            finished = [c for c in cells if runner.finished(c)]
            if not finished:  # an earlier report (of experiments since moved or removed) is kept
                print(f'[compare] no finished cell of {len(cells)} under experiments/; nothing written')
                return 0
            write_report(preset, finished, runner)
            print(f'[compare] report of {len(finished)} finished cell(s) of {len(cells)}: '
                  f'{os.path.relpath(os.path.join(runner.out_dir, "report.md"), ROOT)}')
            return 0
        restore = _stop_on_signals(runner)
        try:
            runner.run()
        except RunnerStopped as stopped:
            runner.stop()
            print(f'compare: {stopped}: ended {runner.ended} running cell(s) (each writes a checkpoint on SIGTERM); '
                  'run the command again to continue', file=sys.stderr, flush=True)
            return 128 + stopped.signum
        finally:
            runner.stop()  # no-op unless cells are still running (an error in the runner itself)
            restore()
    except (PresetError, MethodNotAvailable, OSError, ValueError, CellFailed) as e:
        print(f'compare: error: {error_message(e)}', file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return 0

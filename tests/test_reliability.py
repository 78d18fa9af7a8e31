"""Pruning that survives crashes, many processes and bad input.

Real subprocesses of fmpsr/train.py on a tiny LSRB, run through ``tests/hooked_run.py`` (test-only
hooks: every ``atomic_write`` path and every iteration's network digest are recorded, and a chosen
write can be held so that SIGKILL lands exactly there, not when a polling loop happens to look):

* a run killed at a checkpoint, inside a checkpoint write, inside an export write or just after the
  stage switch, then resumed with ``--auto_resume``, really resumes (BasicSR's and fmpsr's resume log
  lines, only the iterations after the checkpoint are run, no ``*_archived_*`` folder), passes
  through the same network state at every iteration and ends bit for bit where an uninterrupted run
  with the same seed ends; the files a killed write would have replaced are intact;
* every checkpoint, training state and export file is written through ``atomic_write``;
* a pruned weight stays pruned when its indicator grows back, across a checkpoint and a resume;
* two gloo ranks hold bit-identical networks at every iteration (recorded by each rank, not taken
  from fmpsr's own log line) and end within a stated PSNR tolerance of one process with the same
  global batch (bit equality with one process cannot hold: the order of float sums differs); two
  gloo ranks of a mask method (ISS-R) agree at every iteration too, and only rank 0 writes files;
* bad options and data fail before anything is written, naming the key / folder / file.
"""
import os
import os.path as osp
import pickle
import re
import signal
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, SCALE, assert_one_line_error, run, run_failing, write_options
from safetensors.torch import load_file

import fmpsr  # noqa: F401
from fmpsr.data.checks import DataCheckError, check_datasets
from fmpsr.pipeline import check_options
from fmpsr.pruning.export import atomic_write

RESUME_EXTRA = {'pruning.lambda_c': 8.0, 'pruning.max_prune_iter': 30, 'train.total_iter': 45,
                'logger.save_checkpoint_freq': 10, 'datasets.train.num_worker_per_gpu': 1}
TOTAL_ITER = RESUME_EXTRA['train.total_iter']
BATCHES_PER_EPOCH = 100  # 4 training pairs x dataset_enlarge_ratio 50 / batch 2: every run here stays in epoch 0


def free_port():
    """A TCP port nobody listens on now (for torchrun's --master_port / dist_params.port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def experiment(name, *parts):
    return osp.join(ROOT, 'experiments', name, *parts)


def final_state(name):
    """(network_g, masks, params of net_g_latest) of a finished run."""
    exp = osp.join(ROOT, 'experiments', name)
    with open(osp.join(exp, 'export', 'network_g.yml')) as f:
        network_opt = yaml.safe_load(f)
    masks = load_file(osp.join(exp, 'export', 'weight_masks.safetensors'))
    params = torch.load(osp.join(exp, 'models', 'net_g_latest.pth'), weights_only=True)['params']
    return network_opt, masks, params


def assert_same_result(a, b, max_abs=0.0, most_within=0.0):
    """Identical widths and masks; every parameter within ``max_abs`` and 99.9 % within
    ``most_within`` (both 0: bit-identical)."""
    (opt_a, masks_a, params_a), (opt_b, masks_b, params_b) = a, b
    assert opt_a == opt_b                                   # identical widths
    assert masks_a.keys() == masks_b.keys()
    for key in masks_a:
        assert torch.equal(masks_a[key], masks_b[key]), key  # identical masks
    assert params_a.keys() == params_b.keys()
    diff = torch.cat([(params_a[k] - params_b[k]).abs().flatten() for k in params_a])
    assert float(diff.max()) <= max_abs, f'max |difference| {float(diff.max()):.3e} > {max_abs}'
    assert float((diff > most_within).float().mean()) <= (1e-3 if most_within else 0.0)


# ---------------------------------------------------------------- hooked runs (tests/hooked_run.py)


def hooked(record, *args):
    """The command running ``args`` (an fmpsr script and its arguments) under tests/hooked_run.py."""
    return [sys.executable, osp.join('tests', 'hooked_run.py'), str(record), *[str(a) for a in args]]


def recorded_iters(record, rank=None):
    """[(iteration, stage, network digest)] in the order the hooked run did them."""
    path = osp.join(str(record), 'iters.txt' + ('' if rank is None else f'.rank{rank}'))
    if not osp.isfile(path):
        return []
    with open(path) as f:
        return [(int(i), stage, digest) for i, stage, digest in (line.split() for line in f if line.strip())]


def recorded_writes(record):
    """Every path the hooked run gave to atomic_write (absolute), in order."""
    path = osp.join(str(record), 'writes.txt')
    if not osp.isfile(path):
        return []
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def run_until_held(args, record, hold, count=1, when='before', timeout=300):
    """Start a hooked run that blocks at the ``count``-th atomic_write whose path matches the regular
    expression ``hold`` (``when``: 'before' the rename into place, or 'after'); SIGKILL it once it is
    blocked there. Returns the held path. Fails when the run ends without reaching the write."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore', FMPSR_HOOK_HOLD=hold,
               FMPSR_HOOK_HOLD_COUNT=str(count), FMPSR_HOOK_HOLD_WHEN=when)
    os.makedirs(str(record), exist_ok=True)
    reached = osp.join(str(record), 'reached')
    log_path = osp.join(str(record), 'killed_run.log')
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout  # a safety net for a hung run, not a timing assertion
        while not osp.isfile(reached):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f'the run ended (status {proc.returncode}) before the held write {hold!r} #{count}:\n'
                            + open(log_path).read()[-3000:])
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # it is blocked inside (or right after) the held write
        proc.wait()
    with open(reached) as f:
        return f.read().strip()


def assert_really_resumed(name, result, record, from_iter, reference=None, total_iter=TOTAL_ITER):
    """The resumed run logged BasicSR's and fmpsr's resume lines for ``from_iter``, ran exactly the
    iterations after it, archived nothing, and (given the reference run's record) held the same
    network as the uninterrupted run after every iteration."""
    log = result.stdout + result.stderr
    assert f'Resuming training from epoch: 0, iter: {from_iter}.' in log, log[-3000:]
    if from_iter:
        assert f'Resume: skipping the {from_iter} batches of epoch 0' in log, log[-3000:]
    done = recorded_iters(record)
    assert [i for i, _, _ in done] == list(range(from_iter + 1, total_iter + 1))  # fewer than the full run's
    assert len(done) < total_iter
    archived = [d for d in os.listdir(osp.join(ROOT, 'experiments')) if d.startswith(f'{name}_archived')]
    assert not archived, archived
    if reference is not None:
        expected = {i: (stage, digest) for i, stage, digest in reference['iters']}
        for i, stage, digest in done:
            assert (stage, digest) == expected[i], f'iteration {i} differs from the uninterrupted run'


@pytest.fixture(scope='module')
def reference(data, names, tmp_path_factory):
    """An uninterrupted run (the result a resumed run must reproduce), recorded by tests/hooked_run.py."""
    name = names('pytest_ref')
    folder = tmp_path_factory.mktemp('ref')
    yml = folder / 'ref.yml'
    write_options(yml, name, data, extra=RESUME_EXTRA)
    run(hooked(folder / 'record', 'fmpsr/train.py', '-opt', yml))
    with open(osp.join(ROOT, 'experiments', name, 'export', 'pruning.json')) as f:
        switch_iter = yaml.safe_load(f)['switch_iter']
    return {'name': name, 'switch_iter': switch_iter, 'result': final_state(name),
            'iters': recorded_iters(folder / 'record'), 'writes': recorded_writes(folder / 'record')}


def last_state(name):
    folder = osp.join(ROOT, 'experiments', name, 'training_states')
    latest = max(int(f.split('.')[0]) for f in os.listdir(folder) if f.endswith('.state'))
    return torch.load(osp.join(folder, f'{latest}.state'), weights_only=True)


def kill_then_resume(name, data, tmp_path, watched):
    """Run, SIGKILL right after ``watched`` (relative to the experiment folder) is written (the run is
    held there, so nothing later happens), check the state it left, resume with --auto_resume to the
    end. Returns the last state before the resume."""
    yml = tmp_path / 'kill.yml'
    write_options(yml, name, data, extra=RESUME_EXTRA)
    run_until_held(hooked(tmp_path / 'killed', 'fmpsr/train.py', '-opt', yml, '--auto_resume'), tmp_path / 'killed',
                   re.escape(experiment(name, watched)) + '$', when='after')
    state = last_state(name)
    result = run(hooked(tmp_path / 'resumed', 'fmpsr/train.py', '-opt', yml, '--auto_resume'))
    with open(tmp_path / 'resumed' / 'run.log', 'w') as f:  # for run_log()
        f.write(result.stdout + result.stderr)
    return state


def run_log(record):
    """The output of the resumed run of :func:`kill_then_resume` (kept in ``record/run.log``)."""
    with open(osp.join(str(record), 'run.log')) as f:
        text = f.read()
    return subprocess.CompletedProcess([], 0, text, '')


def resume_after_kill(name, data, tmp_path, hold, count=1, when='before'):
    """Hold and kill a run (see :func:`run_until_held`), return (last state on disk, held path, yml)."""
    yml = tmp_path / 'kill.yml'
    write_options(yml, name, data, extra=RESUME_EXTRA)
    held = run_until_held(hooked(tmp_path / 'killed', 'fmpsr/train.py', '-opt', yml, '--auto_resume'),
                          tmp_path / 'killed', hold, count, when)
    return last_state(name), held, yml


@pytest.mark.slow
def test_resume_after_sigkill_in_the_pruning_stage(reference, data, names, tmp_path):
    assert reference['switch_iter'] > 10, 'the tiny run must still be pruning at iteration 10'
    name = names('pytest_kill_prune')
    state = kill_then_resume(name, data, tmp_path, osp.join('training_states', '10.state'))
    assert state['fmp']['stage'] == 'prune' and state['iter'] == 10
    assert [i for i, _, _ in recorded_iters(tmp_path / 'killed')] == list(range(1, 11))  # killed right there
    assert_really_resumed(name, run_log(tmp_path / 'resumed'), tmp_path / 'resumed', 10, reference)
    assert_same_result(final_state(name), reference['result'])


@pytest.mark.slow
def test_resume_after_sigkill_just_after_the_stage_switch(reference, data, names, tmp_path):
    name = names('pytest_kill_switch')
    state = kill_then_resume(name, data, tmp_path, osp.join('export', 'pruning.json'))
    assert state['fmp']['stage'] == 'finetune' and state['iter'] == reference['switch_iter']
    assert_really_resumed(name, run_log(tmp_path / 'resumed'), tmp_path / 'resumed', reference['switch_iter'],
                          reference)
    assert_same_result(final_state(name), reference['result'])


def same_tree(a, b):
    """Recursive equality of loaded checkpoints (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    return a == b


def load_pth(*parts):
    return torch.load(osp.join(*parts), weights_only=True)


# what is held (regular expression on the absolute path) and at which of its writes
SAVE_KILLS = {
    'network checkpoint': (r'/models/net_g_20\.pth$', 1),
    'training state': (r'/training_states/20\.state$', 1),
    'export weights': (r'/export/net_g\.safetensors$', 2),
    'export pruning.json': (r'/export/pruning\.json$', 2),
}


@pytest.mark.slow
@pytest.mark.parametrize('what', list(SAVE_KILLS))
def test_sigkill_inside_a_save_keeps_the_previous_files_and_resumes(what, reference, data, names, tmp_path):
    """Killed while a file is being written (temporary file complete, not yet renamed into place)."""
    hold, count = SAVE_KILLS[what]
    name = names('pytest_kill_save')
    state, held, yml = resume_after_kill(name, data, tmp_path, hold, count)
    folder = osp.dirname(held)
    assert [f for f in os.listdir(folder) if f.endswith('.tmp')], 'the killed write left no temporary file'
    ref = experiment(reference['name'])
    if what in ('network checkpoint', 'training state'):
        # the last complete checkpoint is iteration 10's, bit for bit what the uninterrupted run saved
        assert state['iter'] == 10 and not osp.exists(experiment(name, 'training_states', '20.state'))
        if what == 'network checkpoint':
            assert not osp.exists(held)
        else:  # the network checkpoint of iteration 20 was complete before its training state
            assert same_tree(load_pth(held.replace('/training_states/20.state', '/models/net_g_20.pth')),
                             load_pth(ref, 'models', 'net_g_20.pth'))
        assert same_tree(load_pth(experiment(name, 'models', 'net_g_10.pth')), load_pth(ref, 'models', 'net_g_10.pth'))
        assert same_tree(state, load_pth(ref, 'training_states', '10.state'))
    else:
        # the export is written after the checkpoint: the checkpoint of this iteration is complete, and
        # the export files are complete files (the previous export's, up to the held one)
        assert state['fmp']['stage'] == 'finetune'
        with open(experiment(name, 'export', 'pruning.json')) as f:
            previous = yaml.safe_load(f)
        assert previous['exported_at_iter'] == reference['switch_iter']
        from fmpsr.pruning import load_compact
        net, network_opt, masks = load_compact(experiment(name, 'export'))
        assert network_opt == previous['network_g'] and set(masks) and net is not None
        exported_iter = previous['exported_at_iter'] if what == 'export weights' else state['iter']
        params = load_pth(experiment(name, 'models', f'net_g_{exported_iter}.pth'))['params']
        weights = load_file(experiment(name, 'export', 'net_g.safetensors'))
        assert weights.keys() == params.keys() and all(torch.equal(weights[k], params[k]) for k in params)
    result = run(hooked(tmp_path / 'resumed', 'fmpsr/train.py', '-opt', yml, '--auto_resume'))
    assert_really_resumed(name, result, tmp_path / 'resumed', state['iter'], reference)
    assert_same_result(final_state(name), reference['result'])
    assert not [f for f in os.listdir(folder) if f.endswith('.tmp')]  # the resumed run removed it


@pytest.mark.slow
def test_every_checkpoint_and_export_file_goes_through_atomic_write(reference):
    """Every file under models/, training_states/ and export/ of the reference run was written by
    ``atomic_write`` (recorded by tests/hooked_run.py); a writer that bypassed it would be listed."""
    writes = set(reference['writes'])
    exp = experiment(reference['name'])
    files = [osp.join(root, f) for sub in ('models', 'training_states', 'export')
             for root, _, found in os.walk(osp.join(exp, sub)) for f in found]
    assert not [f for f in files if f not in writes], 'written without atomic_write'
    names = {osp.relpath(f, exp) for f in files}
    assert {'models/net_g_10.pth', 'models/net_g_latest.pth', 'training_states/10.state', 'export/net_g.safetensors',
            'export/weight_masks.safetensors', 'export/network_g.yml', 'export/pruning.json'} <= names
    assert not [f for f in files if f.endswith('.tmp')]


# ---------------------------------------------------------------- many processes


def validation_psnr(name):
    """The last validation PSNR in a run's log file (BasicSR: ``# psnr: <value>``)."""
    exp = experiment(name)
    log = next(osp.join(exp, f) for f in os.listdir(exp) if f.startswith('train_') and f.endswith('.log'))
    with open(log) as f:
        values = re.findall(r'# psnr: ([0-9.]+)', f.read())
    assert values, f'no validation PSNR in {log}'
    return float(values[-1])


# Two ranks x batch 1 against one process x batch 2: the same samples in every step
# (tests/test_sampling.py), but gradients are averaged over ranks in another order than summed in one
# batch, and Adam turns near-zero gradients' rounding noise into lr-sized steps, so weights, masks and
# even widths may differ. The final validation PSNR of the two stays close: measured on this tiny run
# (30 iterations, OMP_NUM_THREADS=1): equal to 4 decimals (18.0982 dB both; 19.9037 dB both after a change
# of defaults); the tolerance leaves room for other BLAS / thread orders of the sums.
PSNR_TOLERANCE_DB = 0.1


@pytest.mark.slow
def test_two_gloo_ranks_agree_and_match_one_process(data, names, tmp_path):
    extra = {'pruning.max_prune_iter': 20, 'train.total_iter': 30, 'datasets.train.num_worker_per_gpu': 0,
             'val.val_freq': 30}
    single, ddp = names('pytest_single'), names('pytest_ddp2')
    write_options(tmp_path / 'single.yml', single, data, extra=dict(extra, **{'datasets.train.batch_size_per_gpu': 2}))
    write_options(tmp_path / 'ddp.yml', ddp, data, extra=dict(extra, **{'datasets.train.batch_size_per_gpu': 1}))
    run([sys.executable, 'fmpsr/train.py', '-opt', str(tmp_path / 'single.yml')])
    run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
         *hooked(tmp_path / 'record', 'fmpsr/train.py', '-opt', tmp_path / 'ddp.yml', '--launcher', 'pytorch')[1:]],
        timeout=400)
    # each rank recorded a digest of its whole network (hypernetwork, vectors, indicators, masks; then
    # the compact network) after every iteration: the ranks agree at every one of them
    rank0, rank1 = recorded_iters(tmp_path / 'record', 0), recorded_iters(tmp_path / 'record', 1)
    assert [i for i, _, _ in rank0] == list(range(1, 31))
    assert rank0 == rank1
    assert {stage for _, stage, _ in rank0} == {'prune', 'finetune'}
    psnr_single, psnr_ddp = validation_psnr(single), validation_psnr(ddp)
    print(f'validation PSNR: one process {psnr_single:.4f} dB, two ranks {psnr_ddp:.4f} dB')
    assert abs(psnr_ddp - psnr_single) <= PSNR_TOLERANCE_DB, (psnr_single, psnr_ddp)


def recorded_opens(record, rank):
    """Every file rank ``rank`` of a hooked run opened for writing (tests/hooked_run.py ``opens.txt``)."""
    path = osp.join(str(record), f'opens.txt.rank{rank}')
    if not osp.isfile(path):
        return []
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


@pytest.mark.slow
def test_two_gloo_ranks_of_a_mask_method_agree_and_only_rank_0_writes(data, names, tmp_path):
    """ISS-R (random shrink sets drawn from (manual_seed, iteration) on every rank) under torchrun with
    two gloo ranks: both ranks hold bit-identical networks and masks after every iteration of both
    stages, and only rank 0 writes files (checkpoints, states, export, figures, logs: every write
    through atomic_write or Python's open is recorded per rank by tests/hooked_run.py)."""
    name = names('pytest_ddp_issr')
    edsr = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 2, 'upscale': SCALE,
            'res_scale': 1}
    extra = {'network_g': edsr, 'train.total_iter': 24, 'logger.save_checkpoint_freq': 10, 'logger.print_freq': 5,
             'datasets.train.batch_size_per_gpu': 1,
             'pruning': {'method': 'iss_r', 'prune_ratio': 0.9, 'alpha': 0.9, 'check_freq': 5, 'max_prune_iter': 15,
                         'macs_input_size': [16, 16]}}
    write_options(tmp_path / 'ddp.yml', name, data, model_type='ISSPModel', extra=extra)
    record = tmp_path / 'record'
    run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
         *hooked(record, 'fmpsr/train.py', '-opt', tmp_path / 'ddp.yml', '--launcher', 'pytorch')[1:]], timeout=400)
    rank0, rank1 = recorded_iters(record, 0), recorded_iters(record, 1)
    assert [i for i, _, _ in rank0] == list(range(1, 25))
    assert rank0 == rank1                                    # same weights and masks on both ranks, every step
    assert rank0[0][1] == 'prune' and rank0[-1][1] == 'finetune'
    outputs = [osp.join(ROOT, d) + os.sep for d in ('experiments', 'results', 'tb_logger')]
    written = {r: [p for p in recorded_opens(record, r) if p.startswith(tuple(outputs))] for r in (0, 1)}
    assert written[1] == [] and not osp.exists(osp.join(str(record), 'writes.txt.rank1')), written[1][:5]
    with open(osp.join(str(record), 'writes.txt.rank0')) as f:
        atomic = {osp.relpath(line.strip(), experiment(name)) for line in f if line.strip()}
    assert {'models/net_g_10.pth', 'training_states/10.state', 'export/net_g.safetensors'} <= atomic
    assert any(p.endswith('.log') for p in written[0])      # the hook does see rank 0's writes
    exp = experiment(name)
    logs = [f for f in os.listdir(exp) if f.endswith('.log')]
    assert len(logs) == 1, logs                              # one log file, rank 0's
    with open(osp.join(exp, logs[0])) as f:
        text = f.read()
    assert text.count('Start training from epoch: 0, iter: 0') == 1  # each line once: no second rank logged


# ---------------------------------------------------------------- masks and criteria


def test_a_pruned_weight_stays_pruned_when_its_indicator_grows_back(tmp_path, data):
    """A weight pruned at a check stays pruned although its indicator is far above the threshold again,
    through further checks, a checkpoint, a resume (BasicSR's path: network checkpoint as
    pretrain_network_g, then resume_training) and the switch to the compact network."""
    import copy

    from basicsr.models import build_model

    from fmpsr.pruning import get_weight_masks
    model, exp = in_process_model(tmp_path, data, **{'pruning.lambda_c': 0.0, 'pruning.check_freq': 2})
    with torch.no_grad():
        for vector in model.hypernetwork.channel_vectors.values():
            vector.z.abs_().add_(0.5)  # no channel is pruned: weight positions stay comparable
    conv_name = 'body.0.conv1'
    conv = model.hypernetwork.net.get_submodule(conv_name)
    pruned = torch.zeros_like(conv.weight_mask)
    pruned.view(-1)[::7] = True
    with torch.no_grad():
        conv.weight_mask[pruned] = False
        conv.weight_indicator[pruned] = 1.0  # grown back, 200 x weight_threshold
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 32, 32, generator=g)) for _ in range(4)]

    def train(m, iters):
        for it in iters:
            lq, gt = batches[it % 4]
            m.feed_data({'lq': lq, 'gt': gt})
            m.optimize_parameters(it)

    def assert_still_pruned(m):
        c = m.hypernetwork.net.get_submodule(conv_name)
        assert not c.weight_mask[pruned].any()
        assert (c.weight_indicator.detach()[pruned].abs() > 10 * m.config.weight_threshold).all()
        with torch.no_grad():
            assert torch.all(c.generate_weight()[pruned] == 0)

    train(model, range(1, 5))  # checks at 2 and 4
    assert model.stage == 'prune'
    assert_still_pruned(model)
    model.save(0, 4)
    opt = copy.deepcopy(model.opt)
    opt['path']['pretrain_network_g'] = str(exp / 'models' / 'net_g_4.pth')
    resumed = build_model(opt)
    resumed.resume_training(torch.load(exp / 'training_states' / '4.state', weights_only=True))
    assert_still_pruned(resumed)
    train(resumed, range(5, 9))  # checks at 6 and 8
    assert_still_pruned(resumed)
    resumed.switch_to_finetune(8, converged=False)
    compact = resumed.get_bare_model(resumed.net_g)
    assert resumed.compact_network_opt['num_feat'] == opt['network_g']['num_feat']  # same positions
    assert not get_weight_masks(compact)[conv_name][pruned].any()
    assert torch.all(compact.get_submodule(conv_name).weight.detach()[pruned] == 0)
    exported = load_file(str(exp / 'export' / 'weight_masks.safetensors'))
    assert not exported[conv_name][pruned].any()


def test_total_fixed_freezes_the_part_that_reached_its_target():
    """criterion total_fixed on FMPPruner: the part that reaches its target is frozen (no proximal
    step, no mask update, no regulariser) while the other goes on; both reached: converged."""
    from basicsr.archs import build_network

    from fmpsr.pruning import FMPConfig, FMPPruner, HyperNetwork, build_grouping, trace_conv_specs
    opt = {'type': 'LSRB', 'num_feat': 16, 'num_block': 2, 'esa_channels': 8, 'upscale': 2}
    torch.manual_seed(0)
    net = build_network(dict(opt))
    hyper = HyperNetwork(net, build_grouping(net, opt), embed_dim=4)
    specs = trace_conv_specs(build_network(dict(opt)), (16, 16))
    original = sum(p.numel() for p in build_network(dict(opt)).parameters())
    # a weight target of n whole weights that float arithmetic gives back exactly (budget = gamma_w *
    # original == n): see test_a_fractional_weight_budget_still_reaches_the_target for other targets
    n = next(n for n in range(int(0.05 * original), original) if (n / original) * original == n)
    gamma_w = n / original
    config = FMPConfig.from_options({'criterion': 'total_fixed', 'gamma_c': 0.1, 'gamma_w': gamma_w, 'lambda_c': 1.0,
                                     'lambda_w': 0.02, 'min_channels': 2, 'macs_input_size': [16, 16]})
    pruner = FMPPruner(hyper, specs, config)
    vectors = hyper.prunable_vectors()
    with torch.no_grad():
        for v in hyper.channel_vectors.values():
            v.z.fill_(1.0)
        for v in vectors:  # zero half of every prunable group: far beyond gamma_c
            v.z[:v.size // 2] = 0.0
        for _, conv in hyper.hyper_convs():
            conv.weight_indicator.fill_(1.0)  # no weight below the threshold yet
    status = pruner.check()
    assert status.channel_done and not status.weight_done and not status.converged
    assert pruner.channel_frozen and not pruner.weight_frozen
    channel_ratio = pruner.ratios.channel_ratio('params')
    assert channel_ratio >= 0.1
    masks = {id(v): v.mask.clone() for v in vectors}
    z = {id(v): v.z.detach().clone() for v in vectors}
    # frozen channels: the proximal step and further checks leave vectors and channel masks alone
    with torch.no_grad():
        for v in vectors:
            v.z[v.size // 2] = 1e-4  # below prune_threshold: would be pruned if the part were not frozen
            z[id(v)] = v.z.detach().clone()
    pruner.proximal_step(lr=0.5)
    pruner.check()
    for v in vectors:
        assert torch.equal(v.mask, masks[id(v)]) and torch.equal(v.z.detach(), z[id(v)])
    assert pruner.ratios.channel_ratio('params') == channel_ratio
    assert float(pruner.regularization().detach()) > 0  # the weight part still has its regulariser
    # weights reach their target: frozen too, and converged
    with torch.no_grad():
        for _, conv in hyper.hyper_convs():
            conv.weight_indicator.fill_(1e-4)
    status = pruner.check()
    assert status.converged and pruner.weight_frozen and pruner.converged
    assert pruner.ratios.weight_ratio('params') >= gamma_w
    weight_masks = [conv.weight_mask.clone() for _, conv in hyper.hyper_convs()]
    assert float(pruner.regularization().detach()) == 0.0  # frozen: no regulariser
    pruner.check()
    assert all(torch.equal(a, conv.weight_mask) for a, (_, conv) in zip(weight_masks, hyper.hyper_convs()))


def test_a_fractional_weight_budget_still_reaches_the_target():
    """gamma_w x params is rarely a whole number of weights: the weight part must still converge."""
    from basicsr.archs import build_network

    from fmpsr.pruning import FMPConfig, FMPPruner, HyperNetwork, build_grouping, trace_conv_specs
    opt = {'type': 'LSRB', 'num_feat': 16, 'num_block': 2, 'esa_channels': 8, 'upscale': 2}
    net = build_network(dict(opt))
    hyper = HyperNetwork(net, build_grouping(net, opt), embed_dim=4)
    specs = trace_conv_specs(build_network(dict(opt)), (16, 16))
    config = FMPConfig.from_options({'criterion': 'weight', 'gamma_c': 0.0, 'gamma_w': 0.05, 'min_channels': 2,
                                     'macs_input_size': [16, 16]})  # 0.05 x 17,372 params = 868.6 weights
    pruner = FMPPruner(hyper, specs, config)
    with torch.no_grad():
        for v in hyper.channel_vectors.values():
            v.z.fill_(1.0)
        for _, conv in hyper.hyper_convs():
            conv.weight_indicator.fill_(1e-4)  # every weight is a candidate
    for _ in range(3):
        status = pruner.check()
    # weights are pruned whole and never past the budget: 868 of them; the target counts as met
    # within one weight (FMPPruner.weight_granularity), otherwise the weight part could never converge
    weight_ratio = pruner.ratios.weight_ratio('params')
    assert 0.05 - 1 / 17372 <= weight_ratio < 0.05 and pruner.weight_granularity() == 1 / 17372
    assert status.converged and pruner.converged


# ---------------------------------------------------------------- checkpoints


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / 'net_g_10.pth'
    torch.save({'params': {'w': torch.ones(3)}}, path)

    def crash(tmp):
        with open(tmp, 'wb') as f:
            f.write(b'half a checkpoint')
        raise OSError('disk full')
    with pytest.raises(OSError, match='disk full'):
        atomic_write(str(path), crash)
    assert torch.equal(torch.load(path, weights_only=True)['params']['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['net_g_10.pth']  # no temporary file left behind


class Exploit:
    def __reduce__(self):
        return (os.system, (f'touch {Exploit.marker}',))


def test_checkpoints_never_execute_code(tmp_path):
    from fmpsr.compat import load_resume_state
    from fmpsr.models.pruned_sr_model import load_checkpoint
    Exploit.marker = str(tmp_path / 'pwned')
    evil = tmp_path / 'net_g_5.pth'
    with open(evil, 'wb') as f:
        pickle.dump({'params': Exploit()}, f)
    refused = f"{str(evil)!r} was refused: loading it would run code stored in the file"
    with pytest.raises(pickle.UnpicklingError) as error:
        load_checkpoint(str(evil))
    assert refused in str(error.value)
    zipped = tmp_path / 'net_g_6.pth'  # torch's own format: the refused global is named
    torch.save({'params': Exploit()}, zipped)
    with pytest.raises(pickle.UnpicklingError, match=r'was refused: loading it would run code.*posix\.system'):
        load_checkpoint(str(zipped))
    with pytest.raises(pickle.UnpicklingError) as error:
        load_resume_state({'auto_resume': False, 'path': {'resume_state': str(evil)}})
    assert str(error.value).startswith('path.resume_state ' + refused)
    assert not osp.exists(Exploit.marker)


# ---------------------------------------------------------------- bad options


def parsed(tmp_path, data, **extra):
    """The dict BasicSR's parse_options would give for a tiny FMP option file."""
    opt = write_options(tmp_path / 'opt.yml', 'pytest_bad', data, extra=extra)
    opt['is_train'] = True
    for phase, dataset in opt['datasets'].items():
        dataset['phase'], dataset['scale'] = phase.split('_')[0], opt['scale']
    return opt


@pytest.mark.parametrize('extra, message', [
    ({'pruning.gama_c': 0.3}, "unknown key(s) ['gama_c']"),
    ({'pruning.metric': 'energy'}, "unknown metric 'energy'"),
    ({'pruning.criterion': 'totall'}, "unknown criterion 'totall'"),
    ({'pruning.weight_reg': 'l0'}, "unknown regulariser 'l0'"),
    ({'pruning.gamma_c': 1.2}, 'pruning.gamma_c must be a fraction in [0, 1)'),
    ({'pruning.gamma_w': -0.1}, 'pruning.gamma_w must be a fraction in [0, 1)'),
    ({'pruning.gamma_c': 0.7, 'pruning.gamma_w': 0.3}, 'gamma_c + pruning.gamma_w must be < 1'),
    ({'network_g.upscale': 3}, 'network_g.upscale (3) differs from scale (2)'),
    ({'datasets.train.gt_size': 28}, 'ESA needs at least 15'),
    ({'pruning.max_prune_iter': 40}, 'must be below train.total_iter'),
    ({'train.finetune': {'optim': {}}}, "train.finetune: unknown key(s) ['optim']"),
    ({'train.ema_decay': 1.5}, 'train.ema_decay must be a number in [0, 1)'),
])
def test_bad_options_are_named(tmp_path, data, extra, message):
    opt = parsed(tmp_path, data, **extra)
    with pytest.raises(ValueError) as error:
        check_options(opt)
    assert message in str(error.value)


@pytest.mark.slow
def test_bad_option_stops_train_py_before_touching_the_experiment_folder(tmp_path, data, names):
    name = names('pytest_badopt')
    yml = tmp_path / 'bad.yml'
    write_options(yml, name, data, extra={'pruning.lamda_c': 0.1})
    exp = osp.join(ROOT, 'experiments', name)
    os.makedirs(exp)
    with open(osp.join(exp, 'precious.txt'), 'w') as f:
        f.write('saved earlier')
    result = run_failing([sys.executable, 'fmpsr/train.py', '-opt', str(yml)])
    line = assert_one_line_error(result, 'fmpsr: error: pruning: unknown key(s) ')
    assert "['lamda_c']" in line
    assert os.listdir(exp) == ['precious.txt']  # not renamed to *_archived_*, nothing written
    assert not [d for d in os.listdir(osp.join(ROOT, 'experiments')) if d.startswith(f'{name}_archived')]


# ---------------------------------------------------------------- bad data


def copy_data(data, tmp_path):
    import shutil
    root = tmp_path / 'data'
    shutil.copytree(data, root)
    return root


def data_opt(root, **extra):
    opt = {'scale': SCALE, 'datasets': {'train': {
        'name': 't', 'type': 'PairedImageDataset', 'phase': 'train', 'dataroot_gt': str(root / 'train/HR'),
        'dataroot_lq': str(root / 'train/LR'), 'filename_tmpl': '{}', 'io_backend': {'type': 'disk'}}}}
    opt['datasets']['train'].update(extra)
    return opt


def test_missing_and_empty_folders_are_named(tmp_path, data):
    root = copy_data(data, tmp_path)
    with pytest.raises(DataCheckError, match="datasets.train.dataroot_gt: folder .*nowhere.* does not exist"):
        check_datasets(data_opt(root, dataroot_gt=str(root / 'nowhere')))
    (root / 'empty').mkdir()
    with pytest.raises(DataCheckError, match="datasets.train.dataroot_lq: folder .*empty.* holds no images"):
        check_datasets(data_opt(root, dataroot_lq=str(root / 'empty')))


def test_unpaired_names_and_wrong_sizes_are_named(tmp_path, data):
    root = copy_data(data, tmp_path)
    os.rename(root / 'train/LR/img3.png', root / 'train/LR/img9.png')
    with pytest.raises(DataCheckError, match=r"img3\.png.*img9\.png"):
        check_datasets(data_opt(root))
    os.rename(root / 'train/LR/img9.png', root / 'train/LR/img3.png')
    cv2.imwrite(str(root / 'train/LR/img1.png'), np.zeros((30, 48, 3), np.uint8))  # should be 48x48 at x2
    with pytest.raises(DataCheckError, match=r"img1\.png.*is 96x96.*48x30.*must be 96x60"):
        check_datasets(data_opt(root))


def test_validation_gt_may_be_larger_than_scale_times_lq(tmp_path, data):
    root = copy_data(data, tmp_path)
    hr = cv2.imread(str(root / 'val/HR/img0.png'))
    cv2.imwrite(str(root / 'val/HR/img0.png'), np.pad(hr, ((0, 1), (0, 1), (0, 0))))  # 65x65 over a 32x32 LQ
    val = {'name': 'v', 'type': 'PairedImageDataset', 'phase': 'val', 'dataroot_gt': str(root / 'val/HR'),
           'dataroot_lq': str(root / 'val/LR'), 'io_backend': {'type': 'disk'}}
    check_datasets({'scale': SCALE, 'datasets': {'val': val}})
    with pytest.raises(DataCheckError, match='img0.png'):
        check_datasets({'scale': SCALE, 'datasets': {'train': dict(val, phase='train')}})


def test_lmdb_with_different_keys_is_named(tmp_path, data):
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs
    root = copy_data(data, tmp_path)
    for d, names in (('HR', ['img0', 'img1', 'img2']), ('LR', ['img0', 'img1', 'img3'])):
        make_lmdb_from_imgs(str(root / 'train' / d), str(root / f'{d}.lmdb'), [f'{n}.png' for n in names], names)
    opt = data_opt(root, dataroot_gt=str(root / 'HR.lmdb'), dataroot_lq=str(root / 'LR.lmdb'),
                   io_backend={'type': 'lmdb'})
    with pytest.raises(DataCheckError, match=r"LMDB keys differ.*\['img2'\].*\['img3'\]"):
        check_datasets(opt)


def test_unreadable_images_are_named(tmp_path, data):
    from basicsr.data import build_dataset

    from fmpsr.data.sampling import SampleKey, SeededDataset
    root = copy_data(data, tmp_path)
    (root / 'train/HR/img2.png').write_bytes(b'not an image at all')
    with pytest.raises(DataCheckError, match=r"cannot read image .*img2\.png"):
        check_datasets(data_opt(root))
    # a file whose header is intact but whose data is cut off is found when it is loaded
    good = (root / 'train/LR/img2.png').read_bytes()
    cv2.imwrite(str(root / 'train/HR/img2.png'), cv2.imread(str(data / 'train/HR/img2.png')))
    (root / 'train/LR/img2.png').write_bytes(good[:len(good) // 3])
    dataset_opt = dict(data_opt(root)['datasets']['train'], gt_size=32, use_hflip=False, use_rot=False, scale=SCALE)
    dataset = SeededDataset(build_dataset(dataset_opt), seed=0)
    index = next(i for i, p in enumerate(dataset.paths) if p['lq_path'].endswith('img2.png'))
    with pytest.raises(RuntimeError, match=r"cannot load training pair .*img2\.png"):
        dataset[SampleKey(0, index)]


def test_grayscale_and_rgba_images_are_converted(tmp_path, data):
    from basicsr.data import build_dataset
    root = copy_data(data, tmp_path)
    gray = cv2.cvtColor(cv2.imread(str(root / 'train/HR/img0.png')), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(root / 'train/HR/img0.png'), gray)
    rgba = cv2.cvtColor(cv2.imread(str(root / 'train/LR/img0.png')), cv2.COLOR_BGR2BGRA)
    cv2.imwrite(str(root / 'train/LR/img0.png'), rgba)
    check_datasets(data_opt(root))
    dataset_opt = dict(data_opt(root)['datasets']['train'], gt_size=32, use_hflip=False, use_rot=False, scale=SCALE)
    dataset = build_dataset(dataset_opt)
    index = next(i for i, p in enumerate(dataset.paths) if p['gt_path'].endswith('img0.png'))
    item = dataset[index]
    assert item['gt'].shape == (3, 32, 32) and item['lq'].shape == (3, 16, 16)


# ---------------------------------------------------------------- NaN loss, unreachable target


def in_process_model(tmp_path, data, **extra):
    from basicsr.models import build_model
    opt = parsed(tmp_path, data, **extra)
    exp = tmp_path / 'exp'
    opt.update(dist=False, rank=0, world_size=1, num_gpu=0, root_path=str(tmp_path), auto_resume=False)
    opt['path'].update(experiments_root=str(exp), models=str(exp / 'models'),
                       training_states=str(exp / 'training_states'), log=str(exp), visualization=str(exp / 'vis'))
    opt['logger']['use_tb_logger'] = False
    torch.manual_seed(0)
    return build_model(opt), exp


def test_nan_loss_stops_before_the_weights_change(tmp_path, data):
    model, _ = in_process_model(tmp_path, data)
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    lq = torch.rand(2, 3, 16, 16)
    lq[0, 0, 3, 3] = float('nan')
    model.feed_data({'lq': lq, 'gt': torch.rand(2, 3, 32, 32)})
    with pytest.raises(FloatingPointError, match='loss is nan at iteration 7'):
        model.optimize_parameters(7)
    after = model.net_g.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unreachable_target_ends_at_the_cap_and_keeps_what_it_has(tmp_path, data):
    model, exp = in_process_model(tmp_path, data, **{'pruning.lambda_c': 0.0, 'pruning.lambda_w': 0.0,
                                                     'pruning.max_prune_iter': 6, 'pruning.check_freq': 3})
    for it in range(1, 7):
        model.feed_data({'lq': torch.rand(2, 3, 16, 16), 'gt': torch.rand(2, 3, 32, 32)})
        model.optimize_parameters(it)
    assert model.stage == 'finetune' and model.switch_iter == 6
    assert model.final_ratios['converged'] is False
    with open(exp / 'export' / 'pruning.json') as f:
        info = yaml.safe_load(f)
    assert info['ratios']['converged'] is False and info['network_g']['num_feat'] == 12


@pytest.mark.slow
def test_finetune_model_resumes_exactly_after_sigkill(reference, data, names, tmp_path):
    """PrunedSRModel (fine-tuning an export) resumes to the same result as an uninterrupted run."""
    export = osp.join(ROOT, 'experiments', reference['name'], 'export', 'net_g.safetensors')
    extra = {'path.pretrain_network_g': export, 'train.total_iter': 30, 'logger.save_checkpoint_freq': 10,
             'datasets.train.num_worker_per_gpu': 1}
    results = {}
    for kind in ('uninterrupted', 'killed'):
        name = names(f'pytest_ft_{kind}')
        yml = tmp_path / f'{kind}.yml'
        write_options(yml, name, data, model_type='PrunedSRModel', extra=extra)
        if kind == 'killed':  # killed inside the write of 20.state: the last complete checkpoint is 10
            run_until_held(hooked(tmp_path / 'killed', 'fmpsr/train.py', '-opt', yml, '--auto_resume'),
                           tmp_path / 'killed', r'/training_states/20\.state$')
        result = run(hooked(tmp_path / f'{kind}_run', 'fmpsr/train.py', '-opt', yml, '--auto_resume'))
        if kind == 'killed':
            assert_really_resumed(name, result, tmp_path / f'{kind}_run', 10, total_iter=30)
        checkpoint = torch.load(osp.join(ROOT, 'experiments', name, 'models', 'net_g_latest.pth'), weights_only=True)
        results[kind] = checkpoint
    a, b = results['uninterrupted'], results['killed']
    assert a['fmp_compact']['network_g'] == b['fmp_compact']['network_g']
    for key in a['params']:
        assert torch.equal(a['params'][key], b['params'][key]), key


@pytest.mark.slow
def test_slurm_launcher_initialises_without_cuda(tmp_path):
    """--launcher slurm's set-up (fmpsr.compat.init_dist) on a CPU machine: gloo, one task."""
    script = ("import fmpsr, torch.distributed as dist\n"
              "from fmpsr.compat import init_dist\n"
              f"init_dist('slurm', backend='nccl', port={free_port()})\n"
              "print('backend', dist.get_backend(), 'rank', dist.get_rank(), 'world', dist.get_world_size())\n")
    env = dict(os.environ, SLURM_PROCID='0', SLURM_NTASKS='1', SLURM_NODELIST='localhost',
               MASTER_ADDR='127.0.0.1', PYTHONWARNINGS='ignore', CUDA_VISIBLE_DEVICES='')
    result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'backend gloo rank 0 world 1' in result.stdout


def test_total_fixed_weight_part_resumes_when_channel_pruning_lowers_its_ratio():
    """total_fixed, weights first: the weight part reaches gamma_w and freezes; channels pruned later take
    pruned weights with them, so the weight ratio (FMP Sec. 4.4) falls below gamma_w. The weight part then
    goes on again (instead of the run never converging, or converging short of gamma_w) and the run
    converges once both targets hold."""
    from basicsr.archs import build_network

    from fmpsr.pruning import FMPConfig, FMPPruner, HyperNetwork, build_grouping, trace_conv_specs
    opt = {'type': 'LSRB', 'num_feat': 16, 'num_block': 2, 'esa_channels': 8, 'upscale': 2}
    torch.manual_seed(0)
    net = build_network(dict(opt))
    hyper = HyperNetwork(net, build_grouping(net, opt), embed_dim=4)
    specs = trace_conv_specs(build_network(dict(opt)), (16, 16))
    config = FMPConfig.from_options({'criterion': 'total_fixed', 'gamma_c': 0.3, 'gamma_w': 0.1, 'min_channels': 2,
                                     'macs_input_size': [16, 16]})
    pruner = FMPPruner(hyper, specs, config)
    vectors = hyper.prunable_vectors()
    with torch.no_grad():
        for v in hyper.channel_vectors.values():
            v.z.fill_(1.0)
        for _, conv in hyper.hyper_convs():    # every weight of the first half of each group's channels
            conv.weight_indicator.fill_(1.0)
            conv.weight_indicator[:conv.out_channels // 2] = 1e-4
    status = pruner.check()
    assert status.weight_done and not status.channel_done and pruner.weight_frozen and not pruner.converged
    with torch.no_grad():                        # now the channels holding those pruned weights go
        for v in vectors:
            v.z[:v.size // 2] = 0.0
    status = pruner.check()
    assert pruner.ratios.channel_ratio('params') >= 0.3 and pruner.channel_frozen
    assert pruner.ratios.weight_ratio('params') < 0.1          # fell back below gamma_w ...
    assert not status.converged and not pruner.weight_frozen   # ... so the weight part goes on
    assert float(pruner.regularization().detach()) > 0
    with torch.no_grad():                        # more indicators reach the threshold
        for _, conv in hyper.hyper_convs():
            conv.weight_indicator.fill_(1e-4)
    status = pruner.check()
    assert status.converged and pruner.converged and pruner.ratios.weight_ratio('params') >= 0.1 - pruner.weight_granularity()

"""Kill -9 and ``--auto_resume`` for the methods and stages whose resume is not tested beside their
other tests: ISS-R (a kill in the pruning stage and a second one in the fine-tune stage of the same
run), ISS-P with N:M masks, the LTH family (inside the second round), kernel masks (ERSS-G, dense
period), DHP, L1-norm (fine-tune stage, after the one-shot selection) and FMP with
``metric: latency`` (the resumed run must count with the table its killed predecessor started with).
SRP and ASSL use the same helper from tests/test_srp.py and tests/test_assl.py (their module runs are
the reference), FMP and fine-tuning an export from tests/test_reliability.py.

Every case asserts that the run really resumed (:mod:`resume_helpers`: the resume log lines, only the
iterations after the checkpoint, no archived folder, the network bit for bit the uninterrupted run's
after every iteration, the same export); one uninterrupted reference run, each kill and the last run
are one subprocess each (~5 s of interpreter start-up apiece), so the runs stay a few dozen iterations.
"""
import json
import os.path as osp

import pytest
from baseline_helpers import tiny_options
from conftest import ROOT, write_options
from resume_helpers import BackgroundReference, kill_and_resume

EDSR_X2 = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 2, 'upscale': 2,
           'res_scale': 1}
ISS_R = {'network_g': EDSR_X2, 'train.total_iter': 45, 'logger.save_checkpoint_freq': 10,
         'pruning': {'method': 'iss_r', 'prune_ratio': 0.9, 'alpha': 0.9, 'check_freq': 5, 'max_prune_iter': 30,
                     'macs_input_size': [16, 16]}}


def tiny(path, scale, **changes):
    """A writer of the tiny option file ``path`` pointed at the x``scale`` test data, with ``changes``."""
    def write(out, name, data, data_at, tmp_path):
        tiny_options(osp.join(ROOT, path), name, data_at(scale), out, changes)
    return write


def lsrb(model_type, **extra):
    """A writer of conftest.write_options (tiny LSRB on the x2 test data) with ``extra``."""
    def write(out, name, data, data_at, tmp_path):
        write_options(out, name, data, model_type=model_type, extra=extra)
    return write


# name: (option writer, total_iter, [(held_iter, when, resume_iter, stage at resume_iter)])
CASES = {
    # random sets drawn from (manual_seed, iteration); the second kill lands in the fine-tune stage
    'iss_r': (lsrb('ISSPModel', **ISS_R), 45, [(10, 'after', 10, 'prune'), (40, 'before', 30, 'finetune')]),
    'iss_p_nm': (tiny('options/tiny/issp/iss_p_nm24_edsr_x4.yml', 4, **{'logger.save_checkpoint_freq': 10}), 40,
                 [(20, 'before', 10, 'prune')]),
    'lmc_lth': (tiny('options/tiny/lth/lmc_lth_edsr_x4.yml', 4, **{'logger.save_checkpoint_freq': 5}), 40,
                [(15, 'after', 15, 'prune')]),
    'erss_g': (tiny('options/tiny/kernel/erss_g_edsr_x4.yml', 4, **{'logger.save_checkpoint_freq': 5}), 40,
               [(10, 'after', 10, 'prune')]),
    'dhp': (tiny('options/tiny/dhp_edsr_x4_keep40.yml', 4, **{'logger.save_checkpoint_freq': 5}), 40,
            [(5, 'after', 5, 'prune')]),
    'l1norm': (tiny('options/tiny/l1norm/l1norm_edsr_x4.yml', 4, **{'train.total_iter': 30}), 30,
               [(20, 'before', 10, 'finetune')]),
}


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(CASES))
def test_a_killed_run_resumes_where_it_was_killed(case, data, data_at, names, tmp_path):
    write, total_iter, kills = CASES[case]
    ref, killed = names(f'pytest_ref_{case}'), names(f'pytest_kill_{case}')
    write(tmp_path / 'ref.yml', ref, data, data_at, tmp_path)
    write(tmp_path / 'kill.yml', killed, data, data_at, tmp_path)
    reference = BackgroundReference(tmp_path / 'ref.yml', tmp_path / 'ref')   # beside the killed runs
    kill_and_resume(tmp_path / 'kill.yml', killed, tmp_path / 'kill', kills, reference, total_iter, ref)


LATENCY = {'pruning.metric': 'latency', 'pruning.gamma_w': 0.0, 'pruning.criterion': 'channel',
           'pruning.gamma_c': 0.3, 'pruning.lambda_c': 8.0, 'pruning.max_prune_iter': 25, 'train.total_iter': 35,
           'pruning.latency': {'device': 'cpu', 'threads': 1, 'step': 6, 'warmup': 1, 'repeats': 2}}


@pytest.mark.slow
def test_latency_run_resumes_with_the_table_it_started_with(data, names, tmp_path):
    """``metric: latency``: the run starts from a measured table (given as ``pruning.latency.table``), which
    it copies into its experiment folder; it is killed and resumed with the table no longer given, so the
    resumed run must count with that copy (timings differ from run to run: measuring again would change
    its ratios), not measure again."""
    import torch

    from basicsr.archs import build_network
    from fmpsr.pruning import trace_conv_specs
    from fmpsr.pruning.latency import measure_table
    ref, killed = names('pytest_ref_latency'), names('pytest_kill_latency')
    opt = write_options(tmp_path / 'kill.yml', killed, data, extra=LATENCY)
    with torch.random.fork_rng():
        plain = build_network(dict(opt['network_g']))
        table = measure_table(plain, trace_conv_specs(plain, (16, 16)), (16, 16), threads=1, step=6, warmup=1,
                              repeats=2)
    table.save(str(tmp_path / 'table.json'))
    given = dict(LATENCY, **{'pruning.latency': dict(LATENCY['pruning.latency'], table=str(tmp_path / 'table.json'))})
    write_options(tmp_path / 'ref.yml', ref, data, extra=given)
    write_options(tmp_path / 'kill.yml', killed, data, extra=given)

    def forget_the_table():   # after the kill: the resumed run is not given the table any more
        write_options(tmp_path / 'kill.yml', killed, data, extra=LATENCY)
    result = kill_and_resume(tmp_path / 'kill.yml', killed, tmp_path / 'kill', [(10, 'after', 10, 'prune')],
                             BackgroundReference(tmp_path / 'ref.yml', tmp_path / 'ref'), 35, ref,
                             ignore_info=('pruning',), after_first_kill=forget_the_table)  # options lack the table
    assert 'Measuring the latency table' not in result.stdout + result.stderr
    with open(osp.join(ROOT, 'experiments', killed, 'latency_table.json')) as f:
        assert json.load(f) == json.loads((tmp_path / 'table.json').read_text())


def test_the_checks_catch_a_silent_restart():
    """What a run that silently started again from iteration 1 (or lost part of its state) leaves
    behind fails the helper's checks: the iterations run, the digests, the log lines."""
    from resume_helpers import assert_iterations, assert_log_resumed
    reference = [(i, 'prune' if i <= 5 else 'finetune', f'd{i}') for i in range(1, 9)]
    assert_iterations(reference[5:], 6, 8, reference)                      # a real resume from 5
    with pytest.raises(AssertionError):
        assert_iterations(reference, 6, 8, reference)                     # restarted: ran 1..8 again
    with pytest.raises(AssertionError, match='iteration 7 differs'):
        assert_iterations([(6, 'finetune', 'd6'), (7, 'finetune', 'x'), (8, 'finetune', 'd8')], 6, 8, reference)
    good = ('Resuming training from epoch: 0, iter: 5.\nResume: skipping the 5 batches of epoch 0 that iterations '
            'up to 5 consumed\n[train..][epoch:  0, iter:       8, lr:(1.000e-03,)] l_pix: 0.1\n')
    assert_log_resumed(good, 5)
    with pytest.raises(AssertionError):
        assert_log_resumed('Start training from epoch: 0, iter: 0\n', 5)
    with pytest.raises(AssertionError):          # an iteration line from before the checkpoint
        assert_log_resumed(good + '[train..][epoch:  0, iter:       4, lr:(1.000e-03,)] l_pix: 0.1\n', 5)

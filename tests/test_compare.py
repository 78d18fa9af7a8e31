"""The equal-budget comparison (scripts/compare.py, fmpsr.compare): budget searches against counts from
the papers, preset checks, and the tiny preset end to end, its report recounted independently from the
exported files."""
import glob
import json
import math
import os
import os.path as osp
import shutil
import uuid

import pytest
import torch
import yaml
from torch import nn

from conftest import ROOT, run

from fmpsr.compare import methods as compare_methods
from fmpsr.compare.budgets import Backbone, ratio_for_budget, ratio_widths
from fmpsr.compare.methods import (BudgetContext, BudgetUnreachable, MethodEntry, MethodNotAvailable, fmp_keys,
                                   lth_keys, selection_ratio_keys)
from fmpsr.compare.preset import Preset, PresetError
from fmpsr.compare.report import kept_curve, mark_ties, summarize, trained_iterations

EDSR_X2 = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 64, 'num_block': 16, 'upscale': 2}
LSRB_4_32 = {'type': 'LSRB', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 32, 'num_block': 4, 'upscale': 4,
             'esa_channels': 16}
TINY = osp.join(ROOT, 'options', 'compare', 'tiny.yml')


# ---- an independent recount (forward hooks, not FlopCounterMode; not fmpsr.compare.recount) ----
def recount(export_dir, input_size):
    from basicsr.archs import build_network
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = osp.join(export_dir, 'net_g.safetensors')
    state = load_file(path)
    with safe_open(path, framework='pt') as f:
        network_g = json.loads(f.metadata()['network_g'])
    net = build_network(dict(network_g))
    net.load_state_dict(state)
    return count_network(net, state, input_size), network_g


def count_network(net, state, input_size):
    pixels, hooks = {}, []
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(
                lambda mod, i, o, name=name: pixels.__setitem__(name, o.shape[-2] * o.shape[-1])))
    with torch.no_grad():
        net(torch.rand(1, 3, *input_size))
    for h in hooks:
        h.remove()
    out = dict(params_dense=0, params_nonzero=0, macs_dense=0, macs_nonzero=0)
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            w, b = state[f'{name}.weight'], state.get(f'{name}.bias')
            nb = b.numel() if b is not None else 0
            nz = int((w != 0).sum())
            out['params_dense'] += w.numel() + nb
            out['params_nonzero'] += nz + nb
            out['macs_dense'] += w.numel() * pixels[name]
            out['macs_nonzero'] += nz * pixels[name]
    return out


# ---- budgets: no training ----
@pytest.fixture(scope='module')
def edsr_x2():
    return Backbone(EDSR_X2, (16, 16))


@pytest.mark.parametrize('ratio,params', [(0.1, 1101745), (0.3, 681039), (0.5, 381795), (0.7, 154139), (0.9, 26869)])
def test_ratio_search_finds_srp_table1_ratios(edsr_x2, ratio, params):
    """SRP Table 1 (REFERENCE sec. 4): EDSR x2 conv params at ratio r. Asked for that kept fraction, the
    search returns a ratio removing ceil(r*64) channels, and the count is exact."""
    assert edsr_x2.original.params == 1369859
    match = ratio_for_budget(edsr_x2, 'params', params / 1369859, tolerance=0.01)
    assert match.params == params and match.error == 0 and match.within
    assert ratio_widths(edsr_x2, match.value) == ratio_widths(edsr_x2, ratio)
    assert set(ratio_widths(edsr_x2, ratio).values()) == {64 - math.ceil(ratio * 64)}


@pytest.fixture(scope='module')
def lsrb():
    return Backbone(LSRB_4_32, (64, 64))


def test_budget_keys_of_fmp_and_lth(lsrb):
    backbone = lsrb
    keys = fmp_keys(BudgetContext('FMP', backbone, 'macs', 0.3, 0.01, {'weight_share': 0.25}))
    # total_fixed by default: each part stops at its own target, so weight_share is the split reached
    assert keys['criterion'] == 'total_fixed' and keys['metric'] == 'flops'
    assert keys['gamma_c'] + keys['gamma_w'] == pytest.approx(0.7) and keys['gamma_w'] == pytest.approx(0.175)
    raced = fmp_keys(BudgetContext('FMP', backbone, 'macs', 0.3, 0.01, {'weight_share': 0.25, 'criterion': 'total'}))
    assert raced == dict(keys, criterion='total')
    with pytest.raises(ValueError, match='criterion'):
        fmp_keys(BudgetContext('FMP', backbone, 'macs', 0.3, 0.01, {'criterion': 'weight'}))
    with pytest.raises(ValueError, match='params budget'):
        lth_keys(BudgetContext('LTH', backbone, 'macs', 0.3, 0.01, {}))
    keys = lth_keys(BudgetContext('LTH', backbone, 'params', 0.3, 0.01, {'pruning': {'rounds': 3}}))
    assert 0 < keys['prune_fraction'] < 1 and keys['rounds'] == 3


def test_a_budget_filter_pruning_cannot_reach_is_named():
    """EDSR x4 keeps its upsampler's channels under SRP / L1-norm (PixelShuffle groups): at 16x16 most MACs
    are there, so 20 % of the MACs is out of reach; 60 % of the params is not."""
    edsr_x4 = Backbone(dict(EDSR_X2, num_feat=16, num_block=2, upscale=4), (16, 16))
    with pytest.raises(BudgetUnreachable, match='SRP cannot keep 0.2 of the macs'):
        selection_ratio_keys(BudgetContext('SRP', edsr_x4, 'macs', 0.2, 0.01, {}))
    assert 0 < selection_ratio_keys(BudgetContext('SRP', edsr_x4, 'params', 0.6, 0.01, {}))['ratio'] < 1


# ---- presets ----
def tiny_preset(tmp_path, data, name, **changes):
    preset = yaml.safe_load(open(TINY))
    preset['name'] = name
    preset['datasets']['train'].update(dataroot_gt=str(data / 'train/HR'), dataroot_lq=str(data / 'train/LR'))
    preset['datasets']['test'] = {'tiny_val': {'dataroot_gt': str(data / 'val/HR'), 'dataroot_lq': str(data / 'val/LR')}}
    for key, value in changes.items():
        node = preset
        *parents, last = key.split('.')
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / f'{name}.yml'
    path.write_text(yaml.safe_dump(preset))
    return str(path)


@pytest.mark.slow
def test_methods_missing_from_this_fmpsr_are_refused_by_name(tmp_path, data, monkeypatch):
    name = f'cmp_refuse_{uuid.uuid4().hex[:6]}'
    with pytest.raises(MethodNotAvailable, match="'NoSuchMethod'"):
        Preset(tiny_preset(tmp_path, data, name, methods={'NoSuchMethod': {}}), ROOT)
    monkeypatch.setitem(compare_methods.METHODS, 'Future', MethodEntry('FutureModel', fmp_keys, 'future'))
    with pytest.raises(MethodNotAvailable, match="'FutureModel'.*not registered"):
        Preset(tiny_preset(tmp_path, data, name, methods={'FMP': {}, 'Future': {}}), ROOT)
    # the CLI says so in one line and exits 2, before any folder is made
    result = run_cli(['-opt', tiny_preset(tmp_path, data, name, methods={'NoSuchMethod': {}})], check=False)
    assert result.returncode == 2 and 'NoSuchMethod' in result.stderr
    assert result.stderr.strip().startswith('compare: error: ') and result.stderr.strip().count('\n') == 0
    assert not osp.exists(osp.join(ROOT, 'results', 'compare', name))


@pytest.mark.parametrize('key,value,message', [
    ('budget.targets', [0.5, 1.2], 'budget.targets'),
    ('budget.metric', 'joules', 'budget.metric'),
    ('scratch.reference', ['DHP2'], 'scratch.reference'),
    ('methods.FMP.pruning.gamma_c', 0.1, 'methods.FMP.pruning.gamma_c'),
    ('methods.FMP.train', {'total_iter': 5}, 'total_iter'),
    ('datasets.train.dataroot_gt', '/no/such/folder', 'datasets.train.dataroot_gt'),
])
def test_bad_presets_are_refused_with_the_key(tmp_path, data, key, value, message):
    path = tiny_preset(tmp_path, data, 'cmp_bad', **{key: value})
    with pytest.raises(PresetError, match=message.replace('.', r'\.')):
        Preset(path, ROOT).method_cells()


# ---- equal terms: fine-tune schedules, starts, indicator form ----
PRESETS = ['tiny', 'cpu_demo', 'paper_x4']


def preset_with_data(tmp_path, data, preset_name):
    """A copy of options/compare/<preset_name>.yml reading the test's images (so it passes the checks)."""
    preset = yaml.safe_load(open(osp.join(ROOT, 'options', 'compare', f'{preset_name}.yml')))
    preset['name'] = f'eq_{preset_name}'
    preset['datasets']['train'].update(dataroot_gt=str(data / 'train/HR'), dataroot_lq=str(data / 'train/LR'))
    preset['datasets']['test'] = {'val': {'dataroot_gt': str(data / 'val/HR'), 'dataroot_lq': str(data / 'val/LR')}}
    path = tmp_path / f'{preset_name}.yml'
    path.write_text(yaml.safe_dump(preset))
    return Preset(str(path), ROOT)


@pytest.mark.parametrize('preset_name', PRESETS)
def test_every_method_fine_tunes_like_the_scratch_baselines(tmp_path, data, preset_name):
    """Same lr and one complete cosine down to the same eta_min: after any switch for the methods, over the
    whole run for scratch (the old presets fine-tuned at half the scratch lr, or cut the cosine at total_iter)."""
    from fmpsr.compare.report import finetune_schedule
    from fmpsr.compare.preset import Cell
    preset = preset_with_data(tmp_path, data, preset_name)
    cells = preset.method_cells()
    preset.check_cell_options(cells)
    total = preset.total_iter
    scratch = Cell('s', 'scratch', 0.5, 0, preset.scratch_options('s', 0, preset.opt['network_g']),
                   baseline='same_widths')
    reference = finetune_schedule(scratch, total, None)
    assert reference['prune_iterations'] == 0 and reference['finetune_iterations'] == total
    for cell in cells:
        for switch in (1, total // 3, total - 2):
            got = finetune_schedule(cell, total, switch)
            assert got['finetune_iterations'] == total - switch
            if switch < total - 2:   # (a 2-iteration cosine is half-way down at its first iteration)
                assert got['finetune_lr_start'] == pytest.approx(reference['finetune_lr_start'], rel=5e-3), cell.name
            assert got['finetune_lr_end'] == pytest.approx(reference['finetune_lr_end'], rel=1e-9), cell.name
    eta_min = preset.opt['scratch']['train']['scheduler']['eta_min']
    assert reference['finetune_lr_end'] == pytest.approx(eta_min, rel=1e-9)


def test_paper_preset_gives_fmp_the_indicator_form_of_the_paper_option_files(tmp_path, data):
    from fmpsr.models.fmp_model import FMPModel
    preset = preset_with_data(tmp_path, data, 'paper_x4')
    cell = next(c for c in preset.method_cells() if c.method == 'FMP')
    got = FMPModel.check_options(dict(cell.options, is_train=True))
    paper = yaml.safe_load(open(osp.join(ROOT, 'options', 'fmp_lsrb_x4.yml')))
    want = FMPModel.check_options(dict(paper, is_train=True))
    for key in ('indicator_update', 'lambda_w', 'weight_reg', 'weight_reg_reduction', 'weight_lr_mult', 'lambda_c'):
        assert getattr(got, key) == getattr(want, key), key
    assert want.indicator_update == 'proximal' and want.weight_reg_reduction == 'sum'


def test_lr_at_equals_basicsr_schedulers_stepped():
    from basicsr.models.lr_scheduler import CosineAnnealingRestartLR, MultiStepRestartLR
    from fmpsr.compare.report import lr_at
    for kind, options, cls in [
            ('CosineAnnealingRestartLR', {'periods': [7, 5], 'restart_weights': [1, 0.5], 'eta_min': 1e-5},
             CosineAnnealingRestartLR),
            ('MultiStepLR', {'milestones': [3, 3, 8], 'gamma': 0.5}, MultiStepRestartLR)]:
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler = cls(optimizer, **options)
        for step in range(12):
            assert lr_at(1e-3, dict(options, type=kind), step) == pytest.approx(optimizer.param_groups[0]['lr'],
                                                                                rel=1e-12), (kind, step)
            optimizer.step()
            scheduler.step()


def test_report_says_what_every_cell_starts_from(tmp_path, data):
    from fmpsr.compare.report import start_line
    preset = preset_with_data(tmp_path, data, 'paper_x4')   # no pretrain track: every cell from random weights
    line = start_line(preset)
    assert 'random initialisation' in line and 'prune a pretrained network in their papers' in line, line
    named = line.split('same for all. ')[1].split(' prune a pretrained')[0]
    assert sorted(named.split(', ')) == ['ASSL', 'L1-norm', 'SRP']
    preset = preset_with_data(tmp_path, data, 'cpu_demo')   # the charged dense start of SRP, ASSL, L1-norm
    line = start_line(preset)
    assert line.startswith('- SRP, ASSL, L1-norm start from a dense network trained from random initialisation '
                           'for 200 iterations'), line
    assert 'then train 600: the dense training is charged to their budget of 800 iterations' in line
    others = line.split('iterations. ')[-1].split(' and the scratch baselines start from random weights')[0]
    assert sorted(others.split(', ')) == ['DHP', 'FMP', 'ISS-P', 'Kernel-ERSS-L', 'LTH'], line


# ---- report helpers ----
def record(method, target, seed, psnr):
    return {'method': method, 'kind': 'method', 'target': {'kept': target}, 'seed': seed, 'within_tolerance': True,
            'reached': {'params_nonzero': 1, 'params_dense': 1, 'macs_nonzero': 1, 'macs_dense': 1}, 'kept': target,
            'iterations': 10, 'prune_iterations': 5, 'test': {'val': {'psnr': psnr, 'ssim': 0.5}}}


def test_ties_are_differences_below_the_spread():
    records = [record('A', 0.5, 0, 30.0), record('A', 0.5, 1, 30.2),    # mean 30.1, std 0.141
               record('B', 0.5, 0, 30.0), record('B', 0.5, 1, 30.1),    # mean 30.05: 0.05 below A -> tie
               record('C', 0.5, 0, 29.0), record('C', 0.5, 1, 29.1)]    # a whole dB below -> no tie
    summary = summarize(records, ['val'])
    assert summary[('A', 0.5)]['psnr']['val'][0] == pytest.approx(30.1)
    assert summary[('A', 0.5)]['psnr']['val'][1] == pytest.approx(0.2 / 2 ** 0.5)
    marks = mark_ties(summary, ['val'])
    assert (marks[('A', 0.5, 'val')], marks[('B', 0.5, 'val')], marks[('C', 0.5, 'val')]) == ('best', 'tie', '')
    one_seed = summarize([record('A', 0.5, 0, 30.0), record('B', 0.5, 0, 29.99)], ['val'])
    assert mark_ties(one_seed, ['val'])[('B', 0.5, 'val')] == ''   # no spread, no tie


def test_kept_curve_reads_every_log_of_a_resumed_run(tmp_path):
    (tmp_path / 'train_x_1.log').write_text('[prune iter 10] params: channel ratio 0.1, weight ratio 0.0, kept 0.9000 (x)\n'
                                            '[prune iter 20] params: channel ratio 0.2, weight ratio 0.0, kept 0.8000\n')
    (tmp_path / 'train_x_2.log').write_text('noise\n[prune iter 20] flops: channel ratio 0.25, weight ratio 0.0, kept 0.7500\n')
    assert kept_curve(str(tmp_path)) == [(10, 0.9), (20, 0.75)]
    (tmp_path / 'training_states').mkdir()
    (tmp_path / 'training_states' / '1000.state').write_bytes(b'')
    assert trained_iterations(str(tmp_path)) == 1000
    with open(tmp_path / 'train_x_2.log', 'a') as f:
        f.write('2026 INFO: [cmp_t..][epoch:  3, iter:   1,200, lr:(1.000e-03,)] [eta: 0:00:00] l_pix: 1e-2\n')
    assert trained_iterations(str(tmp_path)) == 1200


# ---- end to end ----
def run_cli(args, check=True):
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    if check:
        return run([sys.executable, 'scripts/compare.py'] + args, timeout=900)
    return subprocess.run([sys.executable, 'scripts/compare.py'] + args, cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture
def tiny_run(tmp_path, data):
    name = f'tiny_{uuid.uuid4().hex[:8]}'
    path = tiny_preset(tmp_path, data, name)
    yield name, path
    shutil.rmtree(osp.join(ROOT, 'results', 'compare', name), ignore_errors=True)
    for folder in glob.glob(osp.join(ROOT, 'experiments', f'cmp_{name}_*')) + \
            glob.glob(osp.join(ROOT, 'results', f'cmp_{name}_*')) + glob.glob(osp.join(ROOT, 'tb_logger', f'cmp_{name}_*')):
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_tiny_preset_end_to_end_recounted_and_not_rerun(tiny_run, capsys):
    name, path = tiny_run
    first = run_cli(['-opt', path])
    out = osp.join(ROOT, 'results', 'compare', name)
    assert 'ran 10 cells' in first.stdout
    with open(osp.join(out, 'results.jsonl')) as f:
        records = [json.loads(line) for line in f]
    preset = yaml.safe_load(open(path))
    size = tuple(preset['macs_input_size'])
    original, _ = recount_dense(preset['network_g'], size)
    by_cell = {r['cell']: r for r in records}
    assert sorted(by_cell) == sorted(
        [f'{m}-params{t}-s0' for m in ('FMP', 'DHP') for t in (0.7, 0.5)]
        + [f'scratch-{k}-FMP-params{t}-s0' for k in ('same_widths', 'uniform_params', 'uniform_macs') for t in (0.7, 0.5)])
    report = open(osp.join(out, 'report.md')).read()
    for r in records:
        exp = osp.join(ROOT, r['experiment'])
        counts, network_g = recount(osp.join(exp, 'export'), size)
        assert r['reached'] == dict(counts, **{f'kept_{k}': v / original['params_dense' if k.startswith('params') else 'macs_dense']
                                               for k, v in counts.items()})
        assert r['original'] == {'params': original['params_dense'], 'macs': original['macs_dense']}
        kept = counts['params_nonzero'] / original['params_dense']
        assert r['kept'] == pytest.approx(kept, abs=0)
        if r['kind'] == 'method':
            assert r['within_tolerance'] == (abs(kept - r['target']['kept']) <= 0.01)
        metrics = json.load(open(osp.join(ROOT, 'results', f'cmp_{name}_{r["cell"]}_test', 'metrics.json')))
        assert r['test'] == {'tiny_val': metrics['tiny_val']}
        assert r['iterations'] == r['total_iter'] == 40       # the same training length for every cell
        # the last stage's schedule: a method's fine-tune after its switch, a scratch run's whole run; both
        # anneal to the preset's eta_min at iteration 40, from the same lr
        schedule = r['schedule']
        switch = 0 if r['kind'] == 'scratch' else r['prune_iterations']
        assert schedule['prune_iterations'] == switch and schedule['finetune_iterations'] == 40 - switch
        assert schedule['finetune_lr_end'] == pytest.approx(1e-5, rel=1e-9)
        assert r['start'] == 'random initialisation'
        if r['kind'] == 'method':
            assert set(r['search']['selection']['groups']) >= {'stream'}
        assert f"{counts['params_nonzero'] / 1e3:,.1f} K" in report and f"{metrics['tiny_val']['psnr']:.2f}" in report
        opt = yaml.safe_load(open(osp.join(out, 'options', f'{r["cell"]}.yml')))
        assert opt['manual_seed'] == 0 and opt['train']['total_iter'] == 40
        if r['kind'] == 'method':
            assert opt['pruning']['metric'] == 'params'
        else:
            assert opt['model_type'] == 'PrunedSRModel' and opt['path']['pretrain_network_g'] is None
    for t in (0.7, 0.5):
        fmp = by_cell[f'FMP-params{t}-s0']
        assert fmp['pruning']['gamma_c'] + fmp['pruning']['gamma_w'] == pytest.approx(1 - t)
        same = by_cell[f'scratch-same_widths-FMP-params{t}-s0']
        assert same['network_g'] == fmp['network_g'] and same['widths'] == fmp['widths']
        up = by_cell[f'scratch-uniform_params-FMP-params{t}-s0']['reached']['params_dense']
        um = by_cell[f'scratch-uniform_macs-FMP-params{t}-s0']['reached']['macs_dense']
        assert abs(up / fmp['reached']['params_nonzero'] - 1) <= 0.02
        assert abs(um / fmp['reached']['macs_nonzero'] - 1) <= 0.02
    assert 'fine-tune: iterations (lr start → end)' in report and 'random initialisation' in report
    for figure in ('psnr_vs_params', 'psnr_vs_macs', 'widths', 'kept_vs_iter'):
        with open(osp.join(out, 'figures', f'{figure}.png'), 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'
        assert f'figures/{figure}.png' in report
    # the prune-stage log lines were parsed into the kept-ratio figure's data
    fmp_dir = osp.join(ROOT, by_cell['FMP-params0.5-s0']['experiment'])
    curve = kept_curve(fmp_dir)
    assert curve and curve[-1][0] == by_cell['FMP-params0.5-s0']['prune_iterations'], \
        (curve, os.listdir(fmp_dir), [open(p).read()[-3000:] for p in glob.glob(osp.join(fmp_dir, 'train_*.log'))])

    logs = sorted(os.listdir(osp.join(out, 'logs')))
    stamps = {p: os.path.getmtime(p) for p in glob.glob(osp.join(ROOT, 'experiments', f'cmp_{name}_*', 'export', '*'))}
    second = run_cli(['-opt', path])
    assert 'ran 0 cells' in second.stdout and 'train:' not in second.stdout
    assert sorted(os.listdir(osp.join(out, 'logs'))) == logs
    assert {p: os.path.getmtime(p) for p in stamps} == stamps
    # a cell whose test results are gone runs its test again, not its training
    shutil.rmtree(osp.join(ROOT, 'results', f'cmp_{name}_DHP-params0.5-s0_test'))
    third = run_cli(['-opt', path])
    assert 'ran 1 cells' in third.stdout and 'DHP-params0.5-s0: test:' in third.stdout and 'train:' not in third.stdout
    # --report-only rewrites the same report from the files; --dry-run lists the method cells
    from fmpsr.compare.runner import main
    before = open(osp.join(out, 'results.jsonl')).read()
    capsys.readouterr()
    assert main(['-opt', path, '--report-only']) == 0
    assert open(osp.join(out, 'results.jsonl')).read() == before
    said = capsys.readouterr().out
    assert f'report of {len(by_cell)} finished cell(s) of {len(by_cell)}: results/compare/{name}/report.md' in said
    assert main(['-opt', path, '--dry-run']) == 0
    listed = [line.split(':')[0] for line in capsys.readouterr().out.splitlines() if line.endswith('}')]
    assert sorted(listed) == sorted(c for c in by_cell if not c.startswith('scratch'))


def recount_dense(network_g, size):
    from basicsr.archs import build_network
    net = build_network(dict(network_g))
    return count_network(net, net.state_dict(), size), network_g


# ---- the pretrained track: a dense start charged to the methods that prune a pretrained network ----
@pytest.mark.parametrize('pretrain,message', [
    ({'iterations': 40}, r'pretrain\.iterations'),            # not below total_iter
    ({'iterations': 10, 'methods': ['FMP']}, r'pretrain\.methods.*FMP'),   # FMP searches from scratch
    ({'iterations': 10, 'methods': ['SRP']}, r'pretrain\.methods'),        # not a method of the preset
    ({'iterations': 10, 'warmup': 3}, r'pretrain: unknown key'),
])
def test_bad_pretrain_sections_are_refused_with_the_key(tmp_path, data, pretrain, message):
    path = tiny_preset(tmp_path, data, 'cmp_bad_pretrain', pretrain=pretrain)
    with pytest.raises(PresetError, match=message):
        Preset(path, ROOT)


def test_pretrained_cells_start_from_the_dense_cell_and_are_charged_its_iterations(tmp_path, data):
    path = tiny_preset(tmp_path, data, 'cmp_pre', methods={'FMP': {}, 'L1-norm': {'pruning': {'mode': 'aligned'}}},
                       pretrain={'iterations': 15})
    preset = Preset(path, ROOT)
    dense = preset.pretrain_cells()
    assert [c.name for c in dense] == ['pretrain-dense-s0'] and dense[0].is_pretrain
    assert dense[0].options['train']['total_iter'] == 15 and 'finetune' not in dense[0].options['train']
    assert dense[0].options['network_g'] == preset.opt['network_g']
    assert dense[0].options['train']['scheduler'] == preset.scratch['train']['scheduler']   # the scratch schedule
    for cell in preset.method_cells():
        start = cell.options['path']['pretrain_network_g']
        if cell.method == 'L1-norm':
            assert start == preset.dense_start_path(0) and cell.options['train']['total_iter'] == 25
        else:   # FMP searches from random weights for the whole budget
            assert start is None and cell.options['train']['total_iter'] == 40


@pytest.mark.slow
def test_pretrain_track_end_to_end(tmp_path, data):
    """The dense cell trains first; L1-norm's cells load its weights, train total_iter minus its iterations,
    and the report says both."""
    name = f'pre_{uuid.uuid4().hex[:8]}'
    path = tiny_preset(tmp_path, data, name, methods={'L1-norm': {'pruning': {'mode': 'aligned'}}},
                       pretrain={'iterations': 20}, scratch=None,
                       **{'budget.targets': [0.5], 'budget.tolerance': 0.05})   # L1-norm's closest on LSRB-2-12
    try:
        run_cli(['-opt', path])
        out = osp.join(ROOT, 'results', 'compare', name)
        dense_exp = osp.join(ROOT, 'experiments', f'cmp_{name}_pretrain-dense-s0')
        assert trained_iterations(dense_exp) == 20
        start = osp.join(dense_exp, 'export', 'net_g_dense.pth')
        dense_state = torch.load(start, weights_only=True)['params']
        from basicsr.archs import build_network
        net = build_network(dict(yaml.safe_load(open(path))['network_g']))
        net.load_state_dict(dense_state)   # the dense network, all of it
        with open(osp.join(out, 'results.jsonl')) as f:
            (r,) = [json.loads(line) for line in f]
        assert r['cell'] == 'L1-norm-params0.5-s0' and r['pretrain_iterations'] == 20 and r['total_iter'] == 20
        assert r['iterations'] == 20 and 'dense network trained 20 iterations' in r['start']
        log = ''.join(open(p).read() for p in glob.glob(osp.join(ROOT, r['experiment'], 'train_*.log')))
        assert f'weights from {osp.relpath(start, ROOT)}' in log
        report = open(osp.join(out, 'report.md')).read()
        assert 'start from a dense network trained from random initialisation for 20 iterations' in report
    finally:
        shutil.rmtree(osp.join(ROOT, 'results', 'compare', name), ignore_errors=True)
        for folder in glob.glob(osp.join(ROOT, 'experiments', f'cmp_{name}_*')) + \
                glob.glob(osp.join(ROOT, 'results', f'cmp_{name}_*')):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize('folder, hint', [
    ('datasets/demo_x2/train/HR_sub', 'build_demo_dataset.py --output datasets/demo_x2 --scale 4'),
    ('datasets/DF2K/HR_sub', "README's 'Prepare the data sets'")])
def test_a_missing_data_folder_names_the_command_that_makes_it(tmp_path, data, folder, hint):
    """The hint builds the folder the preset reads (tiny.yml reads datasets/demo_x2, and --output datasets/demo
    would have been the x4 demo data); DF2K cannot be built by the demo builder."""
    preset = yaml.safe_load(open(osp.join(ROOT, 'options', 'compare', 'cpu_demo.yml')))
    preset['datasets']['train']['dataroot_gt'] = folder
    path = tmp_path / 'p.yml'
    path.write_text(yaml.safe_dump(preset))
    with pytest.raises(PresetError) as e:
        Preset(str(path), str(tmp_path))
    assert f"datasets.train.dataroot_gt: '{folder}' does not exist" in str(e.value) and hint in str(e.value)


def test_dry_run_lists_the_dense_starts_the_method_cells_and_how_many_scratch_cells_follow(tmp_path, data, capsys):
    """--dry-run lists every cell it can name before training (the scratch cells' widths come from FMP's
    finished cells, so they are counted, not listed)."""
    from fmpsr.compare.runner import main
    preset_with_data(tmp_path, data, 'cpu_demo')
    assert main(['-opt', str(tmp_path / 'cpu_demo.yml'), '--dry-run']) == 0
    lines = capsys.readouterr().out.splitlines()
    # --report-only with nothing finished writes nothing (an earlier report is not replaced by an empty one)
    out_dir = osp.join(ROOT, 'results', 'compare', 'eq_cpu_demo')
    existed = osp.exists(out_dir)
    assert main(['-opt', str(tmp_path / 'cpu_demo.yml'), '--report-only']) == 0
    assert 'no finished cell of 72 under experiments/; nothing written' in capsys.readouterr().out
    assert osp.exists(out_dir) == existed
    dense = [line for line in lines if 'dense pretraining' in line]
    assert [line.split(':')[0] for line in dense] == ['pretrain-dense-s0', 'pretrain-dense-s1', 'pretrain-dense-s2']
    assert 'dense pretraining of 200 iterations (the start of SRP, ASSL, L1-norm)' in dense[0]
    methods = [line for line in lines if line.endswith('}')]
    assert len(methods) == 8 * 3 * 3   # 8 methods x 3 budgets x 3 seeds
    assert lines[-1].startswith('and 27 scratch cells (same_widths, uniform_params, uniform_macs of each of the 9 '
                                'cells of FMP)'), lines[-1]

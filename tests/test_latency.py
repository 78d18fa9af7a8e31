"""``pruning.metric: latency`` (fmpsr.pruning.latency): the per-conv table's grid and interpolation, the
criteria's refusal of weight targets, the pruner's latency ratios against an independent recount from the
finalized compact network's conv shapes, a measured table's round trip and shape check, and a model that
measures its table once, caches it in the experiment folder and reads it back on a second build."""
import json

import pytest
import torch
import yaml
from conftest import SCALE, build_model_in, write_options

import fmpsr  # noqa: F401
from basicsr.archs import build_network
from fmpsr.pruning import FMPConfig, FMPPruner, HyperNetwork, build_grouping, finalize, trace_conv_specs
from fmpsr.pruning.criteria import ConvergenceCriterion
from fmpsr.pruning.latency import LatencyTable, grid_step, latency_keys, measure_table, width_grid

LSRB = {'type': 'LSRB', 'num_feat': 12, 'num_block': 2, 'upscale': SCALE, 'esa_channels': 6}
SIZE = (16, 16)


def test_width_grid():
    assert width_grid(32, 16) == [1, 16, 32]
    assert width_grid(12, 4) == [1, 4, 8, 12]
    assert width_grid(3, 4) == [1, 3]
    assert width_grid(48, 5) == [1, 5, 10, 15, 20, 25, 30, 35, 40, 45, 48]
    assert grid_step(latency_keys({}), 1) == 4 and grid_step(latency_keys({}), 16) == 16
    assert grid_step(latency_keys({'step': 8}), 16) == 8


def synthetic_table(specs, f):
    """A table whose seconds are f(c_in, c_out, spec) at every grid point (no timing)."""
    convs = {}
    for name, spec in specs.items():
        gi, go = width_grid(spec.in_channels, 4), width_grid(spec.out_channels, 4)
        convs[name] = {'grid_in': gi, 'grid_out': go, 'seconds': [[f(a, b, spec) for b in go] for a in gi],
                       'spec': None}
    return LatencyTable(convs, {'device': 'synthetic'})


def bilinear(a, b, spec):  # bilinear in (c_in, c_out): interpolation on any grid reproduces it exactly
    return 1e-6 * (a * b * spec.kernel_area + 2 * a + 3 * b + 5)


def test_interpolation_is_exact_for_bilinear_costs_and_clamped():
    specs = trace_conv_specs(build_network(dict(LSRB)), SIZE)
    table = synthetic_table(specs, bilinear)
    name, spec = next((n, s) for n, s in specs.items() if s.in_channels == 12 and s.out_channels == 12)
    for a, b in [(5, 7), (12, 3), (1, 11), (9, 9)]:
        assert table.conv_seconds(name, a, b) == pytest.approx(bilinear(a, b, spec), rel=1e-12)
    step = synthetic_table(specs, lambda a, b, s: float(a >= 8))   # a cliff between grid points 4 and 8
    assert step.conv_seconds(name, 6, 12) == pytest.approx(0.5)
    assert table.conv_seconds(name, 40, 40) == pytest.approx(bilinear(12, 12, spec))   # clamped to the grid


@pytest.mark.parametrize('changes', [{'criterion': 'total', 'gamma_w': 0.1}, {'criterion': 'weight', 'gamma_w': 0.1},
                                     {'criterion': 'total_fixed', 'gamma_w': 0.1}])
def test_weight_targets_are_refused_with_latency(changes):
    opts = {'metric': 'latency', 'criterion': 'channel', 'gamma_c': 0.3, 'gamma_w': 0.0, **changes}
    with pytest.raises(ValueError, match='weight zeros do not make a dense kernel faster'):
        ConvergenceCriterion(opts['metric'], opts['criterion'], opts['gamma_c'], opts['gamma_w'])
    FMPConfig.from_options({'metric': 'latency', 'criterion': 'channel', 'gamma_c': 0.3})   # gamma_w unused: fine
    with pytest.raises(ValueError, match='pruning.latency is set but pruning.metric'):
        FMPConfig.from_options({'latency': {'step': 4}})
    with pytest.raises(ValueError, match=r"pruning.latency: unknown key\(s\) \['steps'\]"):
        FMPConfig.from_options({'metric': 'latency', 'gamma_w': 0, 'latency': {'steps': 4}})


def pruned_hypernetwork(round_to=1):
    plain = build_network(dict(LSRB))
    specs = trace_conv_specs(plain, SIZE)
    grouping = build_grouping(plain, dict(LSRB), None, torch.zeros(1, 3, *SIZE))
    hyper = HyperNetwork(plain, grouping, 8)
    torch.manual_seed(1)
    with torch.no_grad():
        for vector in hyper.prunable_vectors():
            vector.z.mul_((torch.rand_like(vector.z) > 0.4).float())   # about 40 % of each vector to zero
    return plain, specs, hyper


def test_pruner_latency_ratio_equals_a_recount_from_the_compact_network():
    plain, specs, hyper = pruned_hypernetwork()
    table = synthetic_table(specs, lambda a, b, s: 1e-6 * (a * b * s.kernel_area + 4 * b))
    config = FMPConfig.from_options({'metric': 'latency', 'criterion': 'channel', 'gamma_c': 0.3,
                                     'macs_input_size': list(SIZE), 'min_channels': 1})
    pruner = FMPPruner(hyper, specs, config, latency=table)
    pruner.check()
    compact = finalize(hyper, build_network, dict(LSRB))[0]
    widths = {n: (m.in_channels, m.out_channels) for n, m in compact.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert set(widths) == set(specs)
    kept = sum(1e-6 * (a * b * specs[n].kernel_area + 4 * b) for n, (a, b) in widths.items())
    dense = sum(1e-6 * (s.in_channels * s.out_channels * s.kernel_area + 4 * s.out_channels) for s in specs.values())
    assert any(w != (specs[n].in_channels, specs[n].out_channels) for n, w in widths.items())   # something pruned
    assert pruner.ratios.channel_ratio('latency') == pytest.approx(1 - kept / dense, rel=1e-9)
    assert pruner.ratios.weight_ratio('latency') == 0 and pruner.weight_granularity() == 0
    assert pruner.ratios.as_dict()['latency_total_ratio'] == pytest.approx(kept / dense, rel=1e-9)
    with pytest.raises(ValueError, match='needs a latency table'):
        FMPPruner(hyper, specs, config)
    # one point: the dense network's time outside its convs is added to every count, pruned or not
    table.meta.update(conv_sum_s=dense, network_s=3 * dense)
    pruner = FMPPruner(hyper, specs, config, latency=table)
    assert pruner.ratios.total_ratio('latency') == pytest.approx((kept + 2 * dense) / (3 * dense), rel=1e-9)
    # two points: time = a * conv sum + b through (dense, 3 dense) and (dense / 2, 2 dense): a = 2, b = dense
    table.meta.update(narrow_conv_sum_s=dense / 2, narrow_network_s=2 * dense)
    assert table.line == pytest.approx((2.0, dense), rel=1e-9)
    pruner = FMPPruner(hyper, specs, config, latency=table)
    assert pruner.ratios.total_ratio('latency') == pytest.approx((2 * kept + dense) / (3 * dense), rel=1e-9)


def test_measured_table_round_trips_and_refuses_another_network(tmp_path):
    plain = build_network(dict(LSRB))
    specs = trace_conv_specs(plain, SIZE)
    narrow = build_network(dict(LSRB, num_feat=6))
    table = measure_table(plain, specs, SIZE, threads=1, step=6, warmup=1, repeats=2, narrow=narrow)
    assert set(table.convs) == set(specs)
    head = table.convs['conv_first'] if 'conv_first' in table.convs else next(iter(table.convs.values()))
    assert head['grid_in'] == width_grid(head['spec']['in_channels'], 6)
    assert all(t > 0 for entry in table.convs.values() for row in entry['seconds'] for t in row)
    assert table.meta['conv_sum_s'] == pytest.approx(table.conv_total(specs)) and table.meta['network_s'] > 0
    assert table.meta['narrow_widths']['conv_first'] == [3, 6] and table.meta['narrow_network_s'] > 0
    m, (scale, offset) = table.meta, table.line
    if m['narrow_network_s'] < m['network_s'] and m['narrow_conv_sum_s'] < m['conv_sum_s']:   # two points
        assert table.total(specs) == pytest.approx(m['network_s'], rel=1e-9)
        assert scale * m['narrow_conv_sum_s'] + offset == pytest.approx(m['narrow_network_s'], rel=1e-9)
    else:                          # timing noise on a loaded machine (no positive slope): one point, slope 1
        assert (scale, offset) == (1.0, max(m['network_s'] - m['conv_sum_s'], 0.0))
    path = tmp_path / 'table.json'
    table.save(str(path))
    again = LatencyTable.load(str(path))
    again.check_matches(specs, str(path))
    assert again.total(specs) == pytest.approx(table.total(specs), rel=1e-12)
    other = trace_conv_specs(build_network(dict(LSRB, num_feat=16)), SIZE)
    with pytest.raises(ValueError, match='table.json'):
        again.check_matches(other, str(path))
    path.write_text('{"version": 99}')
    with pytest.raises(ValueError, match='is not a latency table'):
        LatencyTable.load(str(path))


def build_model(tmp_path, data, **extra):
    return build_model_in(tmp_path, data, 'pytest_latency', **extra)


LATENCY_OPTIONS = {'pruning.metric': 'latency', 'pruning.gamma_w': 0.0,
                   'pruning.latency': {'device': 'cpu', 'threads': 1, 'step': 6, 'warmup': 1, 'repeats': 2}}


def test_model_measures_once_and_reads_its_cache_back(tmp_path, data):
    model = build_model(tmp_path, data, **LATENCY_OPTIONS)
    cache = tmp_path / 'exp' / 'latency_table.json'
    assert cache.is_file()
    saved = json.loads(cache.read_text())
    assert saved['meta']['step'] == 6 and saved['meta']['threads'] == 1
    assert model.pruner.latency is not None and model.pruner.ratios.channel_ratio('latency') == 0
    widths = saved['meta']['narrow_widths']           # every prunable group at half width (12 -> 6, ESA 6 -> 6)
    assert widths['conv_first'] == [3, 6] and widths['body.0.esa.conv1'][0] == 6
    with open(cache, 'w') as f:     # a resumed run reads the file: make it recognisable
        saved['meta']['device_name'] = 'from the cache'
        json.dump(saved, f)
    again = build_model(tmp_path, data, **LATENCY_OPTIONS)
    assert again.pruner.latency.meta['device_name'] == 'from the cache'
    missing = dict(LATENCY_OPTIONS, **{'pruning.latency': {'table': str(tmp_path / 'nope.json')}})
    from fmpsr.models.fmp_model import FMPModel
    opt = yaml.safe_load(open(tmp_path / 'opt.yml'))
    opt['pruning'].update(metric='latency', gamma_w=0.0, latency=missing['pruning.latency'])
    with pytest.raises(FileNotFoundError, match='nope.json'):
        FMPModel.check_options(opt)


@pytest.mark.slow
def test_latency_table_script_writes_a_table_the_model_accepts(tmp_path, data):
    """scripts/benchmark/latency_table.py on the tiny option file: the JSON line, the table file, and the
    same table given to a model as pruning.latency.table (copied into its experiment folder)."""
    import importlib.util
    import os.path as osp
    root = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
    spec = importlib.util.spec_from_file_location('latency_table', osp.join(root, 'scripts/benchmark/latency_table.py'))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    write_options(tmp_path / 'opt.yml', 'pytest_latency', data)
    out = tmp_path / 'table.json'
    result = script.main(['-opt', str(tmp_path / 'opt.yml'), '-o', str(out), '--threads', '1', '--step', '6',
                          '--warmup', '1', '--repeats', '2', '--check', '6,12'])
    assert out.is_file() and result['step'] == 6 and result['input_size'] == [16, 16]
    widths = {w['num_feat']: w for w in result['check']['widths']}
    assert widths[12]['predicted_fraction'] == pytest.approx(1.0)     # num_feat 12 is the dense network itself
    written = LatencyTable.load(str(out))                               # recount the prediction from the file
    small = trace_conv_specs(build_network(dict(LSRB, num_feat=6)), SIZE)
    dense_specs = trace_conv_specs(build_network(dict(LSRB)), SIZE)
    expected = written.total(dense_specs, {n: v.in_channels for n, v in small.items()},
                             {n: v.out_channels for n, v in small.items()}) / written.total(dense_specs)
    assert widths[6]['predicted_fraction'] == pytest.approx(expected, rel=1e-9)   # no timing is asserted
    (tmp_path / 'run').mkdir()
    model = build_model(tmp_path / 'run', data, **dict(LATENCY_OPTIONS, **{'pruning.latency': {'table': str(out)}}))
    copied = tmp_path / 'run' / 'exp' / 'latency_table.json'
    assert json.loads(copied.read_text()) == json.loads(out.read_text())
    assert model.pruner.latency.meta['step'] == 6

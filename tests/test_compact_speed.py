"""The compact-vs-dense benchmark (scripts/benchmark/compact_speed.py) runs and reports counts that
agree with independent recounts (no timing is asserted: speed is read off the JSON on a quiet
machine, see scripts/benchmark/README.md)."""
import importlib.util
import json
import os
import os.path as osp

import pytest
from safetensors.torch import load_file

from basicsr.archs import build_network
from deploy_helpers import LSRB_COMPACT, LSRB_DENSE, make_export

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))


@pytest.fixture(scope='module')
def script():
    spec = importlib.util.spec_from_file_location(
        'compact_speed', osp.join(ROOT, 'scripts', 'benchmark', 'compact_speed.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lsrb_conv_pixels(name, size):
    """Output pixels of an LSRB conv at a square LR input of ``size``, by hand: ESA's conv2 is a 3x3
    stride-2 conv without padding, conv3 runs after a 7x7 stride-3 max-pool of that."""
    strided = (size - 3) // 2 + 1
    pooled = (strided - 7) // 3 + 1
    if name.endswith('esa.conv2'):
        return strided ** 2
    if name.endswith('esa.conv3'):
        return pooled ** 2
    return size ** 2


@pytest.mark.slow
def test_quick_run_reports_consistent_counts(tmp_path, script, capsys):
    _, export = make_export(tmp_path / 'export', LSRB_COMPACT, zero_fraction=0.4, dense_opt=LSRB_DENSE)
    result = script.main(['--quick', '--no-onnx', export])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    assert result['benchmark'] == 'compact_speed' and result['dense_source'] == 'pruning.json:original_network_g'
    assert result['threads'] == int(os.environ.get('OMP_NUM_THREADS') or 2) and result['config']['scale'] == 2
    assert result['representative'] is False and '--quick' in result['not_representative_because'][0]
    dense, compact = result['networks']['dense'], result['networks']['compact']
    for stats in (dense, compact):
        for key in ('params', 'params_nonzero', 'macs_ntire_lr256', 'macs_hd_out1280x720', 'eager_ms',
                    'peak_memory_bytes', 'file_bytes'):
            assert key in stats
        timing = stats['eager_ms']
        assert timing['n'] == 3 and timing['min'] <= timing['p10'] <= timing['median'] <= timing['p90'] <= timing['max']
        assert stats['macs_ntire_lr256']['lr_size'] == [256, 256]
        assert stats['macs_hd_out1280x720']['lr_size'] == [360, 640]  # x2: 1280 x 720 output
        for size_key in ('macs_ntire_lr256', 'macs_hd_out1280x720'):  # FlopCounterMode == conv hooks
            assert stats[size_key]['macs'] == stats[size_key]['conv_macs']
    # params recounted from the files / a fresh dense build
    state = load_file(osp.join(export, 'net_g.safetensors'))
    assert compact['params'] == sum(t.numel() for t in state.values())
    assert compact['params_nonzero'] == sum(int((t != 0).sum()) for t in state.values()) < compact['params']
    dense_net = build_network(dict(LSRB_DENSE))
    assert dense['params'] == dense['params_nonzero'] == sum(t.numel() for t in dense_net.state_dict().values())
    # nonzero MACs at 256 x 256 recounted with output sizes worked out by hand
    weights = {k[:-len('.weight')]: v for k, v in state.items() if k.endswith('.weight')}
    expected = sum(int((w != 0).sum()) * lsrb_conv_pixels(name, 256) for name, w in weights.items())
    assert compact['macs_ntire_lr256']['macs_nonzero'] == expected
    expected_dense = sum(w.numel() * lsrb_conv_pixels(name, 256) for name, w in weights.items())
    assert compact['macs_ntire_lr256']['macs'] == expected_dense
    assert compact['file_bytes'] == osp.getsize(osp.join(export, 'net_g.safetensors'))
    assert compact['sparse_file_bytes'] > 0 and dense['file_bytes'] > compact['file_bytes']
    ratios = result['ratios']
    assert ratios['macs_reduction'] == pytest.approx(
        dense['macs_hd_out1280x720']['macs'] / compact['macs_hd_out1280x720']['macs'], rel=1e-3)
    speedup = dense['eager_ms']['median'] / compact['eager_ms']['median']
    assert ratios['eager_speedup'] == pytest.approx(speedup, rel=1e-2)


def test_dense_original_of_a_compactarch_export(tmp_path, script):
    from deploy_helpers import EDSR_COMPACT, EDSR_DENSE
    _, export = make_export(tmp_path / 'export', EDSR_COMPACT)
    options = script.dense_options(export, EDSR_COMPACT)
    assert options == (EDSR_DENSE, 'network_g.arch (CompactArch)')
    _, lsrb = make_export(tmp_path / 'lsrb', LSRB_COMPACT)  # no pruning.json, no option file
    with pytest.raises(ValueError, match='cannot tell which dense network'):
        script.dense_options(lsrb, LSRB_COMPACT)
    assert script.dense_options(lsrb, LSRB_COMPACT, json.dumps(LSRB_DENSE)) == (LSRB_DENSE, '--dense')


def test_width_sweep(script, capsys):
    result = script.main(['--widths', '8,12,16', '--quick', '--num-block', '1', '--scale', '2'])
    assert result['benchmark'] == 'compact_speed_widths'
    assert [r['num_feat'] for r in result['rows']] == [8, 12, 16]
    macs = [r['macs'] for r in result['rows']]
    assert macs[0] < macs[1] < macs[2]
    assert set(result['throughput_by_multiple']) == {'8', '16'}  # 4 divides all three: nothing to compare
    assert result['favoured_multiple'] in (1, 8, 16)


def test_favoured_multiple_on_the_issue_measurements(script):
    # issue 10, 2-core x86 CPU, LSRB-4-C at LR 180x320: (C, GMACs, ms); 16 and 32 beat the trend
    rows = [{'num_feat': c, 'gmacs_per_s': g / t * 1e3}
            for c, g, t in ((16, 2.00, 51.1), (24, 3.83, 99.8), (28, 4.99, 96.2), (32, 6.30, 92.9))]
    by_multiple, favoured = script.favoured_multiple(rows)
    assert favoured == 16 and by_multiple[16]['ratio'] > 1.2
    flat = [{'num_feat': c, 'gmacs_per_s': 10.0 + 0.1 * c} for c in (16, 20, 24, 28, 32)]  # no multiple stands out
    assert script.favoured_multiple(flat)[1] == 1


@pytest.mark.slow
def test_speed_table_rows_match_their_json(tmp_path, capsys):
    """scripts/benchmark/speed_table.py: one Markdown row per export whose numbers are those of the
    compact_speed JSON it wrote (eager ms, speed-up, MACs, params)."""
    spec = importlib.util.spec_from_file_location('speed_table', osp.join(ROOT, 'scripts', 'benchmark', 'speed_table.py'))
    table_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table_script)
    _, export = make_export(tmp_path / 'run' / 'export', LSRB_COMPACT, zero_fraction=0.4, dense_opt=LSRB_DENSE)
    out = tmp_path / 'runs.jsonl'
    table = table_script.main([export, '--json', str(out), '--', '--quick', '--no-onnx', '--no-memory'])
    assert capsys.readouterr().out.strip() == table          # only the table on stdout
    rows = [line for line in table.splitlines() if line.startswith('| run ')]
    result = json.loads(out.read_text().splitlines()[0])
    compact, dense = result['networks']['compact'], result['networks']['dense']
    # --quick: the row is marked as not representative, the reason below the table
    assert len(rows) == 1 and f"| run * | {compact['eager_ms']['median']:.1f} / {dense['eager_ms']['median']:.1f} " \
        f"({result['ratios']['eager_speedup']:.2f}x) | - |" in rows[0]
    assert f"{compact['params'] / 1e3:.1f} K ({compact['params_nonzero'] / 1e3:.1f} K nonzero)" in rows[0]

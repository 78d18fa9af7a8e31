"""scripts/benchmark/registry_support.py: every arch registered in BasicSR's ARCH_REGISTRY (and
fmpsr's) ends as "works" (FMP pruned channels and the compact network equals the hypernetwork in
float64), "refused" (with the module named) or "skipped" (not an SR generator, with the reason);
none ends as "fails"."""
import importlib.util
import json
import os.path as osp

import pytest

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))


def load_script():
    spec = importlib.util.spec_from_file_location(
        'registry_support', osp.join(ROOT, 'scripts', 'benchmark', 'registry_support.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_registered_arch_works_or_is_refused_or_skipped_with_a_reason(tmp_path, capsys):
    from basicsr.utils.registry import ARCH_REGISTRY

    script = load_script()
    # BasicSR's and fmpsr's archs (other test files register small archs of their own in the same registry)
    archs = sorted(k for k in ARCH_REGISTRY.keys()
                   if ARCH_REGISTRY.get(k).__module__.split('.')[0] in ('basicsr', 'fmpsr'))
    records = script.main(['--out-dir', str(tmp_path), '--archs', *archs])
    assert {r['arch'] for r in records} == set(archs) and len(archs) >= 25
    failed = [(r['arch'], r['reason']) for r in records if r['status'] == 'fails']
    assert not failed
    by_arch = {}
    for r in records:
        by_arch.setdefault(r['arch'], []).append(r)
        assert r['status'] in ('works', 'refused', 'skipped')
        if r['status'] != 'works':
            assert r['reason']
    for arch in ('EDSR', 'MSRResNet', 'RCAN', 'RRDBNet', 'SRVGGNetCompact_basicsr', 'IMDN', 'LSRB', 'RLFN'):
        assert all(r['status'] == 'works' for r in by_arch[arch]), arch
    prelu = by_arch['SRVGGNetCompact_basicsr'][0]
    assert prelu['network_g']['act_type'] == 'prelu' and prelu['channel_params'] == 5  # one PReLU per conv but the last
    for r in records:
        if r['status'] == 'works':
            assert r['kept_channels'] < r['prunable_channels'] and r['compact_params'] < r['dense_params']
            assert r['relative_error'] <= 1e-10
    ecbsr, = by_arch['ECBSR']
    assert ecbsr['status'] == 'refused'
    assert "'backbone.0.conv3x3'" in ecbsr['reason'] and 'pruning.exclude' in ecbsr['reason']
    assert [r['status'] for r in by_arch['SwinIR']] == ['refused', 'works']  # refused; works with exclude
    assert by_arch['VGGStyleDiscriminator'][0]['status'] == 'skipped'
    with open(tmp_path / 'registry_support.json') as f:
        assert json.load(f) == json.loads(json.dumps(records))
    table = (tmp_path / 'registry_support.md').read_text()
    assert table.count('\n') == len(records) + 2 and '| ECBSR |' in table
    assert capsys.readouterr().out == table

"""Scratch baselines (fmpsr/baselines.py, scripts/scratch_baseline.py): exact compact widths and
uniform-width networks of the same arch within 2 % of the export's params / MACs, recounted here
from the built networks (numel, FlopCounterMode)."""
import json
import sys

import pytest
import torch
import yaml
from conftest import run
from torch.utils.flop_counter import FlopCounterMode

import fmpsr  # noqa: F401
from basicsr.archs import build_network
from fmpsr.baselines import scratch_options
from fmpsr.pruning import build_grouping, finalize_plain, mask_ratios, trace_conv_specs
from fmpsr.pruning.selection import classify_groups

SIZE = (16, 16)
ARCHS = {
    'EDSR': {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 48, 'num_block': 3, 'upscale': 2},
    'LSRB': {'type': 'LSRB', 'num_feat': 32, 'num_block': 3, 'upscale': 2, 'esa_channels': 8},
    'RLFN': {'type': 'RLFN', 'num_feat': 32, 'num_block': 3, 'upscale': 2, 'esa_channels': 8},
}


def macs(net):
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, *SIZE))
    return counter.get_total_flops() // 2


def make_export(folder, network_opt, seed=0):
    """A non-uniform channel-pruned export (random keep fractions per group) and its option file."""
    torch.manual_seed(seed)
    net = build_network(dict(network_opt))
    grouping = build_grouping(net, network_opt, None, torch.zeros(1, 3, *SIZE))
    constrained, free = classify_groups(grouping)
    masks = {g: torch.ones(grp.size, dtype=torch.bool) for g, grp in grouping.groups.items()}
    for g in constrained + free:
        size = grouping.groups[g].size
        masks[g] = torch.randperm(size) < int(torch.randint(max(1, size // 4), size, ()))
    compact, compact_opt, _ = finalize_plain(net, grouping, masks, build_network, network_opt)
    ratios = mask_ratios(trace_conv_specs(net, SIZE), grouping, masks).as_dict()
    export = folder / 'export'
    export.mkdir(parents=True)
    (export / 'pruning.json').write_text(json.dumps({
        'method': 'Test', 'network_g': compact_opt, 'original_network_g': network_opt, 'ratios': ratios,
        'pruning': {'macs_input_size': list(SIZE), 'grouping': None}}))
    opt = {'name': 'run', 'model_type': 'SRPModel', 'scale': 2, 'network_g': network_opt, 'pruning': {'ratio': 0.5},
           'path': {'pretrain_network_g': 'x.pth'}, 'datasets': {},
           'train': {'total_iter': 123, 'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'finetune': {},
                     'sparsity_opt': {'type': 'GrowingL2Loss'}}}
    (folder / 'run.yml').write_text(yaml.safe_dump(opt))
    return export, compact, ratios


@pytest.mark.slow
@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_exact_and_uniform_baselines(tmp_path, arch):
    export, compact, ratios = make_export(tmp_path, ARCHS[arch])
    exact = scratch_options(str(export), None, 'exact')
    assert exact['model_type'] == 'PrunedSRModel' and exact['path']['pretrain_network_g'] is None
    assert exact['train']['total_iter'] == 123 and 'pruning' not in exact
    assert not {'finetune', 'sparsity_opt'} & set(exact['train'])
    net = build_network(dict(exact['network_g']))
    assert [p.shape for p in net.parameters()] == [p.shape for p in compact.parameters()]   # same widths
    for kind, target, measure in (('params', ratios['pruned_params'], lambda n: sum(p.numel() for p in n.parameters())),
                                  ('macs', ratios['pruned_macs'], macs)):
        opt = scratch_options(str(export), None, kind)
        uniform = build_network(dict(opt['network_g']))
        assert type(uniform).__name__ == arch                       # the same arch
        value = measure(uniform)
        assert abs(value - target) / target <= 0.02, (kind, value, target)
        assert opt['scratch_baseline']['count'] == value             # the search counted what is built
        # uniform: every block has the same widths
        per_block = {}
        for name, conv in uniform.named_modules():
            if isinstance(conv, torch.nn.Conv2d) and (name.startswith('body.') or name.startswith('block_')):
                block, _, rest = name.replace('body.', 'body_', 1).partition('.')
                per_block.setdefault(block, {})[rest] = (conv.in_channels, conv.out_channels)
        assert len(per_block) == 3 and len({tuple(sorted(v.items())) for v in per_block.values()}) == 1


@pytest.mark.slow
def test_script_writes_the_option_files(tmp_path):
    export, _, _ = make_export(tmp_path, ARCHS['EDSR'])
    out = tmp_path / 'opts'
    result = run([sys.executable, 'scripts/scratch_baseline.py', '--export', str(export), '--out', str(out)])
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [line['kind'] for line in lines] == ['exact', 'params', 'macs']
    for line in lines:
        opt = yaml.safe_load(open(line['option_file']))
        assert opt['name'] == f"run_scratch_{line['kind']}" and opt['train']['total_iter'] == 123


def test_bad_kind_is_named(tmp_path):
    export, _, _ = make_export(tmp_path, ARCHS['EDSR'])
    with pytest.raises(ValueError, match="kind must be one of"):
        scratch_options(str(export), None, 'flops')

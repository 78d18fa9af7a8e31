"""Kernel-level masks and the width-sparsity trade-off (KernelSparseModel; sparsity_of_sr_networks.txt
Sec. 3-4, A.2.2, Table 3).

Each generator is checked against what the paper defines it to be, counted here: a grouped mask is
block diagonal with keep ratio 1/G; Bernoulli keeps each kernel with probability q; ERSS-L keeps the
same kernel fraction in every layer and ERSS-G one global magnitude threshold; a WS-flex graph has the
requested degree, is connected, and maps onto the conv node block by node block, while a disconnected
graph is refused. The widened, masked network's nonzero params (MACs) equal the original's within one
kernel. The grouped export computes what the masked dense network computes (float64) with groups=G
convs. The tiny option files run end to end and their exports are recounted from the files.
"""
import glob
import os.path as osp

import networkx as nx
import pytest
import torch
import yaml
from baseline_helpers import score_export
from conftest import ROOT, run_tiny_forms
from safetensors.torch import load_file
from torch import nn

import fmpsr  # noqa: F401
from basicsr.archs import build_network
from basicsr.utils.registry import MODEL_REGISTRY
from fmpsr.pruning import apply_weight_masks, count, load_compact, trace_conv_specs
from fmpsr.pruning.kernel_masks import (DisconnectedGraphError, bernoulli_kernel_mask, block_diagonal_to_grouped,
                                        erss_global_masks, erss_layer_masks, expand_kernel_mask, graph_kernel_mask,
                                        grouped_kernel_mask, kernel_scores, match_kernel_counts, node_sizes,
                                        widened_options, ws_flex_graph, ws_flex_kernel_mask)

TINY = sorted(glob.glob(osp.join(ROOT, 'options', 'tiny', 'kernel', '*.yml')))
FULL = sorted(glob.glob(osp.join(ROOT, 'options', 'kernel', '*.yml')))
EDSR = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 16, 'num_block': 2, 'upscale': 4}


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


# ---------------------------------------------------------------- generators


def test_grouped_mask_is_block_diagonal_with_keep_ratio_one_over_g():
    mask = grouped_kernel_mask(64, 16, 4)                 # an upsampler conv: c_out = 4 * c_in
    assert mask.shape == (64, 16) and mask.float().mean() == 0.25
    for o in range(64):
        assert mask[o].nonzero().flatten().tolist() == list(range(4 * (o // 16), 4 * (o // 16) + 4))
    with pytest.raises(ValueError, match=r"pruning.groups=3 does not divide the channels of 'body.0.conv1'"):
        grouped_kernel_mask(16, 16, 3, 'body.0.conv1')


def test_bernoulli_mask_keeps_each_kernel_with_probability_q_and_is_seeded():
    a = bernoulli_kernel_mask(200, 100, 0.3, torch.Generator().manual_seed(5))
    b = bernoulli_kernel_mask(200, 100, 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    sigma = (0.3 * 0.7 / a.numel()) ** 0.5
    assert abs(a.float().mean().item() - 0.3) < 4 * sigma


def test_erss_l_keeps_the_same_fraction_in_every_layer_and_erss_g_one_global_threshold():
    torch.manual_seed(0)
    weights = {'a': torch.randn(16, 16, 3, 3), 'b': torch.randn(64, 16, 3, 3) * 0.2, 'c': torch.randn(12, 10, 3, 3) * 4}
    layer = erss_layer_masks(weights, 0.35)
    for name, m in layer.items():
        s = kernel_scores(weights[name])
        assert int(m.sum()) == int(0.35 * m.numel() + 0.5)                   # same kernel fraction per layer
        assert s[m].min() >= s[~m].max()                                    # the largest sum |w| kept
    fractions = [m.float().mean().item() for m in layer.values()]
    assert max(fractions) - min(fractions) <= max(1 / m.numel() for m in layer.values())
    glob_masks = erss_global_masks(weights, 0.35)
    kept = torch.cat([kernel_scores(weights[n])[m] for n, m in glob_masks.items()])
    removed = torch.cat([kernel_scores(weights[n])[~m] for n, m in glob_masks.items()])
    total = sum(m.numel() for m in glob_masks.values())
    assert kept.numel() == int(0.35 * total + 0.5) and kept.min() >= removed.max()
    assert glob_masks['b'].float().mean() < 0.2 < 0.9 < glob_masks['c'].float().mean()   # global, not per layer


@pytest.mark.parametrize('n, k, p, seed', [(16, 4, 0.0, 0), (16, 4.5, 0.3, 1), (64, 9.25, 0.5, 3), (25, 6.4, 1.0, 2)])
def test_ws_flex_graph_has_the_requested_degree_and_is_connected(n, k, p, seed):
    graph = ws_flex_graph(n, k, p, seed)
    assert graph.number_of_nodes() == n and nx.number_of_selfloops(graph) == 0
    assert 2 * graph.number_of_edges() / n == 2 * round(k * n / 2) / n      # average degree k (to rounding)
    assert abs(2 * graph.number_of_edges() / n - k) <= 1 / n
    assert nx.is_connected(graph)
    if p == 0:                                                               # no rewiring: the ring lattice
        assert all(d == k for _, d in graph.degree())
    assert nx.utils.graphs_equal(graph, ws_flex_graph(n, k, p, seed))        # seeded


def test_graph_mask_maps_the_graph_node_block_by_node_block_and_refuses_a_disconnected_graph():
    graph = ws_flex_graph(8, 3, 0.4, 7)
    mask = graph_kernel_mask(graph, 32, 16)                                   # 8 nodes: 4 out x 2 in channels each
    out_sizes, in_sizes = node_sizes(32, 8), node_sizes(16, 8)
    assert out_sizes == [4] * 8 and in_sizes == [2] * 8
    for a in range(8):
        for b in range(8):
            block = mask[4 * a:4 * a + 4, 2 * b:2 * b + 2]
            joined = a == b or graph.has_edge(a, b)
            assert bool(block.all()) == joined and bool(block.any()) == joined
    two_parts = nx.disjoint_union(nx.cycle_graph(4), nx.cycle_graph(4))
    with pytest.raises(DisconnectedGraphError, match='not connected'):
        graph_kernel_mask(two_parts, 16, 16)
    with pytest.raises(DisconnectedGraphError, match='too few for a connected relational graph'):
        ws_flex_kernel_mask(64, 64, 100, 0.2)


@pytest.mark.parametrize('c_out, c_in, kept', [(24, 24, 250), (96, 24, 1003), (150, 150, 4074)])
def test_ws_flex_kernel_mask_has_exactly_the_kernels_asked_and_is_connected(c_out, c_in, kept):
    mask = ws_flex_kernel_mask(c_out, c_in, kept, 0.2, seed=4)
    assert int(mask.sum()) == kept
    n = min(c_out, c_in)
    rows = torch.repeat_interleave(torch.arange(n), torch.tensor(node_sizes(c_out, n)))
    cols = torch.repeat_interleave(torch.arange(n), torch.tensor(node_sizes(c_in, n)))
    nodes = nx.Graph()
    nodes.add_nodes_from(range(n))
    nodes.add_edges_from((int(rows[o]), int(cols[i])) for o, i in mask.nonzero().tolist())
    assert nx.is_connected(nodes)                                            # every channel reaches every other


# ---------------------------------------------------------------- width-sparsity trade-off


def nonzero_counts(net, masks, size=16):
    """(nonzero params, nonzero MACs) of ``net`` with ``masks`` (conv -> bool weight mask), counted with
    forward hooks here: params minus masked weights; kept weights times output pixels per conv."""
    removed = sum(int((~m).sum()) for m in masks.values())
    params = sum(p.numel() for p in net.parameters()) - removed
    macs = []

    def hook(module, _inputs, output, name):
        kept = int(masks[name].sum()) if name in masks else module.weight.numel()
        macs.append(kept * output.shape[-1] * output.shape[-2])
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: hook(mod, i, o, name))
               for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return params, sum(macs)


@pytest.mark.parametrize('network_opt, widen, metric', [
    (EDSR, 1.5, 'params'), (EDSR, 2.0, 'flops'), (dict(EDSR, num_block=3), 2.5, 'params'),
    pytest.param({'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 64, 'num_block': 16, 'upscale': 4},
                 150 / 64, 'params', marks=pytest.mark.slow),              # Table 3 "P": 150 channels, 1500 K
])
def test_widened_masked_network_matches_the_original_within_one_kernel(network_opt, widen, metric):
    original = build_network(dict(network_opt))
    reference = nonzero_counts(original, {})
    reference = reference[0] if metric == 'params' else reference[1]
    wide_opt = widened_options(network_opt, widen)
    assert wide_opt['num_feat'] == round(network_opt['num_feat'] * widen)
    wide = build_network(dict(wide_opt))
    specs = trace_conv_specs(wide, (16, 16))
    masked = [n for n in specs if n not in ('conv_first', 'conv_last')]
    kept, ratio = match_kernel_counts(specs, masked, reference, metric)
    masks = {}
    for i, name in enumerate(masked):
        s = specs[name]
        masks[name] = expand_kernel_mask(ws_flex_kernel_mask(s.out_channels, s.in_channels, kept[name], 0.2, i),
                                         s.kernel_size)
    params, macs = nonzero_counts(wide, masks)
    got = params if metric == 'params' else macs
    one_kernel = min(9 * (1 if metric == 'params' else specs[n].out_pixels) for n in masked)
    assert 0 <= reference - got < one_kernel, (reference, got)
    assert count(specs).get(metric) > 1.5 * reference                         # it really is wider
    if network_opt['num_feat'] == 64:
        assert reference == 1_517_571 and wide_opt['num_feat'] == 150 and 0.17 < ratio < 0.19


# ---------------------------------------------------------------- grouped export


def test_grouped_export_equals_the_masked_dense_network_and_has_grouped_convs():
    from fmpsr.models.kernel_sparse_model import to_grouped
    torch.manual_seed(0)
    dense = build_network(dict(EDSR)).double().eval()
    specs = trace_conv_specs(dense, (16, 16))
    masked = [n for n in specs if n not in ('conv_first', 'conv_last')]
    masks = {n: expand_kernel_mask(grouped_kernel_mask(specs[n].out_channels, specs[n].in_channels, 4),
                                   specs[n].kernel_size) for n in masked}
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    apply_weight_masks(dense, masks)
    grouped, grouped_opt, rest = to_grouped(dense, dict(EDSR), masks, {n: 4 for n in masked})
    assert rest == {} and grouped_opt['type'] == 'CompactArch' and grouped_opt['conv_groups'] == {n: 4 for n in masked}
    for name in masked:
        conv = grouped.get_submodule(name)
        assert conv.groups == 4 and conv.weight.shape[1] == specs[name].in_channels // 4
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(grouped(x), dense(x), rtol=0, atol=1e-10)
    kept = sum(int(m.sum()) for m in masks.values())
    assert sum(p.numel() for p in grouped.parameters()) == \
        sum(p.numel() for p in build_network(dict(EDSR)).parameters()) - sum(m.numel() for m in masks.values()) + kept
    w = torch.randn(8, 8, 3, 3)
    with pytest.raises(ValueError, match='is not block diagonal'):
        block_diagonal_to_grouped(w, 2)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize('change, message', [
    ({'mask': 'bernoulli', 'widen': 2.0, 'keep_ratio': None}, 'pruning.widen needs pruning.mask: ws_flex'),
    ({'mask': 'bernoulli', 'keep_ratio': None}, 'pruning.keep_ratio is required with pruning.mask: bernoulli'),
    ({'mask': 'grouped', 'groups': 4, 'keep_ratio': 0.25}, 'keep_ratio does not apply to pruning.mask: grouped'),
    ({'mask': 'grouped', 'groups': 1}, 'pruning.groups must be an integer in [2'),
    ({'mask': 'erss_g', 'keep_ratio': 0.5, 'max_prune_iter': 0}, 'erss_g prunes a trained network'),
    ({'mask': 'ws_flex', 'widen': 2.0, 'keep_ratio': 0.3}, 'keep_ratio is set by pruning.widen'),
    ({'mask': 'ws_flex', 'widen': 2.0, 'match': 'latency'}, "pruning.match: unknown value 'latency'"),
    ({'mask': 'random', 'keep_ratio': 0.5}, "pruning.mask: unknown value 'random'"),
    ({'mask': 'bernoulli', 'keep_ratio': 1.5}, 'pruning.keep_ratio must be a number in (0, 1]'),
])
def test_bad_kernel_options_are_named(change, message):
    opt = load(osp.join(ROOT, 'options', 'tiny', 'kernel', 'bernoulli_edsr_x4.yml'))
    pruning = {k: v for k, v in opt['pruning'].items() if k not in ('mask', 'keep_ratio')}
    pruning.update({k: v for k, v in change.items() if v is not None})
    opt = dict(opt, is_train=True, pruning=pruning)
    with pytest.raises(ValueError) as error:
        MODEL_REGISTRY.get('KernelSparseModel').check_options(opt)
    assert message in str(error.value)


def test_full_option_files_pass_the_checks_and_match_their_tiny_forms():
    names = {f'{m}_edsr_x4.yml' for m in ('grouped', 'bernoulli', 'erss_g', 'erss_l', 'ws_flex')}
    assert {osp.basename(p) for p in FULL} == {osp.basename(p) for p in TINY} == names
    for path in FULL:
        opt = load(path)
        tiny = load(osp.join(ROOT, 'options', 'tiny', 'kernel', osp.basename(path)))
        assert (opt['model_type'], opt['scale'], opt['network_g']['type'], opt['pruning']['mask']) == \
            (tiny['model_type'], tiny['scale'], tiny['network_g']['type'], tiny['pruning']['mask'])
        MODEL_REGISTRY.get('KernelSparseModel').check_options(dict(opt, is_train=True))
        assert sum(p.numel() for p in build_network(dict(opt['network_g'])).parameters()) == 1_517_571


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope='module')
def tiny_runs(request, data_at, names, tmp_path_factory):
    """The selected tiny forms, run once for the module (conftest.run_tiny_forms)."""
    return run_tiny_forms(request, 'test_tiny_kernel_masks_run_end_to_end', data_at, names, tmp_path_factory.mktemp('tiny'))


@pytest.mark.slow
@pytest.mark.parametrize('path', TINY, ids=osp.basename)
def test_tiny_kernel_masks_run_end_to_end(path, tiny_runs, data_at, names, tmp_path):
    opt, status, log = tiny_runs[path]
    assert status == 0, f'fmpsr/train.py on {osp.basename(path)} failed:\n{log[-5000:]}'
    data, name = data_at(4), opt['name']
    export = osp.join(ROOT, 'experiments', name, 'export')
    info = load(osp.join(export, 'pruning.json'))
    kernel, ratios, config = info['kernel'], info['ratios'], opt['pruning']
    weights = load_file(osp.join(export, 'net_g.safetensors'))
    compact, network_opt, masks = load_compact(export)
    masks = masks or {}
    numel = sum(v.numel() for k, v in weights.items() if k.endswith(('.weight', '.bias')))
    assert kernel['excluded_convs'] == ['conv_first', 'conv_last']
    assert 'conv_first.weight' not in masks and weights['conv_first.weight'].count_nonzero() > 0
    if config['mask'] == 'grouped':                              # real grouped convs, nothing stored as zeros
        assert network_opt['conv_groups'] == {n: config['groups'] for n in kernel['masked_convs']}
        for name_ in kernel['masked_convs']:
            assert compact.get_submodule(name_).groups == config['groups']
        assert masks == {} and ratios['pruned_params'] == numel == kernel['nonzero_params']
        assert kernel['keep_ratio'] == 1 / config['groups']
    else:                                                        # masked weights exactly zero after fine-tuning
        assert sorted(masks) == sorted(kernel['masked_convs'])
        for conv, mask in masks.items():
            assert not weights[f'{conv}.weight'][~mask].any(), conv
        zeros = sum(int((v == 0).sum()) for k, v in weights.items() if k.endswith(('.weight', '.bias')))
        assert ratios['pruned_params'] == numel - zeros == kernel['nonzero_params']   # recounted from the file
        kernel_masks = {n: m.flatten(2).any(2) for n, m in masks.items()}
        assert all(torch.equal(m.flatten(2).all(2), kernel_masks[n]) for n, m in masks.items())  # whole kernels
        fractions = {n: m.float().mean().item() for n, m in kernel_masks.items()}
        if config['mask'] == 'erss_l':
            assert all(abs(f - config['keep_ratio']) <= 1 / kernel_masks[n].numel() for n, f in fractions.items())
        if config['mask'] == 'ws_flex':                          # widened, same nonzero params as the original
            assert network_opt['num_feat'] == round(16 * config['widen'])
            reference = sum(p.numel() for p in build_network(dict(opt['network_g'])).parameters())
            assert 0 <= reference - (numel - zeros) < 9
        if config['mask'] == 'bernoulli':
            assert abs(kernel['keep_ratio'] - config['keep_ratio']) < 0.1
    with torch.no_grad():
        assert compact(torch.rand(1, 3, 16, 16)).shape == (1, 3, 64, 64)
    if config['mask'] == 'grouped':        # the grouped export: fmpsr/test.py's PSNR against a recount
        score_export(export, 4, data, tmp_path, names)

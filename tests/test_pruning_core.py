"""Tests of the FMP pruning core (fmpsr/pruning), CPU only, small LSRBs.

Counts are checked against independent counts on the finalized compact network: params as the sum
of ``p.numel()``, MACs with forward hooks on ``nn.Conv2d`` and with ``FlopCounterMode`` (2 FLOPs per
MAC); pruned counts from the weights that are exactly zero. Nothing here uses
``fmpsr.pruning.accounting.count`` to compute an expected value.
"""
import copy
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

import fmpsr  # noqa: F401  (registers LSRB)
from basicsr.archs import build_network
from fmpsr.pruning import (ChannelGroup, ChannelGrouping, ChannelVector, ConvergenceCriterion, FMPConfig,
                           FMPPruner, HyperNetwork, apply_weight_masks, build_grouping, finalize,
                           hypernetwork_ratios, load_compact, plain_state_dict, save_compact,
                           trace_conv_specs)
from fmpsr.pruning.hyperconv import HyperConv2d

# ---------------------------------------------------------------- helpers


def lsrb_opt(num_feat=16, num_block=2, esa_channels=8, upscale=3, **extra):
    return dict(type='LSRB', num_feat=num_feat, num_block=num_block, esa_channels=esa_channels,
                upscale=upscale, **extra)


def make_hyper(opt, seed=0, embed_dim=8, randomize=True, init='plain'):
    """HyperNetwork over a fresh LSRB built from ``opt``; B0..B2, conv biases and weight indicators
    randomised so that a zero z entry does not give a zero weight."""
    torch.manual_seed(seed)
    net = build_network(dict(opt))
    hyper = HyperNetwork(net, build_grouping(net, opt), embed_dim=embed_dim, init=init)
    if randomize:
        with torch.no_grad():
            for _, conv in hyper.hyper_convs():
                conv.b0.normal_(0, 0.5)
                conv.b1.normal_(0, 0.5)
                conv.b2.normal_(0, 0.05)
                conv.bias.normal_(0, 0.1)
                conv.weight_indicator.uniform_(0.5, 1.5)
    return hyper


def random_prune(hyper, seed=0, channel_p=0.4, weight_p=0.3):
    """Zero some z entries of every prunable group and update the masks (min 1 channel), then
    drop random weights with ``weight_mask``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for vector in hyper.prunable_vectors():
            drop = torch.rand(vector.size, generator=g) < channel_p
            vector.z[drop] = 0.0
            vector.update_mask_(min_channels=1)
        for _, conv in hyper.hyper_convs():
            conv.weight_mask &= torch.rand(conv.weight_mask.shape, generator=g) >= weight_p


def conv_modules(net):
    return {name: m for name, m in net.named_modules() if isinstance(m, nn.Conv2d)}


def num_params(net):
    return sum(p.numel() for p in net.parameters())


def hook_counts(net, x):
    """Independent counts of a plain network via forward hooks on nn.Conv2d.

    Returns:
        dict with ``macs`` (all weights * output pixels), ``nonzero_macs`` (nonzero weights * output
        pixels), ``zero_weights`` (number of weights exactly 0), ``out_pixels`` (name -> H_out*W_out).
    """
    out = {'macs': 0, 'nonzero_macs': 0, 'zero_weights': 0, 'out_pixels': {}}
    names = {m: n for n, m in conv_modules(net).items()}
    handles = []

    def hook(module, _inputs, output):
        pixels = output.shape[-2] * output.shape[-1]
        w = module.weight
        out['out_pixels'][names[module]] = pixels
        out['macs'] += w.numel() * pixels
        out['nonzero_macs'] += int((w != 0).sum()) * pixels
        out['zero_weights'] += int((w == 0).sum())

    for module in names:
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return out


def flop_counter_macs(net, x):
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            net(x)
    return counter.get_total_flops() // 2


def close(a, b, tol=1e-4):
    return torch.allclose(a, b, rtol=0, atol=tol * float(b.abs().max()))


# ---------------------------------------------------------------- HyperConv2d


def naive_weight(conv):
    """REFERENCE.md sec. 3 with Python loops over (i, j); masks not applied.

    fmpsr stores the hypernetwork tensors output-channel first: conv.w1[j, i] is W1 of the pair
    (input i, output j)."""
    z_in, z_out = conv.in_vector.z.detach(), conv.out_vector.z.detach()
    c_in, c_out = z_in.numel(), z_out.numel()
    kh, kw = conv.kernel_size
    weight = torch.empty(c_out, c_in, kh, kw)
    for i in range(c_in):
        for j in range(c_out):
            m_ij = z_in[i] * z_out[j] + conv.b0[j, i]                    # scalar
            e_ij = m_ij * conv.w1[j, i] + conv.b1[j, i]                  # (m,)
            o_ij = conv.w2[j, i] @ e_ij + conv.b2[j, i]                  # (k,)
            weight[j, i] = o_ij.reshape(kh, kw) * conv.weight_indicator[j, i]
    return weight.detach()


TINY = lsrb_opt(num_feat=8, num_block=1, esa_channels=4, upscale=2)


@pytest.mark.parametrize('name', ['conv_first', 'body.0.conv1', 'body.0.conv1x1', 'body.0.esa.conv2',
                                  'body.0.esa.conv_f', 'upsampler'])
def test_hyperconv_weight_equals_naive_loop(name):
    hyper = make_hyper(TINY, seed=1)
    conv = hyper.net.get_submodule(name)
    assert isinstance(conv, HyperConv2d)
    assert conv.b0.abs().min() > 0 and conv.b1.abs().min() > 0 and conv.b2.abs().min() > 0
    expected = naive_weight(conv)
    with torch.no_grad():
        got = conv.generate_weight()
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    # the forward pass is a conv with that weight and the bias
    x = torch.randn(2, conv.in_channels, 17, 15)
    with torch.no_grad():
        ref = F.conv2d(x, expected, conv.bias, conv.stride, conv.padding, conv.dilation)
        assert torch.allclose(conv(x), ref, atol=1e-4)


def naive_bank_weights(bank, z_out, z_in, keep):
    """FMP Eqs. 1-2 for every conv of ``bank`` with Python loops over the pairs, from autograd-tracked
    tensors (differentiable by plain autograd, none of ``_BankChain``'s code)."""
    n, m, k, c_out, c_in = bank.w2.shape
    kh, kw = bank.shape[2:]
    weights = []
    for c in range(n):
        rows = []
        for j in range(c_out):
            pairs = []
            for i in range(c_in):
                m_ij = z_out[c, j] * z_in[c, i] + bank.b0[c, j, i]
                e_ij = m_ij * bank.w1[c, :, j, i] + bank.b1[c, :, j, i]                 # (m,)
                o_ij = e_ij @ bank.w2[c, :, :, j, i] + bank.b2[c, :, j, i]              # (k,)
                pairs.append(o_ij.reshape(kh, kw) * bank.weight_indicator[c, j, i] * keep[c, j, i])
            rows.append(torch.stack(pairs))
        weights.append(torch.stack(rows))
    return torch.stack(weights)


@pytest.mark.parametrize('sliced', [True, False])
@pytest.mark.parametrize('kernel', [(3, 3), (1, 1)])
def test_bank_chain_gradients_equal_autograd_through_the_naive_loop(monkeypatch, sliced, kernel):
    """The hand-written backward of the bank chain (issue 11, part 4), both contraction paths."""
    from fmpsr.pruning import hyperconv
    from fmpsr.pruning.hyperconv import HyperBank
    monkeypatch.setattr(hyperconv, '_SLICED_MIN_NUMEL', 0 if sliced else 1 << 40)
    torch.manual_seed(3)
    n, c_out, c_in = 2, 3, 4
    bank = HyperBank(n, c_out, c_in, kernel, embed_dim=3).double()
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn_like(p))
    z_out = torch.randn(n, c_out, dtype=torch.float64, requires_grad=True)
    z_in = torch.randn(n, c_in, dtype=torch.float64, requires_grad=True)
    keep = (torch.rand(n, c_out, c_in, *kernel) > 0.3).double()
    upstream = torch.randn(n, c_out, c_in, *kernel, dtype=torch.float64)
    leaves = [z_out, z_in] + list(bank.parameters())

    got = bank.generate(z_out, z_in, keep)
    got_grads = torch.autograd.grad((got * upstream).sum(), leaves)
    expected = naive_bank_weights(bank, z_out, z_in, keep)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), leaves)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    for name, a, b in zip(['z_out', 'z_in'] + [n for n, _ in bank.named_parameters()], got_grads, expected_grads):
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, rtol=0, atol=1e-10), name
    # one conv of the bank (the uncached path of HyperConv2d) and torch's own numerical check
    one = bank.generate(z_out[1], z_in[1], keep[1].bool(), index=1)
    assert torch.allclose(one, expected[1], rtol=0, atol=1e-12)
    chain = hyperconv._BankChain.apply
    assert torch.autograd.gradcheck(lambda zo, zi, w2, ind: chain(zo, zi, bank.b0, bank.w1, bank.b1, w2, bank.b2, ind, keep),
                                    (z_out, z_in, bank.w2, bank.weight_indicator))


def test_proximal_step_of_many_vectors_equals_one_vector_at_a_time():
    """The concatenated proximal step (FMPPruner.proximal_step) against per-vector calls: a vector that
    shrinks, one held at min_channels, one with masked entries, one not prunable."""
    from fmpsr.pruning.hyperconv import proximal_step_vectors_
    specs = [([0.5, -0.3, 0.02, -0.01, 1.0], None, True),
             ([0.5, 0.001, -0.3, 0.0], None, True),                  # two entries >= 5e-3 = min_channels
             ([0.5, 0.7, -0.3, 0.9, 0.2, -0.6], [True, False, True, True, False, True], True),
             ([0.5, -0.2, 0.3], None, False)]

    def build():
        vectors = [_vector(values, mask, prunable) for values, mask, prunable in specs]
        vectors[2].z.data[[1, 4]] = 0.5   # masked entries moved by an optimiser
        return vectors

    together, alone = build(), build()
    proximal_step_vectors_(together, 0.1, prune_threshold=5e-3, min_channels=2)
    for v in alone:
        v.proximal_step_(0.1, prune_threshold=5e-3, min_channels=2)
    for a, b in zip(together, alone):
        assert torch.equal(a.z.detach(), b.z.detach())
    assert torch.allclose(together[0].z.detach(), torch.tensor([0.4, -0.2, 0.0, 0.0, 0.9]), atol=1e-6)
    assert torch.equal(together[1].z.detach(), torch.tensor([0.5, 0.001, -0.3, 0.0]))     # not shrunk
    assert torch.allclose(together[2].z.detach(), torch.tensor([0.4, 0.0, -0.2, 0.8, 0.0, -0.5]), atol=1e-6)
    assert torch.equal(together[3].z.detach(), torch.tensor([0.5, -0.2, 0.3]))            # not prunable


def test_hyperconv_masked_channels_give_exact_zero_weight_and_bias():
    hyper = make_hyper(TINY, seed=2)
    stream = hyper.channel_vectors['stream']
    mid = hyper.channel_vectors['body_0_mid']
    stream.mask[[1, 5]] = False
    mid.mask[[0, 3, 7]] = False
    with torch.no_grad():
        # written by conv_first (stream out), read by body.0.conv1 (stream in, mid out)
        first = hyper.net.conv_first
        w, b = first.generate_weight(), first.generate_bias()
        assert torch.count_nonzero(w[[1, 5]]) == 0 and torch.count_nonzero(b[[1, 5]]) == 0
        assert (w[[0, 2, 3, 4, 6, 7]] != 0).all() and (b[[0, 2, 3, 4, 6, 7]] != 0).all()
        y = first(torch.randn(1, 3, 16, 16))
        assert torch.count_nonzero(y[:, [1, 5]]) == 0
        conv1 = hyper.net.body[0].conv1
        w, b = conv1.generate_weight(), conv1.generate_bias()
        assert torch.count_nonzero(w[[0, 3, 7]]) == 0 and torch.count_nonzero(b[[0, 3, 7]]) == 0
        assert torch.count_nonzero(w[:, [1, 5]]) == 0            # pruned input channels
        kept = w[[1, 2, 4, 5, 6]][:, [0, 2, 3, 4, 6, 7]]
        assert (kept != 0).all()
        # a pruned weight inside kept channels
        conv1.weight_mask[2, 0, 1, 1] = False
        assert conv1.generate_weight()[2, 0, 1, 1] == 0
        assert conv1.generate_weight()[2, 0, 1, 0] != 0


@pytest.mark.parametrize('name, k', [('conv_first', 9), ('body.0.conv2', 9), ('body.0.conv1x1', 1),
                                     ('body.0.esa.conv2', 9), ('body.0.esa.conv4', 1)])
def test_hypernetwork_parameter_count(name, k):
    m = 8
    hyper = make_hyper(TINY, randomize=False, embed_dim=m)
    conv = hyper.net.get_submodule(name)
    per_pair = 1 + 2 * m + k * (m + 1)
    if k == 9:
        assert per_pair == 98
    count = sum(p.numel() for p in conv.hyper_parameters())
    assert count == conv.in_channels * conv.out_channels * per_pair


def test_hypernetwork_dhp_init():
    """``init='dhp'``: DHP's draw (the default ``init='plain'`` is tested in test_fmp_search.py)."""
    hyper = make_hyper(lsrb_opt(num_feat=24, num_block=1, esa_channels=8), seed=0, randomize=False, init='dhp')
    conv = hyper.net.body[0].conv2
    m, c_in, k = 8, conv.in_channels, 9
    for p in (conv.b0, conv.b1, conv.b2):
        assert torch.count_nonzero(p) == 0
    assert torch.equal(conv.weight_indicator, torch.ones_like(conv.weight_indicator))
    assert conv.w1.abs().max() <= 3 ** 0.5 and conv.w1.abs().max() > 0.9 * 3 ** 0.5
    bound = (3 / (m * c_in * k)) ** 0.5
    assert conv.w2.abs().max() <= bound and conv.w2.abs().max() > 0.9 * bound


def test_cached_masks_follow_every_mask_change():
    """HyperNetwork.forward caches the masks; an in-place edit of a channel or weight mask, or a new
    mask tensor, must show in the next forward. Reference: ``hyper.net(x)``, where every HyperConv2d
    generates its own weight from its current masks (no cache)."""
    hyper = make_hyper(TINY, seed=0)
    x = torch.rand(1, 3, 20, 20)
    with torch.no_grad():
        assert torch.allclose(hyper(x), hyper.net(x), atol=1e-6)
        before = hyper(x)
        hyper.channel_vectors['stream'].mask[:3] = False                  # in place (index_put_)
        after = hyper(x)
        assert not torch.allclose(after, before) and torch.allclose(after, hyper.net(x), atol=1e-6)
        conv = hyper.net.body[0].conv1
        conv.weight_mask.view(-1)[:50] = False                             # in place
        assert torch.allclose(hyper(x), hyper.net(x), atol=1e-6)
        conv.weight_mask = torch.ones_like(conv.weight_mask)               # a new tensor
        assert torch.allclose(hyper(x), hyper.net(x), atol=1e-6)
        hyper.load_state_dict(make_hyper(TINY, seed=1).state_dict())       # a load (copy_)
        assert torch.allclose(hyper(x), hyper.net(x), atol=1e-6)
    fresh = make_hyper(TINY, seed=2)
    with torch.inference_mode():                                           # a first forward in inference
        fresh(x)
    fresh(x).sum().backward()                                              # then training still works
    assert fresh.banks[0].w2.grad is not None


def test_batched_forward_gives_every_conv_its_own_weight_and_masked_bias():
    """HyperNetwork.forward generates weights and masked biases per bank; each conv must see exactly
    what it generates alone (generate_weight / generate_bias), and a pruned output channel must be
    exactly zero (bias included) though the function downstream does not depend on it."""
    hyper = make_hyper(TINY, seed=5)
    with torch.no_grad():
        for vector in hyper.prunable_vectors():
            vector.mask[1::3] = False
        hyper.net.body[0].conv1.weight_mask.view(-1)[::7] = False
    seen = {}
    handles = [conv.register_forward_hook(lambda module, inputs, output, name=name: seen.__setitem__(name, (inputs[0], output)))
               for name, conv in hyper.hyper_convs()]
    with torch.no_grad():
        hyper(torch.rand(1, 3, 20, 20))
        for handle in handles:
            handle.remove()
        assert len(seen) == len(hyper.grouping.convs)
        for name, conv in hyper.hyper_convs():
            x, out = seen[name]
            ref = F.conv2d(x, conv.generate_weight(), conv.generate_bias(), conv.stride, conv.padding, conv.dilation)
            assert torch.allclose(out, ref, rtol=0, atol=1e-6), name
            pruned = ~conv.out_vector.channel_mask()
            if pruned.any():
                assert conv.bias[pruned].abs().min() > 0, name   # the randomised bias would show
                assert torch.all(out[:, pruned] == 0), name


def to_old_layout(state):
    """A HyperNetwork state dict (or Adam moments keyed alike) in the pair-first bank layout that
    checkpoints had before issue 11: w1 / b1 (n, c_out, c_in, m), w2 (n, c_out, c_in, k, m),
    b2 (n, c_out, c_in, k). Written from the layouts' definitions, not from HyperBank.OLD_LAYOUT."""
    back = {'w1': (0, 2, 3, 1), 'b1': (0, 2, 3, 1), 'w2': (0, 3, 4, 2, 1), 'b2': (0, 2, 3, 1)}
    return {k: v.permute(*back[k.rsplit('.', 1)[-1]]).contiguous() if k.rsplit('.', 1)[-1] in back else v
            for k, v in state.items()}


def test_checkpoint_in_the_old_bank_layout_loads_to_the_same_function():
    source = make_hyper(TINY, seed=0)
    random_prune(source, seed=1)
    old = to_old_layout(source.state_dict())
    assert old['banks.0.w2'].shape[-1] == 8 and old['banks.0.w2'].shape != source.banks[0].w2.shape
    target = make_hyper(TINY, seed=5)
    target.load_state_dict(old, strict=True)
    x = torch.rand(1, 3, 20, 20)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    with pytest.raises(RuntimeError, match='w2'):
        bad = dict(old)
        bad['banks.0.w2'] = bad['banks.0.w2'].flatten(-2)
        make_hyper(TINY, seed=5).load_state_dict(bad, strict=True)


def test_adam_state_in_the_old_bank_layout_resumes_exactly():
    """Two Adam steps, a save in the old layout, a load + convert_optimizer_state, a third step: the
    same parameters as three uninterrupted steps."""
    x = torch.rand(2, 3, 20, 20)
    y = torch.rand(2, 3, 20 * TINY["upscale"], 20 * TINY["upscale"])

    def step(hyper, optimizer):
        optimizer.zero_grad()
        F.l1_loss(hyper(x), y).backward()
        optimizer.step()

    run = make_hyper(TINY, seed=0)
    opt = torch.optim.Adam(run.parameters(), lr=1e-2)
    for _ in range(2):
        step(run, opt)
    saved_params = to_old_layout({k: v.clone() for k, v in run.state_dict().items()})
    names = {id(p): n for n, p in run.named_parameters()}
    saved_opt = copy.deepcopy(opt.state_dict())
    order = [names[id(p)] for g in opt.param_groups for p in g['params']]
    for index, name in enumerate(order):
        saved_opt['state'][index] = {key: to_old_layout({name: v})[name] if v.dim() else v
                                     for key, v in saved_opt['state'][index].items()}
    step(run, opt)

    resumed = make_hyper(TINY, seed=3)
    resumed.load_state_dict(saved_params, strict=True)
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(saved_opt)
    assert opt2.state[resumed.banks[0].w2]['exp_avg'].shape != resumed.banks[0].w2.shape
    resumed.convert_optimizer_state(opt2)
    step(resumed, opt2)
    for (name, a), b in zip(run.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- grouping


def test_lsrb_grouping_structure():
    opt = lsrb_opt(num_feat=8, num_block=2, esa_channels=4, upscale=2)
    net = build_network(dict(opt))
    grouping = build_grouping(net, opt)
    assert set(grouping.convs) == set(conv_modules(net))
    writers = {n for n, (_, g_out) in grouping.convs.items() if g_out == 'stream'}
    readers = {n for n, (g_in, _) in grouping.convs.items() if g_in == 'stream'}
    exp_writers, exp_readers = {'conv_first', 'conv_after_body'}, {'conv_after_body', 'upsampler'}
    for i in range(2):
        p = f'body.{i}'
        exp_writers |= {f'{p}.conv2', f'{p}.conv1x1', f'{p}.esa.conv4'}
        exp_readers |= {f'{p}.conv1', f'{p}.conv1x1', f'{p}.esa.conv1'}
        assert grouping.convs[f'{p}.esa.conv_f'][1] == grouping.convs[f'{p}.esa.conv3'][1]
        assert grouping.convs[f'{p}.esa.conv_f'][0] == grouping.convs[f'{p}.esa.conv2'][0] \
            == grouping.convs[f'{p}.esa.conv1'][1]
        assert grouping.convs[f'{p}.conv2'][0] == grouping.convs[f'{p}.conv1'][1]
        assert grouping.convs[f'{p}.esa.conv4'][0] == grouping.convs[f'{p}.esa.conv3'][1]
    assert writers == exp_writers
    assert readers == exp_readers
    # free groups are distinct per block
    assert grouping.convs['body.0.conv1'][1] != grouping.convs['body.1.conv1'][1]
    # the image input and the upsampler output are fixed
    assert not grouping.groups[grouping.convs['conv_first'][0]].prunable
    assert not grouping.groups[grouping.convs['upsampler'][1]].prunable
    assert grouping.groups[grouping.convs['upsampler'][1]].size == 3 * 2 * 2
    prunable = {g for g, spec in grouping.groups.items() if spec.prunable}
    assert len(prunable) == 1 + 2 * 4


def test_hypernetwork_shares_vector_objects():
    hyper = make_hyper(lsrb_opt(num_feat=8, num_block=2, esa_channels=4, upscale=2), randomize=False)
    net = hyper.net
    stream = net.conv_first.out_vector
    writers = [net.conv_after_body] + [m for b in net.body for m in (b.conv2, b.conv1x1, b.esa.conv4)]
    readers = [net.upsampler, net.conv_after_body] + [m for b in net.body for m in (b.conv1, b.conv1x1, b.esa.conv1)]
    assert all(m.out_vector is stream for m in writers)
    assert all(m.in_vector is stream for m in readers)
    for b in net.body:
        assert b.esa.conv_f.out_vector is b.esa.conv3.out_vector is b.esa.conv4.in_vector
        assert b.esa.conv1.out_vector is b.esa.conv_f.in_vector is b.esa.conv2.in_vector
        assert b.conv1.out_vector is b.conv2.in_vector
        assert b.conv1.out_vector is not stream
    assert net.body[0].conv1.out_vector is not net.body[1].conv1.out_vector
    assert not net.conv_first.in_vector.prunable and not net.upsampler.out_vector.prunable
    # every vector is registered once
    assert len(list(hyper.channel_vectors.values())) == len({id(v) for v in hyper.channel_vectors.values()})
    assert sum(1 for n, _ in hyper.named_parameters() if n.endswith('.z')) == len(hyper.channel_vectors)


def test_grouping_validation_errors():
    opt = lsrb_opt(num_feat=8, num_block=1, esa_channels=4, upscale=2)
    net = build_network(dict(opt))
    good = build_grouping(net, opt)
    convs = dict(good.convs)
    del convs['body.0.esa.conv3']
    with pytest.raises(ValueError, match='body.0.esa.conv3'):
        ChannelGrouping(dict(good.groups), convs, good.compact_options).validate(net)
    with pytest.raises(ValueError):
        HyperNetwork(build_network(dict(opt)), ChannelGrouping(dict(good.groups), convs))
    groups = dict(good.groups)
    groups['body_0_mid'] = ChannelGroup(7)
    with pytest.raises(ValueError, match='body_0_mid'):
        ChannelGrouping(groups, dict(good.convs)).validate(net)
    convs = dict(good.convs)
    convs['not_a_conv'] = ('stream', 'stream')
    with pytest.raises(ValueError, match='not_a_conv'):
        ChannelGrouping(dict(good.groups), convs).validate(net)
    convs = dict(good.convs)
    convs['body.0.conv1'] = ('stream', 'nope')
    with pytest.raises(ValueError, match='nope'):
        ChannelGrouping(dict(good.groups), convs).validate(net)


# ---------------------------------------------------------------- ChannelVector


def _vector(values, mask=None, prunable=True):
    v = ChannelVector(len(values), prunable=prunable)
    with torch.no_grad():
        v.z.copy_(torch.tensor(values, dtype=torch.float32))
        if mask is not None:
            v.mask.copy_(torch.tensor(mask))
    return v


def test_proximal_step_soft_threshold_exact():
    v = _vector([0.5, -0.3, 0.02, -0.01, 1.0, 0.0, -0.04])
    v.proximal_step_(0.05, prune_threshold=5e-3, min_channels=2)
    expected = torch.tensor([0.45, -0.25, 0.0, 0.0, 0.95, 0.0, 0.0])
    assert torch.allclose(v.z.detach(), expected, atol=1e-7)
    assert v.z[2] == 0 and v.z[3] == 0 and v.z[6] == 0   # exactly zero, not sign-flipped
    assert v.mask.all()                                   # the proximal step does not mask


def test_proximal_step_stops_at_min_channels():
    values = [0.5, 0.001, -0.3, 0.0, 0.004]   # two entries >= 5e-3
    v = _vector(values)
    v.proximal_step_(0.1, prune_threshold=5e-3, min_channels=2)
    assert torch.equal(v.z.detach(), torch.tensor(values))
    v = _vector(values)
    v.proximal_step_(0.1, prune_threshold=5e-3, min_channels=1)   # 2 > 1: shrinks
    assert torch.allclose(v.z.detach(), torch.tensor([0.4, 0.0, -0.2, 0.0, 0.0]))


def test_proximal_step_keeps_masked_entries_zero():
    v = _vector([0.5, 0.7, -0.3, 0.9], mask=[True, False, True, True])
    v.z.data[1] = 0.7   # as if an optimiser had moved it
    v.proximal_step_(0.1, min_channels=1)
    assert v.z[1] == 0
    assert torch.allclose(v.z.detach(), torch.tensor([0.4, 0.0, -0.2, 0.8]))


def test_update_mask_prunes_below_threshold():
    v = _vector([0.5, 0.001, -0.3, 0.0, -0.004, 0.006])
    assert v.update_mask_(prune_threshold=5e-3, min_channels=2) == 3
    assert v.mask.tolist() == [True, False, True, False, False, True]
    assert v.z[1] == 0 and v.z[4] == 0
    assert v.kept() == 3


def test_update_mask_keeps_min_channels_largest():
    v = _vector([0.001, 0.002, -0.003, 0.0001, 0.004])
    assert v.update_mask_(prune_threshold=5e-3, min_channels=2) == 3
    assert v.mask.tolist() == [False, False, True, False, True]
    # monotone: a pruned entry does not come back even with a large z
    v.z.data[0] = 10.0
    v.z.data[1] = -10.0
    v.update_mask_(prune_threshold=5e-3, min_channels=2)
    assert v.mask.tolist() == [False, False, True, False, True]
    v.z.data[2] = 1.0
    v.z.data[4] = 1.0
    v.update_mask_(prune_threshold=5e-3, min_channels=2)
    assert v.mask.tolist() == [False, False, True, False, True]


def test_update_mask_monotone_with_small_nonzero_kept_entries():
    v = _vector([0.2, 0.3, 0.004, 0.003, 0.002], mask=[False, False, True, True, True])
    v.update_mask_(prune_threshold=5e-3, min_channels=2)
    assert v.mask.tolist() == [False, False, True, True, False]


def test_update_mask_monotone_when_kept_entries_are_zero():
    resurrected = []
    for size, masked in ((6, [0, 1]), (6, [4, 5]), (8, [0, 2, 5]), (5, [2])):
        mask = [i not in masked for i in range(size)]
        v = _vector([0.0] * size, mask=mask)
        v.update_mask_(prune_threshold=5e-3, min_channels=3)
        if any(v.mask[i] for i in masked):
            resurrected.append((size, masked, v.mask.tolist()))
    assert not resurrected, resurrected


def test_fixed_vector_never_changes():
    v = _vector([0.001, -0.002, 0.0, 0.3], prunable=False)
    before = v.z.detach().clone()
    v.proximal_step_(1.0, min_channels=1)
    assert v.update_mask_(min_channels=1) == 0
    assert torch.equal(v.z.detach(), before)
    assert v.mask.all()


# ---------------------------------------------------------------- finalize


FIN = lsrb_opt(num_feat=16, num_block=2, esa_channels=8, upscale=3)


@pytest.fixture(scope='module')
def pruned_finalized():
    hyper = make_hyper(FIN, seed=3)
    random_prune(hyper, seed=4)
    hyper.eval()
    compact, opt, masks = finalize(hyper, build_network)
    return hyper, compact.eval(), opt, masks


def test_finalize_random_prune_is_nontrivial(pruned_finalized):
    hyper, *_ = pruned_finalized
    kept = hyper.kept_channels()
    assert kept['stream'] < 16 and any(kept[f'body_{i}_mid'] < 16 for i in range(2))
    assert any(not conv.weight_mask.all() for _, conv in hyper.hyper_convs())
    # random B0..B2: a zero z entry alone would not zero the weights (pruning is by mask)
    vector = hyper.channel_vectors['stream']
    assert (vector.z[~vector.mask] == 0).all()
    unmasked = naive_weight(hyper.net.conv_first)
    assert (unmasked[~vector.mask] != 0).all()


def test_finalize_compact_is_plain_lsrb_with_reduced_widths(pruned_finalized):
    hyper, compact, opt, masks = pruned_finalized
    assert type(compact).__name__ == 'LSRB'
    assert not any(isinstance(m, HyperConv2d) for m in compact.modules())
    kept = {name: int(v.mask.sum()) for name, v in hyper.channel_vectors.items()}
    convs = conv_modules(compact)
    c = kept['stream']
    assert opt['type'] == 'LSRB' and opt['num_feat'] == c and opt['upscale'] == 3
    assert convs['conv_first'].weight.shape == (c, 3, 3, 3)
    assert convs['upsampler'].weight.shape == (27, c, 3, 3)
    for i in range(2):
        f1, f2, f3 = (kept[f'body_{i}_esa{j}'] for j in (1, 2, 3))
        mid = kept[f'body_{i}_mid']
        p = f'body.{i}'
        assert convs[f'{p}.conv1'].weight.shape == (mid, c, 3, 3)
        assert convs[f'{p}.conv2'].weight.shape == (c, mid, 3, 3)
        assert convs[f'{p}.esa.conv1'].weight.shape == (f1, c, 1, 1)
        assert convs[f'{p}.esa.conv2'].weight.shape == (f2, f1, 3, 3)
        assert convs[f'{p}.esa.conv3'].weight.shape == (f3, f2, 3, 3)
        assert convs[f'{p}.esa.conv_f'].weight.shape == (f3, f1, 1, 1)
        assert convs[f'{p}.esa.conv4'].weight.shape == (c, f3, 1, 1)
    assert set(masks) == set(convs)
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == convs[name].weight.shape


def test_finalize_compact_equals_hypernetwork(pruned_finalized):
    hyper, compact, _, masks = pruned_finalized
    torch.manual_seed(5)
    x = torch.randn(2, 3, 20, 24)
    with torch.no_grad():
        a, b = compact(x), hyper(x)
    assert a.shape == b.shape == (2, 3, 60, 72)
    assert float(b.abs().max()) > 0
    assert close(a, b)
    convs = conv_modules(compact)
    for name, mask in masks.items():
        w = convs[name].weight
        assert torch.count_nonzero(w[~mask]) == 0, name
        assert (w[mask] != 0).all(), name


def test_finalize_equals_naive_sliced_weights(pruned_finalized):
    """Compact weights are the naive formula's weights sliced by the kept indices, masked."""
    hyper, compact, _, _ = pruned_finalized
    convs = conv_modules(compact)
    for name, conv in hyper.hyper_convs():
        rows = conv.out_vector.mask.nonzero().flatten()
        cols = conv.in_vector.mask.nonzero().flatten()
        z_in_saved, z_out_saved = conv.in_vector.z.detach().clone(), conv.out_vector.z.detach().clone()
        expected = naive_weight(conv)[rows][:, cols] * conv.weight_mask[rows][:, cols]
        assert torch.equal(conv.in_vector.z.detach(), z_in_saved)
        assert torch.equal(conv.out_vector.z.detach(), z_out_saved)
        assert torch.allclose(convs[name].weight, expected, atol=1e-5), name
        assert torch.allclose(convs[name].bias, conv.bias.detach()[rows]), name


# ---------------------------------------------------------------- accounting (independent counts)


def independent_counts(dense_opt, compact, lr_size, flop_counter=True):
    dense = build_network(dict(dense_opt))
    x = torch.zeros(1, 3, *lr_size)
    dense_hooks = hook_counts(dense, x)
    compact_hooks = hook_counts(compact, x)
    compact_params = num_params(compact)
    return {
        'original_params': num_params(dense), 'original_macs': dense_hooks['macs'],
        'channel_params': compact_params, 'channel_macs': compact_hooks['macs'],
        'pruned_params': compact_params - compact_hooks['zero_weights'],
        'pruned_macs': compact_hooks['nonzero_macs'],
        'flop_counter_channel_macs': flop_counter_macs(compact, x) if flop_counter else compact_hooks['macs'],
        'flop_counter_original_macs': flop_counter_macs(dense, x) if flop_counter else dense_hooks['macs'],
    }


def check_ratios_against_independent(ratios, ind):
    assert ind['channel_macs'] == ind['flop_counter_channel_macs']
    assert ind['original_macs'] == ind['flop_counter_original_macs']
    assert ratios.original.params == ind['original_params']
    assert ratios.original.macs == ind['original_macs']
    assert ratios.channel.params == ind['channel_params']
    assert ratios.channel.macs == ind['channel_macs']
    assert ratios.pruned.params == ind['pruned_params']
    assert ratios.pruned.macs == ind['pruned_macs']
    for metric, key in (('params', 'params'), ('flops', 'macs')):
        o, c, p = ind[f'original_{key}'], ind[f'channel_{key}'], ind[f'pruned_{key}']
        assert ratios.channel_ratio(metric) == pytest.approx((o - c) / o, abs=1e-12)
        assert ratios.weight_ratio(metric) == pytest.approx((c - p) / o, abs=1e-12)
        assert ratios.total_ratio(metric) == pytest.approx(p / o, abs=1e-12)


@pytest.mark.parametrize('lr_size', [(20, 24), (64, 64), (15, 17)])
def test_accounting_matches_independent_counts(pruned_finalized, lr_size):
    hyper, compact, _, _ = pruned_finalized
    specs = trace_conv_specs(build_network(dict(FIN)), lr_size)
    ratios = hypernetwork_ratios(hyper, specs)
    ind = independent_counts(FIN, compact, lr_size)
    assert ind['pruned_params'] < ind['channel_params'] < ind['original_params']
    assert ind['pruned_macs'] < ind['channel_macs'] < ind['original_macs']
    check_ratios_against_independent(ratios, ind)
    d = ratios.as_dict()
    assert d['original_params'] == ind['original_params'] and d['pruned_macs'] == ind['pruned_macs']
    assert d['params_total_ratio'] == pytest.approx(ind['pruned_params'] / ind['original_params'])


def test_accounting_dense_hypernetwork_has_zero_ratios():
    hyper = make_hyper(FIN, seed=0, randomize=False)
    ratios = hypernetwork_ratios(hyper, trace_conv_specs(build_network(dict(FIN)), (16, 16)))
    dense = build_network(dict(FIN))
    assert ratios.original.params == ratios.channel.params == ratios.pruned.params == num_params(dense)
    for metric in ('params', 'flops'):
        assert ratios.channel_ratio(metric) == 0 and ratios.weight_ratio(metric) == 0
        assert ratios.total_ratio(metric) == 1


def test_trace_conv_specs_same_on_hypernetwork_and_plain():
    hyper = make_hyper(FIN, seed=0, randomize=False)
    a = trace_conv_specs(build_network(dict(FIN)), (17, 21))
    # traced through the HyperNetwork wrapper, names carry its 'net.' prefix
    b = trace_conv_specs(hyper, (17, 21))
    assert b == {f'net.{k}': v for k, v in a.items()}
    assert a['body.0.esa.conv2'].out_size == ((17 - 3) // 2 + 1, (21 - 3) // 2 + 1)
    assert a['body.0.esa.conv3'].out_size == (((17 - 3) // 2 + 1 - 7) // 3 + 1, ((21 - 3) // 2 + 1 - 7) // 3 + 1)
    # the hypernetwork itself is untouched (still on CPU)
    assert next(hyper.parameters()).device.type == 'cpu'


@st.composite
def pruning_case(draw):
    num_feat = draw(st.integers(4, 24))
    num_block = draw(st.integers(1, 3))
    mid = [draw(st.integers(1, 12)) for _ in range(num_block)]
    esa = [[draw(st.integers(1, 6)) for _ in range(3)] for _ in range(num_block)]
    upscale = draw(st.sampled_from([2, 3, 4]))
    lr_size = (draw(st.integers(15, 22)), draw(st.integers(15, 22)))
    seed = draw(st.integers(0, 2 ** 16))
    channel_p = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    weight_p = draw(st.sampled_from([0.0, 0.2, 0.6, 0.95]))
    return num_feat, num_block, mid, esa, upscale, lr_size, seed, channel_p, weight_p


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pruning_case())
def test_property_counts_equal_compact_network(case):
    num_feat, num_block, mid, esa, upscale, lr_size, seed, channel_p, weight_p = case
    opt = lsrb_opt(num_feat=num_feat, num_block=num_block, upscale=upscale, mid_feats=mid, esa_feats=esa)
    hyper = make_hyper(opt, seed=seed % 1000, embed_dim=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for vector in hyper.prunable_vectors():
            keep = torch.rand(vector.size, generator=g) >= channel_p
            keep[torch.randint(vector.size, (1,), generator=g)] = True      # >= 1 per group
            vector.mask.copy_(keep)
            vector.z.mul_(keep)
        for _, conv in hyper.hyper_convs():
            conv.weight_mask.copy_(torch.rand(conv.weight_mask.shape, generator=g) >= weight_p)
    compact, compact_opt, masks = finalize(hyper, build_network)
    assert compact_opt['num_feat'] == int(hyper.channel_vectors['stream'].mask.sum())
    # count on the exported network: safetensors written and read back, rebuilt from its options
    with tempfile.TemporaryDirectory() as folder:
        save_compact(folder, compact, compact_opt, masks)
        compact, compact_opt, masks = load_compact(folder)
    ratios = hypernetwork_ratios(hyper, trace_conv_specs(build_network(dict(opt)), lr_size))
    ind = independent_counts(opt, compact, lr_size, flop_counter=False)
    check_ratios_against_independent(ratios, ind)
    convs = conv_modules(compact)
    assert sum(int(m.sum()) for m in masks.values()) == sum(int((c.weight != 0).sum()) for c in convs.values())


# ---------------------------------------------------------------- criteria and config


CRITERION_TABLE = [
    # criterion, (channel_ratio, weight_ratio), (converged, channel_done, weight_done)
    ('channel', (0.5, 0.0), (True, False, False)),
    ('channel', (0.49, 0.5), (False, False, False)),
    ('weight', (0.0, 0.2), (True, False, False)),
    ('weight', (0.69, 0.19), (False, False, False)),
    ('total_fixed', (0.5, 0.1), (False, True, False)),
    ('total_fixed', (0.4, 0.25), (False, False, True)),
    ('total_fixed', (0.55, 0.2), (True, True, True)),
    ('total_fixed', (0.4, 0.1), (False, False, False)),
    ('total', (0.65, 0.1), (True, False, False)),
    ('total', (0.0, 0.75), (True, False, False)),
    ('total', (0.5, 0.15), (False, False, False)),
    ('total', (0.3, 0.3), (False, False, False)),
]


@pytest.mark.parametrize('criterion, expected', [('weight', (True, False, False)), ('total_fixed', (True, True, True)),
                                                 ('total', (True, False, False)), ('channel', (False, False, False))])
def test_criterion_weight_slack(criterion, expected):
    # gamma_c 0.5, gamma_w 0.2: the weight part short of its target by 0.004, within a slack of 0.005
    rule = ConvergenceCriterion('flops', criterion, 0.5, 0.2)
    assert tuple(vars(rule.status(0.49 if criterion == 'channel' else 0.5, 0.196, weight_slack=0.005)).values()) == expected
    if criterion != 'channel':   # beyond the slack: not met
        assert not rule.status(0.5, 0.194, weight_slack=0.005).converged


@pytest.mark.parametrize('criterion, ratios, expected', CRITERION_TABLE)
def test_criterion_status_table(criterion, ratios, expected):
    rule = ConvergenceCriterion('params', criterion, 0.5, 0.2)
    status = rule.status(*ratios)
    assert (status.converged, status.channel_done, status.weight_done) == expected


@pytest.mark.parametrize('criterion, ratios, expected', [
    ('channel', (0.1, 0.0), float('inf')),
    ('weight', (0.3, 0.05), 0.15),
    ('weight', (0.3, 0.25), 0.0),
    ('total_fixed', (0.9, 0.05), 0.15),
    ('total', (0.4, 0.1), 0.2),
    ('total', (0.6, 0.2), 0.0),
])
def test_criterion_weight_budget(criterion, ratios, expected):
    rule = ConvergenceCriterion('flops', criterion, 0.5, 0.2)
    assert rule.weight_budget(*ratios) == pytest.approx(expected)


@pytest.mark.parametrize('kwargs, match', [
    (dict(metric='macs'), 'metric'),
    (dict(criterion='both'), 'criterion'),
    (dict(gamma_c=1.0), 'gamma_c'),
    (dict(gamma_c=-0.1), 'gamma_c'),
    (dict(gamma_w=1.0), 'gamma_w'),
    (dict(gamma_w=-0.01), 'gamma_w'),
    (dict(gamma_c=0.6, gamma_w=0.4), 'gamma_c \\+ pruning.gamma_w'),
    (dict(gamma_c=0.7, gamma_w=0.5), 'gamma'),
    (dict(criterion='channel', gamma_c=0.0), 'gamma_c'),
    (dict(criterion='weight', gamma_w=0.0), 'gamma_w'),
])
def test_criterion_rejects_bad_values(kwargs, match):
    args = dict(metric='params', criterion='total', gamma_c=0.5, gamma_w=0.2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ConvergenceCriterion(**args)


def test_fmp_config_from_options():
    config = FMPConfig.from_options({'type': 'FMP', 'criterion': 'total_fixed', 'gamma_c': 0.3, 'gamma_w': 0.1,
                                     'macs_input_size': [32, 48]})
    assert config.criterion == 'total_fixed' and config.gamma_c == 0.3 and config.macs_input_size == (32, 48)
    with pytest.raises(ValueError, match='gama_c'):
        FMPConfig.from_options({'gama_c': 0.3})
    with pytest.raises(ValueError, match='gamma_c'):
        FMPConfig.from_options({'gamma_c': 1.5})
    with pytest.raises(ValueError, match='weight_reg'):
        FMPConfig.from_options({'weight_reg': 'l0'})
    with pytest.raises(ValueError, match='macs_input_size'):
        FMPConfig.from_options({'macs_input_size': [8, 64]})


# ---------------------------------------------------------------- FMPPruner weight budget


def _weight_pruner(metric, seed=0):
    hyper = make_hyper(FIN, seed=seed, randomize=False)
    with torch.no_grad():
        for v in hyper.channel_vectors.values():
            v.z.fill_(1.0)   # no channel falls below the channel threshold
    specs = trace_conv_specs(build_network(dict(FIN)), (32, 32))
    config = FMPConfig.from_options(dict(criterion='weight', gamma_c=0.0, gamma_w=0.1, metric=metric))
    return hyper, FMPPruner(hyper, specs, config), specs


def _pruned_fraction(hyper, specs, metric):
    """Independent weight ratio: pruned weights (x output pixels for flops) / dense total."""
    dense = build_network(dict(FIN))
    out = hook_counts(dense, torch.zeros(1, 3, 32, 32))
    total = num_params(dense) if metric == 'params' else out['macs']
    pruned = 0
    for name, conv in hyper.hyper_convs():
        n = int((~conv.weight_mask).sum())
        pruned += n if metric == 'params' else n * out['out_pixels'][name]
    return pruned / total


def _wave_pruner(round_to, max_overshoot, gamma_c=0.1):
    """FIN with half of every prunable group's |z| below the threshold (distinct values): a wave that
    carries the channel ratio far past ``gamma_c``."""
    hyper = make_hyper(FIN, seed=0, randomize=False)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for v in hyper.prunable_vectors():
            v.z.fill_(1.0)
            low = torch.randperm(v.size, generator=g)[:v.size // 2]
            v.z[low] = torch.rand(low.numel(), generator=g) * 1e-3 + 1e-5
    specs = trace_conv_specs(build_network(dict(FIN)), (32, 32))
    config = FMPConfig.from_options(dict(criterion='channel', gamma_c=gamma_c, gamma_w=0.0, round_to=round_to,
                                         max_overshoot=max_overshoot, weight_indicators=False))
    return hyper, FMPPruner(hyper, specs, config)


@pytest.mark.parametrize('round_to,bound', [(1, 0.01), (4, 0.03)])
def test_max_overshoot_stops_a_channel_wave_at_the_target(round_to, bound):
    dense = num_params(build_network(dict(FIN)))
    hyper, pruner = _wave_pruner(round_to, None)
    pruner.check()
    wave = 1 - num_params(finalize(hyper, build_network)[0]) / dense
    assert wave > 0.3  # without a bound the whole wave goes

    hyper, pruner = _wave_pruner(round_to, bound)
    low = {name: (v.z.detach().abs() < 5e-3) for name, v in hyper.channel_vectors.items() if v.prunable}
    z = {name: v.z.detach().abs().clone() for name, v in hyper.channel_vectors.items()}
    status = pruner.check()
    ratio = 1 - num_params(finalize(hyper, build_network)[0]) / dense   # counted on the compact network
    assert 0.1 <= ratio <= 0.1 + bound
    assert pruner.ratios.channel_ratio('params') == pytest.approx(ratio)
    assert status.converged and pruner.deferred_channels > 0
    for name, candidates in low.items():
        mask = hyper.channel_vectors[name].mask
        pruned = ~mask
        assert not (pruned & ~candidates).any(), name          # only channels below the threshold
        assert int(mask.sum()) % round_to == 0, name            # widths stay multiples of round_to
        if pruned.any() and (candidates & mask).any():          # within a group: smallest |z| first
            assert z[name][pruned].max() <= z[name][candidates & mask].min(), name
        assert (hyper.channel_vectors[name].z[pruned] == 0).all()


def test_max_overshoot_skips_a_step_that_passes_the_bound():
    """A step too large for the bound is left for later (deferred), not taken."""
    hyper, pruner = _wave_pruner(8, 0.0, gamma_c=0.01)
    pruner.check()
    dense = num_params(build_network(dict(FIN)))
    ratio = 1 - num_params(finalize(hyper, build_network)[0]) / dense
    # every step of 8 channels (half of a 16-wide group) costs more than 1 %: none fits [1 %, 1 %]
    assert ratio == 0 and pruner.deferred_channels > 0 and not pruner.converged


@pytest.mark.parametrize('criterion,kwargs,expected', [
    ('channel', {}, 0.3),
    ('total_fixed', {}, 0.3),
    ('total', {}, 0.3 + 0.1 - 0.05),                                   # the weights' share counts
    ('keep_ratio', {'keep_ratio': 0.4, 'keep_tolerance': 0.02}, 1 - 0.4 - 0.02 - 0.05),
    ('weight', {}, None)])
def test_channel_target_per_criterion(criterion, kwargs, expected):
    rule = ConvergenceCriterion('params', criterion, 0.3, 0.1, **kwargs)
    target = rule.channel_target(0.05)
    assert target == (None if expected is None else pytest.approx(expected))
    if expected is not None:   # at the target the channel side of the rule holds, just below it does not
        done = (lambda st: st.channel_done) if criterion == 'total_fixed' else (lambda st: st.converged)
        assert done(rule.status(target + 1e-9, 0.05))
        assert not done(rule.status(target - 1e-3, 0.05))


def test_max_overshoot_option_errors():
    with pytest.raises(ValueError, match='pruning.max_overshoot'):
        FMPConfig.from_options(dict(max_overshoot=1.5))
    with pytest.raises(ValueError, match='pruning.max_overshoot'):
        FMPConfig.from_options(dict(criterion='weight', gamma_c=0.0, gamma_w=0.1, max_overshoot=0.02))


def test_weight_budget_all_indicators_below_threshold():
    hyper, pruner, specs = _weight_pruner('params')
    conv1 = hyper.net.body[1].conv1
    special = torch.zeros(conv1.weight_indicator.shape, dtype=torch.bool)
    special.view(-1)[torch.randperm(special.numel(), generator=torch.Generator().manual_seed(0))[:40]] = True
    with torch.no_grad():
        for _, conv in hyper.hyper_convs():
            conv.weight_indicator.fill_(1e-4)
        conv1.weight_indicator[special] = 1e-6
    pruner.check()
    ratio = _pruned_fraction(hyper, specs, 'params')
    assert not conv1.weight_mask[special].any()       # the smallest are pruned first
    assert 0.1 - 0.01 <= ratio <= 0.1                 # within budget, not everything, not nothing


@pytest.mark.parametrize('metric', ['params', 'flops'])
def test_weight_budget_smallest_first_and_not_everything(metric):
    hyper, pruner, specs = _weight_pruner(metric)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, conv in hyper.hyper_convs():
            # all below the 5e-3 threshold, distinct
            conv.weight_indicator.copy_(torch.rand(conv.weight_indicator.shape, generator=g) * 1e-3 + 1e-5)
        target = hyper.net.body[1].conv1.weight_indicator
        special = torch.zeros(target.numel(), dtype=torch.bool)
        special[torch.randperm(target.numel(), generator=g)[:40]] = True
        special = special.view_as(target)
        target[special] = 1e-7 * (1 + torch.rand(int(special.sum()), generator=g))
    status = pruner.check()
    ratio = _pruned_fraction(hyper, specs, metric)
    assert 0.1 - 0.01 <= ratio <= 0.1 + 1e-12
    assert pruner.ratios.weight_ratio(metric) == pytest.approx(ratio)
    # a weight target is met within one weight's cost (pruning never overshoots, so with flops the
    # last fraction of a weight could never be filled)
    slack = 1 / num_params(build_network(dict(FIN))) if metric == 'params' else \
        max(s.out_pixels for s in specs.values()) / hook_counts(build_network(dict(FIN)), torch.zeros(1, 3, 32, 32))['macs']
    assert pruner.weight_granularity() == pytest.approx(slack)
    assert status.converged == (ratio >= 0.1 - slack)
    # the distinguishable smallest subset is pruned
    assert not hyper.net.body[1].conv1.weight_mask[special].any()
    # smallest |Z_W| first: every pruned indicator <= every kept indicator that was a candidate
    # (the per-conv floor, min_channels * kh * kw largest, is protected)
    pruned_max, kept_min = 0.0, float('inf')
    for name, conv in hyper.hyper_convs():
        mag = conv.weight_indicator.detach().abs().flatten()
        mask = conv.weight_mask.flatten()
        if (~mask).any():
            pruned_max = max(pruned_max, float(mag[~mask].max()))
        floor = 4 * specs[name].kernel_area
        protected = torch.zeros_like(mask)
        protected[mag.topk(floor).indices] = True
        if (mask & ~protected).any():
            kept_min = min(kept_min, float(mag[mask & ~protected].min()))
    assert pruned_max <= kept_min
    # a second check with the target reached prunes nothing more
    before = [conv.weight_mask.clone() for _, conv in hyper.hyper_convs()]
    pruner.check()
    after = [conv.weight_mask for _, conv in hyper.hyper_convs()]
    if ratio >= 0.1 - 1e-9:
        assert all(torch.equal(a, b) for a, b in zip(after, before))
    # monotone in any case
    assert all(not (a & ~b).any() for a, b in zip(after, before))


def test_weight_indicators_above_threshold_are_not_pruned():
    hyper, pruner, specs = _weight_pruner('params')
    pruner.check()   # indicators at their init (1.0)
    assert all(conv.weight_mask.all() for _, conv in hyper.hyper_convs())
    assert pruner.ratios.weight_ratio('params') == 0


# ---------------------------------------------------------------- masks.py


def _compact_with_masks(seed=0):
    torch.manual_seed(seed)
    opt = lsrb_opt(num_feat=6, num_block=1, esa_channels=3, upscale=2, mid_feats=[5], esa_feats=[[3, 2, 4]])
    net = build_network(dict(opt))
    g = torch.Generator().manual_seed(seed)
    masks = {name: torch.rand(m.weight.shape, generator=g) > 0.4 for name, m in conv_modules(net).items()}
    return net, opt, masks


def test_apply_weight_masks_keeps_zero_after_optimizer_step():
    net, _, masks = _compact_with_masks()
    apply_weight_masks(net, masks)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1, weight_decay=0.01)
    x = torch.randn(2, 3, 16, 16)
    for _ in range(2):
        optimizer.zero_grad()
        loss = net(x).square().mean()
        loss.backward()
        optimizer.step()
    any_grad = False
    for name, mask in masks.items():
        module = net.get_submodule(name)
        original = module.parametrizations.weight.original
        any_grad |= bool((original.grad[mask] != 0).any())
        assert torch.count_nonzero(module.weight[~mask]) == 0, name
        assert torch.count_nonzero(original.grad[~mask]) == 0, name
        assert (module.weight[mask] != 0).all(), name
    assert any_grad


def test_apply_weight_masks_rejects_bad_shape_and_name():
    net, _, masks = _compact_with_masks()
    with pytest.raises(ValueError, match='conv_first'):
        apply_weight_masks(net, {'conv_first': torch.ones(6, 3, 1, 1, dtype=torch.bool)})
    with pytest.raises(KeyError, match='nope'):
        apply_weight_masks(net, {'nope': masks['conv_first']})


def test_plain_state_dict_loads_into_plain_lsrb():
    net, opt, masks = _compact_with_masks(seed=1)
    apply_weight_masks(net, masks)
    net.eval()
    with torch.no_grad():   # nonzero stored values under the mask must not leak into the export
        for name, mask in masks.items():
            net.get_submodule(name).parametrizations.weight.original[~mask] = 3.0
    state = plain_state_dict(net)
    assert not any('parametrizations' in k for k in state)
    fresh = build_network(dict(opt)).eval()
    assert set(state) == set(fresh.state_dict())
    fresh.load_state_dict(state, strict=True)
    for name, mask in masks.items():
        assert torch.count_nonzero(fresh.get_submodule(name).weight[~mask]) == 0
    x = torch.randn(1, 3, 17, 15)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


# ---------------------------------------------------------------- export.py


def test_export_round_trip(tmp_path, pruned_finalized):
    _, compact, opt, masks = pruned_finalized
    import copy
    net = copy.deepcopy(compact)
    apply_weight_masks(net, masks)
    net.eval()
    out = tmp_path / 'export'
    paths = save_compact(str(out), net, opt, masks)
    files = sorted(os.listdir(out))
    assert files == ['net_g.safetensors', 'network_g.yml', 'weight_masks.safetensors']
    assert set(paths) == {'weights', 'masks', 'options'}
    for name in files:
        if name.endswith('.safetensors'):
            raw = (out / name).read_bytes()
            header_len = int.from_bytes(raw[:8], 'little')
            assert raw[8:9] == b'{' and 0 < header_len < len(raw)   # safetensors header, not pickle / zip
            assert raw[:2] != b'PK' and raw[0] != 0x80
    loaded, loaded_opt, loaded_masks = load_compact(str(out))
    assert loaded_opt == opt
    assert type(loaded).__name__ == 'LSRB' and not loaded.training
    assert set(loaded_masks) == set(masks)
    for name in masks:
        assert loaded_masks[name].dtype == torch.bool and torch.equal(loaded_masks[name], masks[name])
    x = torch.randn(1, 3, 18, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
        assert torch.equal(loaded(x), compact(x))
    # loading the weights file path directly works too
    again, _, _ = load_compact(str(out / 'net_g.safetensors'))
    with torch.no_grad():
        assert torch.equal(again(x), net(x))
    import yaml
    assert yaml.safe_load((out / 'network_g.yml').read_text()) == opt


def test_export_without_masks(tmp_path):
    net, opt, _ = _compact_with_masks()
    save_compact(str(tmp_path), net, opt)
    assert sorted(os.listdir(tmp_path)) == ['net_g.safetensors', 'network_g.yml']
    _, _, masks = load_compact(str(tmp_path))
    assert masks is None


def test_load_compact_missing_raises(tmp_path):
    empty = tmp_path / 'nothing_here'
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match='nothing_here'):
        load_compact(str(empty))
    with pytest.raises(FileNotFoundError, match='missing.safetensors'):
        load_compact(str(tmp_path / 'missing.safetensors'))


def test_trace_records_grouped_and_strided_convs_and_counts_them_by_numel():
    """A grouped conv (left plain by ``exclude``) counts in_channels / groups inputs per output; the traced
    spec keeps stride, padding, dilation and the input size (the latency table rebuilds convs from them)."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=4),
                        nn.Conv2d(8, 4, 1, bias=False))
    specs = trace_conv_specs(net, (16, 16))
    grouped = specs['1']
    assert (grouped.groups, grouped.stride, grouped.padding, grouped.dilation) == (4, (2, 2), (2, 2), (2, 2))
    assert grouped.in_size == (16, 16) and grouped.out_size == (8, 8) and specs['2'].in_size == (8, 8)
    from fmpsr.pruning import count
    counts = count(specs)
    assert counts.params == sum(p.numel() for p in net.parameters())
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, 16, 16))
    assert counts.macs == counter.get_total_flops() // 2

"""Which archs of BasicSR's ``ARCH_REGISTRY`` (and fmpsr's) FMP can prune with ``grouping: auto``.

For every registered arch (fmpsr imported first, so its archs and BasicSR's are all there), built at
a tiny width from the table :data:`ARCHS` of constructor arguments, the script

1. runs :func:`fmpsr.pruning.coupling.check_prunable` (the option check of ``FMPModel``): automatic
   grouping, refusal of what cannot be coupled, float64 comparison with random channel masks;
2. if that passes, converts the arch to its FMP hypernetwork (float64), runs a few real FMP
   iterations (strong regularisers, so channels and weights do get pruned: the pruner decides which),
   finalizes it, and compares the compact network with the hypernetwork on a random input.

Each arch ends as ``works`` (channels pruned and compact == hypernetwork to ``--tolerance``),
``refused`` (the check's message: the module and the reason), ``skipped`` (not an SR generator:
discriminators, feature extractors, video archs with 5-D input, flow networks; the reason is given)
or ``fails`` (anything else, with the error): the last must not happen. Rows with ``pruning.exclude``
show how a refused arch can still be pruned in part.

Output: ``<out-dir>/registry_support.json`` (one record per row) and ``registry_support.md`` (the
README table); the table is also printed on stdout, logs go to stderr.

Examples::

    python scripts/benchmark/registry_support.py                       # every registered arch (~1 min on CPU)
    python scripts/benchmark/registry_support.py --archs SRVGGNetCompact_basicsr ECBSR --out-dir /tmp/rs
"""
import argparse
import copy
import os
import os.path as osp
import sys
import traceback

import torch
from torch.nn import functional as F

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir, osp.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

F64 = torch.float64
LR_SIZE = 16  # LR pixels: ESA (LSRB, RLFN) needs >= 15, SwinIR's window (4 here) must divide it
VIDEO = 'video SR: 5-D input (B, T, C, H, W) with an optical-flow or alignment network'
DISCRIMINATOR = 'a GAN discriminator (image -> realness score), not an image-to-image network'

# arch -> list of rows: {'opt': constructor arguments} (optional 'exclude', 'note', 'size'), or a skip reason
ARCHS = {
    'EDSR': [{'opt': dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=4)}],
    'MSRResNet': [{'opt': dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=4)},
                  {'opt': dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=3)}],
    'RCAN': [{'opt': dict(num_in_ch=3, num_out_ch=3, num_feat=16, num_group=2, num_block=2, squeeze_factor=4,
                          upscale=2)}],
    'RRDBNet': [{'opt': dict(num_in_ch=3, num_out_ch=3, scale=4, num_feat=8, num_block=1, num_grow_ch=4)},
                {'opt': dict(num_in_ch=3, num_out_ch=3, scale=2, num_feat=8, num_block=1, num_grow_ch=4),
                 'note': 'x2: pixel_unshuffle on the input image'}],
    'SRVGGNetCompact_basicsr': [
        {'opt': dict(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=4, act_type='prelu'),
         'note': 'per-channel PReLU'},
        {'opt': dict(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=4, act_type='leakyrelu')}],
    'RIDNet': [{'opt': dict(in_channels=3, mid_channels=16, out_channels=3, num_block=2),
                'note': 'denoising (output size = input size)'}],
    'ECBSR': [{'opt': dict(num_in_ch=3, num_out_ch=3, num_block=2, num_channel=8, with_idt=False, act_type='prelu',
                           scale=2)}],
    'SwinIR': [{'opt': dict(upscale=2, img_size=16, window_size=4, embed_dim=12, depths=[1, 1], num_heads=[2, 2],
                            mlp_ratio=1, upsampler='pixelshuffle'), 'note': 'transformer'},
               {'opt': dict(upscale=2, img_size=16, window_size=4, embed_dim=12, depths=[1, 1], num_heads=[2, 2],
                            mlp_ratio=1, upsampler='pixelshuffle'),
                'exclude': ['conv_first', 'layers.*.conv', 'conv_after_body', 'conv_before_upsample.0'],
                'note': 'transformer, body excluded: the upsampler is pruned'}],
    'HiFaceGAN': [{'opt': dict(num_in_ch=3, num_feat=8, crop_size=64, norm_g='spectralspadebatch3x3'),
                   'size': 64, 'note': 'blind face restoration (SPADE)'}],
    'IMDN': [{'opt': dict(num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, upscale=4)}],
    'LSRB': [{'opt': dict(num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, upscale=4, esa_channels=8),
              'note': 'grouping auto (the hand grouping is the default)'}],
    'SRPNLite': [{'opt': dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=2)}],
    'RLFN': [{'opt': dict(num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, esa_channels=8, upscale=4)}],
    # spandrel's archs (fmpsr/archs/spandrel_arch.py), registered when spandrel is installed
    'SpandrelCompact': [{'opt': dict(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=4,
                                     act_type='prelu'), 'note': "spandrel's SRVGGNetCompact"}],
    'SpandrelESRGAN': [{'opt': dict(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4),
                        'note': "spandrel's RRDBNet"}],
    'SpandrelSPAN': [{'opt': dict(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=4),
                      'note': "spandrel's SPAN (re-parameterised Conv3XC)"}],
    'CompactArch': "fmpsr's wrapper around a pruned network (what finalize builds), not an arch to prune",
    'BasicVSR': VIDEO, 'BasicVSRPlusPlus': VIDEO, 'IconVSR': VIDEO, 'EDVR': VIDEO, 'DUF': VIDEO,
    'TOFlow': VIDEO,
    'SpyNet': 'an optical-flow network (two frames -> flow), not an SR network',
    'DFDNet': 'face restoration that needs a facial-component dictionary file (dict_path) and landmarks',
    'StyleGAN2Generator': 'an unconditional face generator (style vectors in, no LR image)',
    'StyleGAN2Discriminator': DISCRIMINATOR, 'HiFaceGANDiscriminator': DISCRIMINATOR,
    'UNetDiscriminatorSN_basicsr': DISCRIMINATOR, 'VGGStyleDiscriminator': DISCRIMINATOR,
    'VGGFeatureExtractor': 'the perceptual-loss feature extractor (VGG19 features), not an SR network',
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--archs', nargs='*', help='only these registered archs (default: all)')
    parser.add_argument('--out-dir', default=osp.join(ROOT, 'results', 'registry_support'),
                        help='where registry_support.json / .md are written (default results/registry_support)')
    parser.add_argument('--steps', type=int, default=4, help='FMP iterations before the mask update (default 4)')
    parser.add_argument('--tolerance', type=float, default=1e-10,
                        help='max relative difference compact vs hypernetwork, float64 (default 1e-10)')
    return parser.parse_args(argv)


def fmp_prune(hyper, specs, x, steps):
    """A few real FMP iterations (FMP Eqs. 4, 9-10) with strong regularisers, then a mask update."""
    from fmpsr.pruning import FMPConfig, FMPPruner

    config = FMPConfig(metric='params', criterion='weight', gamma_c=0.0, gamma_w=0.3, lambda_c=60.0, lambda_w=1.0,
                       weight_threshold=0.97, min_channels=2, check_freq=1)
    pruner = FMPPruner(hyper, specs, config)
    lr = 1e-2
    optimizer = torch.optim.Adam(hyper.parameters(), lr=lr)
    with torch.no_grad():
        target = hyper(x)
    target = target.detach() + 0.1 * torch.rand(target.shape, dtype=target.dtype)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.l1_loss(hyper(x), target) + pruner.regularization()
        loss.backward()
        optimizer.step()
        pruner.proximal_step(lr)
    pruner.check()


def try_row(arch, row, steps, tolerance):
    """Check, prune, finalize and compare one configuration; returns its record (dict)."""
    from basicsr.archs import build_network

    from fmpsr.pruning import HyperNetwork, finalize, trace_conv_specs
    from fmpsr.pruning.coupling import check_prunable, input_channels
    from fmpsr.pruning.grouping import build_grouping

    opt = dict(type=arch, **row['opt'])
    exclude = list(row.get('exclude', ()))
    size = row.get('size', LR_SIZE)
    record = {'arch': arch, 'network_g': opt, 'exclude': exclude, 'note': row.get('note', ''), 'lr_size': size}
    try:
        check_prunable(copy.deepcopy(opt), (size, size), exclude=exclude, mode='auto')
    except ValueError as error:
        return dict(record, status='refused', reason=str(error))
    try:
        torch.manual_seed(0)
        net = build_network(copy.deepcopy(opt)).to(F64)
        in_ch = input_channels(net, opt)
        dense_params = sum(p.numel() for p in net.parameters())
        grouping = build_grouping(net, opt, 'auto', torch.zeros(1, in_ch, size, size, dtype=F64), exclude=exclude)
        specs = trace_conv_specs(net, (size, size), in_ch)
        # DHP's N(0, 1) draw: this script checks coupling and finalize, and needs channels pruned in a few
        # steps in a varied order; from equal |z| (the default init) they die together, and IMDN's
        # channel split can then lose every channel of one chunk (a zero-width conv, not yet handled)
        hyper = HyperNetwork(net, grouping, embed_dim=4, init='dhp').to(F64)
        x = torch.rand(2, in_ch, size, size, dtype=F64)
        fmp_prune(hyper, specs, x, steps)
        prunable = [v for v in hyper.prunable_vectors()]
        kept = sum(v.kept() for v in prunable)
        total = sum(v.size for v in prunable)
        with torch.no_grad():
            hyper.eval()
            expected = hyper(x)
            compact, compact_opt, _ = finalize(hyper, build_network, opt)
            got = compact.eval()(x)
        error = float((got - expected).abs().max() / expected.abs().max())
        compact_params = sum(p.numel() for p in compact.parameters())
        record.update(dense_params=dense_params, compact_params=compact_params, prunable_channels=total,
                      kept_channels=kept, channel_params=len(grouping.channel_params),
                      plain_convs=list(grouping.plain_convs), relative_error=error)
        if kept >= total or compact_params >= dense_params:
            return dict(record, status='fails', reason='no channel was pruned')
        if not error <= tolerance:
            return dict(record, status='fails', reason=f'compact differs from the hypernetwork: {error:.2e}')
        return dict(record, status='works', reason='')
    except Exception as error:  # noqa: BLE001 (the point is to report whatever happens)
        return dict(record, status='fails', reason=f'{type(error).__name__}: {error}',
                    traceback=traceback.format_exc(limit=-3))


def collect(archs, steps, tolerance, log=sys.stderr):
    import fmpsr  # noqa: F401  (registers fmpsr's archs and patches basicsr)
    from basicsr.utils.registry import ARCH_REGISTRY

    records = []
    for arch in archs or sorted(ARCH_REGISTRY.keys()):
        if arch not in ARCH_REGISTRY:
            records.append({'arch': arch, 'status': 'fails', 'reason': 'not in ARCH_REGISTRY'})
            continue
        rows = ARCHS.get(arch)
        if rows is None:
            records.append({'arch': arch, 'status': 'fails', 'reason': 'no constructor arguments in the table '
                            '(scripts/benchmark/registry_support.py: ARCHS)'})
        elif isinstance(rows, str):
            records.append({'arch': arch, 'status': 'skipped', 'reason': f'not an SR arch: {rows}'})
        else:
            for row in rows:
                records.append(try_row(arch, row, steps, tolerance))
        for r in records[-(1 if not isinstance(rows, list) else len(rows)):]:
            print(f'{arch}: {r["status"]} {r.get("reason", "")[:200]}', file=log)
    return records


def markdown(records):
    lines = ['| arch | configuration | result | details |', '|---|---|---|---|']
    for r in records:
        opt = {k: v for k, v in (r.get('network_g') or {}).items() if k != 'type'}
        config = ', '.join(f'{k}={v}' for k, v in opt.items())
        if r.get('exclude'):
            config += f'; exclude {r["exclude"]}'
        if r.get('note'):
            config = f'{r["note"]}: {config}' if config else r['note']
        if r['status'] == 'works':
            details = (f'params {r["dense_params"]:,} -> {r["compact_params"]:,}, channels kept '
                       f'{r["kept_channels"]}/{r["prunable_channels"]}, per-channel params '
                       f'{r["channel_params"]}, max rel. diff {r["relative_error"]:.1e}')
        else:
            details = r.get('reason', '').replace('|', '\\|').replace('\n', ' ')
        lines.append(f'| {r["arch"]} | {config} | {r["status"]} | {details} |')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    args = parse_args(argv)
    from fmpsr.pruning.export import atomic_write, write_json

    records = collect(args.archs, args.steps, args.tolerance)
    table = markdown(records)
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(osp.join(args.out_dir, 'registry_support.json'), records)

    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(table)
    atomic_write(osp.join(args.out_dir, 'registry_support.md'), write)
    print(table, end='')
    return records


if __name__ == '__main__':
    from fmpsr.cli import run_cli
    run_cli(main, prog='registry_support.py')

"""How fast FMP's weight indicators Z_W move toward pruning, per regulariser form and optimiser.

FMP (Sec. 3.4) updates Z_W with "standard SGD" on L_rec + lambda_W R(Z_W), lambda_W = 0.02. This
script trains the hypernetwork form of an LSRB (LSRB-4-32, the demo's, and ESRB-6-256, the paper's x4
network) for a few hundred steps on small LR patches cut from scikit-image's sample photos, once per
*form* of the indicator update, and measures per indicator:

* ``g_rec``: the reconstruction gradient dL_rec/dZ_W (mean over steps of |g| and |mean g|);
* ``g_reg``: the regulariser's gradient dlambda_W R/dZ_W, mean of its magnitude (in the proximal forms it is
  not back-propagated; the proximal step's shrinkage per step is lr times it, for small steps);
* the change of |Z_W| per step (mean over indicators), and per indicator the drift rate of |Z_W|
  over the second half of the run.

Forms (``pruning.indicator_update`` / ``pruning.indicator_optim`` / ``train.indicator_opt``):

* ``adam_mean``: Z_W in Adam's param groups (lr = ``--lr``), gradient of lambda_W R / N_W (the old default);
* ``adam_sum``: the same with the summed regulariser;
* ``sgd_sum``: Z_W with its own SGD (lr = ``--sgd-lr``), gradient of the summed regulariser (FMP literal);
* ``proximal_adam``: Adam on L_rec (lr = ``--lr`` * ``--prox-lr-mult``), then soft-threshold by
  lr * lambda_W (summed regulariser's operator) after each step;
* ``proximal_adam_mult``: the same with the indicators' lr raised by ``--prox-lr-mult`` (default 10,
  ``pruning.weight_lr_mult``);
* ``proximal_sgd``: own SGD on L_rec, then the same proximal step with the SGD lr.

Every form starts from the same network, trained ``--warmup-*`` steps with Adam on L_rec alone (no
regulariser, nothing pruned) from the DHP/FMP initialisation, so that the measured rates are not
those of the first steps after initialisation (the L1 loss of an untrained ESRB-6-256 hypernetwork
is in the thousands); every form builds its optimisers afresh.

each with R = ``--norms`` (l1; l2 and weight_decay on request).

Projection. With drift rate d_i (change of |Z_W,i| per step at the full lr, second half of the run)
and |Z_W,i| = z_i at the end of the run (step T), indicator i is projected to cross
``weight_threshold`` after T + s_i full-lr steps, s_i = (z_i - threshold) / (-d_i) (never when
d_i >= 0); the lr schedule of the option file (MultiStepLR milestones, gamma) stretches full-lr steps
into iterations (every update here scales with the lr). The weight target of the option file is met
when a fraction ``gamma_w`` of all indicators is below the threshold (``projected_iters``: the
gamma_w-quantile of the crossing iterations), or, counting only indicators in channels kept after
the channel target, a fraction gamma_w / (1 - gamma_c) (``projected_iters_after_channels``). It is a
linear extrapolation of a short run from initialisation: a statement about the rate, not a
simulation of 300 K iterations. ``selectivity`` is the Spearman rank correlation between an
indicator's drift rate d_i and its mean reconstruction-gradient magnitude |mean g_rec| (positive: the
indicators that matter shrink less or grow; ~0: every indicator shrinks alike whatever its
importance, and what is pruned first is arbitrary).

Output: JSON (``--out``, default ``results/indicator_dynamics.json`` in the repository, whatever the
working folder) and a PNG beside it; the folder is created.

Examples::

    .venv/bin/python scripts/benchmark/indicator_dynamics.py --quick           # smoke run (a minute)
    .venv/bin/python scripts/benchmark/indicator_dynamics.py                   # LSRB 300 steps, ESRB 60
    .venv/bin/python scripts/benchmark/indicator_dynamics.py --archs esrb --steps-esrb 300 --threads 16
"""
import argparse
import copy
import math
import os
import sys
import time

import numpy as np
import torch
import yaml
from torch.nn import functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fmpsr  # noqa: E402,F401  (registers LSRB)
from basicsr.archs import build_network  # noqa: E402
from basicsr.utils.matlab_functions import imresize  # noqa: E402
from fmpsr.losses.weight_indicator_loss import WeightIndicatorLoss  # noqa: E402
from fmpsr.pruning import FMPConfig, FMPPruner, HyperNetwork, build_grouping, trace_conv_specs  # noqa: E402
from fmpsr.pruning.export import write_json  # noqa: E402

ARCHS = {'lsrb': dict(num_feat=32, num_block=4, label='LSRB-4-32'),
         'esrb': dict(num_feat=256, num_block=6, label='ESRB-6-256')}
FORMS = {  # name: (indicator_update, optimiser of Z_W, reduction)
    'adam_mean': ('gradient', 'adam', 'mean'),
    'adam_sum': ('gradient', 'adam', 'sum'),
    'sgd_sum': ('gradient', 'sgd', 'sum'),
    'proximal_adam': ('proximal', 'adam', 'sum'),
    'proximal_adam_mult': ('proximal', 'adam', 'sum'),
    'proximal_sgd': ('proximal', 'sgd', 'sum'),
}
PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'immunohistochemistry', 'hubble_deep_field')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='smoke run: 20 LSRB / 4 ESRB steps, two forms')
    p.add_argument('--archs', nargs='+', default=['lsrb', 'esrb'], choices=sorted(ARCHS))
    p.add_argument('--forms', nargs='+', default=list(FORMS), choices=list(FORMS))
    p.add_argument('--norms', nargs='+', default=['l1'], choices=['l1', 'l2', 'weight_decay'])
    p.add_argument('--steps-lsrb', type=int, default=300)
    p.add_argument('--steps-esrb', type=int, default=60)
    p.add_argument('--batch', type=int, default=4, help='LR patches per batch (default 4)')
    p.add_argument('--patch-lsrb', type=int, default=24, help='LR patch of LSRB-4-32 in pixels (default 24)')
    p.add_argument('--patch-esrb', type=int, default=16, help='LR patch of ESRB-6-256 in pixels (>= 15; default 16)')
    p.add_argument('--lr', type=float, default=1e-4, help='Adam lr (paper: 1e-4)')
    p.add_argument('--sgd-lr', type=float, default=1e-4, help='lr of the SGD of Z_W (paper: the same 1e-4)')
    p.add_argument('--prox-lr-mult', type=float, default=10.0,
                   help='weight_lr_mult of the proximal_adam_mult form (default 10)')
    p.add_argument('--warmup-lsrb', type=int, default=300, help='shared Adam steps on L_rec before the forms')
    p.add_argument('--warmup-esrb', type=int, default=20, help='shared Adam steps on L_rec before the forms')
    p.add_argument('--lambda-w', type=float, default=0.02)
    p.add_argument('--options', default=os.path.join(ROOT, 'options', 'fmp_lsrb_x4.yml'),
                   help='option file whose gamma_c, gamma_w, weight_threshold, schedule and budget are projected')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=os.path.join(ROOT, 'results', 'indicator_dynamics.json'),
                   help='JSON file to write, a PNG beside it (default results/indicator_dynamics.json)')
    args = p.parse_args(argv)
    if args.quick:
        args.steps_lsrb, args.steps_esrb = min(args.steps_lsrb, 20), min(args.steps_esrb, 4)
        args.warmup_lsrb, args.warmup_esrb = min(args.warmup_lsrb, 10), min(args.warmup_esrb, 2)
        if args.forms == list(FORMS):
            args.forms = ['adam_mean', 'proximal_adam']
    if args.patch_esrb < 15 or args.patch_lsrb < 15:
        p.error('LR patches must be >= 15 pixels (ESA)')
    return args


def make_patches(scale, lr_size, count, seed):
    """``count`` (LR, HR) pairs: random HR crops of scikit-image photos, LR by MATLAB bicubic."""
    import skimage.data
    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        photos.append(img.astype(np.float32) / 255.)
    hr_size = lr_size * scale
    lq, gt = [], []
    for i in range(count):
        img = photos[i % len(photos)]
        y, x = rng.integers(0, img.shape[0] - hr_size), rng.integers(0, img.shape[1] - hr_size)
        hr = img[y:y + hr_size, x:x + hr_size]
        lq.append(torch.from_numpy(np.ascontiguousarray(imresize(hr, 1 / scale))).permute(2, 0, 1).clamp(0, 1))
        gt.append(torch.from_numpy(np.ascontiguousarray(hr)).permute(2, 0, 1))
    return torch.stack(lq), torch.stack(gt)


def build(arch, seed):
    network_opt = dict(type='LSRB', num_in_ch=3, num_out_ch=3, num_feat=ARCHS[arch]['num_feat'],
                       num_block=ARCHS[arch]['num_block'], upscale=4, esa_channels=16)
    torch.manual_seed(seed)
    plain = build_network(copy.deepcopy(network_opt))
    specs = trace_conv_specs(plain, (64, 64), 3)
    grouping = build_grouping(plain, network_opt, None, torch.zeros(1, 3, 64, 64), ())
    return HyperNetwork(plain, grouping, 8), specs


def spearman(a, b):
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def iterations_for(full_lr_steps, start, milestones, gamma, limit=10 ** 9):
    """Iterations after which ``full_lr_steps`` steps at the initial lr have been taken, starting at
    iteration ``start``, when the lr is multiplied by ``gamma`` at each milestone."""
    it, left, rate = float(start), float(full_lr_steps), gamma ** sum(m <= start for m in milestones)
    for m in sorted(milestones) + [limit]:
        if m <= it:
            continue
        if left <= (m - it) * rate:
            return it + left / rate
        left -= (m - it) * rate
        it, rate = float(m), rate * gamma
    return math.inf


def batches(data, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, data[0].shape[0], (batch,), generator=gen)
        yield data[0][idx], data[1][idx]


def warm_up(arch, args, data):
    """The shared start: ``--warmup-*`` Adam steps on L_rec alone; returns (state_dict, last losses)."""
    hyper, _ = build(arch, args.seed)
    steps = args.warmup_esrb if arch == 'esrb' else args.warmup_lsrb
    optimizer = torch.optim.Adam(hyper.parameters(), lr=args.lr)
    losses = []
    for _, (lq, gt) in zip(range(steps), batches(data, args.batch, args.seed + 1)):
        optimizer.zero_grad()
        loss = F.l1_loss(hyper(lq), gt)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if len(losses) % 10 == 0:
            print(f'{arch}: warm-up step {len(losses)}: L1 {losses[-1]:.4g}', file=sys.stderr, flush=True)
    return {k: v.clone() for k, v in hyper.state_dict().items()}, losses


def run_form(arch, form, norm, args, data, target, start):
    update, optim, reduction = FORMS[form]
    hyper, specs = build(arch, args.seed)
    hyper.load_state_dict(start)
    loss_fn = WeightIndicatorLoss(args.lambda_w, norm, reduction)
    lr_w = args.sgd_lr if optim == 'sgd' else args.lr * (args.prox_lr_mult if form == 'proximal_adam_mult' else 1.0)
    config = FMPConfig(metric='params', criterion='total', gamma_c=target['gamma_c'], gamma_w=target['gamma_w'],
                       lambda_c=0.1, lambda_w=args.lambda_w, weight_reg=norm, weight_reg_reduction=reduction,
                       indicator_update=update, weight_threshold=target['threshold'])
    pruner = FMPPruner(hyper, specs, config, loss_fn)
    groups = hyper.parameter_groups()
    param_groups = [{'params': groups['hyper'], 'lr': args.lr}, {'params': groups['channel'], 'lr': args.lr}]
    if optim == 'adam':
        param_groups.append({'params': groups['weight'], 'lr': lr_w})
    optimizers = [torch.optim.Adam(param_groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)]
    if optim == 'sgd':
        optimizers.append(torch.optim.SGD(groups['weight'], lr=lr_w))
    indicators = groups['weight']
    flat = lambda ts: torch.cat([t.detach().flatten() for t in ts])  # noqa: E731
    steps = args.steps_esrb if arch == 'esrb' else args.steps_lsrb
    n_w = sum(t.numel() for t in indicators)
    sum_grec, sum_abs_grec = torch.zeros(n_w, dtype=torch.float64), torch.zeros(n_w, dtype=torch.float64)
    sum_abs_greg = 0.0
    z_start = flat(indicators).abs()
    z_half, mean_abs_z, rec_losses = None, [float(z_start.mean())], []
    t0 = time.time()
    for step, (lq, gt) in zip(range(1, steps + 1), batches(data, args.batch, args.seed + 2)):
        for o in optimizers:
            o.zero_grad()
        rec = F.l1_loss(hyper(lq), gt)
        rec.backward()
        g_rec = flat([t.grad for t in indicators])
        sum_grec += g_rec.double()
        sum_abs_grec += g_rec.abs().double()
        # the regulariser's gradient; added to Z_W's gradient in the gradient forms (what
        # pruner.regularization() back-propagates), applied as a proximal step in the others
        kept, masks = pruner._kept_indicators()
        g_reg = torch.autograd.grad(loss_fn(kept, masks), indicators)
        if update == 'gradient':
            for t, g in zip(indicators, g_reg):
                t.grad += g
        sum_abs_greg += float(flat(g_reg).abs().mean())
        for o in optimizers:
            o.step()
        pruner.proximal_step(args.lr)
        pruner.indicator_proximal_step(lr_w)
        z = flat(indicators).abs()
        mean_abs_z.append(float(z.mean()))
        rec_losses.append(float(rec.detach()))
        if step == steps // 2:
            z_half = z.clone()
    seconds = time.time() - t0
    z_end = flat(indicators).abs()
    half = steps - steps // 2
    drift = ((z_end - z_half) / half).numpy().astype(np.float64)           # per full-lr step
    mean_g = (sum_grec / steps).abs().numpy()
    abs_g = (sum_abs_grec / steps).numpy()
    left = (z_end.numpy() - target['threshold'])
    with np.errstate(divide='ignore', invalid='ignore'):
        full_steps = np.where(drift < 0, np.maximum(left, 0) / -drift, np.inf)
    ranked = np.sort(full_steps)

    def quantile(q):  # the crossing iteration is monotone in the full-lr steps, so map the quantile
        s = float(ranked[min(max(int(math.ceil(q * n_w)) - 1, 0), n_w - 1)])
        return iterations_for(s, steps, target['milestones'], target['gamma']) if math.isfinite(s) else math.inf

    sub = np.random.default_rng(0).choice(n_w, size=min(n_w, 200_000), replace=False)
    proj = quantile(target['gamma_w'])
    proj_c = quantile(target['gamma_w'] / (1 - target['gamma_c']))
    return {
        'arch': ARCHS[arch]['label'], 'form': form, 'norm': norm, 'indicator_update': update, 'optimizer': optim,
        'reduction': reduction, 'lr_indicators': lr_w, 'lambda_w': args.lambda_w, 'n_indicators': n_w,
        'steps': steps, 'seconds': round(seconds, 1),
        'g_rec_abs_median': float(np.median(abs_g)), 'g_rec_abs_p99': float(np.quantile(abs_g, 0.99)),
        'g_rec_mean_abs_median': float(np.median(mean_g)), 'g_rec_mean_abs_p99': float(np.quantile(mean_g, 0.99)),
        'g_reg_abs_mean': sum_abs_greg / steps,
        'dz_per_step_mean': (mean_abs_z[-1] - mean_abs_z[0]) / steps,
        'dz_per_step_second_half_mean': float(drift.mean()),
        'shrinking_fraction': float((drift < 0).mean()),
        'projected_iters': proj, 'projected_iters_after_channels': proj_c,
        'within_budget': bool(proj <= target['budget']),
        'within_budget_after_channels': bool(proj_c <= target['budget']),
        'selectivity': spearman(drift[sub], mean_g[sub]),
        'rec_loss_first_last': [rec_losses[0], float(np.mean(rec_losses[-max(1, steps // 10):]))],
        'mean_abs_z': mean_abs_z[::max(1, steps // 100)],
    }


def plot(results, target, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    archs = sorted({r['arch'] for r in results}, key=lambda a: a != 'LSRB-4-32')
    fig, axes = plt.subplots(2, len(archs), figsize=(6.5 * len(archs), 8.5), squeeze=False)
    for col, arch in enumerate(archs):
        rows = [r for r in results if r['arch'] == arch]
        ax = axes[0][col]
        for r in rows:
            xs = np.linspace(0, r['steps'], len(r['mean_abs_z']))
            ax.plot(xs, r['mean_abs_z'], label=f"{r['form']} ({r['norm']})")
        ax.set(title=f'{arch}: mean |Z_W| per step', xlabel='step', ylabel='mean |Z_W|')
        ax.legend(fontsize=8)
        ax = axes[1][col]
        labels = [f"{r['form']}\n{r['norm']}" for r in rows]
        values = [min(r['projected_iters'], 1e9) for r in rows]
        ax.bar(range(len(rows)), values, color=['tab:green' if r['within_budget'] else 'tab:red' for r in rows])
        ax.axhline(target['budget'], color='k', ls='--', label=f"budget {target['budget']:,} iterations")
        ax.set_yscale('log')
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set(title=f"{arch}: projected iterations to gamma_w={target['gamma_w']} below "
                     f"{target['threshold']} (1e9 = never)", ylabel='iterations')
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.options) as f:
        opt = yaml.safe_load(f)
    pruning, sched = opt['pruning'], opt['train']['scheduler']
    target = {'options': os.path.relpath(args.options, ROOT), 'gamma_c': float(pruning['gamma_c']),
              'gamma_w': float(pruning['gamma_w']), 'threshold': float(pruning.get('weight_threshold', 5e-3)),
              'milestones': [int(m) for m in sched.get('milestones', [])], 'gamma': float(sched.get('gamma', 1.0)),
              'budget': int(pruning['max_prune_iter'])}
    results, warmups = [], {}
    for arch in args.archs:
        patch = args.patch_esrb if arch == 'esrb' else args.patch_lsrb
        data = make_patches(4, patch, 32, args.seed)
        start, losses = warm_up(arch, args, data)
        warmups[ARCHS[arch]['label']] = {'steps': len(losses), 'l1_first_last': losses[:1] + losses[-1:]}
        print(f'{arch}: warm-up {warmups[ARCHS[arch]["label"]]}', file=sys.stderr, flush=True)
        for norm in args.norms:
            for form in args.forms:
                r = run_form(arch, form, norm, args, data, target, start)
                print({k: v for k, v in r.items() if k != 'mean_abs_z'}, file=sys.stderr, flush=True)
                results.append(r)
    out = {'settings': {k: v for k, v in vars(args).items()}, 'target': target, 'torch_threads':
           torch.get_num_threads(), 'warmup': warmups, 'results': results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, out)
    png = os.path.splitext(args.out)[0] + '.png'
    plot(results, target, png)
    print(f'wrote {args.out} and {png}', file=sys.stderr)
    return out


if __name__ == '__main__':
    from fmpsr.cli import run_cli
    run_cli(main, prog='indicator_dynamics.py')

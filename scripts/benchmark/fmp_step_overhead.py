"""Training-step cost of FMP pruning: dense LSRB (``nn.Conv2d``) vs its FMP hypernetwork form.

Both networks are built from the same ``network_g`` options (LSRB-6-64 x4 by default) and trained
side by side in one process on the same random batch (16 LR patches of 48x48 pixels and their
192x192 targets by default). After ``--warmup`` untimed rounds the two steps are timed interleaved,
dense then FMP, ``--steps`` times (ABAB...), so that machine noise hits both alike.

* dense step: ``zero_grad``; forward; L1 loss; backward; Adam step (BasicSR's ``SRModel``).
* FMP step: what ``FMPModel.optimize_parameters`` does every prune-stage iteration: ``zero_grad``;
  forward through the :class:`~fmpsr.pruning.HyperNetwork` (every conv weight generated);
  L1 loss + ``pruner.regularization()``; the finiteness check; backward; Adam step over the three
  parameter groups of ``FMPModel.setup_optimizers`` (hypernetwork, channel vectors, weight
  indicators); ``pruner.proximal_step(channel lr)`` and ``pruner.indicator_proximal_step`` (a no-op
  with the default ``indicator_update: gradient``); ``pruner.channel_regularization()`` (logged
  every iteration).

Both run after :func:`fmpsr.cpu_allocator.keep_freed_memory`, as ``fmpsr/train.py`` does
(``--default-malloc``: glibc's defaults, under which every step page-faults its large tensors in
anew). ``minor_page_faults_per_step_median`` shows which is in effect.

``ops_per_step``: the aten ops one step of each network dispatches (counted once, after the timed
steps). Unlike every time here it does not depend on the machine or its load.

``pruner.check()`` (mask update and recount, every ``check_freq`` = 100 iterations) is not part
of the step; its cost is measured separately (median of ``--check-reps`` calls, after the timed
steps) and reported as ``check_s`` and as the amortised ratio
``(fmp_step + check_s / check_freq) / dense_step``.

Peak memory: one more dense and one more FMP training run, each measured alone (a spawned process per
network on CPU, ``torch.cuda.max_memory_allocated`` on CUDA; :func:`step_peak_memory`), reported as
``peak_memory_ratio`` (whole training memory: parameters, optimiser state, batch and the step's peak)
and ``step_peak_memory_ratio`` (the step's own peak only). ``--no-memory`` skips it.

Output: ONE JSON line on stdout (logs go to stderr). Targets: the paired median of ``fmp / dense``
<= 1.05 (``pass``) and ``peak_memory_ratio`` <= 2.
See ``scripts/benchmark/README.md`` for the keys.

Examples::

    python scripts/benchmark/fmp_step_overhead.py                   # the issue's setting, CPU
    python scripts/benchmark/fmp_step_overhead.py --quick           # smoke run (seconds)
    python scripts/benchmark/fmp_step_overhead.py --device cuda --steps 50 --warmup 10
"""
import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

TARGET = 1.05          # paired median of fmp / dense step time (issue 11, part 4)
MEMORY_TARGET = 2.0    # peak training memory, fmp / dense
DEFAULTS = dict(batch=16, patch=48, num_feat=64, num_block=6, scale=4, steps=20, warmup=3)
QUICK = dict(batch=4, patch=24, num_feat=64, num_block=6, scale=4, steps=5, warmup=1)
ESA_MIN_LR_SIZE = 15  # ESA: stride-2 3x3 conv, then a 7x7 max-pool


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true',
                        help=f'smoke-test sizes {QUICK} (explicit options still win)')
    parser.add_argument('--batch', type=int, help=f'LR patches per batch (default {DEFAULTS["batch"]})')
    parser.add_argument('--patch', type=int, help=f'LR patch size in pixels (default {DEFAULTS["patch"]}; >= 15)')
    parser.add_argument('--num-feat', type=int, help=f'LSRB stream width (default {DEFAULTS["num_feat"]})')
    parser.add_argument('--num-block', type=int, help=f'LSRB blocks (default {DEFAULTS["num_block"]})')
    parser.add_argument('--scale', type=int, help=f'upscale factor (default {DEFAULTS["scale"]})')
    parser.add_argument('--steps', type=int, help=f'timed steps per network (default {DEFAULTS["steps"]})')
    parser.add_argument('--warmup', type=int, help=f'untimed steps per network first (default {DEFAULTS["warmup"]})')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch default)')
    parser.add_argument('--device', default='cpu', help="'cpu' (default) or 'cuda' / 'cuda:N'")
    parser.add_argument('--lr', type=float, default=1e-3, help='Adam learning rate (default 1e-3, as the options)')
    parser.add_argument('--check-reps', type=int, default=5, help='pruner.check() calls to time (default 5)')
    parser.add_argument('--check-freq', type=int, default=None,
                        help='iterations between checks for the amortised ratio (default FMPConfig: 100)')
    parser.add_argument('--breakdown', action='store_true',
                        help='on CUDA, synchronise between phases to report per-phase times '
                             '(always reported on CPU, where it costs nothing)')
    parser.add_argument('--optimizer', choices=['fused', 'foreach', 'for-loop'], default='fused',
                        help="Adam implementation for BOTH networks (default 'fused', what FMPModel uses "
                             "when optim_g does not choose)")
    parser.add_argument('--default-malloc', action='store_true',
                        help="leave glibc's malloc settings alone (default: fmpsr.cpu_allocator.keep_freed_memory, "
                             'as fmpsr/train.py does)')
    parser.add_argument('--no-memory', action='store_true',
                        help='skip the peak-memory measurement (two spawned processes on CPU)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ('batch', 'patch', 'num_feat', 'num_block', 'scale', 'steps', 'check_reps'):
        if getattr(args, key) < 1:
            parser.error(f'--{key.replace("_", "-")} must be >= 1')
    if args.warmup < 0:
        parser.error('--warmup must be >= 0')
    if args.patch < ESA_MIN_LR_SIZE:
        parser.error(f'--patch must be >= {ESA_MIN_LR_SIZE} LR pixels (ESA)')
    if args.threads is not None and args.threads < 1:
        parser.error('--threads must be >= 1')
    return args


def percentile(values, q):
    """Linear-interpolation percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values):
    return {'median': statistics.median(values), 'p10': percentile(values, 10), 'p90': percentile(values, 90),
            'min': min(values), 'max': max(values)}


class Stepper:
    """One network's training step, timed as a whole and (optionally) by phase."""

    def __init__(self, device, phases):
        self.device = device
        self.phases = phases          # record per-phase times
        self.phase_times = {}
        self.page_faults = []

    def sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def mark(self, name, start):
        """Record the time since ``start`` under ``name``; return the new start."""
        if not self.phases:
            return start
        self.sync()
        now = time.perf_counter()
        self.phase_times.setdefault(name, []).append(now - start)
        return now

    def timed(self, lq, gt):
        """Seconds of one step; its minor page faults go to ``self.page_faults`` (where ``resource`` exists)."""
        self.sync()
        faults = _minor_faults()
        start = time.perf_counter()
        self.step(lq, gt, start)
        self.sync()
        elapsed = time.perf_counter() - start
        if faults is not None:
            self.page_faults.append(_minor_faults() - faults)
        return elapsed


def _minor_faults():
    """Minor page faults of this process so far (None where the ``resource`` module is missing)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (forward, autograd's backward and the optimiser
    alike, views included; a fused Adam over a parameter group is one op)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(stepper, lq, gt):
    """Aten ops of one training step of ``stepper`` (int): every op dispatched, views and backward ops
    included, so it counts more widely than the issue's "about 150 small ops per step". Unlike the
    times, the count is the same on every machine (for one torch version). The step is a real one: it
    updates the parameters."""
    with _OpCounter() as counter:
        stepper.step(lq, gt, time.perf_counter())
    return counter.count


def adam_kwargs(implementation):
    """Keyword arguments that select Adam's implementation ('fused', 'foreach' or 'for-loop')."""
    return {'fused': {'fused': True}, 'foreach': {'foreach': True}, 'for-loop': {'foreach': False}}[implementation]


class DenseStep(Stepper):
    def __init__(self, net, lr, device, phases, optimizer='fused'):
        super().__init__(device, phases)
        self.net = net
        self.optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0,
                                          **adam_kwargs(optimizer))

    def step(self, lq, gt, t):
        self.optimizer.zero_grad()
        out = self.net(lq)
        loss = F.l1_loss(out, gt)
        t = self.mark('forward_loss', t)
        loss.backward()
        t = self.mark('backward', t)
        self.optimizer.step()
        self.mark('optimizer', t)


class FMPStep(Stepper):
    """Mirrors ``FMPModel.setup_optimizers`` and the per-iteration part of ``optimize_parameters``."""

    def __init__(self, hyper, pruner, lr, device, phases, optimizer='fused'):
        super().__init__(device, phases)
        self.hyper, self.pruner = hyper, pruner
        config = pruner.config
        groups = hyper.parameter_groups()
        param_groups = [
            {'params': groups['hyper'], 'lr': lr, 'weight_decay': 0, 'name': 'hyper'},
            {'params': groups['channel'], 'lr': lr * config.channel_lr_mult, 'weight_decay': 0, 'name': 'channel'},
            {'params': groups['weight'], 'lr': lr * config.weight_lr_mult, 'weight_decay': 0, 'name': 'weight'}]
        self.optimizer = torch.optim.Adam(param_groups, lr=lr, betas=(0.9, 0.999), **adam_kwargs(optimizer))

    def channel_lr(self):
        return next(g['lr'] for g in self.optimizer.param_groups if g.get('name') == 'channel')

    def indicator_lr(self):
        return next(g['lr'] for g in self.optimizer.param_groups if g.get('name') == 'weight')

    def step(self, lq, gt, t):
        self.optimizer.zero_grad()
        out = self.hyper(lq)
        loss = F.l1_loss(out, gt)
        t = self.mark('forward_loss', t)
        loss = loss + self.pruner.regularization()
        t = self.mark('regularization', t)
        if not torch.isfinite(loss):
            raise FloatingPointError(f'FMP loss is {loss.item()}')
        t = self.mark('isfinite', t)
        loss.backward()
        t = self.mark('backward', t)
        self.optimizer.step()
        t = self.mark('optimizer', t)
        self.pruner.proximal_step(self.channel_lr())
        if self.pruner.config.weight_indicators:
            self.pruner.indicator_proximal_step(self.indicator_lr())
        t = self.mark('proximal_step', t)
        self.pruner.channel_regularization()
        self.mark('channel_regularization', t)


def build(args, device, which=('dense', 'fmp')):
    """The dense LSRB and/or its FMP hypernetwork and pruner, and one random batch, all on ``device``.

    Returns:
        tuple: (dense or None, hyper or None, pruner or None, config, lq, gt).
    """
    import fmpsr  # noqa: F401  (registers LSRB)
    from basicsr.archs import build_network
    from fmpsr.pruning import FMPConfig, FMPPruner, HyperNetwork, build_grouping, trace_conv_specs

    opt = dict(type='LSRB', num_feat=args.num_feat, num_block=args.num_block, upscale=args.scale)
    config = FMPConfig() if args.check_freq is None else FMPConfig(check_freq=args.check_freq)
    config.validate()
    torch.manual_seed(args.seed)
    dense = build_network(dict(opt)).to(device) if 'dense' in which else None
    hyper = pruner = None
    if 'fmp' in which:
        plain = build_network(dict(opt))
        specs = trace_conv_specs(plain, config.macs_input_size)   # as FMPModel.build_hypernetwork
        hyper = HyperNetwork(plain, build_grouping(plain, opt), config.embed_dim).to(device)
        pruner = FMPPruner(hyper, specs, config)
    lq = torch.rand(args.batch, 3, args.patch, args.patch, device=device)
    gt = torch.rand(args.batch, 3, args.patch * args.scale, args.patch * args.scale, device=device)
    return dense, hyper, pruner, config, lq, gt


def make_stepper(kind, args, device, phases=False):
    """Build one network (``kind``: 'dense' or 'fmp') and its step; returns (stepper, lq, gt)."""
    dense, hyper, pruner, _, lq, gt = build(args, device, (kind,))
    if kind == 'dense':
        return DenseStep(dense, args.lr, device, phases, args.optimizer), lq, gt
    return FMPStep(hyper, pruner, args.lr, device, phases, args.optimizer), lq, gt


def step_peak_memory_child(kind, arg_dict):
    """In a fresh (spawned) process: peak resident memory of training ``kind`` ('dense' | 'fmp').

    Returns a dict of bytes: ``training`` (the high-water mark during a step less the RSS before the
    network was built: parameters, optimiser state, batch and the step's own peak) and ``step`` (the
    high-water mark less the RSS just before the step: activations, gradients, generated weights).
    The high-water mark is reset through ``/proc/self/clear_refs`` after two warm-up steps (so Adam's
    moments exist), so memory freed earlier and kept by the C allocator cannot hide the growth."""
    args = argparse.Namespace(**arg_dict)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    allocator_setup(args)
    with contextlib.redirect_stdout(sys.stderr):
        import fmpsr.pruning  # noqa: F401  (imports first, fmpsr before basicsr: its compat shims;
        import basicsr.archs  # noqa: F401  the imports' memory is not the network's)
        from fmpsr.deploy.profiling import status_kb
    gc.collect()
    start = status_kb('VmRSS')
    with contextlib.redirect_stdout(sys.stderr):
        stepper, lq, gt = make_stepper(kind, args, torch.device('cpu'))
    for _ in range(2):
        stepper.timed(lq, gt)
    gc.collect()
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    before = status_kb('VmRSS')
    stepper.timed(lq, gt)
    peak = status_kb('VmHWM')
    return {'training': (peak - start) * 1024, 'step': (peak - before) * 1024}


def allocator_setup(args):
    """What ``fmpsr/train.py`` does before training (:func:`fmpsr.cpu_allocator.keep_freed_memory`), for
    both networks alike; with ``--default-malloc`` nothing. Returns the JSON's ``cpu_allocator``."""
    if args.default_malloc:
        return {'applied': False, 'reason': '--default-malloc'}
    from fmpsr.cpu_allocator import keep_freed_memory
    return keep_freed_memory()


def step_peak_memory(args, device):
    """Peak memory of a dense and of an FMP training step: (dict kind -> dict of bytes, method).

    * CUDA: ``torch.cuda.max_memory_allocated`` over one step after two warm-up steps; ``training`` is
      that peak less what was allocated before the network was built, ``step`` less what was allocated
      just before the step.
    * CPU (Linux): one spawned process per network, run one after the other
      (:func:`step_peak_memory_child`); 'unavailable' elsewhere.
    """
    kinds = ('dense', 'fmp')
    if device.type == 'cuda':
        out = {}
        for kind in kinds:
            gc.collect()
            torch.cuda.empty_cache()
            start = torch.cuda.memory_allocated(device)
            stepper, lq, gt = make_stepper(kind, args, device)
            for _ in range(2):
                stepper.timed(lq, gt)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            stepper.timed(lq, gt)
            peak = torch.cuda.max_memory_allocated(device)
            out[kind] = {'training': peak - start, 'step': peak - before}
            del stepper, lq, gt
        return out, 'cuda_max_memory_allocated'
    if not (sys.platform.startswith('linux') and os.path.exists('/proc/self/clear_refs')):
        return None, 'unavailable'
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    out = {}
    try:
        for kind in kinds:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:
                out[kind] = pool.submit(step_peak_memory_child, kind, vars(args)).result()
    except (OSError, RuntimeError) as error:
        print(f'fmp_step_overhead: peak memory not measured ({error})', file=sys.stderr)
        return None, 'unavailable'
    return out, 'rss_peak_delta_spawned'


def run(args):
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('fmp_step_overhead: --device cuda asked for but torch.cuda.is_available() is False')
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    allocator = allocator_setup(args)
    memory, memory_method = (None, 'skipped (--no-memory)') if args.no_memory else step_peak_memory(args, device)
    with contextlib.redirect_stdout(sys.stderr):   # keep stdout for the JSON line
        dense, hyper, pruner, config, lq, gt = build(args, device)
    phases = device.type == 'cpu' or args.breakdown
    dense_step = DenseStep(dense, args.lr, device, phases, args.optimizer)
    fmp_step = FMPStep(hyper, pruner, args.lr, device, phases, args.optimizer)

    for _ in range(args.warmup):
        dense_step.timed(lq, gt)
        fmp_step.timed(lq, gt)
    for stepper in (dense_step, fmp_step):
        stepper.phase_times.clear()
    gc.collect()
    dense_times, fmp_times = [], []
    for _ in range(args.steps):                      # interleaved: A B A B ...
        dense_times.append(dense_step.timed(lq, gt))
        fmp_times.append(fmp_step.timed(lq, gt))

    ops = {'dense': ops_per_step(dense_step, lq, gt), 'fmp': ops_per_step(fmp_step, lq, gt)}
    check_times = []
    for _ in range(args.check_reps):                 # after the timed steps: check() may change masks
        fmp_step.sync()
        start = time.perf_counter()
        pruner.check()
        fmp_step.sync()
        check_times.append(time.perf_counter() - start)

    dense_s, fmp_s = summary(dense_times), summary(fmp_times)
    check_s = statistics.median(check_times)
    ratio = fmp_s['median'] / dense_s['median']
    paired = statistics.median(f / d for f, d in zip(fmp_times, dense_times))
    amortised = (fmp_s['median'] + check_s / config.check_freq) / dense_s['median']
    rnd = lambda v: round(v, 6)  # noqa: E731
    result = {
        'benchmark': 'fmp_step_overhead',
        'device': device.type,
        'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
        'torch': torch.__version__,
        'threads': torch.get_num_threads(),
        'config': {'arch': 'LSRB', 'batch': args.batch, 'patch': args.patch, 'num_feat': args.num_feat,
                   'num_block': args.num_block, 'scale': args.scale, 'steps': args.steps,
                   'warmup': args.warmup, 'lr': args.lr, 'optimizer': args.optimizer, 'embed_dim': config.embed_dim,
                   'check_freq': config.check_freq, 'quick': args.quick},
        'params': {'dense': sum(p.numel() for p in dense.parameters()),
                   'fmp_trainable': sum(p.numel() for p in hyper.parameters())},
        'dense_step_s_median': rnd(dense_s['median']),
        'fmp_step_s_median': rnd(fmp_s['median']),
        'ratio': round(ratio, 4),
        'ratio_paired_median': round(paired, 4),
        # FMP's own cost per step in seconds; with a tiny batch (--batch 1 --patch 16) nearly all of it is weight
        # generation, Adam over the hypernetwork and the proximal steps, and little is machine noise
        'extra_s_paired_median': rnd(statistics.median(f - d for f, d in zip(fmp_times, dense_times))),
        'target': TARGET,
        'pass': bool(paired <= TARGET),
        'cpu_allocator': allocator,
        'minor_page_faults_per_step_median': (
            {name: statistics.median(stepper.page_faults[-args.steps:]) for name, stepper in
             (('dense', dense_step), ('fmp', fmp_step))} if fmp_step.page_faults else None),
        'ops_per_step': ops,
        'memory_method': memory_method,
        'peak_memory_bytes': memory,
        'peak_memory_ratio': None if memory is None else round(memory['fmp']['training'] / memory['dense']['training'], 4),
        # with freed memory kept (the default), most of a step's memory is resident before it starts: only
        # --default-malloc gives the step's own peak
        'step_peak_memory_ratio': (None if memory is None or allocator['applied'] or not memory['dense']['step']
                                   else round(memory['fmp']['step'] / memory['dense']['step'], 4)),
        'memory_target': MEMORY_TARGET,
        'check_s': rnd(check_s),
        'amortised_ratio_with_check': round(amortised, 4),
        'dense_step_s': {k: rnd(v) for k, v in dense_s.items()},
        'fmp_step_s': {k: rnd(v) for k, v in fmp_s.items()},
        'dense_steps_s': [rnd(v) for v in dense_times],
        'fmp_steps_s': [rnd(v) for v in fmp_times],
        'check_calls_s': [rnd(v) for v in check_times],
    }
    if phases:
        result['phases_s_median'] = {
            name: {phase: rnd(statistics.median(times)) for phase, times in stepper.phase_times.items()}
            for name, stepper in (('dense', dense_step), ('fmp', fmp_step))}
    return result


def main(argv=None):
    result = run(parse_args(argv))
    print(json.dumps(result), flush=True)
    return result


if __name__ == '__main__':
    from fmpsr.cli import run_cli
    run_cli(main, prog='fmp_step_overhead.py')

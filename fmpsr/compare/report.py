"""The comparison's outputs: ``results.jsonl`` (one line per finished cell), ``report.md`` and figures.

Every count in them is recounted from the cell's exported files (:mod:`fmpsr.compare.recount`), not
copied from what the pruning code logged; PSNR / SSIM are ``fmpsr/test.py``'s ``metrics.json``.

With two or more seeds, a curve's point is the mean over seeds and its spread the sample standard
deviation (ddof 1). In the tables the best mean PSNR of a budget and test set is in bold; another entry
whose difference to it is smaller than the larger of the two spreads is marked as a tie (``~``).
"""
import glob
import json
import math
import os
import re
from collections import OrderedDict

from fmpsr.pruning.export import atomic_write

PRUNE_LOG_RE = re.compile(r'\[prune iter (\d+)\] (\w+): .*?kept ([0-9.]+)')
FIGURES = OrderedDict([('psnr_vs_params', 'PSNR vs params'), ('psnr_vs_macs', 'PSNR vs MACs'),
                       ('widths', 'Per-layer kept widths'), ('kept_vs_iter', 'Kept ratio vs iteration')])


def kept_curve(exp_dir):
    """``[(iteration, kept fraction), ...]`` from the ``[prune iter N] <metric>: ... kept X`` lines of a
    run's training logs (every log of the run, resumed runs included; later lines win)."""
    points = {}
    for path in sorted(glob.glob(os.path.join(exp_dir, 'train_*.log'))):
        with open(path, errors='replace') as f:
            for line in f:
                m = PRUNE_LOG_RE.search(line)
                if m:
                    points[int(m.group(1))] = float(m.group(3))
    return sorted(points.items())


ITER_LOG_RE = re.compile(r'\[epoch:\s*\d+, iter:\s*([\d,]+),')


def trained_iterations(exp_dir):
    """The last iteration a run reached: the largest of its saved training states
    (``training_states/<iter>.state``) and of the ``iter:`` of its training log lines, or None."""
    stems = [os.path.basename(p).split('.')[0] for p in glob.glob(os.path.join(exp_dir, 'training_states', '*.state'))]
    iters = [int(s) for s in stems if s.isdigit()]
    for path in glob.glob(os.path.join(exp_dir, 'train_*.log')):
        with open(path, errors='replace') as f:
            iters += [int(m.group(1).replace(',', '')) for m in ITER_LOG_RE.finditer(f.read())]
    return max(iters) if iters else None


def lr_at(base_lr, scheduler_opt, step):
    """The lr of BasicSR's scheduler ``scheduler_opt`` (``periods`` resolved) after ``step`` steps, in
    closed form (float), or None for a form this does not know (restarts of MultiStepRestartLR, a step
    beyond the cosine's periods, another type).

    ``MultiStepLR`` / ``MultiStepRestartLR`` (restarts [0]): base * gamma ** (milestones <= step, counted
    with repeats); ``CosineAnnealingRestartLR``: eta_min + w * (base - eta_min) * (1 + cos(pi * t / period)) / 2
    in the period holding ``step`` (t the steps since its start, w its restart weight).
    """
    kind = scheduler_opt.get('type')
    if kind in ('MultiStepLR', 'MultiStepRestartLR'):
        if list(scheduler_opt.get('restarts', [0])) != [0]:
            return None
        gamma = scheduler_opt.get('gamma', 0.1)
        return base_lr * gamma ** sum(1 for m in scheduler_opt.get('milestones', []) if m <= step)
    if kind == 'CosineAnnealingRestartLR':
        periods = list(scheduler_opt['periods'])
        weights = list(scheduler_opt.get('restart_weights', [1]))
        eta_min = scheduler_opt.get('eta_min', 0)
        start = 0
        for period, weight in zip(periods, weights):
            if step <= start + period:
                return eta_min + weight * 0.5 * (base_lr - eta_min) * (1 + math.cos(math.pi * (step - start) / period))
            start += period
    return None


def finetune_schedule(cell, total_iter, switch_iter):
    """What a cell's last stage trained with: a method's fine-tune after its switch, or a scratch baseline's
    whole run.

    Returns:
        dict: ``prune_iterations`` (the switch iteration; 0 for scratch), ``finetune_iterations``
        (``total_iter`` minus it), ``finetune_lr_start`` / ``finetune_lr_end`` (the lr of the stage's first
        and last iteration, from the cell's options and BasicSR's stepping:
        :func:`fmpsr.models.pruned_sr_model.scheduler_steps_left`; None where unknown).
    """
    from fmpsr.models.pruned_sr_model import resolve_scheduler, scheduler_steps_left

    train = cell.options.get('train') or {}
    start = 0 if cell.is_scratch else switch_iter
    if start is None:
        return {'prune_iterations': None, 'finetune_iterations': None, 'finetune_lr_start': None,
                'finetune_lr_end': None}
    stage = {} if cell.is_scratch else (train.get('finetune') or {})
    optim = stage.get('optim_g') or train.get('optim_g') or {}
    try:
        scheduler = resolve_scheduler(stage.get('scheduler') or train.get('scheduler') or {}, total_iter, start)
    except ValueError:
        scheduler = {}
    base = optim.get('lr')
    first = 0 if start == 0 else 1      # a scheduler built before iteration 1 is first stepped at iteration 2
    last = scheduler_steps_left(total_iter, start)
    lr_start = lr_at(base, scheduler, first) if base is not None else None
    lr_end = lr_at(base, scheduler, last) if base is not None else None
    return {'prune_iterations': start, 'finetune_iterations': total_iter - start,
            'finetune_lr_start': lr_start, 'finetune_lr_end': lr_end}


def cell_record(preset, cell, runner, original):
    """The ``results.jsonl`` line of a finished cell (see the module docstring)."""
    from .recount import recount_export

    export = runner.export_dir(cell)
    with open(os.path.join(export, 'pruning.json')) as f:
        pruning = json.load(f)
    with open(runner.metrics_path(cell)) as f:
        metrics = json.load(f)
    counts = recount_export(export, preset.macs_input_size)
    reached = {k: counts[k] for k in ('params_dense', 'params_nonzero', 'macs_dense', 'macs_nonzero')}
    for key in list(reached):
        base = original['params_dense'] if key.startswith('params') else original['macs_dense']
        reached[f'kept_{key}'] = reached[key] / base
    kept = reached[f'kept_{preset.metric}_nonzero']
    timing = {}
    if os.path.isfile(runner.timing_path(cell)):
        with open(runner.timing_path(cell)) as f:
            timing = json.load(f)
    cell_total = cell.options['train']['total_iter']
    start_path = (cell.options.get('path') or {}).get('pretrain_network_g')
    pretrain_iters = preset.total_iter - cell_total if start_path and preset.pretrain else 0
    record = OrderedDict(
        cell=cell.name, method=cell.label, kind='scratch' if cell.is_scratch else 'method',
        model_type=cell.options['model_type'], baseline=cell.baseline, reference=cell.reference, seed=cell.seed,
        target={'metric': preset.metric, 'kept': cell.target, 'tolerance': preset.tolerance},
        reached=reached, kept=kept, deviation=kept - cell.target,
        within_tolerance=(abs(kept - cell.target) <= preset.tolerance + 1e-12) if not cell.is_scratch
        else cell.match.get('within', True),
        original={'params': original['params_dense'], 'macs': original['macs_dense']},
        macs_input_size=list(preset.macs_input_size),
        test={name: {k: float(v) for k, v in metrics[name].items()} for name in preset.test_sets},
        iterations=trained_iterations(runner.exp_dir(cell)), total_iter=cell_total,
        pretrain_iterations=pretrain_iters,
        prune_iterations=pruning.get('switch_iter'),
        schedule=finetune_schedule(cell, cell_total, pruning.get('switch_iter')),
        start='random initialisation' if not start_path
        else (f'dense network trained {pretrain_iters} iterations ({start_path}); charged: this cell trains '
              f'{cell_total}, {pretrain_iters + cell_total} in all' if pretrain_iters else start_path),
        converged=(pruning.get('ratios') or {}).get('converged'),
        search=pruning.get('search'),
        wall_time_s={k: round(v, 1) for k, v in timing.items()} or None,
        pruning={k: v for k, v in (cell.options.get('pruning') or {}).items() if k != 'macs_input_size'} or None,
        match=cell.match or None, network_g=pruning.get('network_g'), widths=counts['widths'],
        experiment=os.path.relpath(runner.exp_dir(cell), preset.root))
    return record


def mean_std(values):
    """(mean, sample standard deviation or None with one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarize(records, test_sets):
    """Group records by (curve label, target): means and spreads of counts and PSNR / SSIM.

    Returns:
        OrderedDict: (label, target) -> dict with ``n``, ``kind``, ``params`` / ``macs`` (mean nonzero),
        ``params_dense`` / ``macs_dense``, ``kept``, ``within`` (all cells within tolerance),
        ``psnr`` / ``ssim``: test set -> (mean, std or None), ``iterations``, ``prune_iterations``.
    """
    groups = OrderedDict()
    for r in records:
        groups.setdefault((r['method'], r['target']['kept']), []).append(r)
    out = OrderedDict()
    for key, rs in groups.items():
        entry = {'n': len(rs), 'kind': rs[0]['kind'], 'within': all(r['within_tolerance'] for r in rs),
                 'seeds': [r['seed'] for r in rs]}
        for k in ('params_nonzero', 'params_dense', 'macs_nonzero', 'macs_dense'):
            entry[k] = mean_std([r['reached'][k] for r in rs])[0]
        entry['kept'] = mean_std([r['kept'] for r in rs])[0]
        entry['iterations'] = sorted({r['iterations'] for r in rs}, key=lambda v: (v is None, v))
        entry['prune_iterations'] = [r['prune_iterations'] for r in rs]
        entry['schedules'] = [r.get('schedule') or {} for r in rs]
        for metric in ('psnr', 'ssim'):
            entry[metric] = {t: mean_std([r['test'][t][metric] for r in rs]) for t in test_sets
                             if all(metric in r['test'].get(t, {}) for r in rs)}
        out[key] = entry
    return out


def mark_ties(summary, test_sets, metric='psnr'):
    """Per target and test set: the best mean, and the entries tied with it.

    An entry ties with the best when both have spreads (two or more seeds) and their mean difference is
    smaller than the larger spread.

    Returns:
        dict: (label, target, test set) -> 'best' | 'tie' | ''.
    """
    marks = {}
    targets = sorted({t for _, t in summary})
    for target in targets:
        for t in test_sets:
            entries = [(label, e[metric][t]) for (label, tg), e in summary.items() if tg == target and t in e[metric]]
            if not entries:
                continue
            best_label, (best_mean, best_std) = max(entries, key=lambda x: x[1][0])
            for label, (mean, std) in entries:
                mark = ''
                if label == best_label:
                    mark = 'best'
                elif std is not None and best_std is not None and best_mean - mean < max(std, best_std):
                    mark = 'tie'
                marks[(label, target, t)] = mark
    return marks


def _fmt(mean_std_pair, digits):
    mean, std = mean_std_pair
    return f'{mean:.{digits}f}' + (f' ± {std:.{digits}f}' if std is not None else '')


def _num(v, unit):
    scale = {'K': 1e3, 'M': 1e6, 'G': 1e9}[unit]
    return f'{v / scale:,.1f} {unit}' if unit == 'K' else f'{v / scale:,.3f} {unit}'


def markdown(preset, records, skipped=()):
    """The text of ``report.md`` (``skipped``: baselines left out, one line each)."""
    tests = list(preset.test_sets)
    summary = summarize(records, tests)
    marks = mark_ties(summary, tests)
    seeds = sorted({r['seed'] for r in records})
    original = records[0]['original'] if records else {}
    net = preset.opt['network_g']
    lines = [f'# Equal-budget comparison: `{preset.name}`', '',
             f'- Backbone: `{json.dumps(net)}` (x{preset.opt["scale"]}), {original.get("params", 0):,} params, '
             f'{original.get("macs", 0) / 1e9:.3f} G MACs at an LR input of '
             f'{preset.macs_input_size[0]}x{preset.macs_input_size[1]} pixels.',
             f'- Every cell trains `train.total_iter` = {preset.total_iter} iterations (pruning + fine-tuning, or from '
             f'scratch) on `{preset.opt["datasets"]["train"].get("name", "train")}`, seeds {seeds}; test sets: '
             f'{", ".join(tests)} (PSNR / SSIM as configured in the preset).',
             f'- Budgets: kept fraction of the {preset.metric}, each method driven to the target within '
             f'±{preset.tolerance:.0%} of the original; "kept" below is recounted from the exported weights '
             '(nonzero conv weights + biases; MACs = nonzero weights x output pixels).',
             ]
    if preset.scratch:
        s = preset.scratch
        lines.append(f'- Scratch baselines (random init, same iterations) of {", ".join(s["reference"])}: '
                     f'{", ".join(s["baselines"])}; uniform widths matched to the reference\'s {s["match"]} '
                     f'params / MACs within ±{s["tolerance"]:.0%}.')
    lines.append(start_line(preset))
    lines.append('- "fine-tune": the iterations after a method\'s switch (a scratch baseline: its whole run) and the '
                 'lr of their first and last iteration, per seed.')
    if len(seeds) > 1:
        lines.append('- Mean ± sample std over seeds; **bold**: best mean PSNR of the budget; `~`: difference to the '
                     'best smaller than the larger spread (a tie).')
    else:
        lines.append('- One seed: no spread, so no ties can be called; **bold**: best PSNR of the budget.')
    lines.append('')
    for target in sorted({t for _, t in summary}, reverse=True):
        lines += [f'## Budget: {target:.0%} of the {preset.metric} kept', '']
        head = ['method', 'n', 'params (nonzero / dense)', 'MACs (nonzero / dense)', f'kept {preset.metric}',
                'within', 'iterations (prune)', 'fine-tune: iterations (lr start → end)']
        head += [f'{t} PSNR' for t in tests] + [f'{t} SSIM' for t in tests]
        lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        for (label, tg), e in summary.items():
            if tg != target:
                continue
            prune = ', '.join(str(p) for p in e['prune_iterations'] if p is not None) or '-'
            row = [label, str(e['n']), f"{_num(e['params_nonzero'], 'K')} / {_num(e['params_dense'], 'K')}",
                   f"{_num(e['macs_nonzero'], 'G')} / {_num(e['macs_dense'], 'G')}", f"{e['kept']:.2%}",
                   'yes' if e['within'] else '**no**', f"{', '.join(str(i) for i in e['iterations'])} ({prune})",
                   schedule_text(e['schedules'])]
            for t in tests:
                cell = _fmt(e['psnr'][t], 2) if t in e['psnr'] else '-'
                mark = marks.get((label, tg, t), '')
                row.append(f'**{cell}**' if mark == 'best' else (f'~{cell}' if mark == 'tie' else cell))
            for t in tests:
                row.append(_fmt(e['ssim'][t], 4) if t in e['ssim'] else '-')
            lines.append('| ' + ' | '.join(row) + ' |')
        lines.append('')
    unreachable = getattr(preset, 'unreachable', [])
    if unreachable:
        lines += ['## Budgets a method cannot reach on this backbone (no cell)', '']
        lines += [f'- {u}' for u in unreachable] + ['']
    if skipped:
        lines += ['## Baselines left out', ''] + [f'- {s}' for s in skipped] + ['']
    outside = [r for r in records if not r['within_tolerance']]
    if outside:
        lines += ['## Cells outside their tolerance', '']
        for r in outside:
            what = (f"kept {r['kept']:.2%} of the {preset.metric} for a target of {r['target']['kept']:.0%}"
                    if r['kind'] == 'method' else
                    f"matched {r['match'].get('metric')} off by {r['match'].get('error', 0):+.2%}")
            lines.append(f"- `{r['cell']}`: {what}")
        lines.append('')
    lines += ['## Figures', '']
    for key, title in FIGURES.items():
        lines += [f'![{title}](figures/{key}.png)', '']
    lines += ['Per-cell facts (counts, PSNR / SSIM, iterations, wall time, seed, widths): `results.jsonl`.', '']
    return '\n'.join(lines)


def schedule_text(schedules):
    """``"<fine-tune iterations> (<lr start> → <lr end>)"`` per distinct schedule of a table entry."""
    def lr(v):
        return '?' if v is None else f'{v:.1e}'
    texts = [f"{s.get('finetune_iterations', '?')} "
             f"({lr(s.get('finetune_lr_start'))} → {lr(s.get('finetune_lr_end'))})" for s in schedules if s]
    return ', '.join(dict.fromkeys(texts)) or '-'


def start_line(preset):
    """The report line that says what every cell starts from."""
    from .methods import PRETRAINED_IN_PAPER
    named = [m for m in preset.methods if m in PRETRAINED_IN_PAPER]
    if preset.pretrain:
        p = preset.pretrain
        others = [m for m in preset.methods if m not in p['methods']]
        text = (f'- {", ".join(p["methods"])} start from a dense network trained from random initialisation for '
                f'{p["iterations"]} iterations (one per seed, the scratch schedule over those iterations), then '
                f'train {preset.total_iter - p["iterations"]}: the dense training is charged to their budget of '
                f'{preset.total_iter} iterations.')
        if others:
            text += (f' {", ".join(others)} and the scratch baselines start from random weights and train all '
                     f'{preset.total_iter}.')
        return text
    text = ('- Every cell starts from a random initialisation (`path.pretrain_network_g` is null): no dense '
            'network is trained first, and the budget of iterations is the same for all.')
    if named:
        text += (f' {", ".join(named)} prune a pretrained network in their papers; here they select from the '
                 'network of their first iterations, so their numbers are those of an equal-iterations '
                 'comparison, not of the published setting.')
    return text


def _style(label):
    return {'linestyle': '--', 'marker': 's'} if label.startswith('scratch') else {'linestyle': '-', 'marker': 'o'}


def plot_psnr(preset, records, x_key, unit, path):
    """PSNR vs ``x_key`` ('params_nonzero' or 'macs_nonzero', shown in ``unit`` 'K' or 'G'): one subplot per
    test set, one curve per method (scratch baselines dashed), error bars = std over seeds; PNG at ``path``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    tests = list(preset.test_sets)
    summary = summarize(records, tests)
    scale = {'K': 1e3, 'G': 1e9}[unit]
    fig, axes = plt.subplots(1, len(tests), figsize=(6 * len(tests), 4.5), squeeze=False)
    for ax, t in zip(axes[0], tests):
        labels = list(OrderedDict.fromkeys(label for label, _ in summary))
        for label in labels:
            pts = sorted((e[x_key] / scale, e['psnr'][t][0], e['psnr'][t][1] or 0)
                         for (lb, _), e in summary.items() if lb == label and t in e['psnr'])
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, label=label, capsize=3, **_style(label))
        ax.set_xlabel(f'{"params" if x_key.startswith("params") else "MACs"} kept (nonzero, {unit})')
        ax.set_ylabel(f'PSNR on {t} (dB)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f'{preset.name}: PSNR vs {"params" if x_key.startswith("params") else "MACs"}')
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format='png'))
    plt.close(fig)


def plot_widths(preset, records, original_widths, path):
    """Output channels of every conv (x: convs in module order) per method, one panel per budget (first
    seed of each method), the original widths in grey; PNG at ``path``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    targets = sorted({r['target']['kept'] for r in records}, reverse=True)
    fig, axes = plt.subplots(len(targets), 1, figsize=(11, 3.2 * len(targets)), squeeze=False)
    names = list(original_widths)
    for ax, target in zip(axes[:, 0], targets):
        ax.step(range(len(names)), [original_widths[n][1] for n in names], where='mid', color='0.6',
                label='original', linewidth=2)
        shown = set()
        for r in records:
            if r['target']['kept'] != target or r['method'] in shown:
                continue
            shown.add(r['method'])
            ax.step(range(len(names)), [r['widths'].get(n, [0, 0])[1] for n in names], where='mid', label=r['method'],
                    linestyle='--' if r['kind'] == 'scratch' else '-')
        ax.set_title(f'{target:.0%} of the {preset.metric} kept (seed {min(r["seed"] for r in records)} where several)',
                     fontsize=9)
        ax.set_ylabel('output channels')
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format='png'))
    plt.close(fig)


def plot_kept(preset, records, curves, path):
    """Kept fraction vs iteration of every method cell (``curves``: cell -> :func:`kept_curve`), one panel
    per budget, with the target +- tolerance band; PNG at ``path``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    targets = sorted({r['target']['kept'] for r in records}, reverse=True)
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for r in records:
            curve = curves.get(r['cell'])
            if r['target']['kept'] != target or not curve:
                continue
            xs, ys = zip(*curve)
            ax.plot(xs, ys, label=f"{r['method']} s{r['seed']}", marker='.', markersize=3)
        ax.axhspan(target - preset.tolerance, target + preset.tolerance, color='0.85',
                   label=f'target ±{preset.tolerance:.0%}')
        ax.set_title(f'target {target:.0%}', fontsize=9)
        ax.set_xlabel('iteration')
        ax.set_ylabel('kept fraction (method\'s metric)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format='png'))
    plt.close(fig)


def write_report(preset, cells, runner):
    """Write ``results.jsonl``, ``report.md`` and ``figures/*.png`` for the finished ``cells``.

    Returns:
        list: the records (dicts) written to ``results.jsonl``.
    """
    from .recount import recount_dense

    os.makedirs(os.path.join(preset.out_dir, 'figures'), exist_ok=True)
    original = recount_dense(preset.opt['network_g'], preset.macs_input_size)
    records = [cell_record(preset, c, runner, original) for c in cells]

    def write_lines(tmp):
        with open(tmp, 'w') as f:
            for r in records:
                f.write(json.dumps(r) + '\n')
    atomic_write(os.path.join(preset.out_dir, 'results.jsonl'), write_lines)
    text = markdown(preset, records, runner.skipped)

    def write_md(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(os.path.join(preset.out_dir, 'report.md'), write_md)
    if records:
        fig = os.path.join(preset.out_dir, 'figures')
        plot_psnr(preset, records, 'params_nonzero', 'K', os.path.join(fig, 'psnr_vs_params.png'))
        plot_psnr(preset, records, 'macs_nonzero', 'G', os.path.join(fig, 'psnr_vs_macs.png'))
        plot_widths(preset, records, original['widths'], os.path.join(fig, 'widths.png'))
        curves = {r['cell']: kept_curve(os.path.join(preset.root, r['experiment'])) for r in records
                  if r['kind'] == 'method'}
        plot_kept(preset, records, curves, os.path.join(fig, 'kept_vs_iter.png'))
    return records

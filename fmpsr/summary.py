"""The summary at the end of every ``fmpsr/train.py`` and ``fmpsr/test.py`` run.

:func:`write_run_summary` prints a short table and writes ``summary.json`` (atomically) into the
experiment folder (training) or the results folder (testing): the parameters before and after
pruning and the kept ratio (for a pruning method, from its ``export/pruning.json``; otherwise the
network's parameter count), PSNR / SSIM (the option file's ``val.metrics``) of each validation or
test set with bicubic upsampling of the same LR images beside them (:func:`bicubic_scores`: BasicSR's
MATLAB-like ``imresize``, the same metric settings), the export path, and a warning line for every
set on which the network scores below bicubic.
"""
import json
import os
import os.path as osp

__all__ = ['summarize_finished_run', 'bicubic_scores', 'bicubic_image', 'bicubic_psnr_ssim', 'run_summary',
           'format_summary', 'write_run_summary']


def bicubic_image(lq, scale):
    """MATLAB-like bicubic upsampling (BasicSR's ``imresize``) of an LR image.

    Args:
        lq (numpy.ndarray): HWC image, uint8 (0..255) or float (0..1).
        scale (int): upscale factor.

    Returns:
        numpy.ndarray: uint8 HWC image, ``scale`` times larger, rounded like BasicSR's ``tensor2img``.
    """
    import numpy as np
    from basicsr.utils.matlab_functions import imresize
    img = lq.astype(np.float32) / 255. if lq.dtype == np.uint8 else lq.astype(np.float32)
    return np.clip(np.round(imresize(img, scale) * 255.), 0, 255).astype(np.uint8)


def bicubic_scores(dataset_opt, scale, metrics_opt):
    """Mean of each metric for bicubic upsampling of a paired data set's LR images.

    The images are read by BasicSR's own dataset (``dataset_opt``, any backend / file template; the
    GT cropped to ``scale`` x LR as in validation) and scored exactly as BasicSR scores the network:
    ``calculate_metric({'img': sr, 'img2': gt}, metric_opt)`` on uint8 BGR images.

    Args:
        dataset_opt (dict): a ``datasets.<phase>`` entry (``phase`` not 'train').
        scale (int): the option file's ``scale``.
        metrics_opt (dict): ``val.metrics`` (``{name: {type, crop_border, test_y_channel, ...}}``).

    Returns:
        dict: ``{metric name: mean}`` (empty for a data set without GT).
    """
    import copy

    import numpy as np
    from basicsr.data import build_dataset
    from basicsr.metrics import calculate_metric
    from basicsr.utils import tensor2img

    dataset_opt = dict(copy.deepcopy(dataset_opt), phase='val', scale=scale)
    dataset = build_dataset(dataset_opt)
    values = {name: [] for name in metrics_opt or {}}
    for index in range(len(dataset)):
        item = dataset[index]
        if 'gt' not in item:
            return {}
        lq = tensor2img(item['lq'], rgb2bgr=True, out_type=np.float32)  # BGR, 0..1
        sr = bicubic_image(lq, scale)
        gt = tensor2img(item['gt'])
        for name, metric_opt in (metrics_opt or {}).items():
            values[name].append(float(calculate_metric({'img': sr, 'img2': gt}, copy.deepcopy(metric_opt))))
    return {name: float(np.mean(v)) for name, v in values.items() if v}


def bicubic_psnr_ssim(dataset_opt, scale, root=None):
    """Mean (PSNR, SSIM) of bicubic upsampling on a paired set, on the Y channel with ``scale`` border
    pixels cropped (the settings of fmpsr's option files and scripts/demo.py).

    Args:
        dataset_opt (dict): a ``datasets.<phase>`` entry; relative ``dataroot_*`` are taken below ``root``.
        scale (int): upscale factor.
        root (str | None): folder relative data roots are resolved against (default: the working folder).

    Returns:
        tuple: (psnr, ssim) floats.
    """
    dataset_opt = dict(dataset_opt)
    dataset_opt.setdefault('type', 'PairedImageDataset')
    dataset_opt.setdefault('name', 'bicubic')
    dataset_opt.setdefault('io_backend', {'type': 'disk'})
    for key in ('dataroot_gt', 'dataroot_lq'):
        if root and dataset_opt.get(key):
            dataset_opt[key] = osp.join(root, dataset_opt[key])
    metrics = {name: {'type': f'calculate_{name}', 'crop_border': scale, 'test_y_channel': True}
               for name in ('psnr', 'ssim')}
    scores = bicubic_scores(dataset_opt, scale, metrics)
    return scores['psnr'], scores['ssim']


def _params(opt, folder):
    """(before, after) parameter counts and their source, or None."""
    info_path = osp.join(folder, 'export', 'pruning.json')
    if osp.isfile(info_path):
        with open(info_path) as f:
            ratios = json.load(f).get('ratios') or {}
        if 'original_params' in ratios and 'pruned_params' in ratios:
            return int(ratios['original_params']), int(ratios['pruned_params'])
    return None


def run_summary(opt, scores, bicubic, network_params=None):
    """The summary as a plain dict.

    Args:
        opt (dict): the run's options (after parsing).
        scores (dict): ``{data set: {metric: value}}`` of the network (the last validation / the test).
        bicubic (dict): ``{data set: {metric: value}}`` of bicubic upsampling.
        network_params (int | None): parameter count of the network, for runs that did not prune.

    Returns:
        dict: ``name``, ``model_type``, ``run`` ('train' / 'test'), ``params`` (``before``, ``after``,
        ``kept_ratio``; or ``network``), ``sets`` (``{name: {network, bicubic, below_bicubic}}``),
        ``export``.
    """
    train = bool(opt.get('is_train'))
    folder = opt['path'].get('experiments_root' if train else 'results_root')
    counts = _params(opt, folder) if train else None
    params = ({'before': counts[0], 'after': counts[1], 'kept_ratio': counts[1] / counts[0]} if counts
              else {'network': network_params})
    sets = {}
    for name, values in scores.items():
        base = bicubic.get(name) or {}
        below = 'psnr' in values and 'psnr' in base and values['psnr'] < base['psnr']
        sets[name] = {'network': values, 'bicubic': base, 'below_bicubic': bool(below)}
    if train:
        export = osp.join(folder, 'export')
        if not osp.isdir(export):
            export = osp.join(folder, 'models', 'net_g_latest.pth')
        export = export if osp.exists(export) else None
    else:
        export = opt['path'].get('pretrain_network_g')
    return {'name': opt['name'], 'model_type': opt.get('model_type'), 'run': 'train' if train else 'test',
            'params': params, 'sets': sets, 'export': export}


def format_summary(summary):
    """A few lines for people: parameters, each data set's metrics with bicubic in brackets, the export,
    and one ``warning:`` line per set where the network is below bicubic in PSNR."""
    lines = [f"run summary: {summary['name']} ({summary['model_type']}, {summary['run']})"]
    params = summary['params']
    if 'before' in params:
        lines.append(f"  params: {params['before']:,} -> {params['after']:,} (kept {100 * params['kept_ratio']:.1f} %)")
    elif params.get('network') is not None:
        lines.append(f"  params: {params['network']:,}")
    if not summary['sets']:
        lines.append('  no validation / test set scored')
    for name, entry in summary['sets'].items():
        cells = [f"{metric.upper()} {value:.4f}" + (f" (bicubic {entry['bicubic'][metric]:.4f})"
                                                     if metric in entry['bicubic'] else '')
                 for metric, value in entry['network'].items()]
        lines.append(f'  {name}: ' + ', '.join(cells))
    lines.append(f"  export: {summary['export']}")
    for name, entry in summary['sets'].items():
        if entry['below_bicubic']:
            gap = entry['bicubic']['psnr'] - entry['network']['psnr']
            lines.append(f"warning: on {name} the network is {gap:.2f} dB below bicubic in PSNR "
                         '(too few iterations, a wrong lr, or pruned too far?)')
    return '\n'.join(lines)


def write_run_summary(opt, scores, network_params=None):
    """Compute bicubic for every scored data set, print the summary and write ``summary.json``
    (atomically) into the run's folder.

    Args:
        opt (dict): the run's options (after parsing; ``path.experiments_root`` or ``results_root``).
        scores (dict): ``{data set name: {metric: value}}`` of the network.
        network_params (int | None): see :func:`run_summary`.

    Returns:
        tuple: (summary dict, path of ``summary.json``).
    """
    from .pruning.export import write_json
    bicubic = {}
    metrics = (opt.get('val') or {}).get('metrics') or {}
    for dataset_opt in (opt.get('datasets') or {}).values():
        if dataset_opt.get('name') in scores and dataset_opt.get('phase') != 'train':
            bicubic[dataset_opt['name']] = bicubic_scores(dataset_opt, opt['scale'], metrics)
    summary = run_summary(opt, scores, bicubic, network_params)
    folder = opt['path']['experiments_root' if opt.get('is_train') else 'results_root']
    path = osp.join(folder, 'summary.json')
    summary['summary'] = path
    os.makedirs(folder, exist_ok=True)
    write_json(path, summary)
    print(format_summary(summary) + f'\n  summary: {path}', flush=True)
    return summary, path


def summarize_finished_run():
    """Summarise the run this process just finished (:func:`fmpsr.pipeline.finished_run`), on rank 0.

    A failure here (e.g. a data set that cannot be read again) is reported on stderr in one line and
    does not change the run's exit status: the training or test itself is done.
    """
    import sys

    from .pipeline import finished_run, opt_rank
    opt, model, scores = finished_run()
    if opt is None or model is None or opt_rank(opt) != 0:
        return
    try:
        net = model.get_bare_model(model.net_g)
        write_run_summary(opt, scores, network_params=sum(p.numel() for p in net.parameters()))
    except Exception as error:  # noqa: BLE001 - the run is done; the summary is an extra
        print(f'fmpsr: the run summary could not be written: {type(error).__name__}: {error}', file=sys.stderr)

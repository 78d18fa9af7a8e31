"""Scratch baselines for a pruned network (SRP Table 1's "Scratch" column, and equal-size controls).

From an export folder (``pruning.json``, written by every pruning method) and the option file of
the run that produced it, :func:`scratch_options` writes option files that train, from random
initialisation and for the same ``train.total_iter``:

* ``exact``: the compact widths of the export (``network_g`` of ``pruning.json``), no pretrained
  weights, no masks (SRP Table 1's Scratch: "training the small network from scratch");
* ``params``: a network of the same arch with uniform widths whose params are within ``tolerance``
  (2 %) of the export's kept params;
* ``macs``: the same for MACs (at the run's ``pruning.macs_input_size``).

Uniform widths are built on the dense arch's channel groups (the run's ``pruning.grouping`` /
``tie_outputs``) with the selection rule's kept groups at full width (image channels, the
upsampler's output before PixelShuffle, ``skip_groups``; :func:`fmpsr.pruning.selection.kept_groups`):
every pruned group keeps the same fraction ``k / C_max`` of its channels (one knob, searched over
``k``); when no single ``k`` lands within the tolerance, the free groups (one writer: block-inner
convs) get their own ``k_f`` while the constrained groups (the residual stream) keep ``k`` — the pair
within the tolerance with the smallest ``|k - k_f|`` is taken. The network is then sliced by
:func:`fmpsr.pruning.finalize_plain`, so it is the same arch (LSRB with narrower options, or
``CompactArch``). Counts are :func:`fmpsr.pruning.mask_ratios`'s (params = conv weights + biases;
MACs = weights x output pixels), as in ``pruning.json``. Weight masks of an export (FMP's pruned single
weights) are not carried: the baselines train dense layers, and their target is the export's kept
(nonzero) count.
"""
import copy
import glob
import json
import os

import torch
import yaml

from basicsr.archs import build_network

from fmpsr.pruning import build_grouping, finalize_plain, mask_ratios, trace_conv_specs
from fmpsr.pruning.selection import classify_groups

KINDS = ('exact', 'params', 'macs')
DROP_TRAIN_KEYS = ('finetune', 'sparsity_opt', 'alignment_opt', 'regularizer_opt')


def read_export(export_dir):
    """``pruning.json`` of an export folder (dict).

    Raises:
        FileNotFoundError: the folder has no ``pruning.json`` (named).
    """
    path = os.path.join(export_dir, 'pruning.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path!r} not found: pass an export folder written by an fmpsr pruning run')
    with open(path) as f:
        return json.load(f)


def find_option_file(export_dir):
    """The option file BasicSR copied into the experiment folder (the export's parent).

    Raises:
        FileNotFoundError: none or several ``*.yml`` there (pass ``--opt``).
    """
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(export_dir)), '*.yml')))
    if len(files) != 1:
        raise FileNotFoundError(f'expected one option file beside {export_dir!r}, found {files}; pass --opt')
    return files[0]


def _group_setup(info):
    pruning = info.get('pruning') or {}
    network_opt = dict(info['original_network_g'])
    size = tuple(pruning.get('macs_input_size') or (64, 64))
    net = build_network(copy.deepcopy(network_opt))
    in_ch = network_opt.get('num_in_ch', 3)
    ties = tuple(tuple(t) if isinstance(t, list) else t for t in pruning.get('tie_outputs') or ())
    extra = {'exclude': tuple(pruning['exclude'])} if pruning.get('exclude') else {}   # the run's plain convs
    grouping = build_grouping(net, network_opt, pruning.get('grouping'), torch.zeros(1, in_ch, *size), ties, **extra)
    specs = trace_conv_specs(net, size, in_ch)
    return net, network_opt, grouping, specs, tuple(pruning.get('skip_groups') or ())


def uniform_masks(grouping, k, k_free, width, constrained, free):
    """Keep masks: the first ``max(1, round(k * C / width))`` channels of each constrained group and
    ``round(k_free * C / width)`` of each free group (every other group keeps all)."""
    masks = {g: torch.ones(group.size, dtype=torch.bool) for g, group in grouping.groups.items()}
    for names, kk in ((constrained, k), (free, k_free)):
        for g in names:
            size = grouping.groups[g].size
            kept = min(size, max(1, round(kk * size / width)))
            masks[g] = torch.arange(size) < kept
    return masks


def search_uniform(grouping, specs, target, metric='params', tolerance=0.02, skip=()):
    """Uniform widths whose ``metric`` is closest to ``target`` (see the module docstring).

    Args:
        grouping (ChannelGrouping): groups of the dense arch.
        specs (dict): its conv specs.
        target (int): params or MACs to match.
        metric (str): 'params' or 'flops' (MACs).
        tolerance (float): relative tolerance (0.02 = 2 %).
        skip (sequence): ``pruning.skip_groups`` of the run.

    Returns:
        dict: ``masks`` (group -> keep mask), ``k``, ``k_free``, ``width`` (C_max), ``count``,
        ``relative_error``, ``within`` (bool).
    """
    constrained, free = classify_groups(grouping, skip)
    width = max(grouping.groups[g].size for g in constrained + free)

    def value(k, kf):
        counts = mask_ratios(specs, grouping, uniform_masks(grouping, k, kf, width, constrained, free)).pruned
        return counts.get(metric)

    def rel(v):
        return abs(v - target) / target

    singles = {k: value(k, k) for k in range(1, width + 1)}
    k = min(singles, key=lambda kk: (rel(singles[kk]), kk))
    best = (k, k, singles[k])
    if rel(singles[k]) > tolerance and constrained and free:
        candidates = []
        for kc in range(max(1, k - 8), min(width, k + 8) + 1):
            for kf in range(1, width + 1):
                v = value(kc, kf)
                if rel(v) <= tolerance:
                    candidates.append((abs(kc - kf), rel(v), kc, kf, v))
        if candidates:
            _, _, kc, kf, v = min(candidates)
            best = (kc, kf, v)
    kc, kf, v = best
    return {'masks': uniform_masks(grouping, kc, kf, width, constrained, free), 'k': kc, 'k_free': kf,
            'width': width, 'count': int(v), 'relative_error': rel(v), 'within': rel(v) <= tolerance}


def uniform_network(info, metric='params', tolerance=0.02):
    """``network_g`` of the uniform-width network matching the export's kept ``metric``.

    Returns:
        tuple: (network_g dict, search result of :func:`search_uniform` without the masks, target).

    Raises:
        ValueError: no uniform network lies within ``tolerance`` (the best one is named).
    """
    net, network_opt, grouping, specs, skip = _group_setup(info)
    target = int(info['ratios']['pruned_params' if metric == 'params' else 'pruned_macs'])
    found = search_uniform(grouping, specs, target, metric, tolerance, skip)
    if not found['within']:
        raise ValueError(f'no uniform-width {network_opt["type"]} within {tolerance:.0%} of {target} {metric}: the '
                         f'closest has {found["count"]} ({found["relative_error"]:.2%} off)')
    _, compact_opt, _ = finalize_plain(net, grouping, found['masks'], build_network, network_opt)
    found = {k: v for k, v in found.items() if k != 'masks'}
    return compact_opt, found, target


def scratch_options(export_dir, option_file=None, kind='exact', tolerance=0.02):
    """A BasicSR option dict that trains a scratch baseline (see the module docstring).

    Args:
        export_dir (str): ``<experiments_root>/export`` of a pruning run.
        option_file (str | None): that run's option file; None: the one beside the export.
        kind (str): 'exact', 'params' or 'macs'.
        tolerance (float): for 'params' / 'macs'.

    Returns:
        dict: the options (``model_type: PrunedSRModel``, ``network_g``, no pretrained weights, the
        run's ``train`` without its pruning-stage keys, same ``total_iter``), with a ``scratch_baseline``
        entry describing what was matched.

    Raises:
        ValueError: an unknown kind; see :func:`uniform_network`.
        FileNotFoundError: see :func:`read_export`, :func:`find_option_file`.
    """
    if kind not in KINDS:
        raise ValueError(f'scratch baseline kind must be one of {list(KINDS)}, got {kind!r}')
    info = read_export(export_dir)
    with open(option_file or find_option_file(export_dir)) as f:
        opt = yaml.safe_load(f)
    opt.pop('pruning', None)
    opt['model_type'] = 'PrunedSRModel'
    opt['name'] = f"{opt['name']}_scratch_{kind}"
    opt['path'] = {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None}
    for key in DROP_TRAIN_KEYS:
        opt['train'].pop(key, None)
    described = {'kind': kind, 'export': os.path.abspath(export_dir), 'method': info.get('method'),
                 'total_iter': opt['train']['total_iter']}
    if kind == 'exact':
        opt['network_g'] = copy.deepcopy(info['network_g'])
    else:
        opt['network_g'], found, target = uniform_network(info, 'params' if kind == 'params' else 'flops', tolerance)
        described.update(found, target=target, metric='params' if kind == 'params' else 'macs')
    opt['scratch_baseline'] = described
    return opt

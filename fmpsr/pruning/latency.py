"""Measured latency as a pruning metric (``pruning.metric: latency``).

MACs are a poor proxy for time on a CPU: widths that are not a multiple of the vector width lose the fast
conv path, so a network pruned to arbitrary widths can be slower than a wider one (README, "Use the pruned
network"). With ``metric: latency`` the convergence criteria count time instead of MACs, from a table
measured once on the target device:

* every conv of the dense network is rebuilt alone (its kernel, stride, padding, dilation, bias, at its
  input size when the LR input is ``macs_input_size``) and timed at a grid of kept widths
  ``(c_in, c_out)``: 1, the multiples of ``step`` and the dense width on each side (one point on a side
  whose width is below ``step`` or a grouped conv);
* a conv's time at other widths is interpolated bilinearly on that grid (exact at grid points: with
  ``pruning.round_to`` equal to ``step`` every kept width is a grid point);
* a network's latency (``Counts.latency``, seconds) is ``scale * (sum of its conv times) + offset``, a line
  through two whole-network measurements timed side by side: the dense network, and a narrow one (every
  prunable channel group at about half its width, built by the caller, e.g. with
  :func:`~fmpsr.pruning.finalize.finalize_plain`). Convs timed alone do not add up to the network's time:
  on the 2-core reference CPU at a 64 x 64 LR input the convs of LSRB-4-32 timed alone summed to 12.5 ms
  against 39.2 ms for the network (cache and layout effects inside the network, and the ops between convs:
  activations, adds, ESA's pooling and upsampling, PixelShuffle). The line is exact at the two measured
  networks and follows the table's shape (fast and slow widths) in between. Without a narrow network
  (``narrow=None``) the scale is 1 and the offset the dense network's time outside its convs.

Weight zeros do not change a dense kernel's time, so with this metric the weight ratio is 0 and only
channel pruning moves the kept fraction (:class:`fmpsr.pruning.criteria.ConvergenceCriterion` refuses
weight targets with it).

The table is a JSON file (:meth:`LatencyTable.save`), cached in the experiment folder so that a resumed
run counts exactly as before, and reusable on another machine with ``pruning.latency.table`` (measure on
the deployment device with ``scripts/benchmark/latency_table.py``, prune anywhere).
"""
import bisect
import copy
import json
import os
import platform
import statistics

import torch
from torch import nn

TABLE_VERSION = 1
LATENCY_KEYS = ('table', 'device', 'threads', 'step', 'warmup', 'repeats')


def width_grid(size, step):
    """Kept widths timed for a side of ``size`` channels: 1, the multiples of ``step`` below ``size``, and
    ``size`` itself (sorted, unique)."""
    return sorted({1, size} | set(range(step, size, step)))


def _shape_key(spec):
    return (spec.in_channels, spec.out_channels, tuple(spec.kernel_size), bool(spec.bias), tuple(spec.stride),
            spec.padding if isinstance(spec.padding, str) else tuple(spec.padding), tuple(spec.dilation),
            spec.groups, tuple(spec.in_size))


def _spec_record(spec):
    key = _shape_key(spec)
    return dict(zip(('in_channels', 'out_channels', 'kernel_size', 'bias', 'stride', 'padding', 'dilation', 'groups',
                     'in_size'), [list(v) if isinstance(v, tuple) else v for v in key]))


def _interp(grid, value):
    """(lower index, upper index, weight of the upper) for ``value`` on the sorted ``grid`` (clamped)."""
    value = min(max(value, grid[0]), grid[-1])
    hi = bisect.bisect_left(grid, value)
    if grid[hi] == value:
        return hi, hi, 0.0
    lo = hi - 1
    return lo, hi, (value - grid[lo]) / (grid[hi] - grid[lo])


class LatencyTable:
    """Per-conv latency (seconds) of one network on one device, at a grid of kept widths.

    Args:
        convs (dict): conv name -> dict with ``grid_in``, ``grid_out`` (lists of widths) and ``seconds``
            (list of rows: ``seconds[i][j]`` is the median time at ``grid_in[i]`` inputs and ``grid_out[j]``
            outputs) and ``spec`` (the dense shape it was measured for).
        meta (dict): how it was measured: device, threads, input_size, step, torch version; ``network_s`` and
            ``conv_sum_s`` (the dense network's measured time and its conv sum) and, when a narrow network
            was timed, ``narrow_network_s`` and ``narrow_conv_sum_s``: the two points of :attr:`line`.
    """

    def __init__(self, convs, meta):
        self.convs, self.meta = convs, dict(meta)

    # ---- lookups ----
    def conv_seconds(self, name, c_in, c_out):
        """Time of conv ``name`` with ``c_in`` kept inputs and ``c_out`` kept outputs (seconds; bilinear
        between grid points, clamped to the grid)."""
        entry = self.convs[name]
        i0, i1, a = _interp(entry['grid_in'], c_in)
        j0, j1, b = _interp(entry['grid_out'], c_out)
        t = entry['seconds']
        return ((1 - a) * ((1 - b) * t[i0][j0] + b * t[i0][j1]) + a * ((1 - b) * t[i1][j0] + b * t[i1][j1]))

    @property
    def line(self):
        """(scale, offset): network time = scale * conv sum + offset (seconds), through (``conv_sum_s``,
        ``network_s``) and (``narrow_conv_sum_s``, ``narrow_network_s``); with one point, scale 1 and the
        offset ``network_s - conv_sum_s`` (at least 0); (1, 0) when the table records neither."""
        m = self.meta
        if 'network_s' not in m or 'conv_sum_s' not in m:
            return 1.0, 0.0
        if m.get('narrow_network_s') is not None and m['conv_sum_s'] > m.get('narrow_conv_sum_s', m['conv_sum_s']):
            scale = (m['network_s'] - m['narrow_network_s']) / (m['conv_sum_s'] - m['narrow_conv_sum_s'])
            if scale > 0:
                return scale, m['network_s'] - scale * m['conv_sum_s']
        return 1.0, max(m['network_s'] - m['conv_sum_s'], 0.0)

    def total(self, specs, kept_in=None, kept_out=None):
        """Latency in seconds with the given kept channels (None or a missing conv: dense): the conv sum
        mapped by :attr:`line`."""
        scale, offset = self.line
        return scale * self.conv_total(specs, kept_in, kept_out) + offset

    def conv_total(self, specs, kept_in=None, kept_out=None):
        """Sum of conv times (seconds) with the given kept channels (None or a missing conv: dense)."""
        seconds = 0.0
        for name, spec in specs.items():
            c_in = spec.in_channels if kept_in is None else kept_in.get(name, spec.in_channels)
            c_out = spec.out_channels if kept_out is None else kept_out.get(name, spec.out_channels)
            seconds += self.conv_seconds(name, c_in, c_out)
        return seconds

    def check_matches(self, specs, source):
        """Raise ValueError (naming ``source``) unless the table holds exactly these convs and shapes."""
        names, mine = list(specs), list(self.convs)
        if set(names) != set(mine):
            missing, extra = sorted(set(names) - set(mine)), sorted(set(mine) - set(names))
            raise ValueError(f'pruning.latency: the latency table {source} was measured for another network '
                             f'(convs missing from it: {missing[:4]}, convs it has that network_g lacks: {extra[:4]}); '
                             f'measure it again (delete the file) or give the right pruning.latency.table')
        for name, spec in specs.items():
            if self.convs[name]['spec'] != _spec_record(spec):
                raise ValueError(f'pruning.latency: conv {name!r} in the latency table {source} has the shape '
                                 f'{self.convs[name]["spec"]}, but network_g at macs_input_size gives '
                                 f'{_spec_record(spec)}; measure it again or give the right pruning.latency.table')

    # ---- files ----
    def to_dict(self):
        return {'version': TABLE_VERSION, 'meta': self.meta, 'convs': self.convs}

    def save(self, path):
        """Write the table as JSON, atomically (a crash leaves the old file or none)."""
        from .export import write_json
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path):
        """Read a table written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file. ValueError: not a latency table of this version (file named).
        """
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f'pruning.latency.table: {path} is not a JSON latency table ({error})') from None
        if not isinstance(data, dict) or data.get('version') != TABLE_VERSION or 'convs' not in data:
            raise ValueError(f'pruning.latency.table: {path} is not a latency table of version {TABLE_VERSION} '
                             f'(write one with scripts/benchmark/latency_table.py)')
        return cls(data['convs'], data.get('meta', {}))


def resolve_device(device):
    """'auto' -> 'cuda' when available else 'cpu'; anything else is returned as a torch.device string."""
    if device in (None, 'auto'):
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if torch.device(device).type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'pruning.latency.device: {device!r} asked for, but CUDA is not available here')
    return str(device)


@torch.no_grad()
def measure_table(net, specs, input_size, in_channels=3, device='cpu', threads=None, step=4, warmup=3, repeats=15,
                  narrow=None):
    """Time every conv of ``net`` at a grid of kept widths (see the module docstring).

    Args:
        net (nn.Module): the dense plain network (used only for its whole-network time).
        narrow (nn.Module | None): a narrower plain network with the same conv names (the second point of
            :attr:`LatencyTable.line`), timed side by side with ``net``; None: one point only.
        specs (dict): conv name -> ConvSpec traced at ``input_size`` (:func:`~fmpsr.pruning.accounting.trace_conv_specs`).
        input_size (tuple[int, int]): LR (H, W) in pixels (``macs_input_size``).
        device (str): 'cpu' or 'cuda[:i]' (already resolved, see :func:`resolve_device`).
        threads (int | None): CPU threads while timing (restored after); None: torch's current number.
        step (int): grid step in channels (use ``pruning.round_to`` when it is set).
        warmup, repeats (int): untimed and timed calls per grid point (the points of one row are interleaved).

    Returns:
        LatencyTable

    Raises:
        ValueError: ``step``, ``warmup`` or ``repeats`` below 1.
    """
    from fmpsr.deploy.profiling import time_interleaved

    for key, value in (('step', step), ('warmup', warmup), ('repeats', repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'pruning.latency.{key} must be an integer >= 1, got {value!r}')
    old_threads = torch.get_num_threads()
    if threads is not None and torch.device(device).type == 'cpu':
        torch.set_num_threads(threads)
    try:
        measured, convs = {}, {}
        for name, spec in specs.items():
            key = _shape_key(spec)
            if key not in measured:
                measured[key] = _measure_shape(spec, device, step, warmup, repeats)
            convs[name] = dict(measured[key], spec=_spec_record(spec))
        nets = {'dense': copy.deepcopy(net).to(device).eval()}
        if narrow is not None:
            nets['narrow'] = copy.deepcopy(narrow).to(device).eval()
        x = torch.rand(1, in_channels, *input_size, device=device, dtype=next(net.parameters()).dtype)
        times = time_interleaved({k: (lambda n=n: n(x)) for k, n in nets.items()}, device, warmup, 3 * repeats)
    finally:
        torch.set_num_threads(old_threads)
    meta = {'device': device, 'device_name': _device_name(device), 'threads': torch.get_num_threads() if threads is None
            else threads, 'input_size': list(input_size), 'step': step, 'warmup': warmup, 'repeats': repeats,
            'torch': torch.__version__}
    table = LatencyTable(convs, meta)
    table.meta['conv_sum_s'] = table.conv_total(specs)
    table.meta['network_s'] = statistics.median(times['dense'])
    if narrow is not None:
        from .accounting import trace_conv_specs
        small = trace_conv_specs(narrow, input_size, in_channels)
        if set(small) != set(specs):
            raise ValueError('measure_table: the narrow network has other convs than the dense one')
        table.meta['narrow_conv_sum_s'] = table.conv_total(specs, {n: v.in_channels for n, v in small.items()},
                                                           {n: v.out_channels for n, v in small.items()})
        table.meta['narrow_network_s'] = statistics.median(times['narrow'])
        table.meta['narrow_widths'] = {n: [v.in_channels, v.out_channels] for n, v in small.items()}
    return table


def half_width_network(plain, grouping, step, build_network, network_opt):
    """The second network of :attr:`LatencyTable.line`: ``plain`` with every prunable channel group of
    ``grouping`` keeping its first ceil(C / 2) channels, rounded up to a multiple of ``step`` (at most C).

    Args:
        plain (nn.Module): the dense plain network (``nn.Conv2d`` layers, not yet a hypernetwork).
        grouping (ChannelGrouping): its channel groups.
        step (int): the table's grid step in channels.
        build_network (callable), network_opt (dict): see :func:`fmpsr.pruning.finalize.finalize_plain`.

    Returns:
        nn.Module: the compact plain network (same conv names, half widths).

    Raises:
        RuntimeError, ValueError: see :func:`fmpsr.pruning.finalize.slice_network`.
    """
    from .finalize import finalize_plain

    masks = {}
    for name, group in grouping.groups.items():
        if group.prunable:
            half = -(-group.size // 2)
            masks[name] = torch.arange(group.size) < min(group.size, -(-half // step) * step)
    return finalize_plain(plain, grouping, masks, build_network, dict(network_opt))[0]


def _measure_shape(spec, device, step, warmup, repeats):
    """Median time (s) of one conv shape at every (c_in, c_out) of its grid."""
    from fmpsr.deploy.profiling import time_interleaved

    grouped = spec.groups > 1
    grid_in = [spec.in_channels] if grouped else width_grid(spec.in_channels, step)
    grid_out = [spec.out_channels] if grouped else width_grid(spec.out_channels, step)
    x = torch.rand(1, spec.in_channels, *spec.in_size, device=device)
    seconds = []
    for c_in in grid_in:
        xi = x[:, :c_in]  # batch 1: a contiguous view
        fns = {}
        for c_out in grid_out:
            conv = nn.Conv2d(c_in, c_out, spec.kernel_size, spec.stride, spec.padding, spec.dilation,
                             spec.groups if grouped else 1, spec.bias).to(device).eval()
            fns[c_out] = (lambda conv=conv: conv(xi))
        times = time_interleaved(fns, device, warmup, repeats)
        seconds.append([statistics.median(times[c]) for c in grid_out])
    return {'grid_in': grid_in, 'grid_out': grid_out, 'seconds': seconds}


def _device_name(device):
    if torch.device(device).type == 'cuda':
        return torch.cuda.get_device_name(torch.device(device))
    return f'{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)'


def latency_keys(options):
    """Check the ``pruning.latency`` dict (None -> {}) and return it with defaults filled in.

    Keys: ``table`` (path of a table to use instead of measuring; default None), ``device`` ('auto',
    'cpu', 'cuda'; default 'auto' = the device training runs on), ``threads`` (CPU threads while
    timing; default None = torch's current number), ``step`` (grid step in channels; default None =
    ``pruning.round_to`` when above 1, else 4), ``warmup`` (3), ``repeats`` (15).

    Raises:
        ValueError: not a dict, an unknown key or a bad value (named).
    """
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ValueError(f'pruning.latency must be a dict with keys {list(LATENCY_KEYS)}, got {options!r}')
    unknown = sorted(set(options) - set(LATENCY_KEYS))
    if unknown:
        raise ValueError(f'pruning.latency: unknown key(s) {unknown}; known keys are {list(LATENCY_KEYS)}')
    out = {'table': None, 'device': 'auto', 'threads': None, 'step': None, 'warmup': 3, 'repeats': 15, **options}
    if out['table'] is not None and not isinstance(out['table'], str):
        raise ValueError(f'pruning.latency.table must be a file path, got {out["table"]!r}')
    if out['device'] not in ('auto', 'cpu') and not str(out['device']).startswith('cuda'):
        raise ValueError(f"pruning.latency.device must be 'auto', 'cpu' or 'cuda[:i]', got {out['device']!r}")
    for key in ('threads', 'step', 'warmup', 'repeats'):
        value = out[key]
        if value is None and key in ('threads', 'step'):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'pruning.latency.{key} must be an integer >= 1, got {value!r}')
    return out


def grid_step(latency, round_to):
    """The grid step: ``pruning.latency.step``, else ``round_to`` when above 1, else 4."""
    return latency['step'] or (round_to if round_to > 1 else 4)


__all__ = ['LatencyTable', 'grid_step', 'half_width_network', 'latency_keys', 'measure_table', 'resolve_device', 'width_grid']

"""Count and time a network for deployment: params and MACs (dense and nonzero), latency, peak memory.

Used by ``scripts/benchmark/compact_speed.py``. Conventions (REFERENCE Sec. 7):

* params: every parameter entry (conv weights and biases, and any other parameter); nonzero params:
  the entries that are not exactly zero.
* MACs: multiply-accumulates, ``torch.utils.flop_counter.FlopCounterMode`` FLOPs / 2 (convs and
  matmuls; elementwise ops, pooling and interpolation are not counted, as in SR papers). Nonzero
  MACs: per ``nn.Conv2d``, nonzero weights x output pixels x batch (what a sparse kernel would
  execute). Counted on the ``meta`` device, so any input size is free.
* Sizes: the NTIRE efficient-SR convention is a 256 x 256 LR input; SR papers also quote MACs at a
  1280 x 720 HR output (LR ``720 / s`` x ``1280 / s``, rounded down).
"""
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

NTIRE_LR_SIZE = (256, 256)
HD_OUTPUT_SIZE = (720, 1280)


def hd_lr_size(scale):
    """LR (H, W) in pixels whose ``scale`` x output is 1280 x 720 (rounded down)."""
    return HD_OUTPUT_SIZE[0] // scale, HD_OUTPUT_SIZE[1] // scale


def count_params(net):
    """(params, nonzero params) of ``net``: entries of every parameter, and those not exactly zero."""
    params = sum(p.numel() for p in net.parameters())
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in net.parameters())
    return params, nonzero


def count_macs(net, lr_size, in_channels=3, batch=1):
    """MACs of one forward pass at LR size ``lr_size`` = (H, W) pixels.

    Returns:
        dict: ``macs`` (FlopCounterMode FLOPs / 2, every conv weight), ``macs_nonzero`` (sum over
        ``nn.Conv2d`` of nonzero weights x output pixels x batch), ``conv_macs`` (the same sum with
        every weight; equals ``macs`` for conv-only networks: a cross-check), ``lr_size``.
    """
    meta = copy.deepcopy(net).to('meta')
    convs = {name: m for name, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    out_pixels, hooks = {}, []
    for name, module in meta.named_modules():
        if name in convs:
            def hook(_m, _i, out, name=name):
                out_pixels[name] = out_pixels.get(name, 0) + out.shape[0] * out.shape[-2] * out.shape[-1]
            hooks.append(module.register_forward_hook(hook))
    dtype = next(meta.parameters()).dtype
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(torch.empty(batch, in_channels, *lr_size, device='meta', dtype=dtype))
    for h in hooks:
        h.remove()
    nonzero = sum(int(torch.count_nonzero(convs[n].weight.detach())) * p for n, p in out_pixels.items())
    conv_macs = sum(convs[n].weight.numel() * p for n, p in out_pixels.items())
    return {'lr_size': list(lr_size), 'macs': int(counter.get_total_flops() // 2), 'macs_nonzero': nonzero,
            'conv_macs': conv_macs}


def summary(values_s):
    """median / p10 / p90 / min / max of times given in seconds, in milliseconds (rounded to 1 us)."""
    ms = sorted(v * 1e3 for v in values_s)
    q = statistics.quantiles(ms, n=10, method='inclusive') if len(ms) > 1 else [ms[0]] * 9
    return {'median': round(statistics.median(ms), 3), 'p10': round(q[0], 3), 'p90': round(q[-1], 3),
            'min': round(ms[0], 3), 'max': round(ms[-1], 3), 'n': len(ms)}


class Timer:
    """Time one call of ``fn`` in seconds: ``perf_counter`` on CPU; CUDA events after a synchronise
    on GPU (the call is bracketed by events and the device synchronised before reading them)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == 'cuda'

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def time_interleaved(fns, device, warmup, repeats):
    """Time several callables alternately (A B A B ...), so machine noise hits them alike.

    Args:
        fns (dict): name -> callable with no arguments.
        warmup (int): untimed rounds first. repeats (int): timed rounds.

    Returns:
        dict: name -> list of ``repeats`` times in seconds.
    """
    timer = Timer(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return times


def status_kb(field):
    """A field of ``/proc/self/status`` in kB (Linux), e.g. 'VmRSS' (resident now) or 'VmHWM' (peak).

    Raises:
        KeyError: the field is not there. OSError: no ``/proc`` (not Linux).
    """
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise KeyError(field)


def _build(network_opt, weights):
    """The network of ``network_opt`` (checked as options from a file, :mod:`fmpsr.pruning.untrusted`),
    with the safetensors ``weights`` loaded when given (random weights, seed 0, otherwise)."""
    import fmpsr  # noqa: F401  (registers the archs in a fresh process)
    from fmpsr.pruning.export import load_state, load_weights
    from fmpsr.pruning.untrusted import build_network_from_file

    torch.manual_seed(0)
    net = build_network_from_file(network_opt, weights or 'network_g').eval()
    if weights is not None:
        load_weights(net, load_state(weights), weights)
    return net


def _cpu_peak_child(network_opt, weights, input_shape, threads):
    """In a fresh process: build the network, run a small warm-up, reset the RSS high-water mark
    (Linux ``/proc/self/clear_refs``), run one forward pass, return the peak RSS growth in bytes."""
    torch.set_num_threads(threads)
    net = _build(network_opt, weights)
    x = torch.rand(*input_shape)
    with torch.inference_mode():
        net(x[..., :16, :16])  # 16 >= ESA's 15 pixels
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        base = status_kb('VmRSS')
        net(x)
        return (status_kb('VmHWM') - base) * 1024


def forward_peak_memory(networks, input_shape, device='cpu', threads=1):
    """Peak memory (bytes) that one forward pass of each network adds, and how it was measured.

    Args:
        networks (list[tuple]): ``(network_g options, weights)`` pairs; weights is a safetensors
            state dict or None for random weights (memory does not depend on the values).
        input_shape (tuple): (B, C, H, W) of the input. threads (int): CPU threads.

    * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, less what was
      allocated before the pass (tensors only, as in NTIRE's protocol).
    * CPU (Linux): peak resident set size growth of a fresh (spawned) process per network, its
      high-water mark reset through ``/proc/self/clear_refs`` after the network and input are built,
      so memory that this process freed earlier and the C allocator kept cannot hide the growth.
      (``tracemalloc`` does not see torch's allocations; a forked child can deadlock in OpenMP.)
      The processes run side by side, so this costs one Python start-up.

    Returns:
        tuple: (list of bytes, or of None when it cannot be measured here; method name).
    """
    if torch.device(device).type == 'cuda':
        peaks = []
        for network_opt, weights in networks:
            net = _build(network_opt, weights).to(device)
            x = torch.rand(*input_shape, device=device)
            with torch.inference_mode():
                net(x[..., :16, :16])
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                net(x)
                torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
            del net, x
        return peaks, 'cuda_max_memory_allocated'
    if not (sys.platform.startswith('linux') and os.path.exists('/proc/self/clear_refs')):
        return [None] * len(networks), 'unavailable'
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    try:
        with ProcessPoolExecutor(len(networks), mp_context=multiprocessing.get_context('spawn')) as pool:
            futures = [pool.submit(_cpu_peak_child, opt, weights, tuple(input_shape), threads)
                       for opt, weights in networks]
            return [f.result() for f in futures], 'rss_peak_delta_spawned'
    except (OSError, RuntimeError):
        return [None] * len(networks), 'unavailable'

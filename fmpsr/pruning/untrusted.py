"""Build a network from ``network_g`` options that come from a file (an export, a checkpoint, ONNX metadata).

Such options are untrusted: a file from a stranger could name any registered arch with any arguments,
including archs whose constructors ``torch.load`` a path they are given (BasicSR's ``SpyNet``,
``BasicVSR``, ``DFDNet``, ...), or widths that allocate more memory than the machine has.
:func:`check_network_opt` therefore accepts only

* the archs fmpsr exports: its own (``LSRB``, ``RLFN``, ``IMDN``, ``SRPNLite``, ``CompactArch`` around
  any of the others) and the BasicSR image-SR archs it prunes (``EDSR``, ``MSRResNet``, ``RCAN``,
  ``RRDBNet``, ``SRVGGNetCompact_basicsr``, ``RIDNet``, ``SwinIR``); another arch that fmpsr
  itself registers (a module under ``fmpsr.archs``) is accepted with the generic argument rules below;
* for each arch, only its known constructor arguments, each a plain number, bool, short list of numbers
  or one of a few known strings, inside documented bounds (:data:`MAX_CHANNELS` per width,
  :data:`MAX_BLOCKS` per depth, :data:`MAX_SCALE`, :data:`MAX_IMAGE_CHANNELS`); no argument can name
  a file;
* a network of at most :data:`MAX_PARAMS` parameter and buffer entries, counted on PyTorch's ``meta``
  device (no memory is allocated) before the real network is built (:func:`count_entries`).

Code (not a file) may add an arch with :func:`register_trusted_arch`.
"""
import copy
import math
import re

MAX_CHANNELS = 4096          # any width argument (num_feat, esa_channels, a conv's kept channels, ...)
MAX_IMAGE_CHANNELS = 64      # num_in_ch / num_out_ch
MAX_BLOCKS = 512             # any depth argument (num_block, num_group, num_conv, ...)
MAX_SCALE = 16               # upscale factor
MAX_LIST = 1024              # entries of a list argument
MAX_PARAMS = 100_000_000     # parameter + buffer entries of the whole network (400 MB in float32)
MAX_MODULE_ENTRIES = 100_000  # entries of CompactArch's conv_channels / channel_params / conv_groups
MAX_NAME = 256               # characters of a module or tensor name in CompactArch
MAX_OPTIONS_CHARS = 8 * 2 ** 20  # characters of the JSON text of network_g

_MODULE_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$')
_SHORT_STRING = re.compile(r'^[A-Za-z0-9_+\-]{0,32}$')
_FILE_LIKE_ARG = re.compile(r'path|file|dir|url|load|ckpt|checkpoint|pretrain|weights|dict|model', re.IGNORECASE)


class NetworkOptionsError(ValueError):
    """``network_g`` options from a file that fmpsr refuses to build; the message names the file and key."""


# ---- argument kinds: each is a callable value -> problem (str) or None ----
def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def Int(low, high):  # noqa: N802 (reads as a type in the tables below)
    def check(value):
        if not _is_int(value) or not low <= value <= high:
            return f'must be an integer in [{low}, {high}], got {value!r}'
    return check


def Float(low, high):  # noqa: N802
    def check(value):
        if not _is_number(value) or not low <= value <= high:
            return f'must be a number in [{low}, {high}], got {_short(value)}'
    return check


def Bool(value):  # noqa: N802
    if not isinstance(value, bool):
        return f'must be true or false, got {_short(value)}'


def Choice(*choices):  # noqa: N802
    def check(value):
        if value not in choices or not isinstance(value, str):
            return f'must be one of {list(choices)}, got {_short(value)}'
    return check


def Numbers(max_len, low, high, integer=False):  # noqa: N802
    def check(value):
        if not isinstance(value, (list, tuple)) or len(value) > max_len:
            return f'must be a list of at most {max_len} numbers, got {_short(value)}'
        ok = _is_int if integer else _is_number
        if not all(ok(v) and low <= v <= high for v in value):
            return f'must hold {"integers" if integer else "numbers"} in [{low}, {high}], got {_short(value)}'
    return check


def IntLists(max_len, max_inner, low, high):  # noqa: N802
    inner = Numbers(max_inner, low, high, integer=True)

    def check(value):
        if not isinstance(value, (list, tuple)) or len(value) > max_len:
            return f'must be a list of at most {max_len} lists, got {_short(value)}'
        for v in value:
            problem = inner(v)
            if problem:
                return problem
    return check


def Optional(kind):  # noqa: N802
    def check(value):
        return None if value is None else kind(value)
    return check


def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + '...'


IMAGE = Int(1, MAX_IMAGE_CHANNELS)
WIDTH = Int(1, MAX_CHANNELS)
DEPTH = Int(0, MAX_BLOCKS)
SCALE = Int(1, MAX_SCALE)
RANGE = Float(1e-6, 1e6)
FACTOR = Float(-1e6, 1e6)
RATE = Float(0.0, 1.0)
RGB = Numbers(3, -1e6, 1e6)
_SR = dict(num_in_ch=IMAGE, num_out_ch=IMAGE, num_feat=WIDTH, num_block=DEPTH)
_MEAN = dict(res_scale=FACTOR, img_range=RANGE, rgb_mean=RGB)

# arch -> {argument: kind}; CompactArch is handled by _check_compact
ARCH_ARGS = {
    'EDSR': dict(_SR, upscale=SCALE, **_MEAN),
    'MSRResNet': dict(_SR, upscale=SCALE),
    'RCAN': dict(_SR, num_group=DEPTH, squeeze_factor=WIDTH, upscale=SCALE, **_MEAN),
    'RRDBNet': dict(_SR, scale=SCALE, num_grow_ch=WIDTH),
    'SRVGGNetCompact_basicsr': dict(num_in_ch=IMAGE, num_out_ch=IMAGE, num_feat=WIDTH, num_conv=DEPTH, upscale=SCALE,
                                    act_type=Choice('relu', 'prelu', 'leakyrelu')),
    'RIDNet': dict(in_channels=IMAGE, mid_channels=WIDTH, out_channels=IMAGE, num_block=DEPTH,
                   img_range=RANGE, rgb_mean=RGB, rgb_std=RGB),
    # SwinIR's attention mask buffers grow as (img_size / window_size)^2 * window_size^4 per block
    'SwinIR': dict(img_size=Int(1, 1024), patch_size=Int(1, 16), in_chans=IMAGE, embed_dim=WIDTH,
                   depths=Numbers(64, 0, MAX_BLOCKS, integer=True), num_heads=Numbers(64, 1, 1024, integer=True),
                   window_size=Int(1, 64), mlp_ratio=Float(0, 8), qkv_bias=Bool, qk_scale=Optional(Float(0, 1e3)),
                   drop_rate=RATE, attn_drop_rate=RATE, drop_path_rate=RATE, ape=Bool, patch_norm=Bool,
                   use_checkpoint=Bool, upscale=SCALE, img_range=RANGE,
                   upsampler=Choice('pixelshuffle', 'pixelshuffledirect', 'nearest+conv', ''),
                   resi_connection=Choice('1conv', '3conv')),
    # fmpsr's archs
    'LSRB': dict(_SR, upscale=SCALE, esa_channels=WIDTH,
                 mid_feats=Optional(Numbers(MAX_BLOCKS, 1, MAX_CHANNELS, integer=True)),
                 esa_feats=Optional(IntLists(MAX_BLOCKS, 8, 1, MAX_CHANNELS)),
                 stream_feats=Optional(Numbers(MAX_BLOCKS + 1, 1, MAX_CHANNELS, integer=True))),
    'RLFN': dict(_SR, mid_feat=Optional(WIDTH), esa_channels=WIDTH, upscale=SCALE),
    'IMDN': dict(_SR, upscale=SCALE),
    'SRPNLite': dict(_SR, upscale=SCALE, **_MEAN),
}


def register_trusted_arch(name, args):
    """Let files build ``name`` (an arch registered in BasicSR's ``ARCH_REGISTRY``) with ``args``.

    Args:
        name (str): the arch's registered name.
        args (dict): argument name -> kind (``Int(low, high)``, ``Float``, ``Bool``, ``Choice``,
            ``Numbers``, ``IntLists``, ``Optional``, or any callable value -> problem string or None).

    The arch's constructor must run on PyTorch's ``meta`` device (see :func:`count_entries`).
    """
    ARCH_ARGS[name] = dict(args)


def _fail(source, key, problem):
    raise NetworkOptionsError(f'{source}: {key} {problem}')


def _generic_value(value):
    """Problem of an argument of an fmpsr arch without a table entry, or None."""
    if value is None or isinstance(value, bool):
        return None
    if _is_int(value):
        return None if abs(value) <= MAX_CHANNELS else f'must be at most {MAX_CHANNELS} in size, got {value}'
    if isinstance(value, float):
        return None if _is_number(value) and abs(value) <= 1e6 else f'must be a finite number, got {value!r}'
    if isinstance(value, str):
        return None if _SHORT_STRING.match(value) else \
            f'must be a short word (letters, digits, _+-), got {_short(value)}'
    if isinstance(value, (list, tuple)) and len(value) <= MAX_LIST:
        flat = [v for item in value for v in (item if isinstance(item, (list, tuple)) else [item])]
        if len(flat) <= MAX_LIST and all(_is_number(v) and abs(v) <= MAX_CHANNELS for v in flat):
            return None
    return f'must be a number, bool, short word or short list of numbers, got {_short(value)}'


def _fmpsr_arch(arch):
    from basicsr.utils.registry import ARCH_REGISTRY
    return arch in ARCH_REGISTRY and ARCH_REGISTRY.get(arch).__module__.startswith('fmpsr.archs.')


def _check_arch(opt, source, key, inside_compact=False):
    if not isinstance(opt, dict):
        _fail(source, key, f'must be a mapping of options, got {_short(opt)}')
    arch = opt.get('type')
    if arch == 'CompactArch' and not inside_compact:
        return _check_compact(opt, source, key)
    if not isinstance(arch, str) or not (arch in ARCH_ARGS or (arch != 'CompactArch' and _fmpsr_arch(arch))):
        allowed = sorted(ARCH_ARGS) + ([] if inside_compact else ['CompactArch'])
        _fail(source, f'{key}.type', f'{_short(arch)} is not an arch fmpsr builds from a file (allowed: '
              f'{", ".join(allowed)})')
    kinds = ARCH_ARGS.get(arch)
    for name, value in opt.items():
        if name == 'type':
            continue
        if not isinstance(name, str):
            _fail(source, key, f'has a non-text key {_short(name)}')
        if kinds is None:  # an fmpsr arch without a table entry
            problem = (f'is refused: an argument that may name a file is not accepted from a file'
                       if _FILE_LIKE_ARG.search(name) else _generic_value(value))
        elif name not in kinds:
            problem = f'is not an argument fmpsr accepts for {arch} from a file (known: {", ".join(kinds)})'
        else:
            problem = kinds[name](value)
        if problem:
            _fail(source, f'{key}.{name}', problem)
    return arch


def _check_names(mapping, source, key, value_kind):
    if not isinstance(mapping, dict) or len(mapping) > MAX_MODULE_ENTRIES:
        _fail(source, key, f'must be a mapping of at most {MAX_MODULE_ENTRIES} entries, got {_short(mapping)}')
    for name, value in mapping.items():
        if not isinstance(name, str) or len(name) > MAX_NAME or not _MODULE_NAME.match(name):
            _fail(source, key, f'has an entry {_short(name)} that is not a module or tensor name')
        problem = value_kind(value)
        if problem:
            _fail(source, f'{key}.{name}', problem)


def _check_compact(opt, source, key):
    known = {'type', 'arch', 'conv_channels', 'channel_params', 'conv_groups'}
    for name in opt:
        if name not in known:
            _fail(source, f'{key}.{name}', f'is not an argument of CompactArch (known: {", ".join(sorted(known))})')
    if 'arch' not in opt or 'conv_channels' not in opt:
        _fail(source, key, 'is a CompactArch without its arch or conv_channels')
    arch = _check_arch(opt['arch'], source, f'{key}.arch', inside_compact=True)
    _check_names(opt['conv_channels'], source, f'{key}.conv_channels', Numbers(2, 1, MAX_CHANNELS, integer=True))
    for name, value in opt['conv_channels'].items():
        if len(value) != 2:
            _fail(source, f'{key}.conv_channels.{name}', f'must be [in_channels, out_channels], got {_short(value)}')
    for name in ('channel_params', 'conv_groups'):
        if opt.get(name) is not None:
            _check_names(opt[name], source, f'{key}.{name}', WIDTH)
    return arch


def _meta_build_mode():
    """A torch-function mode that creates every tensor on the ``meta`` device (like ``with
    torch.device('meta')``) and lets the constructors of RIDNet and SwinIR run there: ``.item()`` of a
    meta tensor gives 0.0 (SwinIR's drop-path rates) and ``param.data = cpu_tensor`` stores a meta
    tensor (RIDNet's ``MeanShift``)."""
    import torch
    try:
        from torch.utils._device import DeviceContext
    except ImportError:  # pragma: no cover - torch without it
        return torch.device('meta')

    class MetaBuild(DeviceContext):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.item and args and getattr(args[0], 'is_meta', False):
                return 0.0
            if (getattr(func, '__name__', '') == '__set__' and len(args) == 2 and getattr(args[0], 'is_meta', False)
                    and isinstance(args[1], torch.Tensor)):
                return func(args[0], args[1].to('meta'), **kwargs)
            return super().__torch_function__(func, types, args, kwargs)

    return MetaBuild('meta')


def count_entries(network_opt):
    """Parameter and buffer entries of the network that BasicSR's ``build_network`` makes of
    ``network_opt``, built on PyTorch's ``meta`` device: shapes only, no memory allocated.

    Args:
        network_opt (dict): checked ``network_g`` options.

    Returns:
        int: number of entries.
    """
    from basicsr.archs import build_network

    with _meta_build_mode():
        net = build_network(copy.deepcopy(network_opt))
    return sum(t.numel() for t in net.parameters()) + sum(t.numel() for t in net.buffers())


def check_network_opt(network_opt, source, key='network_g'):
    """Check ``network_g`` options read from a file (see the module docstring) and return a copy.

    Args:
        network_opt (dict): the options as read (e.g. ``json.loads`` of an export's metadata).
        source (str): the file they came from, named in every message.
        key (str): where in that file (default ``network_g``).

    Returns:
        dict: a deep copy of ``network_opt``, safe to give to ``build_network``.

    Raises:
        NetworkOptionsError (a ValueError): an arch fmpsr does not build from files, an unknown or
            file-naming argument, a value of the wrong kind or out of bounds, a network of more than
            :data:`MAX_PARAMS` entries, or options its constructor refuses. The message names
            ``source`` and the key (e.g. ``network_g.arch.num_feat``).
    """
    source = repr(source) if isinstance(source, str) else str(source)
    network_opt = copy.deepcopy(network_opt)
    arch = _check_arch(network_opt, source, key)
    try:
        entries = count_entries(network_opt)
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError, IndexError, AttributeError,
            ZeroDivisionError, NotImplementedError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        _fail(source, key, f'cannot be built as {arch}: {type(error).__name__}: {reason}')
    if entries > MAX_PARAMS:
        _fail(source, key, f'describes a network of {entries:,} parameters, above the limit of {MAX_PARAMS:,} '
              'fmpsr builds from a file')
    return network_opt


def build_network_from_file(network_opt, source, key='network_g'):
    """:func:`check_network_opt`, then BasicSR's ``build_network`` (random weights, CPU).

    Raises:
        NetworkOptionsError: see :func:`check_network_opt`.
    """
    from basicsr.archs import build_network

    return build_network(check_network_opt(network_opt, source, key))

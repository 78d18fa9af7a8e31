"""Options shared by the mask-based pruning methods (SRP, L1-norm, ASSL, ISS-P, LTH, kernel masks).

Each method's ``pruning`` section is a frozen dataclass that extends :class:`PruningOptions` with its
own keys; :meth:`PruningOptions.from_options` refuses unknown keys and bad values with a message that
names the key (``pruning.<key>``) and what would be valid. FMP / DHP keep their own
:class:`~fmpsr.pruning.fmp.FMPConfig`.
"""
from dataclasses import dataclass, fields

from .accounting import METRICS
from .grouping import GROUPING_MODES


def check_number(key, value, low=None, high=None, integer=False, low_open=False, high_open=False):
    """Raise ValueError naming ``pruning.<key>`` unless ``value`` is a number in the given range.

    Args:
        key (str): the option key (without ``pruning.``).
        value: the value to check.
        low, high (float | None): bounds; None = unbounded.
        integer (bool): require an int (bools are refused).
        low_open, high_open (bool): exclude the bound itself.
    """
    kind = 'an integer' if integer else 'a number'
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = '' if low is None else f'{"(" if low_open else "["}{low}'
        hi = '' if high is None else f'{high}{")" if high_open else "]"}'
        where = f' in {lo or "(-inf"}, {hi or "inf)"}' if (low is not None or high is not None) else ''
        raise ValueError(f'pruning.{key} must be {kind}{where}, got {value!r}')


def check_choice(key, value, choices):
    """Raise ValueError naming ``pruning.<key>`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f'pruning.{key}: unknown value {value!r} (choose from {list(choices)})')


@dataclass(frozen=True)
class PruningOptions:
    """Keys every mask-based method has (``pruning`` section of the option file).

    Attributes:
        metric (str): 'params' or 'flops' (MACs) for the ratios in logs and ``pruning.json``.
        grouping (str | None): channel groups for structured methods: 'hand', 'auto' (torch-pruning's
            dependency graph), None: 'hand' where the arch has one, else 'auto'.
        tie_outputs (tuple): for 'auto': lists of conv names / globs whose outputs share one group.
        exclude (tuple): conv / module names or globs left out of channel pruning (their channels keep
            their full width), e.g. a block whose weights are computed in forward.
        check_freq (int): iterations between mask updates / stage checks.
        max_prune_iter (int): length (cap) of the pruning stage, iterations.
        macs_input_size (tuple[int, int]): LR (H, W) in pixels at which MACs are counted.
    """
    metric: str = 'params'
    grouping: str = None
    tie_outputs: tuple = ()
    exclude: tuple = ()
    check_freq: int = 100
    max_prune_iter: int = 300000
    macs_input_size: tuple = (64, 64)

    @classmethod
    def from_options(cls, options, defaults=None):
        """Build from the ``pruning`` dict (``type`` is ignored); ``defaults`` replaces the class
        defaults for keys the file leaves out.

        Raises:
            ValueError: an unknown key or a bad value (named in the message).
        """
        options = {**(defaults or {}), **dict(options or {})}
        options.pop('type', None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f'pruning: unknown key(s) {unknown} for {cls.__name__}; known keys are {sorted(known)}')
        for key, value in list(options.items()):
            if isinstance(value, list):
                options[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        config = cls(**options)
        config.validate()
        return config

    def validate(self):
        """Check the shared keys; subclasses call ``super().validate()`` and check their own."""
        check_choice('metric', self.metric, METRICS)
        if self.grouping is not None:
            check_choice('grouping', self.grouping, GROUPING_MODES)
        if not isinstance(self.tie_outputs, tuple):
            raise ValueError(f'pruning.tie_outputs must be a list of lists of conv names, got {self.tie_outputs!r}')
        if not isinstance(self.exclude, tuple) or not all(isinstance(n, str) for n in self.exclude):
            raise ValueError(f'pruning.exclude must be a list of module names or globs, got {self.exclude!r}')
        check_number('check_freq', self.check_freq, 1, integer=True)
        check_number('max_prune_iter', self.max_prune_iter, 0, integer=True)
        size = self.macs_input_size
        if len(size) != 2 or not all(isinstance(v, int) and v >= 1 for v in size):
            raise ValueError(f'pruning.macs_input_size must be [H, W] in LR pixels, got {list(size)}')

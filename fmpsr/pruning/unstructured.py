"""Unstructured pruning from scratch by iterative shrinkage: ISS-P, IHT, ISS-R (Wang et al., "Iterative
Soft Shrinkage Learning for Efficient Image Super-Resolution", ICCV 2023; its supplement Secs. 3, 5).

After every optimiser step, in each chosen layer a set of weights is *shrunk*:

* ISS-P (``iss_p``): the fraction ``pr`` of the layer's weights with the smallest |w| is multiplied by
  ``alpha`` (e.g. 0.95); the set is chosen again every iteration, so a weight can leave it again;
* IHT (``iht``): the same set is set to zero (alpha = 0, iterative hard thresholding);
* ISS-R (``iss_r``): a random set of the same size is multiplied by ``alpha`` (the ablation of the
  supplement's Tables 2-3).

The set of the last iteration becomes the fixed weight mask of fine-tuning (the model class does that).
With ``nm = (N, M)`` the set respects N:M sparsity: in every group of M consecutive input channels at
each (output channel, kernel position) the M - N smallest (ISS-P / IHT) or M - N random (ISS-R) weights
are shrunk (:mod:`fmpsr.pruning.nm`); a last group of fewer than M channels is not shrunk.

Rules fmpsr fixes where the paper and its code leave them open:

* Set size: ``ceil(pr * numel)`` weights per layer (the reference code's rule), never all of them
  (at most ``numel - 1``). Ties in |w| are broken by position (the earlier weight is shrunk first).
* Schedules of ``pr`` and ``alpha``: neither the paper's supplement nor its public code ramps them
  (the code applies the target ``pr`` and ``alpha`` from the first iteration for the whole pruning
  stage, 1e5 iterations on EDSR-L / SwinIR). That is the default here (``ramp: constant``).
  ``ramp: linear`` / ``cubic`` (Zhu & Gupta 2017's gradual schedule ``1 - (1 - t/T)^3``) move ``pr``
  from ``pr_start`` and ``alpha`` from ``alpha_start`` to their targets over ``ramp_iter`` iterations,
  an fmpsr option, not the paper's.
* ISS-R's random sets come from a ``torch.Generator`` seeded from (``manual_seed``, iteration), so a
  resumed run draws the same sets as an uninterrupted one (on the same device type).
* Flips (supplement Fig. 2): the number of weights whose membership (shrunk / kept) differs between
  two consecutive iterations, each flipping weight counted once (|S_t xor S_{t-1}|).

No BasicSR import: this is part of the pruning core.
"""
import fnmatch
import hashlib
import math
from dataclasses import dataclass

import torch

from .nm import check_nm, nm_mask
from .options import PruningOptions, check_choice, check_number

METHODS = ('iss_p', 'iht', 'iss_r')
RAMPS = ('constant', 'linear', 'cubic')
DEFAULT_ALPHA = 0.95


def num_pruned(numel, prune_ratio):
    """Weights in the shrunk set of a layer of ``numel`` weights: ``ceil(pr * numel)`` (a 1e-9 slack
    absorbs float error, so 0.9 * 10 gives 9), at most ``numel - 1``."""
    return max(0, min(math.ceil(prune_ratio * numel - 1e-9), numel - 1))


def magnitude_set(weight, prune_ratio):
    """The ``num_pruned`` weights of smallest |w| (ISS-P, IHT).

    Args:
        weight (Tensor): any shape, e.g. (c_out, c_in, kh, kw).
        prune_ratio (float): fraction in [0, 1).

    Returns:
        Tensor: bool of ``weight``'s shape, True = in the set (to be shrunk).
    """
    flat = weight.detach().abs().flatten()
    k = num_pruned(flat.numel(), prune_ratio)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if k:
        chosen[torch.argsort(flat, stable=True)[:k]] = True
    return chosen.view(weight.shape)


def random_set(weight, prune_ratio, generator):
    """A random set of ``num_pruned`` weights (ISS-R), drawn with ``generator`` on its device."""
    numel = weight.numel()
    k = num_pruned(numel, prune_ratio)
    chosen = torch.zeros(numel, dtype=torch.bool, device=weight.device)
    if k:
        chosen[torch.randperm(numel, generator=generator, device=weight.device)[:k]] = True
    return chosen.view(weight.shape)


def nm_set(weight, nm, generator=None):
    """The set of an N:M pattern: in every group of M input channels (axis 1) the M - N smallest |w|
    (or M - N random entries when ``generator`` is given); a last partial group is not in the set.

    Returns:
        Tensor: bool of ``weight``'s shape, True = in the set.
    """
    n, m = nm
    if generator is None:
        scores = weight.detach().abs()
    else:
        scores = torch.rand(weight.shape, generator=generator, device=weight.device)
    return ~nm_mask(scores, n, m, axis=1, partial='keep')


@torch.no_grad()
def shrink_(weight, chosen, alpha):
    """Multiply the chosen weights by ``alpha`` in place (alpha = 0: set them to exactly +0.0).

    Args:
        weight (Tensor): the parameter.
        chosen (Tensor): bool of its shape.
        alpha (float): shrink factor in [0, 1].
    """
    if alpha == 0:
        weight.masked_fill_(chosen, 0.0)
    else:
        weight.copy_(torch.where(chosen, weight * alpha, weight))


def count_flips(previous, current):
    """Weights whose membership differs between two sets (bool tensors of one shape), counted once."""
    return int((previous ^ current).sum())


def iteration_generator(seed, iteration, device='cpu'):
    """A ``torch.Generator`` on ``device`` seeded from (``seed``, ``iteration``) only, so the draw of an
    iteration does not depend on what ran before it (exact resume)."""
    digest = hashlib.sha256(f'fmpsr-iss-r:{int(seed)}:{int(iteration)}'.encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], 'little') >> 1)
    return generator


@dataclass(frozen=True)
class Ramp:
    """A value moving from ``start`` to ``end`` over ``ramp_iter`` iterations.

    ``kind``: 'constant' (``end`` from the first iteration), 'linear', or 'cubic' (``1 - (1 - t/T)^3``,
    Zhu & Gupta 2017: fast early, slow near the end).
    """
    kind: str
    start: float
    end: float
    ramp_iter: int

    def __call__(self, iteration):
        if self.kind == 'constant' or self.ramp_iter <= 0:
            return self.end
        t = min(max(iteration, 0) / self.ramp_iter, 1.0)
        progress = t if self.kind == 'linear' else 1.0 - (1.0 - t) ** 3
        return self.start + (self.end - self.start) * progress


def select_layers(names, exclude=(), skip_first_last=False):
    """The conv names to prune, in order.

    Args:
        names (list[str] | dict): every conv of the network, in call order; or the dict conv name ->
            :class:`~fmpsr.pruning.accounting.ConvSpec` of :func:`~fmpsr.pruning.trace_conv_specs`, and
            then frozen convs (``requires_grad=False``, left as they are) and transposed convs (pruned
            by channel only) are left dense too.
        exclude (tuple[str]): conv names or ``fnmatch`` globs to leave dense.
        skip_first_last (bool): also leave the first and the last conv dense (LTH's convention; the
            ISS-P reference code prunes every layer).

    Returns:
        list[str]
    """
    kept = getattr(names, 'items', None)
    untouched = {n for n, s in kept() if s.frozen or s.transposed} if kept is not None else set()
    names = list(names)
    skipped = ({names[0], names[-1]} if skip_first_last and names else set()) | untouched
    return [n for n in names if n not in skipped and not any(fnmatch.fnmatchcase(n, p) for p in exclude)]


class IterativeShrinkage:
    """The per-iteration rule of ISS-P / IHT / ISS-R on a set of conv weights.

    Args:
        weights (dict): conv name -> weight Parameter (c_out, c_in, kh, kw), shrunk in place.
        method (str): 'iss_p' | 'iht' | 'iss_r'.
        prune_ratio (Ramp): ``pr`` per iteration (ignored with ``nm``).
        alpha (Ramp): shrink factor per iteration (IHT: 0 whatever this says).
        nm (tuple): () or (N, M).
        seed (int): ``manual_seed`` of the run (ISS-R).

    State: ``kept`` (conv name -> bool, True = not in the last set; None before the first step).
    A frozen weight (``requires_grad=False``) is left as it is: it is dropped from ``weights``.
    """

    def __init__(self, weights, method, prune_ratio, alpha, nm=(), seed=0):
        if method not in METHODS:
            raise ValueError(f'pruning.method: unknown method {method!r} (choose from {list(METHODS)})')
        weights = {name: w for name, w in weights.items() if w.requires_grad}
        self.weights, self.method, self.nm, self.seed = weights, method, tuple(nm), seed
        self.prune_ratio, self.alpha = prune_ratio, alpha
        self.kept = None

    def shrink_factor(self, iteration):
        return 0.0 if self.method == 'iht' else float(self.alpha(iteration))

    def choose(self, weight, iteration, generator):
        """The set of one layer at ``iteration`` (bool, True = shrunk)."""
        if self.nm:
            return nm_set(weight, self.nm, generator if self.method == 'iss_r' else None)
        pr = float(self.prune_ratio(iteration))
        if self.method == 'iss_r':
            return random_set(weight, pr, generator)
        return magnitude_set(weight, pr)

    @torch.no_grad()
    def step(self, iteration):
        """Choose every layer's set, shrink it, and count flips against the previous sets.

        Returns:
            dict: conv name -> flips since the previous step (absent before the first step).
        """
        alpha = self.shrink_factor(iteration)
        generator = None
        if self.method == 'iss_r':
            generator = iteration_generator(self.seed, iteration, next(iter(self.weights.values())).device)
        kept, flips = {}, {}
        for name, weight in self.weights.items():
            chosen = self.choose(weight, iteration, generator)
            shrink_(weight, chosen, alpha)
            kept[name] = ~chosen
            if self.kept is not None and name in self.kept:
                flips[name] = count_flips(self.kept[name].to(chosen.device), kept[name])
        self.kept = kept
        return flips


# ---- options ----


@dataclass(frozen=True)
class ISSPOptions(PruningOptions):
    """``pruning`` section of an ISSPModel option file (shared keys: :class:`PruningOptions`).

    Attributes:
        method (str): 'iss_p' (default), 'iht' or 'iss_r'.
        prune_ratio (float | None): pr, the fraction of each chosen layer's weights in the shrunk set and
            finally pruned (paper: 0.9 / 0.95 / 0.99). Required unless ``nm`` is given (N:M fixes it).
        alpha (float | None): shrink factor of ISS-P / ISS-R in [0, 1) (reference code: 0.95, the
            default). IHT's is 0; giving IHT another value is an error.
        ramp (str): 'constant' (default: the reference code's, targets from iteration 1), 'linear',
            'cubic': how pr and alpha move from ``pr_start`` / ``alpha_start`` to their targets.
        ramp_iter (int): iterations of the ramp (<= ``max_prune_iter``). Default 0.
        pr_start (float): pr at iteration 0 of a ramp. Default 0.
        alpha_start (float): alpha at iteration 0 of a ramp. Default 1 (no shrinkage).
        nm (tuple): () or [N, M]: the set respects N:M sparsity along the input channels.
        exclude (tuple[str]): conv names or globs left dense. Default none (as the reference code).
        skip_first_last (bool): also leave the first and last conv dense. Default False (as the paper).
        plot_layers (tuple[str]): convs whose flips and gradient norm are plotted; default four
            evenly spaced chosen convs (first, 1/3, 2/3, last), like the supplement's Figs. 1-2.
        check_freq (int): iterations between ratio logs and flip / gradient-norm records (default 100).
        max_prune_iter (int): length of the pruning stage (default 100000, the reference code's:
            0.5 / 1e-4 * 20 iterations of its regularisation clock).
    """
    method: str = 'iss_p'
    prune_ratio: float = None
    alpha: float = None
    ramp: str = 'constant'
    ramp_iter: int = 0
    pr_start: float = 0.0
    alpha_start: float = 1.0
    nm: tuple = ()
    exclude: tuple = ()
    skip_first_last: bool = False
    plot_layers: tuple = ()
    check_freq: int = 100
    max_prune_iter: int = 100000

    def validate(self):
        """Check every key (ValueError naming ``pruning.<key>``); fills in the default alpha."""
        super().validate()
        check_choice('method', self.method, METHODS)
        if self.nm:
            if len(self.nm) != 2:
                raise ValueError(f'pruning.nm must be [N, M], got {list(self.nm)}')
            check_nm(*self.nm)
            if self.prune_ratio is not None:
                raise ValueError(f'pruning.prune_ratio ({self.prune_ratio}) and pruning.nm ({list(self.nm)}) are both '
                                 f'set; N:M fixes the ratio at (M - N) / M: leave prune_ratio out')
        else:
            if self.prune_ratio is None:
                raise ValueError('pruning.prune_ratio is required (e.g. 0.9, 0.95, 0.99) unless pruning.nm is set')
            check_number('prune_ratio', self.prune_ratio, 0, 1, low_open=True, high_open=True)
        if self.method == 'iht':
            if self.alpha not in (None, 0, 0.0):
                raise ValueError(f'pruning.alpha: IHT sets the chosen weights to zero (alpha 0), got {self.alpha!r}; '
                                 'leave alpha out or use method iss_p')
            object.__setattr__(self, 'alpha', 0.0)
        elif self.alpha is None:
            object.__setattr__(self, 'alpha', DEFAULT_ALPHA)
        check_number('alpha', self.alpha, 0, 1, high_open=True)
        check_choice('ramp', self.ramp, RAMPS)
        check_number('ramp_iter', self.ramp_iter, 0, self.max_prune_iter, integer=True)
        if self.ramp != 'constant' and self.ramp_iter == 0:
            raise ValueError(f'pruning.ramp is {self.ramp!r} but pruning.ramp_iter is 0: give the ramp length')
        check_number('pr_start', self.pr_start, 0, self.prune_ratio if self.prune_ratio is not None else 1)
        check_number('alpha_start', self.alpha_start, self.alpha, 1)
        for key in ('exclude', 'plot_layers'):
            value = getattr(self, key)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError(f'pruning.{key} must be a list of conv names or globs, got {value!r}')
        if not isinstance(self.skip_first_last, bool):
            raise ValueError(f'pruning.skip_first_last must be true or false, got {self.skip_first_last!r}')

    def prune_ratio_ramp(self):
        """:class:`Ramp` of pr (with ``nm``: (M - N) / M, constant)."""
        if self.nm:
            n, m = self.nm
            return Ramp('constant', (m - n) / m, (m - n) / m, 0)
        return Ramp(self.ramp, self.pr_start, self.prune_ratio, self.ramp_iter)

    def alpha_ramp(self):
        """:class:`Ramp` of alpha."""
        return Ramp(self.ramp, self.alpha_start, self.alpha, self.ramp_iter)

"""N:M fine-grained structured sparsity (Mishra et al. 2021, "Accelerating sparse deep neural networks";
the SLS comparison of the ISS-P supplement, Sec. 2).

In every group of ``m`` consecutive entries along one axis, ``n`` entries are kept and ``m - n`` are
zero. NVIDIA's sparse tensor cores run 2:4 along the reduction axis of a matmul; for a conv weight
(c_out, c_in, kh, kw) that is the input-channel axis at each (output channel, kernel position), so
the default axis here is 1.

A group of fewer than ``m`` entries (the axis length is not a multiple of ``m``) is either refused
(``partial='error'``, :class:`NMShapeError`) or kept whole (``partial='keep'``: its entries are not
pruned, so the layer is N:M everywhere except in its last partial group). :func:`nm_partial` says
whether a length leaves such a group.

No BasicSR import: this is part of the pruning core.
"""
import torch

PARTIAL_MODES = ('error', 'keep')


class NMShapeError(ValueError):
    """The axis length is not a multiple of M and partial groups were refused."""


def check_nm(n, m, key='pruning.nm'):
    """Raise ValueError naming ``key`` unless 1 <= n < m are integers.

    Returns:
        tuple[int, int]: (n, m).
    """
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)) and 1 <= n < m
    if not ok:
        raise ValueError(f'{key} must be [N, M] with integers 1 <= N < M (N kept of every M), got {[n, m]}')
    return n, m


def nm_partial(length, m):
    """Number of entries in the last, partial group of ``length`` entries in groups of ``m`` (0: none)."""
    return length % m


def nm_mask(scores, n, m, axis=1, partial='error'):
    """Keep mask of the ``n`` largest scores in every group of ``m`` consecutive entries along ``axis``.

    Args:
        scores (Tensor): any shape, e.g. |w| or |Z_W| of a conv, (c_out, c_in, kh, kw); larger = kept.
            Random scores give a random N:M pattern.
        n (int): entries kept per group.
        m (int): group size (n < m).
        axis (int): the grouped axis (default 1: input channels of a conv weight).
        partial (str): 'error': raise :class:`NMShapeError` when the axis length is not a multiple of
            ``m``; 'keep': the last partial group keeps all its entries.

    Returns:
        Tensor: bool, the shape of ``scores``; exactly ``n`` True in every full group of ``m``. Ties are
        broken by position (the earlier entry is kept), so the mask is deterministic.

    Raises:
        ValueError: bad ``n`` / ``m`` / ``partial``.
        NMShapeError: a partial group with ``partial='error'`` (the length and M in the message).
    """
    check_nm(n, m, key='nm')
    if partial not in PARTIAL_MODES:
        raise ValueError(f'nm_mask: partial must be one of {list(PARTIAL_MODES)}, got {partial!r}')
    moved = scores.detach().movedim(axis, -1)
    length = moved.shape[-1]
    rest = nm_partial(length, m)
    if rest and partial == 'error':
        raise NMShapeError(f'N:M {n}:{m}: axis {axis} has {length} entries, not a multiple of {m} '
                           f'(its last group would have {rest})')
    full = length - rest
    keep = torch.ones(moved.shape, dtype=torch.bool, device=moved.device)
    if full:
        groups = moved[..., :full].reshape(*moved.shape[:-1], full // m, m)
        order = torch.argsort(groups, dim=-1, descending=True, stable=True)
        chosen = torch.zeros(groups.shape, dtype=torch.bool, device=moved.device)
        chosen.scatter_(-1, order[..., :n], True)
        keep[..., :full] = chosen.reshape(*moved.shape[:-1], full)
    return keep.movedim(-1, axis)


def count_nm_violations(weight, n, m, axis=1):
    """Number of full groups of ``m`` along ``axis`` whose count of nonzero entries is not ``n`` (for
    checks and tests; the partial last group is not counted)."""
    moved = weight.detach().movedim(axis, -1)
    full = moved.shape[-1] - nm_partial(moved.shape[-1], m)
    if full == 0:
        return 0
    nonzero = (moved[..., :full] != 0).reshape(*moved.shape[:-1], full // m, m).sum(-1)
    return int((nonzero != n).sum())

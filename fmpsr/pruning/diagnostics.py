"""Is a channel search driven by the data or by the draw? (FMP Sec. 3.4; DHP, Li et al. ECCV 2020)

FMP and DHP prune the channels whose vector entries z the proximal step (FMP Eq. 10) takes to zero.
If the L1 shrink outweighs every data step (under Adam a step moves z by about one lr whatever the
gradient, so with ``lambda_c >= 1`` no gradient can hold a channel), the channels kept are simply
those whose |z| was largest at the start, in which case the search uses no information from the data.
:func:`kept_auc` measures how well a per-channel score ranks the kept channels above the pruned ones;
:func:`selection_diagnostics` applies it per channel group to the initial magnitudes |z0| and to a
data-driven importance accumulated over the prune stage (e.g. the first-order Taylor importance
sum_t |dL/dz_t * z_t|).

Reading the numbers: an AUC of |z0| near 1 means that the draw decided the kept set; with equal
initial magnitudes (``HyperNetwork(init='plain')``, every z = 1) it is 0.5 by construction, and the
AUC of the importance then says how far the kept set follows what the gradients said.
"""
import torch


def kept_auc(scores, kept):
    """Area under the ROC curve of ``scores`` as a predictor of ``kept`` (Mann-Whitney U / (n_kept n_pruned)).

    The probability that a kept channel scores higher than a pruned one, ties counted as one half: 1.0
    when every kept channel outscores every pruned one, 0.5 for equal scores or no relation, 0.0 when
    the order is reversed.

    Args:
        scores (Tensor): (C,) float, one score per channel.
        kept (Tensor): (C,) bool, True where the channel was kept.

    Returns:
        float | None: the AUC; None when every channel was kept or every one pruned (undefined).

    Raises:
        ValueError: ``scores`` and ``kept`` differ in shape or are not 1-D.
    """
    scores = torch.as_tensor(scores).detach().double().flatten().cpu()
    kept = torch.as_tensor(kept).detach().bool().flatten().cpu()
    if scores.shape != kept.shape:
        raise ValueError(f'kept_auc: scores {tuple(scores.shape)} and kept {tuple(kept.shape)} differ in shape')
    n_kept, n_pruned = int(kept.sum()), int((~kept).sum())
    if n_kept == 0 or n_pruned == 0:
        return None
    # average ranks (1-based; tied scores share their mean rank), then U of the kept set
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]
    u = float(ranks[kept].sum()) - n_kept * (n_kept + 1) / 2
    return u / (n_kept * n_pruned)


def selection_diagnostics(groups):
    """Per channel group, how the kept set relates to the initial magnitudes and to an importance.

    Args:
        groups (dict): group name -> dict with ``kept`` (bool (C,)), ``initial`` (float (C,): |z| at
            the start of the search) and optionally ``importance`` (float (C,): a data-driven score,
            larger = more important).

    Returns:
        dict: ``groups``: name -> {``size``, ``kept`` (int), ``auc_initial_magnitude``,
        ``auc_importance`` (float or None: see :func:`kept_auc`)}; ``mean``: the same two AUCs averaged
        over the groups where they are defined, weighted by group size (None where none is).
    """
    rows = {}
    for name, group in groups.items():
        kept = torch.as_tensor(group['kept']).bool()
        importance = group.get('importance')
        rows[name] = {'size': int(kept.numel()), 'kept': int(kept.sum()),
                      'auc_initial_magnitude': kept_auc(group['initial'], kept),
                      'auc_importance': None if importance is None else kept_auc(importance, kept)}
    mean = {}
    for key in ('auc_initial_magnitude', 'auc_importance'):
        defined = [(row[key], row['size']) for row in rows.values() if row[key] is not None]
        total = sum(size for _, size in defined)
        mean[key] = round(sum(v * size for v, size in defined) / total, 4) if total else None
    for row in rows.values():
        for key in ('auc_initial_magnitude', 'auc_importance'):
            if row[key] is not None:
                row[key] = round(row[key], 4)
    return {'groups': rows, 'mean': mean}

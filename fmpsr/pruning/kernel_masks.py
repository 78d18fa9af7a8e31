"""Kernel-level masks (sparsity_of_sr_networks.txt Sec. 3.1, Eq. 1; Sec. 4; appendix A.2.2, A.5 Table 3).

A kernel mask ``m`` of one conv is a bool tensor (c_out, c_in): ``m[o, i]`` keeps or removes the whole
(kh, kw) kernel from input channel ``i`` to output channel ``o`` (:func:`expand_kernel_mask` turns it
into the (c_out, c_in, kh, kw) weight mask fmpsr's machinery holds). Its *keep ratio* is
``m.sum() / (c_out * c_in)``, what the paper's tables call "sparsity". Generators:

* :func:`grouped_kernel_mask`: grouped convolution with G groups (block diagonal, keep ratio 1/G);
  :func:`block_diagonal_to_grouped` turns such a weight into a real ``groups=G`` conv weight;
* :func:`bernoulli_kernel_mask`: each kernel kept with probability q (seeded, randomly connected);
* :func:`erss_global_masks` / :func:`erss_layer_masks`: kernel-magnitude pruning (Mao et al. 2017;
  a kernel's score is ``sum |w|`` over its kh*kw weights) across all masked convs (ERSS-G) or in each
  conv separately at the same rate (ERSS-L);
* relational graphs (You et al. 2020): :func:`ws_flex_graph` is the WS-flex generator (n nodes,
  average degree k, not necessarily an integer, rewiring probability p);
  :func:`graph_kernel_mask` maps a graph onto a conv (each node owns a contiguous block of input and
  of output channels; a kernel is kept when its two nodes are joined or are the same node) and refuses
  a graph that is not connected (:class:`DisconnectedGraphError`);
  :func:`ws_flex_kernel_mask` builds the mask of a conv with an exact number of kept kernels.

The width-sparsity recipe (Sec. 4): :func:`widened_options` widens ``num_feat``;
:func:`match_kernel_counts` gives each masked conv its number of kept kernels so the widened network's
nonzero params (or MACs) equal a target within one kernel. Nothing here imports BasicSR's trainer.
"""
import random
from dataclasses import dataclass

import networkx as nx
import torch

from .accounting import count
from .options import PruningOptions, check_choice, check_number

MASKS = ('grouped', 'bernoulli', 'erss_g', 'erss_l', 'ws_flex')
ERSS = ('erss_g', 'erss_l')
MATCH = ('params', 'flops')


class DisconnectedGraphError(ValueError):
    """A relational graph that is not connected (some channels could never exchange information)."""


# ---------------------------------------------------------------- helpers


def expand_kernel_mask(kernel_mask, kernel_size):
    """(c_out, c_in) bool kernel mask -> (c_out, c_in, kh, kw) bool weight mask."""
    kh, kw = kernel_size
    return kernel_mask.bool()[:, :, None, None].expand(-1, -1, kh, kw).clone()


def kernel_mask_of(weight_mask):
    """(c_out, c_in, kh, kw) weight mask -> (c_out, c_in) kernel mask (a kernel is kept if any weight is)."""
    return weight_mask.bool().flatten(2).any(dim=2)


def kernel_scores(weight):
    """Kernel magnitudes ``sum |w|`` over (kh, kw): (c_out, c_in, kh, kw) -> (c_out, c_in), float64."""
    return weight.detach().abs().double().sum(dim=(2, 3)).cpu()


def add_random_kernels(kernel_mask, extra, generator):
    """Keep ``extra`` more kernels of ``kernel_mask``, chosen uniformly among the removed ones (a copy).

    Raises:
        ValueError: fewer than ``extra`` removed kernels to choose from.
    """
    mask = kernel_mask.clone()
    free = (~mask).flatten().nonzero().flatten()
    if extra > free.numel():
        raise ValueError(f'cannot keep {extra} more kernels: only {free.numel()} are removed')
    if extra > 0:
        chosen = free[torch.randperm(free.numel(), generator=generator)[:extra]]
        mask.view(-1)[chosen] = True
    return mask


# ---------------------------------------------------------------- grouped, Bernoulli


def grouped_kernel_mask(c_out, c_in, groups, name='conv'):
    """Block-diagonal kernel mask of a grouped conv (keep ratio 1/G).

    Output channel ``o`` belongs to group ``o // (c_out / G)``, input channel ``i`` to ``i // (c_in / G)``
    (PyTorch's ``groups`` layout).

    Raises:
        ValueError: G does not divide c_in and c_out (``name`` and the widths are given).
    """
    if c_in % groups or c_out % groups:
        raise ValueError(f'pruning.groups={groups} does not divide the channels of {name!r} '
                         f'(c_in={c_in}, c_out={c_out})')
    rows = torch.arange(c_out) // (c_out // groups)
    cols = torch.arange(c_in) // (c_in // groups)
    return rows[:, None] == cols[None, :]


def bernoulli_kernel_mask(c_out, c_in, keep_prob, generator):
    """Random kernel mask, ``P(m[o, i] = 1) = keep_prob`` independently (Sec. 3.1), drawn from ``generator``."""
    return torch.rand(c_out, c_in, generator=generator, dtype=torch.float64) < keep_prob


# ---------------------------------------------------------------- ERSS (kernel-magnitude pruning)


def _top_kernels(scores, keep):
    """Bool mask keeping the ``keep`` largest of a flat score vector (ties: the earlier index is kept)."""
    order = torch.argsort(-scores, stable=True)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[:keep]] = True
    return mask


def erss_global_masks(weights, keep_ratio):
    """ERSS-G: keep the ``round(keep_ratio * total)`` kernels of largest ``sum |w|`` across all convs.

    Args:
        weights (dict): conv name -> weight (c_out, c_in, kh, kw).
        keep_ratio (float): kept fraction of all kernels, in (0, 1].

    Returns:
        dict: conv name -> (c_out, c_in) bool kernel mask.
    """
    scores = {n: kernel_scores(w) for n, w in weights.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    kept = _top_kernels(flat, int(keep_ratio * flat.numel() + 0.5))
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = kept[start:start + s.numel()].view(s.shape).clone()
        start += s.numel()
    return out


def erss_layer_masks(weights, keep_ratio):
    """ERSS-L: in every conv keep its ``round(keep_ratio * c_out * c_in)`` kernels of largest ``sum |w|``.

    Returns:
        dict: conv name -> (c_out, c_in) bool kernel mask.
    """
    out = {}
    for name, w in weights.items():
        s = kernel_scores(w)
        out[name] = _top_kernels(s.flatten(), int(keep_ratio * s.numel() + 0.5)).view(s.shape)
    return out


# ---------------------------------------------------------------- relational graphs (WS-flex)


def ws_flex_graph(n, k, p, seed=0):
    """The WS-flex generator (You et al. 2020, after Watts & Strogatz 1998).

    A ring of ``n`` nodes gets ``round(k * n / 2)`` edges, spread as evenly as possible: node ``i``
    joins its next ``c_i`` neighbours clockwise, ``c_i`` being ``floor(k / 2)`` or one more. Then each
    of those edges ``(i, i + d)`` is rewired with probability ``p`` to ``(i, w)``, ``w`` drawn uniformly
    from the nodes not yet joined to ``i`` (no self-loops, no double edges). The average degree is
    ``2 * round(k * n / 2) / n``, i.e. ``k`` up to rounding.

    Args:
        n (int): nodes, >= 3.
        k (float): average degree, in [2, n - 1].
        p (float): rewiring probability in [0, 1].
        seed (int): seed of the generator's own ``random.Random``.

    Returns:
        networkx.Graph: nodes 0..n-1 (not necessarily connected; see :func:`check_connected`).

    Raises:
        ValueError: ``n``, ``k`` or ``p`` out of range, or a ring too dense to place the edges once.
    """
    if n < 3 or not 2 <= k <= n - 1:
        raise ValueError(f'WS-flex: the average degree k must be in [2, n - 1] for n = {n} nodes, got {k}')
    if not 0 <= p <= 1:
        raise ValueError(f'WS-flex: the rewiring probability p must be in [0, 1], got {p}')
    rng = random.Random(seed)
    edges = int(round(k * n / 2))
    counts = [edges // n + (1 if i < edges % n else 0) for i in range(n)]
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    for i in range(n):
        graph.add_edges_from((i, (i + d) % n) for d in range(1, counts[i] + 1))
    if graph.number_of_edges() != edges:
        raise ValueError(f'WS-flex: k = {k} is too close to n - 1 = {n - 1} to place {edges} ring edges once')
    for i in range(n):
        for d in range(1, counts[i] + 1):
            v = (i + d) % n
            if rng.random() >= p or not graph.has_edge(i, v):
                continue
            free = [w for w in range(n) if w != i and not graph.has_edge(i, w)]
            if not free:
                continue
            graph.remove_edge(i, v)
            graph.add_edge(i, rng.choice(free))
    return graph


def check_connected(graph):
    """Raise :class:`DisconnectedGraphError` unless ``graph`` is connected (its components are named)."""
    if graph.number_of_nodes() == 0 or not nx.is_connected(graph):
        parts = [sorted(c) for c in nx.connected_components(graph)]
        raise DisconnectedGraphError(
            f'relational graph with {graph.number_of_nodes()} nodes is not connected ({len(parts)} components, '
            f'e.g. {parts[:2]}): its channels could not all exchange information (Sec. 3.2); use a larger '
            'degree (keep ratio), a smaller rewiring probability or another seed')


def connected_ws_flex_graph(n, k, p, seed=0, tries=20):
    """A connected WS-flex graph: seeds ``seed``, ``seed + 1``, ... are tried ``tries`` times.

    Raises:
        DisconnectedGraphError: none of the tries gave a connected graph.
        ValueError: see :func:`ws_flex_graph`.
    """
    for t in range(tries):
        graph = ws_flex_graph(n, k, p, seed + t)
        if nx.is_connected(graph):
            return graph
    raise DisconnectedGraphError(f'WS-flex: no connected graph with n={n}, k={k}, p={p} in {tries} tries from '
                                 f'seed {seed}; use a larger degree (keep ratio) or a smaller rewiring probability')


def node_sizes(channels, n):
    """Channels per node: ``channels`` split into ``n`` contiguous blocks whose sizes differ by at most one."""
    return [channels // n + (1 if i < channels % n else 0) for i in range(n)]


def graph_kernel_mask(graph, c_out, c_in):
    """Map a relational graph onto a conv (c_out, c_in) (You et al. 2020, Sec. 2.3).

    Node ``a`` owns a contiguous block of output channels and one of input channels
    (:func:`node_sizes`); kernel ``(o, i)`` is kept when the nodes owning ``o`` and ``i`` are the same node
    (every node keeps its own messages) or are joined by an edge.

    Returns:
        Tensor: bool (c_out, c_in).

    Raises:
        DisconnectedGraphError: the graph is not connected.
        ValueError: more nodes than ``min(c_out, c_in)``.
    """
    check_connected(graph)
    n = graph.number_of_nodes()
    if n > min(c_out, c_in):
        raise ValueError(f'a graph of {n} nodes cannot be mapped onto a conv with c_out={c_out}, c_in={c_in}')
    adjacency = torch.eye(n, dtype=torch.bool)
    for a, b in graph.edges():
        adjacency[a, b] = adjacency[b, a] = True
    rows = torch.repeat_interleave(torch.arange(n), torch.tensor(node_sizes(c_out, n)))
    cols = torch.repeat_interleave(torch.arange(n), torch.tensor(node_sizes(c_in, n)))
    return adjacency[rows][:, cols]


def ws_flex_kernel_mask(c_out, c_in, kept, p, seed=0, nodes=None, tries=20):
    """Kernel mask of a conv from a connected WS-flex graph with exactly ``kept`` kernels.

    The graph has ``n = min(nodes or min(c_out, c_in), c_out, c_in)`` nodes and the most edges whose mask
    stays within ``kept`` kernels; the kernels still missing are added at random (seeded) among the
    removed ones, which keeps the mask connected.

    Raises:
        DisconnectedGraphError: ``kept`` is too small for a connected graph of ``n`` nodes (a tree:
            ``n - 1`` edges), or no connected graph was found.
    """
    total = c_out * c_in
    if kept >= total:
        return torch.ones(c_out, c_in, dtype=torch.bool)
    n = min(nodes or min(c_out, c_in), c_out, c_in)
    base = sum(o * i for o, i in zip(node_sizes(c_out, n), node_sizes(c_in, n)))   # the nodes themselves
    per_edge = 2 * c_out * c_in / (n * n)
    edges = min(int((kept - base) / per_edge), n * (n - 1) // 2)
    generator = torch.Generator().manual_seed(seed)
    while True:
        if edges < n:                    # WS-flex needs k = 2 * edges / n >= 2 (a ring)
            raise DisconnectedGraphError(
                f'{kept} of {total} kernels (keep ratio {kept / total:.4f}) are too few for a connected relational '
                f'graph of {n} nodes on a conv with c_out={c_out}, c_in={c_in}: it needs about '
                f'{base + per_edge * n:.0f}; raise the keep ratio or lower pruning.nodes')
        try:
            mask = graph_kernel_mask(connected_ws_flex_graph(n, 2 * edges / n, p, seed, tries), c_out, c_in)
        except DisconnectedGraphError:
            raise
        except ValueError:               # too dense to place the ring edges once: one edge fewer
            mask = None
        if mask is not None and int(mask.sum()) <= kept:
            return add_random_kernels(mask, kept - int(mask.sum()), generator)
        edges -= 1


# ---------------------------------------------------------------- grouped export


@torch.no_grad()
def block_diagonal_to_grouped(weight, groups, name='conv'):
    """A block-diagonal dense conv weight as the weight of a ``groups=G`` conv.

    Args:
        weight (Tensor): (c_out, c_in, kh, kw) whose kernels outside the G diagonal blocks are zero.
        groups (int): G, dividing c_out and c_in.

    Returns:
        Tensor: (c_out, c_in / G, kh, kw); group ``j`` (output channels ``j*c_out/G ...``) holds
        ``weight[j*c_out/G:(j+1)*c_out/G, j*c_in/G:(j+1)*c_in/G]``, PyTorch's grouped-conv layout.

    Raises:
        ValueError: G does not divide the channels, or a weight outside the blocks is not zero.
    """
    c_out, c_in = weight.shape[:2]
    block = grouped_kernel_mask(c_out, c_in, groups, name)
    if weight[~block].count_nonzero() > 0:
        raise ValueError(f'{name!r} is not block diagonal with {groups} groups: weights outside the blocks '
                         'are not zero')
    co, ci = c_out // groups, c_in // groups
    return torch.cat([weight[j * co:(j + 1) * co, j * ci:(j + 1) * ci] for j in range(groups)], dim=0).clone()


# ---------------------------------------------------------------- width-sparsity trade-off


def widened_options(network_opt, factor):
    """``network_g`` with ``num_feat`` multiplied by ``factor`` (rounded), or a copy when ``factor`` is None.

    Raises:
        ValueError: the arch's options have no ``num_feat``.
    """
    opt = dict(network_opt)
    if factor is None:
        return opt
    if 'num_feat' not in opt:
        raise ValueError(f"pruning.widen: network_g ({opt.get('type')}) has no num_feat to widen")
    opt['num_feat'] = int(round(opt['num_feat'] * factor))
    return opt


def kernel_unit(spec, metric):
    """What one kernel of a conv costs: kh*kw params, or kh*kw*H_out*W_out MACs."""
    return spec.kernel_area if metric == 'params' else spec.kernel_area * spec.out_pixels


def match_kernel_counts(specs, masked, target, metric):
    """Kept kernels per masked conv so that the network's nonzero params (MACs) equal ``target``.

    Every masked conv gets the same keep ratio ``d = (target - fixed) / masked dense cost`` (rounded
    down to whole kernels); the remainder is then spent a whole kernel at a time on the convs whose
    kernels cost most first, so the total falls short of ``target`` by less than one kernel of the
    cheapest masked conv.

    Args:
        specs (dict): conv name -> ConvSpec of the (widened) network.
        masked (list): names of the masked convs (the others keep every weight).
        target (int): params or MACs to reach.
        metric (str): 'params' or 'flops' (MACs at the traced input size).

    Returns:
        tuple: (dict conv name -> kept kernels (int), the common keep ratio d (float)).

    Raises:
        ValueError: the target is below the unmasked part or above the dense network (named numbers).
    """
    full = {n: s.in_channels * s.out_channels * s.kernel_area for n, s in specs.items()}
    fixed = count(specs, kept_weights={n: 0 if n in masked else full[n] for n in specs}).get(metric)
    dense = sum(specs[n].in_channels * specs[n].out_channels * kernel_unit(specs[n], metric) for n in masked)
    budget = target - fixed
    if budget <= 0 or budget > dense:
        raise ValueError(f'pruning.widen: the target of {target} {metric} cannot be met: the convs left dense '
                         f'(first / last) and the biases take {fixed}, the masked convs hold {dense} when dense')
    ratio = budget / dense
    kept = {n: int(ratio * specs[n].in_channels * specs[n].out_channels) for n in masked}
    rest = budget - sum(kept[n] * kernel_unit(specs[n], metric) for n in masked)
    for name in sorted(masked, key=lambda n: -kernel_unit(specs[n], metric)):
        unit = kernel_unit(specs[name], metric)
        add = min(specs[name].in_channels * specs[name].out_channels - kept[name], rest // unit)
        kept[name] += add
        rest -= add * unit
    return kept, ratio


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class KernelOptions(PruningOptions):
    """``pruning`` section of :class:`~fmpsr.models.kernel_sparse_model.KernelSparseModel`.

    Attributes:
        mask (str): 'grouped' | 'bernoulli' | 'erss_g' | 'erss_l' | 'ws_flex'.
        keep_ratio (float): kept fraction of the kernels of every masked conv (q for Bernoulli; the
            paper's "sparsity" column); not with 'grouped' (1/groups) nor with ``widen``.
        groups (int): G of 'grouped', >= 2 (divides the channels of every masked conv).
        seed (int): seed of the random masks (Bernoulli, WS-flex rewiring, added kernels).
        ws_p (float): rewiring probability p of WS-flex.
        nodes (int | None): nodes of each conv's relational graph (default: one per channel of the
            conv's narrower side).
        graph_tries (int): seeds tried for a connected WS-flex graph.
        widen (float | None): factor on ``network_g.num_feat`` (width-sparsity recipe, 'ws_flex' only).
        match (str): with ``widen``: 'params' or 'flops' (MACs) equal ``budget`` times the original's.
        budget (float): with ``widen``: the target as a fraction of the original network's count.
        grouped_export (bool): 'grouped' finalizes into real ``groups=G`` convs (CompactArch ``conv_groups``).
        max_prune_iter (int): the prune stage; default 0 (one training step, masks fixed from iteration
            0) for the fixed masks; for ERSS the dense training period before kernel pruning.
    """
    mask: str = None
    keep_ratio: float = None
    groups: int = None
    seed: int = 0
    ws_p: float = 0.2
    nodes: int = None
    graph_tries: int = 20
    widen: float = None
    match: str = 'params'
    budget: float = 1.0
    grouped_export: bool = True

    @classmethod
    def from_options(cls, options, defaults=None):
        options = dict(options or {})
        if 'max_prune_iter' not in options and options.get('mask') not in ERSS:
            options['max_prune_iter'] = 0
        return super().from_options(options, defaults)

    def validate(self):
        super().validate()
        check_choice('mask', self.mask, MASKS)
        check_choice('match', self.match, MATCH)
        check_number('seed', self.seed, 0, integer=True)
        check_number('ws_p', self.ws_p, 0, 1)
        check_number('graph_tries', self.graph_tries, 1, integer=True)
        check_number('budget', self.budget, 0, low_open=True)
        if self.nodes is not None:
            check_number('nodes', self.nodes, 3, integer=True)
        if not isinstance(self.grouped_export, bool):
            raise ValueError(f'pruning.grouped_export must be true or false, got {self.grouped_export!r}')
        if self.widen is not None:
            if self.mask != 'ws_flex':
                raise ValueError('pruning.widen needs pruning.mask: ws_flex (a connected-graph mask), '
                                 f'got {self.mask!r}')
            check_number('widen', self.widen, 1, low_open=True)
            if self.keep_ratio is not None:
                raise ValueError('pruning.keep_ratio is set by pruning.widen / match / budget; leave it out')
        elif self.mask == 'grouped':
            check_number('groups', self.groups, 2, integer=True)
            if self.keep_ratio is not None:
                raise ValueError('pruning.keep_ratio does not apply to pruning.mask: grouped (it is 1 / groups)')
        else:
            if self.keep_ratio is None:
                raise ValueError(f'pruning.keep_ratio is required with pruning.mask: {self.mask}')
            check_number('keep_ratio', self.keep_ratio, 0, 1, low_open=True)
        if self.mask != 'grouped' and self.groups is not None:
            raise ValueError(f'pruning.groups applies to pruning.mask: grouped only (mask is {self.mask!r})')
        if self.mask in ERSS and self.max_prune_iter < 1:
            raise ValueError(f'pruning.max_prune_iter: {self.mask} prunes a trained network; give its dense '
                             'training period (>= 1 iteration)')

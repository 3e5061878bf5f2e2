"""Function-preserving alignment: hidden-unit permutations from the ELBO's likelihood cost.

Model ``i`` is observed as ``gamma_i ~ N(A_i m_i, diag A_i v_i)`` (Eq. 6) where ``A_i`` ranges
over the network's symmetry group: independent permutations of each group of hidden units that
the architecture declares (the units of an MLP layer, the channels of a convolution).
Given the decoder's canonical mean and variance, the cost of sending model unit ``u`` to
canonical unit ``v`` is ``-E_q log N(gamma_i[unit u] | m[unit v], v[unit v])`` summed over the
unit's weights (Eq. 18 restricted to the symmetry group); each group is a linear assignment
solved exactly with the other groups fixed (coordinate ascent, never lowering the likelihood).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fedfuse.architectures import Architecture
from fedfuse.parallel import ParallelMap, serial_map


def unit_cost(units: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """``cost[u, v] = E_s sum_k [(x[u,k] - m[s,v,k])^2 / v[s,v,k] + log v[s,v,k]] / 2``.

    ``units``: ``(H, k)`` one model's units; ``mean``/``var``: ``(S, H, k)`` canonical units
    under ``S`` samples of the codes (the expectation over ``q``).
    """
    inv = 1.0 / var
    a = inv.mean(0)
    b = (mean * inv).mean(0)
    c = (mean * mean * inv + np.log(var)).mean(0).sum(1)
    return 0.5 * ((units * units) @ a.T - 2.0 * units @ b.T + c[None, :])


def align_model(
    spec: Architecture,
    gamma: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    perms: list[np.ndarray] | None = None,
    max_sweeps: int = 3,
) -> list[np.ndarray]:
    """Best hidden-unit permutations of one model ``gamma`` ``(d,)`` against ``mean``/``var``
    ``(S, d)`` in canonical order; returns one index vector per permutation group, where entry
    ``v`` is the model unit placed at canonical position ``v``."""
    sizes = spec.perm_sizes
    perms = [p.copy() for p in perms] if perms is not None else [np.arange(h) for h in sizes]
    if not sizes:
        return perms
    unit_idx = [spec.unit_index(li).numpy() for li in range(len(sizes))]
    for _ in range(max_sweeps if len(sizes) > 1 else 1):
        changed = False
        for li in range(len(sizes)):
            others = [torch.as_tensor(p) for p in perms]
            others[li] = torch.arange(sizes[li])
            x = gamma[spec.gather_index(others).numpy()]
            idx = unit_idx[li]
            cost = unit_cost(x[idx], mean[:, idx], var[:, idx])
            rows, cols = linear_sum_assignment(cost)
            new = np.empty_like(perms[li])
            new[cols] = rows
            if not np.array_equal(new, perms[li]):
                perms[li], changed = new, True
        if not changed:
            break
    return perms


@dataclass(frozen=True)
class AlignChunk:
    """A slice of the zoo sent to one worker: plain arrays, cheap to ship to Ray."""

    spec: Architecture
    gamma: np.ndarray  # (b, d)
    mean: np.ndarray  # (b, S, d)
    var: np.ndarray  # (b, S, d)
    perms: list[np.ndarray]  # per hidden layer (b, H_l)


def align_chunk(chunk: AlignChunk) -> list[np.ndarray]:
    """Align every model of a chunk; returns per-layer ``(b, H_l)`` permutations."""
    out = [
        align_model(
            chunk.spec,
            chunk.gamma[j].astype(np.float64),
            chunk.mean[j].astype(np.float64),
            chunk.var[j].astype(np.float64),
            [p[j] for p in chunk.perms],
        )
        for j in range(chunk.gamma.shape[0])
    ]
    return [np.stack([o[li] for o in out]) for li in range(len(chunk.spec.perm_sizes))]


def align_zoo(
    spec: Architecture,
    gamma: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    perms: list[torch.Tensor],
    pmap: ParallelMap = serial_map,
    chunk_size: int = 64,
) -> list[torch.Tensor]:
    """Re-solve every model's permutations (independent per model, so fanned out by ``pmap``).

    ``gamma`` ``(n, d)`` raw weights; ``mean``/``var`` ``(n, S, d)`` canonical-order decoder
    outputs; ``perms`` per layer ``(n, H_l)``. Models are batched ``chunk_size`` per task so
    that a remote map's overhead stays small against the work.
    """
    if not spec.perm_sizes:
        return perms
    n = gamma.shape[0]
    g, m, v = (t.detach().float().numpy() for t in (gamma, mean, var))
    p = [t.numpy() for t in perms]
    chunks = [
        AlignChunk(spec, g[s : s + chunk_size], m[s : s + chunk_size], v[s : s + chunk_size],
                   [q[s : s + chunk_size] for q in p])
        for s in range(0, n, chunk_size)
    ]
    results = pmap(align_chunk, chunks)
    return [
        torch.from_numpy(np.concatenate([r[li] for r in results])).long()
        for li in range(len(spec.perm_sizes))
    ]


def apply_perms(spec: Architecture, gamma: torch.Tensor, perms: list[torch.Tensor]) -> torch.Tensor:
    """Re-order each model of ``gamma`` ``(n, d)`` into canonical order, all models at once
    (the batched form of :meth:`Architecture.permute`)."""
    if not spec.perm_sizes:
        return gamma
    return gamma.gather(1, spec.batched_gather_index(perms))


def task_tree(tau: torch.Tensor, k: int = 10) -> tuple[np.ndarray, list[np.ndarray]]:
    """Parents and breadth-first levels of a minimum spanning tree over a k-nearest-neighbour
    graph of the descriptors: neighbouring tasks end up aligned to each other first."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order, minimum_spanning_tree
    from scipy.spatial import cKDTree

    x = tau.double().numpy()
    n = x.shape[0]
    parents = np.full(n, -1)
    if n == 1:
        return parents, [np.zeros(1, dtype=int)]
    dist, nbr = cKDTree(x).query(x, k=min(k, n - 1) + 1)
    rows = np.repeat(np.arange(n), nbr.shape[1] - 1)
    w = dist[:, 1:].ravel() + 1e-9  # a zero weight would read as "no edge"
    root = int(np.argmin(((x - x.mean(0)) ** 2).sum(1)))
    # link every model weakly to the root so the graph is connected whatever the clusters
    far = (dist.max() + 1.0) * 10
    rows = np.concatenate([rows, np.full(n, root)])
    cols = np.concatenate([nbr[:, 1:].ravel(), np.arange(n)])
    w = np.concatenate([w, np.full(n, far)])
    keep = rows != cols
    graph = coo_matrix((w[keep], (rows[keep], cols[keep])), shape=(n, n)).tocsr()
    tree = minimum_spanning_tree(graph + graph.T)
    order, pred = breadth_first_order(tree, root, directed=False)
    depth = np.zeros(n, dtype=int)
    for node in order[1:]:
        depth[node] = depth[pred[node]] + 1
    parents[order[1:]] = pred[order[1:]]
    return parents, [np.flatnonzero(depth == lv) for lv in range(depth.max() + 1)]


def chain_align(
    spec: Architecture, gamma: torch.Tensor, tau: torch.Tensor, pmap: ParallelMap = serial_map,
    chunk_size: int = 64,
) -> list[torch.Tensor]:
    """Initial permutations: each model matched (unit variance) to its already-aligned parent in
    the task tree, level by level; models of one level are independent and fan out."""
    n = gamma.shape[0]
    perms = [torch.arange(h).repeat(n, 1) for h in spec.perm_sizes]
    if not spec.perm_sizes or n == 1:
        return perms
    parents, levels = task_tree(tau)
    aligned = gamma.clone()
    for members in levels[1:]:
        idx = torch.as_tensor(members)
        ref = aligned[parents[members]][:, None, :]
        new = align_zoo(spec, gamma[idx], ref, torch.ones_like(ref),
                        [p[idx] for p in perms], pmap, chunk_size)
        for li in range(len(spec.perm_sizes)):
            perms[li][idx] = new[li]
        aligned[idx] = apply_perms(spec, gamma[idx], new)
    return perms

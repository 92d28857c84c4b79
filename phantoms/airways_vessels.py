"""Bronchial, pulmonary arterial and pulmonary venous trees that fill the lungs as real ones do.

Why this exists: real lung on CT is mostly vessels and bronchi. They branch from the hila,
thin with every generation, run as bronchus-artery pairs, stop 1-2 cm short of the pleura
where they fall below a voxel, and never cross a fissure. A phantom whose lung is a flat
texture with random tubes in it teaches a classifier that any real vessel is disease.

The trees are grown by volume filling: every branch heads for the centroid of the lung volume
it supplies (a cloud of sample points), stops part of the way there, and the cloud is split in
two across its widest spread; each half gets a child. It is done level by level for all
branches at once with numpy group reductions, so trees of ~10^4 branches take a fraction of a
second. The lobes are the first
split, so no branch crosses a fissure. Radii follow a Murray-like law in the supplied volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hrct_triage.phantoms.geometry import Tubes

__all__ = ["Tree", "Trees", "grow_tree", "lung_trees"]

F64 = NDArray[np.floating[Any]]
I64 = NDArray[np.int64]


@dataclass(frozen=True)
class Tree:
    """Branches as segments: start and end (n, 3), parent index (-1 root), supplied points,
    generation (0 at the root branches)."""

    start: F64
    end: F64
    parent: I64
    supplied: F64
    generation: I64

    def __len__(self) -> int:
        return int(self.parent.size)


def grow_tree(
    rng: np.random.Generator,
    points: F64,
    groups: I64,
    roots: F64,
    *,
    fraction: float = 0.4,
    terminal: int = 1,
    min_length: float = 1.5,
    max_angle_deg: float = 65.0,
    max_generations: int = 30,
) -> Tree:
    """Volume-filling tree: ``points`` (n, 3) split into ``groups`` (ids 0..k-1, one per root),
    each group's first branch starting at ``roots[g]``.

    A branch runs ``fraction`` of the way to the centroid of its points; a group of at most
    ``terminal`` points, or whose branch would be shorter than ``min_length`` mm, ends there
    (its last branch reaches the centroid). Children turn at most ``max_angle_deg`` from their
    parent.
    """
    n_groups = int(groups.max(initial=-1)) + 1
    gid = groups.astype(np.int64).copy()
    start = roots[:n_groups].astype(np.float64).copy()
    parent_dir = np.zeros((n_groups, 3))
    parent_branch = np.full(n_groups, -1, dtype=np.int64)
    starts: list[F64] = []
    ends: list[F64] = []
    parents: list[I64] = []
    supplied: list[F64] = []
    gens: list[I64] = []
    count_branches = 0
    cos_max = np.cos(np.radians(max_angle_deg))
    for gen in range(max_generations):
        live = gid >= 0
        if not live.any():
            break
        g = gid[live]
        p = points[live]
        k = start.shape[0]
        cnt = np.bincount(g, minlength=k).astype(np.float64)
        has = cnt > 0
        safe = np.maximum(cnt, 1.0)
        sums = [np.bincount(g, weights=p[:, i], minlength=k) for i in range(3)]
        cen = np.stack(sums, 1).astype(np.float64) / safe[:, None]
        vec = cen - start
        dist = np.linalg.norm(vec, axis=1)
        unit = vec / np.maximum(dist, 1e-9)[:, None]
        # keep children within max_angle of their parent (roots are free)
        has_parent = np.linalg.norm(parent_dir, axis=1) > 0
        cosang = (unit * parent_dir).sum(axis=1)
        bend = has_parent & (cosang < cos_max)
        if bend.any():
            u, w = unit[bend], parent_dir[bend]
            perp = u - (u * w).sum(axis=1, keepdims=True) * w
            perp /= np.maximum(np.linalg.norm(perp, axis=1, keepdims=True), 1e-9)
            sin_max = np.sqrt(1.0 - cos_max * cos_max)
            unit[bend] = cos_max * w + sin_max * perp
        term = has & ((cnt <= terminal) | (dist * fraction < min_length))
        length = np.where(term, np.maximum(dist, min_length * 0.5), dist * fraction)
        jitter = np.clip(rng.normal(1.0, 0.12, k), 0.7, 1.3)
        length = np.where(term, length, length * jitter)
        end = start + unit * length[:, None]
        ids = np.full(k, -1, dtype=np.int64)
        idx = np.flatnonzero(has)
        ids[idx] = count_branches + np.arange(idx.size)
        count_branches += idx.size
        starts.append(start[idx])
        ends.append(end[idx])
        parents.append(parent_branch[idx])
        supplied.append(cnt[idx])
        gens.append(np.full(idx.size, gen, dtype=np.int64))
        # points of terminal groups are done; the others split across their widest spread
        done = term[gid.clip(0)] & live
        gid[done] = -1
        live = gid >= 0
        if not live.any():
            break
        g = gid[live]
        p = points[live]
        rel = p - cen[g]
        cov = np.zeros((k, 3, 3))
        for i in range(3):
            for j in range(i, 3):
                s = np.bincount(g, weights=rel[:, i] * rel[:, j], minlength=k)
                cov[:, i, j] = s
                cov[:, j, i] = s
        proj = np.eye(3)[None] - unit[:, :, None] * unit[:, None, :]
        cov = proj @ cov @ proj
        _, vecs = np.linalg.eigh(cov)
        axis = vecs[:, :, 2]
        side = ((rel * axis[g]).sum(axis=1) > 0).astype(np.int64)
        new = 2 * g + side
        uniq, inv = np.unique(new, return_inverse=True)
        gid[live] = inv
        old = uniq // 2
        start = end[old]
        parent_dir = unit[old]
        parent_branch = ids[old]
    if not starts:
        z3 = np.zeros((0, 3))
        zi = np.zeros(0, dtype=np.int64)
        return Tree(z3, z3.copy(), zi, np.zeros(0), zi.copy())
    return Tree(
        np.concatenate(starts),
        np.concatenate(ends),
        np.concatenate(parents),
        np.concatenate(supplied),
        np.concatenate(gens),
    )


def root_of(tree: Tree) -> I64:
    """Index of the root group (0..k-1) each branch descends from; parents come first."""
    owner = np.arange(len(tree))
    for i in range(len(tree)):
        p = tree.parent[i]
        owner[i] = i if p < 0 else owner[p]
    roots = np.flatnonzero(tree.parent < 0)
    rank = np.zeros(len(tree), dtype=np.int64)
    rank[roots] = np.arange(roots.size)
    return np.asarray(rank[owner], dtype=np.int64)


def radii(tree: Tree, root_radius: F64 | float, exponent: float = 2.5) -> F64:
    """Murray-like radius of each branch: its root's radius x (supplied share)^(1/exponent)."""
    rank = root_of(tree)
    roots = np.flatnonzero(tree.parent < 0)
    total = tree.supplied[roots][rank]
    share = tree.supplied / np.maximum(total, 1.0)
    base = np.asarray(root_radius, dtype=np.float64)
    per = base[rank] if base.ndim else np.full(len(tree), float(base))
    return np.asarray(per * share ** (1.0 / exponent))


def wiggle(rng: np.random.Generator, tree: Tree, amount: float = 0.08) -> tuple[F64, F64, F64]:
    """Each branch as two segments whose joint is pushed sideways: gently curved vessels.

    Returns (a, mid, b) with a = start, b = end.
    """
    d = tree.end - tree.start
    length = np.linalg.norm(d, axis=1, keepdims=True)
    mid = (tree.start + tree.end) / 2.0 + rng.normal(0.0, 1.0, d.shape) * amount * length
    return tree.start, mid, tree.end


@dataclass(frozen=True)
class Trees:
    """The lungs' tubes, ready to rasterise."""

    airway_lumen: Tubes
    airway_wall: Tubes  # outer surface of the wall
    arteries: Tubes
    veins: Tubes
    artery_tree: Tree
    vein_tree: Tree
    airway_lobe: NDArray[np.int64]  # lobe (root group + 1) of each airway lumen tube


def _tubes(a: F64, mid: F64, b: F64, r_start: F64, r_end: F64) -> Tubes:
    r_mid = (r_start + r_end) / 2.0
    return Tubes(
        np.concatenate([a, mid]),
        np.concatenate([mid, b]),
        np.concatenate([r_start, r_mid]),
        np.concatenate([r_mid, r_end]),
    )


def lung_trees(
    rng: np.random.Generator,
    artery_points: F64,
    artery_groups: I64,
    artery_roots: F64,
    artery_root_radius: F64,
    vein_points: F64,
    vein_groups: I64,
    vein_roots: F64,
    vein_root_radius: F64,
    *,
    airway_ratio: float = 0.85,
    min_airway_radius: float = 0.5,
    wall_ratio: float = 0.35,
    min_radius: float = 0.45,
) -> Trees:
    """Bronchus-artery pairs grown from the lobar roots, and a separate venous tree.

    Bronchi share the arterial tree's branching (they run together); each bronchus has a lumen
    ``airway_ratio`` x the artery's radius and a wall ``wall_ratio`` x its lumen radius (at
    least 0.3 mm), and stops where its lumen falls under ``min_airway_radius`` mm (below that,
    at 0.6-0.8 mm pixels, bronchi are not seen). The artery runs beside its bronchus. No
    vessel is thinner than ``min_radius`` mm: the branches beyond the last sample point are
    not drawn, but their parent still carries blood to the periphery.
    """
    art = grow_tree(rng, artery_points, artery_groups, artery_roots)
    r_art = np.maximum(radii(art, artery_root_radius), min_radius)
    # radius at each end: parents hand their radius to the child's start
    r_start = np.where(art.parent >= 0, r_art[art.parent.clip(0)], r_art * 1.15)
    r_start = np.minimum(r_start, r_art * 1.6)
    lumen_end = np.minimum(r_art * airway_ratio, 5.0)
    lumen_start = np.minimum(r_start * airway_ratio, 5.5)
    wall_end = lumen_end + np.maximum(0.3, wall_ratio * lumen_end)
    wall_start = lumen_start + np.maximum(0.3, wall_ratio * lumen_start)
    # arteries sit beside their bronchi: offset each node perpendicular to its branch
    d = art.end - art.start
    unit = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-9)
    ref = np.where(np.abs(unit[:, 2:3]) < 0.9, np.array([[0.0, 0.0, 1.0]]), np.array([[1, 0, 0]]))
    side = np.cross(unit, ref)
    side /= np.maximum(np.linalg.norm(side, axis=1, keepdims=True), 1e-9)
    has_airway = lumen_end >= min_airway_radius
    gap_end = np.where(has_airway, wall_end + r_art + 0.2, 0.0)
    off_end = side * gap_end[:, None]
    off_start = np.where(art.parent[:, None] >= 0, off_end[art.parent.clip(0)], off_end)
    a, mid, b = wiggle(rng, art)
    mid_off = (off_start + off_end) / 2.0
    arteries = _tubes(a + off_start, mid + mid_off, b + off_end, r_start, r_art)
    aw = has_airway
    airway_lumen = _tubes(a[aw], mid[aw], b[aw], lumen_start[aw], lumen_end[aw])
    airway_wall = _tubes(a[aw], mid[aw], b[aw], wall_start[aw], wall_end[aw])
    vein = grow_tree(rng, vein_points, vein_groups, vein_roots)
    r_vein = np.maximum(radii(vein, vein_root_radius), min_radius)
    v_start = np.where(vein.parent >= 0, r_vein[vein.parent.clip(0)], r_vein * 1.15)
    v_start = np.minimum(v_start, r_vein * 1.6)
    va, vmid, vb = wiggle(rng, vein, 0.1)
    veins = _tubes(va, vmid, vb, v_start, r_vein)
    root = root_of(art)
    lobe = np.concatenate([root[aw], root[aw]]) + 1
    return Trees(airway_lumen, airway_wall, arteries, veins, art, vein, lobe)

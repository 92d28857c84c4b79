"""The pulmonary vessel trees and main bronchi, as capsules (segments with a radius).

Trees are grown once per patient inside the painted lung, so their branches stay in lung and thin
toward the pleura as real vessels do; the painter only slices the capsules.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from hrct_triage.phantoms.anatomy import (
    BODY_CY,
    CARINA_T,
    CHEST_LENGTH_MM,
    Anatomy,
    Vessels,
    lung_mask,
    sections,
)
from hrct_triage.phantoms.geometry import Grid

_NEIGHBOURS_5MM = np.array(
    [[5.0, 0, 0], [-5.0, 0, 0], [0, 5.0, 0], [0, -5.0, 0], [0, 0, 5.0], [0, 0, -5.0]]
)


class _LungProbe:
    """Point-in-lung tests against a 2 mm occupancy volume of the painted lung mask.

    Growing vessel trees asks tens of thousands of such questions; a lookup table answers them
    in bulk and agrees with what is painted, since it is built by the same painter.
    """

    STEP = 2.0

    def __init__(self, anat: Anatomy) -> None:
        s = anat.size
        xs = np.arange(-170.0 * s, 170.0 * s, self.STEP, dtype=np.float32)
        ys = np.arange(-150.0 * s, 120.0 * s, self.STEP, dtype=np.float32)
        zs = anat.z_top - np.arange(0.0, CHEST_LENGTH_MM, self.STEP)
        grid = Grid(xs, ys)
        lung = np.stack([lung_mask(grid, sections(anat, float(z))) for z in zs])
        self._lung = lung
        self._origin = np.array([xs[0], ys[0], zs[0]])
        self._scale = np.array([1.0, 1.0, -1.0]) / self.STEP
        self._limit = np.array(lung.shape[::-1])

    def inside(self, points: NDArray[np.float64], *, deep: bool = False) -> NDArray[np.bool_]:
        """For (n, 3) points: inside the lung (``deep``: at least ~5 mm from its edge)."""
        if deep:
            ok = self.inside(points)
            for offset in _NEIGHBOURS_5MM:
                ok &= self.inside(points + offset)
            return ok
        idx = np.rint((points - self._origin) * self._scale).astype(np.intp)
        ok = np.all((idx >= 0) & (idx < self._limit), axis=1)
        out = np.zeros(points.shape[0], dtype=bool)
        if ok.all():
            return self._lung[idx[:, 2], idx[:, 1], idx[:, 0]]
        good = idx[ok]
        out[ok] = self._lung[good[:, 2], good[:, 1], good[:, 0]]
        return out


def grow_vessels(anat: Anatomy, rng: np.random.Generator) -> Vessels:
    """Space-filling pulmonary vessel trees, one per lung, rooted at the hilum.

    Random targets fill the lung; taken from the hilum outward, each joins the nearest vessel
    already grown by a gently jittered path. Radii then follow Murray's law from how many
    targets a segment feeds, so vessels branch and thin toward the pleura.
    """
    probe = _LungProbe(anat)
    targets = _lung_targets(anat, probe, rng, count=int(rng.integers(1800, 2400)))
    s = anat.size
    p0: list[NDArray[np.float64]] = []
    p1: list[NDArray[np.float64]] = []
    radii: list[float] = []
    roots = []  # pulmonary arteries enter higher, veins drain lower and more anterior
    for side in (-1, 1):
        roots.append((side, 0, np.array([side * 46.0 * s, BODY_CY - 8.0 * s, _hilum_z(anat)])))
        z_vein = _hilum_z(anat) - 32.0 * s
        roots.append((side, 1, np.array([side * 42.0 * s, BODY_CY - 22.0 * s, z_vein])))
    for side, tree, hilum in roots:
        mine = targets[(np.sign(targets[:, 0]) == side) & (np.arange(len(targets)) % 2 == tree)]
        order = np.argsort(((mine - hilum) ** 2).sum(axis=1))
        nodes, parents = _vessel_tree(probe, rng, hilum, mine[order])
        feeds = _leaf_counts(parents)
        for j in range(1, len(parents)):
            p0.append(nodes[parents[j]])
            p1.append(nodes[j])
            radii.append(min(0.45 * float(feeds[j]) ** 0.45, 6.5))
    if not radii:
        empty = np.zeros((0, 3))
        return Vessels(empty, empty, np.zeros(0))
    return Vessels(np.array(p0), np.array(p1), np.array(radii))


def _hilum_z(anat: Anatomy) -> float:
    return anat.z_top - 0.42 * CHEST_LENGTH_MM


def _lung_targets(
    anat: Anatomy, probe: _LungProbe, rng: np.random.Generator, count: int
) -> NDArray[np.float64]:
    """Points spread uniformly through both lungs, a few millimetres off the pleura."""
    s = anat.size
    low = [-150.0 * s, -110.0 * s, anat.z_top - 255.0]
    high = [150.0 * s, 90.0 * s, anat.z_top]
    found: list[NDArray[np.float64]] = []
    total = 0
    while total < count:
        cand = rng.uniform(low, high, (4096, 3))
        cand = cand[probe.inside(cand, deep=True)]
        found.append(cand)
        total += len(cand)
    return np.concatenate(found)[:count]


def _vessel_tree(
    probe: _LungProbe,
    rng: np.random.Generator,
    hilum: NDArray[np.float64],
    targets: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
    """Nodes (n, 3) and parent indices (root -1) of one lung's tree.

    Targets join in small batches (growing with the tree) so that each batch is one set of
    numpy calls; within a batch they attach only to what was grown before.
    """
    nodes = np.empty((len(targets) * 40 + 1, 3))
    parents = np.empty(nodes.shape[0], dtype=np.intp)
    nodes[0], parents[0], count = hilum, -1, 1
    done = 0
    while done < len(targets):
        batch = targets[done : done + min(max(count // 6, 4), 64)]
        done += len(batch)
        near = ((batch[:, None, :] - nodes[None, :count, :]) ** 2).sum(axis=2).argmin(axis=1)
        points, steps = _vessel_paths(probe, rng, nodes[near], batch, hilum)
        for i in np.flatnonzero(steps):
            k = int(steps[i])
            nodes[count : count + k] = points[i, :k]
            parents[count] = near[i]
            parents[count + 1 : count + k] = np.arange(count, count + k - 1)
            count += k
    return nodes[:count], parents[:count]


def _vessel_paths(
    probe: _LungProbe,
    rng: np.random.Generator,
    start: NDArray[np.float64],
    target: NDArray[np.float64],
    hilum: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
    """Jittered paths with a point every ~8 mm from each start to its target.

    Returns points (k, S, 3) and the number of points of each path, 0 where the path would
    leave the lung (the few centimetres around the hilum excepted).
    """
    gap = target - start
    steps = np.maximum(np.ceil(np.sqrt((gap**2).sum(axis=1)) / 8.0), 1).astype(np.intp)
    frac = np.arange(1, int(steps.max()) + 1)[None, :] / steps[:, None]  # (k, S)
    valid = frac <= 1.0 + 1e-9
    jitter = rng.normal(0.0, 1.6, (*frac.shape, 3)) * (frac < 1.0 - 1e-9)[:, :, None]
    points = start[:, None, :] + gap[:, None, :] * np.minimum(frac, 1.0)[:, :, None] + jitter
    flat = points.reshape(-1, 3)
    near_hilum = ((flat - hilum) ** 2).sum(axis=1) < 30.0**2
    ok = (probe.inside(flat) | near_hilum).reshape(frac.shape) | ~valid
    return points, np.where(ok.all(axis=1), steps, 0)


def _leaf_counts(parents: NDArray[np.intp]) -> NDArray[np.int64]:
    """How many leaves each node feeds (children always come after their parent)."""
    has_child = np.zeros(len(parents), dtype=bool)
    has_child[parents[1:]] = True
    feeds = (~has_child).astype(np.int64)
    for j in range(len(parents) - 1, 0, -1):
        feeds[parents[j]] += feeds[j]
    return feeds


def airways(anat: Anatomy) -> Vessels:
    """Main bronchi from the carina to each hilum, as capsules."""
    s = anat.size
    z_c = anat.z_top - CARINA_T * CHEST_LENGTH_MM
    sec = sections(anat, z_c + 1.0)
    tr = sec.trachea
    y_c = tr.cy if tr is not None else BODY_CY
    p0 = np.array([[0.0, y_c, z_c], [0.0, y_c, z_c]])
    p1 = np.array(
        [
            [-44.0 * s, BODY_CY - 8.0 * s, z_c - 26.0 * s],
            [44.0 * s, BODY_CY - 6.0 * s, z_c - 34.0 * s],
        ]
    )
    return Vessels(p0, p1, np.array([6.5 * s, 6.0 * s]))

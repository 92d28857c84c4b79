"""Ellipses in patient millimetres and the pixel grids they are painted on.

Everything the phantoms draw is a union of (rotated) ellipses cut per slice; a grid answers which
pixels of a box an ellipse covers, with numpy inside bounding boxes and no per-pixel loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

F32 = NDArray[np.float32]
Mask = NDArray[np.bool_]
Box = tuple[slice, slice]


@dataclass(frozen=True)
class Ellipse:
    """An (optionally rotated) ellipse in patient x/y millimetres."""

    cx: float
    cy: float
    ax: float
    ay: float
    angle: float = 0.0

    def grow(self, d: float) -> Ellipse:
        return Ellipse(self.cx, self.cy, max(self.ax + d, 0.1), max(self.ay + d, 0.1), self.angle)

    def contains(self, x: float, y: float, grow: float = 0.0) -> bool:
        """Whether (x, y) lies inside the ellipse grown (or, negative, shrunk) by ``grow`` mm."""
        dx, dy = x - self.cx, y - self.cy
        if self.angle:
            c, s = math.cos(self.angle), math.sin(self.angle)
            dx, dy = dx * c + dy * s, -dx * s + dy * c
        ax, ay = max(self.ax + grow, 0.1), max(self.ay + grow, 0.1)
        return (dx / ax) ** 2 + (dy / ay) ** 2 <= 1.0

    def half_extent(self) -> tuple[float, float]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        return math.hypot(self.ax * c, self.ay * s), math.hypot(self.ax * s, self.ay * c)


@dataclass(frozen=True)
class Grid:
    """Pixel-centre coordinates (mm) of an image: x along columns, y along rows."""

    x: NDArray[np.float32]
    y: NDArray[np.float32]

    @staticmethod
    def square(n: int, spacing: float) -> Grid:
        c = ((np.arange(n) - (n - 1) / 2.0) * spacing).astype(np.float32)
        return Grid(c, c.copy())

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.y.size), int(self.x.size)

    def box(self, cx: float, cy: float, hx: float, hy: float) -> Box | None:
        """Rows/columns covering the rectangle cx +- hx, cy +- hy (None when off the image)."""
        cols = _index_range(self.x, cx - hx, cx + hx)
        rows = _index_range(self.y, cy - hy, cy + hy)
        if cols is None or rows is None:
            return None
        return rows, cols

    def ellipse(self, e: Ellipse) -> tuple[Box, Mask] | None:
        """Bounding box and inside-mask of an ellipse."""
        hx, hy = e.half_extent()
        box = self.box(e.cx, e.cy, hx, hy)
        if box is None:
            return None
        return box, self.q(e, box) <= 1.0

    def q(self, e: Ellipse, box: Box) -> F32:
        """Squared normalised radius of every pixel in ``box`` (1 on the outline)."""
        dx = self.x[box[1]] - np.float32(e.cx)
        dy = self.y[box[0]] - np.float32(e.cy)
        ax, ay = np.float32(e.ax), np.float32(e.ay)
        if e.angle == 0.0:
            q = ((dx / ax) ** 2)[None, :] + ((dy / ay) ** 2)[:, None]
            return q.astype(np.float32, copy=False)
        c, s = np.float32(math.cos(e.angle)), np.float32(math.sin(e.angle))
        u = dx[None, :] * c + dy[:, None] * s
        v = dy[:, None] * c - dx[None, :] * s
        return ((u / ax) ** 2 + (v / ay) ** 2).astype(np.float32, copy=False)


def _index_range(coords: NDArray[np.float32], lo: float, hi: float) -> slice | None:
    step = float(coords[1] - coords[0])
    first = max(math.floor((lo - float(coords[0])) / step), 0)
    last = min(math.ceil((hi - float(coords[0])) / step) + 1, coords.size)
    return slice(first, last) if last > first else None

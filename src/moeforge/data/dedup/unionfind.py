"""Vectorized union-find over a NumPy parent array, shared by the near-duplicate searches.

``parent[x] <= x`` always holds, so a component's root is its lowest index and hooking never makes a
cycle. :func:`union` joins whole arrays of pairs at once; trees stay shallow because every hooked root is
flattened straight away (a chain of pairs (0, 1), (1, 2), … would otherwise grow one level per pair).
"""

from __future__ import annotations

import numpy as np

__all__ = ["find", "flatten", "flatten_nodes", "union"]


def find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Roots of ``x`` by pointer jumping, pointing ``x`` at them."""
    root = parent[x]
    while True:
        up = parent[root]
        if np.array_equal(up, root):
            break
        root = up
    parent[x] = root
    return root


def flatten_nodes(parent: np.ndarray, nodes: np.ndarray) -> None:
    """Point each of ``nodes`` at its root: O(log depth) passes over ``nodes``."""
    while True:
        up = parent[nodes]
        upup = parent[up]
        if np.array_equal(up, upup):
            return
        parent[nodes] = upup


def union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the components of ``a[i]`` and ``b[i]`` for every ``i``."""
    while len(a):
        ra, rb = find(parent, a), find(parent, b)
        differ = ra != rb
        lo, hi = np.minimum(ra[differ], rb[differ]), np.maximum(ra[differ], rb[differ])
        np.minimum.at(parent, hi, lo)  # of several pairs sharing ``hi`` one wins; the rest loop again
        flatten_nodes(parent, hi)
        a, b = lo, hi


def flatten(parent: np.ndarray, chunk: int = 1 << 20) -> None:
    """Point every entry at its root, a chunk at a time in index order (parents are lower indices, so
    earlier chunks are already flat when a later one is processed)."""
    for s in range(0, len(parent), chunk):
        part = parent[s : s + chunk]
        while True:
            up = parent[part]
            if np.array_equal(up, part):
                break
            part[:] = up

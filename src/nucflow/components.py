"""Global connected components of a chunked binary mask with a graph of two tasks per block.

``dask_image.ndmeasure.label`` builds a graph whose size grows with every block face and relabels
the whole array; for keep-or-drop decisions on whole components (small objects, holes) we need
much less. Each block is labelled locally with scipy (one task), reporting its component sizes,
its faces and which components touch the image border; one small task joins components across
block faces (sparse connected components); a second pass per block recomputes the block after
the join, relabels it locally (scipy's labelling is deterministic) and keeps the components the
decision selected. Exact on any chunking.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.graph_manipulation import bind
from scipy import ndimage, sparse

__all__ = ["select_components", "after", "HOLD_BYTES"]

#: Up to this size a stack's blocks may wait in memory for a global step (a join, a
#: background) that a second pass needs; larger stacks have them recomputed after it, so
#: memory does not grow with the stack (:func:`after`).
HOLD_BYTES = 160 * 2**20


def after(array: da.Array, dependency: Any, name: str) -> da.Array:
    """``array`` for use once ``dependency`` is computed: itself if small, else a recomputed clone.

    Holding every block of a large array until a global step is done would make memory grow
    with the stack; a clone bound to the dependency is computed block by block afterwards.
    """
    if array.nbytes <= HOLD_BYTES:
        return array
    return bind(array, dependency, seed=tokenize(array, name))


# decide(sizes, touches_border) -> keep flags, one per global component
Decision = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    return ndimage.generate_binary_structure(ndim, connectivity)


def _summarize(
    block: np.ndarray, *, grid: tuple[int, ...], connectivity: int, block_id: tuple[int, ...]
) -> np.ndarray:
    """One block's summary, in a one-element object array (one element per block)."""
    index = block_id
    labels, count = ndimage.label(block, structure=_structure(block.ndim, connectivity))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    border = np.zeros(count + 1, bool)
    for axis in range(block.ndim):
        if index[axis] == 0:
            border[np.take(labels, 0, axis=axis)] = True
        if index[axis] == grid[axis] - 1:
            border[np.take(labels, -1, axis=axis)] = True
    faces = {
        axis: (np.take(labels, 0, axis=axis), np.take(labels, -1, axis=axis))
        for axis in range(block.ndim)
    }
    summary = np.empty((1,) * block.ndim, dtype=object)
    summary[(0,) * block.ndim] = (count, sizes, border[1:], faces)
    return summary


def _join(
    summaries: np.ndarray, grid: tuple[int, ...], connectivity: int, decide: Decision
) -> dict:
    """Per block, a lookup local label -> keep (index 0 is the block's background)."""
    offsets, start = {}, 0
    for index in itertools.product(*map(range, grid)):
        offsets[index] = start
        start += summaries[index][0]
    sizes = np.concatenate([summaries[i][1] for i in offsets]) if start else np.zeros(0, np.int64)
    border = np.concatenate([summaries[i][2] for i in offsets]) if start else np.zeros(0, bool)
    rows, cols = [], []
    for index in offsets:
        for axis in range(len(grid)):
            if index[axis] + 1 >= grid[axis]:
                continue
            after = tuple(i + (a == axis) for a, i in enumerate(index))
            low = summaries[index][3][axis][1]
            high = summaries[after][3][axis][0]
            for a, b in _touching(low, high, connectivity):
                rows.append(a + offsets[index] - 1)
                cols.append(b + offsets[after] - 1)
    graph = sparse.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(start, start))
    _, component = sparse.csgraph.connected_components(graph, directed=False)
    total_size = np.bincount(component, weights=sizes, minlength=component.max(initial=-1) + 1)
    touches = np.bincount(component, weights=border, minlength=total_size.size) > 0
    keep = np.asarray(decide(total_size.astype(np.int64), touches), bool)
    return {
        index: np.concatenate(
            [[False], keep[component[offsets[index] : offsets[index] + summaries[index][0]]]]
        )
        for index in offsets
    }


def _touching(low: np.ndarray, high: np.ndarray, connectivity: int) -> set[tuple[int, int]]:
    """Pairs of labels on two facing block faces that are neighbours under ``connectivity``."""
    pairs = set()
    ndim = low.ndim
    # neighbours across the face: same position, or shifted in the face plane up to
    # connectivity - 1 further axes (connectivity counts the axes that may differ by one)
    for shift in itertools.product((-1, 0, 1), repeat=ndim):
        if sum(map(abs, shift)) > connectivity - 1:
            continue
        a = low[
            tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, low.shape, strict=True))
        ]
        b = high[
            tuple(slice(max(0, s), n - max(0, -s)) for s, n in zip(shift, high.shape, strict=True))
        ]
        both = (a > 0) & (b > 0)
        pairs.update(zip(a[both].tolist(), b[both].tolist(), strict=True))
    return pairs


def _apply(
    block: np.ndarray, tables: dict, *, connectivity: int, block_id: tuple[int, ...]
) -> np.ndarray:
    labels, _ = ndimage.label(block, structure=_structure(block.ndim, connectivity))
    return tables[block_id][labels]


def select_components(mask: da.Array, decide: Decision, *, connectivity: int = 1) -> da.Array:
    """Keep the connected components of ``mask`` that ``decide`` selects, lazily.

    Parameters
    ----------
    mask : (M, N[, P]) dask array of bool
    decide : callable
        ``decide(sizes, touches_border) -> keep``: arrays with one entry per global component
        (voxel count; whether it touches the image border).
    connectivity : int
        1 (faces) to ``mask.ndim`` (corners), as in ``scipy.ndimage.generate_binary_structure``.

    Returns
    -------
    (M, N[, P]) dask array of bool
        True where a kept component lies.
    """
    grid = tuple(len(c) for c in mask.chunks)
    ndim = mask.ndim
    # Blockwise layers, not one delayed call per block: those each carry a copy of their
    # block's upstream graph, which made the graph grow with the square of the block count.
    summaries = mask.map_blocks(
        _summarize,
        grid=grid,
        connectivity=connectivity,
        chunks=tuple((1,) * n for n in grid),
        dtype=object,
        meta=np.empty((0,) * ndim, object),
    )
    tables = dask.delayed(_join, pure=True)(summaries, grid, connectivity, decide)
    # The second pass needs the join: large masks are recomputed block by block after it.
    again = after(mask, tables, "select_components")
    return again.map_blocks(
        _apply, tables, connectivity=connectivity, dtype=bool, meta=np.empty((0,) * ndim, bool)
    )

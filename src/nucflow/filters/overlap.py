"""The overlap engine: checked steps run in order as ONE pass over the blocks, each block with
the summed halo of its steps.

:func:`chain` works on a dask array (``map_overlap``); :func:`chain_read` and
:class:`BlockFilter` on a stored image, each block reading its own halo from the source.
Chunks smaller than the halo are merged until every chunk is at least the halo, and
``boundary="none"`` lets scipy's own edge mode act only at the true image edge, so each
output voxel is computed from exactly the same input voxels in the same order as in the
whole-array call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import dask.array as da
import numpy as np

from nucflow.errors import ParameterError
from nucflow.filters._checks import _as_image
from nucflow.filters.steps import (
    STEPS,
    Step,
    _checked,
    _checked_steps,
    _step_depth,
    _unresolved,
)


def _grow_chunks(chunks: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Merge neighbouring chunks until each is >= depth (a halo comes from one neighbour)."""
    if depth == 0 or all(c >= depth for c in chunks):
        return chunks
    out: list[int] = []
    acc = 0
    for c in chunks:
        acc += c
        if acc >= depth:
            out.append(acc)
            acc = 0
    if acc:
        if out:
            out[-1] += acc
        else:
            out.append(acc)
    return tuple(out)


def _run_steps(block: np.ndarray, *, steps: tuple[tuple[str, dict], ...]) -> np.ndarray:
    for name, params in steps:
        out = STEPS[name].block(block, **params)
        if out.shape != block.shape:  # a kernel broke the contract: say which, not numpy's why
            raise RuntimeError(
                f"filter step {name!r} returned a block of shape {out.shape} for one of shape "
                f"{block.shape}; a step must keep the shape of its block"
            )
        block = out
    return block


def _overlap(image: da.Array, steps: Sequence[tuple[str, dict]]) -> da.Array:
    """Run checked steps in order as ONE map_overlap with the summed depth."""
    ndim = image.ndim
    depth = tuple(sum(d) for d in zip(*(_step_depth(n, ndim, p) for n, p in steps), strict=True))
    chunks = tuple(_grow_chunks(c, d) for c, d in zip(image.chunks, depth, strict=True))
    if chunks != image.chunks:
        image = image.rechunk(chunks)
    # One chunk on an axis means the true edge is on both sides: no halo needed there.
    depth = tuple(0 if len(c) == 1 else d for c, d in zip(chunks, depth, strict=True))
    func = partial(_run_steps, steps=tuple(steps))
    # The output dtype comes from a 1-voxel trial run so it always matches the kernels.
    dtype = func(np.zeros((1,) * ndim, image.dtype)).dtype
    return image.map_overlap(
        func,
        depth=depth,
        boundary="none",
        trim=True,
        dtype=dtype,
        meta=np.empty((0,) * ndim, dtype),
    )


def _filter(name: str, image: Any, kinds: str = "uif", **params: Any) -> da.Array:
    image = _as_image(image, kinds=kinds)
    return _overlap(image, _resolved(image, [(name, _checked(name, image.ndim, params))]))


def _resolved(image: da.Array, steps: Sequence[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Fill each step's whole-stack parameters (e.g. a noise level) from its own input.

    A step after others is resolved on the lazily filtered output of the steps before it:
    one extra pass over them, never a per-block estimate.
    """
    out: list[tuple[str, dict]] = []
    for name, params in steps:
        if _unresolved(name, params):
            step_input = _overlap(image, out) if out else image
            resolve = STEPS[name].resolve
            assert resolve is not None  # _unresolved: only steps with a resolve get here
            params = resolve(step_input, params)
        out.append((name, params))
    return out


def chain(image: da.Array, steps: Sequence[Step]) -> da.Array:
    """Apply several filters in order as ONE ``map_overlap``.

    Parameters
    ----------
    image : (M, N[, P]) dask array
    steps : sequence of (str, dict)
        E.g. ``[("gaussian", {"sigma": 1.0}), ("white_tophat", {"footprint": fp})]``; names
        are keys of :data:`STEPS`, dicts the keyword arguments of the filter of that name.

    Returns
    -------
    out : (M, N[, P]) dask array
        Equal to applying the whole-array functions in order. The halo is the sum of the
        steps' :func:`depth_of`.
    """
    image = _as_image(image, kinds="buif")
    return _overlap(image, _resolved(image, _checked_steps(steps, image.ndim)))


def chain_read(
    source: Any,
    steps: Sequence[Step],
    *,
    chunks: Sequence[int],
    region: Sequence[slice] | None = None,
    check: Callable[[np.ndarray, tuple[slice, ...]], None] | None = None,
) -> da.Array:
    """:func:`chain` on a stored image, each block reading its own halo from the source.

    Equal to ``chain(da.from_array(source)[region], steps)``, but every block is one task that
    reads its core plus the summed depth (clipped at the region's edges, where the filters'
    edge modes then apply as on the whole region): no block waits in memory for its
    neighbours, whatever the number of blocks.

    Parameters
    ----------
    source : array-like
        ``shape``, ``dtype`` and ``source[tuple of slices] -> ndarray``, e.g.
        :attr:`nucflow.io.Stack.reader`; picklable when computed on other processes.
    steps : sequence of (str, dict)
        As for :func:`chain`.
    chunks : sequence of int
        Block shape of the result.
    region : sequence of slice, optional
        The part of ``source`` to filter (default: all of it).
    check : callable, optional
        Called as ``check(core_voxels, core_slices_in_source)`` on each block's own voxels
        before filtering (to refuse bad input naming the block).

    Returns
    -------
    out : dask array, shaped like ``region``
    """
    ndim = len(source.shape)
    region = tuple(region or (slice(0, n) for n in source.shape))
    block = BlockFilter.of(steps, ndim, source.dtype)
    shape = tuple(r.stop - r.start for r in region)
    return da.map_blocks(
        _read_and_run,
        source=source,
        region=region,
        block=block,
        check=check,
        chunks=da.core.normalize_chunks(tuple(chunks), shape),
        dtype=block.dtype,
        meta=np.empty((0,) * ndim, block.dtype),
    )


@dataclass(frozen=True)
class BlockFilter:
    """A checked chain of steps, run on one block read with its halo from a stored source.

    Build with :meth:`of`; call :meth:`read` in a task. Picklable (plain steps and arrays).
    """

    steps: tuple[tuple[str, dict], ...]
    depth: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, steps: Sequence[Step], ndim: int, dtype: Any) -> BlockFilter:
        """Check ``steps`` (as :func:`chain`; none: read as is) for ``ndim``-D ``dtype`` input."""
        checked = tuple(_checked_steps(steps, ndim)) if steps else ()
        for name, params in checked:
            if _unresolved(name, params):
                missing = sorted(k for k, v in params.items() if v is None)
                raise ParameterError(
                    f"step {name!r} on a stored source needs {missing} given: a block cannot "
                    "estimate whole-stack values (chain() on a dask array estimates them)"
                )
        depths = [_step_depth(n, ndim, p) for n, p in checked] or [(0,) * ndim]
        depth = tuple(sum(d) for d in zip(*depths, strict=True))
        # The output dtype comes from a 1-voxel trial run so it always matches the kernels.
        out = _run_steps(np.zeros((1,) * ndim, dtype), steps=checked).dtype
        return cls(checked, depth, out)

    def read(
        self,
        source: Any,
        core: tuple[slice, ...],
        *,
        region: tuple[slice, ...] | None = None,
        check: Callable[[np.ndarray, tuple[slice, ...]], None] | None = None,
    ) -> np.ndarray:
        """The filtered voxels of ``core`` (coordinates within ``region`` of ``source``).

        Reads ``core`` plus :attr:`depth`, clipped to ``region`` (default: all of
        ``source``), where the filters' own edge modes then act as on the whole region.
        """
        region = tuple(region or (slice(0, n) for n in source.shape))
        lo = [max(0, c.start - d) for c, d in zip(core, self.depth, strict=True)]
        hi = [
            min(r.stop - r.start, c.stop + d)
            for c, d, r in zip(core, self.depth, region, strict=True)
        ]
        box = tuple(slice(r.start + a, r.start + b) for r, a, b in zip(region, lo, hi, strict=True))
        data = np.asarray(source[box])
        inner = tuple(slice(c.start - p, c.stop - p) for c, p in zip(core, lo, strict=True))
        if check is not None:
            where = tuple(
                slice(r.start + c.start, r.start + c.stop)
                for r, c in zip(region, core, strict=True)
            )
            check(data[inner], where)
        return _run_steps(data, steps=self.steps)[inner]


def _read_and_run(
    *,
    source: Any,
    region: tuple,
    block: BlockFilter,
    check: Callable | None,
    block_info: dict,
) -> np.ndarray:
    core = tuple(slice(a, b) for a, b in block_info[None]["array-location"])
    return block.read(source, core, region=region, check=check)

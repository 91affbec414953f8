"""Passes over a stack's blocks whose memory does not depend on the stack's size.

A pass is one task per block. Each task reads what it needs (its block, plus a halo) from
stored inputs, writes its block of a stored output and returns a small summary (a minimum,
a histogram, component sizes). No task waits for another's pixels, so a worker holds one
block and its halo whatever the order in which the scheduler runs the tasks, and a worker
lost mid-pass (a SLURM job reaching its walltime) loses only the tasks it was running: the
blocks already written stay on disk.

The graph is built by hand, one key per task (``dask.delayed`` costs ~30 µs a call, which is
seconds for the hundred thousand blocks of a dense terabyte).
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

__all__ = ["Grid", "padded", "pass_graph", "fmt_region"]

Region = tuple[slice, ...]


@dataclass(frozen=True)
class Grid:
    """Blocks of ``chunks`` voxels tiling ``shape`` (the last block of an axis may be short).

    With ``phase``, block boundaries fall where ``coordinate + phase`` is a multiple of the
    chunk (the first block of an axis is short): a region of a stack starting at ``offset``
    then has the blocks of the stack's own grid, ``phase = offset % chunks``, so a pass writing
    a stack-sized array chunked like the grid writes whole chunks only (no two tasks share one).
    """

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    phase: tuple[int, ...] | None = None

    def _phase(self) -> tuple[int, ...]:
        return self.phase or (0,) * len(self.shape)

    @property
    def counts(self) -> tuple[int, ...]:
        """Blocks per axis."""
        return tuple(
            math.ceil((n + p) / c)
            for n, c, p in zip(self.shape, self.chunks, self._phase(), strict=True)
        )

    def __len__(self) -> int:
        return math.prod(self.counts)

    def blocks(self) -> Iterator[tuple[tuple[int, ...], Region]]:
        """(grid index, core slices) of every block, in C order."""
        for index in itertools.product(*map(range, self.counts)):
            yield index, self.core(index)

    def core(self, index: Sequence[int]) -> Region:
        """The voxels block ``index`` owns."""
        return tuple(
            slice(max(0, i * c - p), min((i + 1) * c - p, n))
            for i, c, n, p in zip(index, self.chunks, self.shape, self._phase(), strict=True)
        )

    def index_of(self, core: Region) -> tuple[int, ...]:
        """The grid index of the block whose core is ``core``."""
        return tuple(
            (s.start + p) // c for s, c, p in zip(core, self.chunks, self._phase(), strict=True)
        )

    def neighbours_above(self, index: Sequence[int]) -> Iterator[tuple[int, tuple[int, ...]]]:
        """(axis, index) of the blocks one step further along each axis, where they exist."""
        for axis, count in enumerate(self.counts):
            if index[axis] + 1 < count:
                yield axis, tuple(i + (a == axis) for a, i in enumerate(index))


def padded(core: Region, halo: Sequence[int], shape: Sequence[int]) -> Region:
    """``core`` grown by ``halo`` voxels per side, clipped to ``shape``."""
    return tuple(
        slice(max(0, c.start - h), min(n, c.stop + h))
        for c, h, n in zip(core, halo, shape, strict=True)
    )


def fmt_region(region: Region) -> str:
    """``[0:64, 0:256, 256:512]``: how messages name a block."""
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in region) + "]"


def pass_graph(tasks: Sequence[Callable[[], Any]], name: str = "pass") -> Delayed:
    """One graph key per task (a no-argument callable), gathered into one list.

    Parameters
    ----------
    tasks : sequence of callables
        Usually :func:`functools.partial` objects of module-level functions, so that process
        and SLURM workers can unpickle them.
    name : str
        Prefix of the keys (shown on the dashboard).

    Returns
    -------
    dask.delayed.Delayed
        Computes to ``[task() for task in tasks]``.
    """
    token = f"{name}-{uuid.uuid4().hex}"
    layer: dict[Any, Any] = {(token, i): (task,) for i, task in enumerate(tasks)}
    layer[token] = (list, [(token, i) for i in range(len(tasks))])
    return Delayed(token, HighLevelGraph.from_collections(token, layer, dependencies=()))

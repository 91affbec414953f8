"""The mask stage: detection and opening in one pass, then hole filling and small-object
removal as global component selections (block components, a join, a keep pass)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from nucflow import (
    components,
    filters,
    stages,
)
from nucflow.blockpass import Grid, Region, pass_graph
from nucflow.config import Params
from nucflow.pipeline.rundir import Run
from nucflow.pipeline.store import filter_pass, reuse, same_as, same_path, store_blocks
from nucflow.pipeline.threshold import Above, Detected
from nucflow.stages import Result


def clean_mask(run: Run, found: Above | Detected) -> zarr.Array:
    """Foreground mask: detection, opening, hole filling, small-object removal (bool).

    Detection (:func:`foreground`) and the opening are one pass; hole filling and small-object
    removal are
    global (a hole or an object may span blocks) and each runs as three passes over the
    stored mask before it (:func:`select_components`).
    """
    p = run.params
    steps: list[tuple[str, dict[str, Any]]] = []
    if p.mask.opening_radius > 0:
        steps.append(
            ("opening", {"footprint": filters.ellipsoid(p.mask.opening_radius, p.voxel_size)})
        )
    grid = Grid(found.shape, p.chunks)
    mask = filter_pass(run, stages.OPENED.name, found, steps, grid, label="foreground")
    if p.mask.fill_holes:
        mask = select_components(
            run, stages.FILLED.name, mask, _touches_border, invert=True, labels=_HOLES
        )
    if p.min_voxels > 0:
        decide = partial(_larger, limit=p.min_voxels)
        mask = select_components(run, stages.MASK.name, mask, decide, labels=_SPECKS)
    return mask


# The progress labels of a selection's three passes: one label per pass of a stage, so no two
# lines of the mask stage look alike.
_HOLES = ("holes find", "holes join", "holes fill")
_SPECKS = ("small objects find", "small objects join", "small objects remove")


def _touches_border(_sizes: np.ndarray, touches_border: np.ndarray) -> np.ndarray:
    return touches_border


def _larger(sizes: np.ndarray, _touches_border: np.ndarray, *, limit: int) -> np.ndarray:
    return sizes > limit


def select_components(
    run: Run,
    name: str,
    source: zarr.Array,
    decide: components.Decision,
    *,
    invert: bool = False,
    labels: tuple[str, str, str] | None = None,
) -> zarr.Array:
    """The components of a stored mask that ``decide`` keeps, stored as ``.work/<name>.zarr``.

    Three passes (see :class:`nucflow.components.BlockComponents`): each block labels itself,
    decides the components that lie wholly inside it, reports the others' sizes and stores
    its faces in ``.work/<name>.faces/``; each block matches its faces with its upper
    neighbours'; the driver joins the crossing components (its memory grows with their
    number: ~40 bytes each, those touching a block face); each block writes what is kept.
    With ``invert``, the components of ``~source`` are selected and the result is inverted
    (hole filling keeps the background that touches the image border).

    When every component is kept, the third pass is skipped: the result is ``source`` itself
    and ``.work/<name>.same`` says so (to ``--resume``). ``labels`` name the three passes in
    the progress lines (default ``<name> find``, ``<name> join``, ``<name> keep``).
    """
    find, join, keep_label = labels or (f"{name} find", f"{name} join", f"{name} keep")
    stored = reuse(run, name, source=source)
    if stored is not None:
        return stored
    same_path(run, name).unlink(missing_ok=True)
    grid = Grid(tuple(source.shape), run.params.chunks)
    faces = run.work / f"{name}.faces"
    faces.mkdir(exist_ok=True)
    blocks = [index for index, _ in grid.blocks()]
    summarize = [
        partial(
            _summarize_task,
            index,
            source=source,
            grid=grid,
            invert=invert,
            faces=faces,
            decide=decide,
        )
        for index in blocks
    ]
    (found,) = run.runner.compute(pass_graph(summarize, f"{name}-summaries"), label=find)
    summaries = [summary for summary, _ in found]
    match = [partial(_match_task, index, faces=faces, grid=grid) for index in blocks]
    (matched,) = run.runner.compute(pass_graph(match, f"{name}-faces"), label=join)
    shutil.rmtree(faces, ignore_errors=True)
    where = [(axis, index) for index in blocks for axis, _ in grid.neighbours_above(index)]
    pairs = [p for per_block in matched for p in per_block]
    keep = components.join(summaries, pairs, blocks=blocks, where=where, decide=decide)
    keeps_all = {
        index: own and bool(keep[index][1:].all())
        for index, (_, own) in zip(blocks, found, strict=True)
    }
    if all(keeps_all.values()):
        # Every component kept (no hole, no small object: the usual case with the local
        # detection): the result is the source, and the pass that would copy it is skipped.
        return same_as(run, name, source, label=keep_label)
    compute = partial(_kept_task, decide=decide, source=source, grid=grid, invert=invert)
    per_block = {
        index: {"keep": table, "keeps_all": keeps_all[index]} for index, table in keep.items()
    }
    return store_blocks(
        run, name, grid, bool, compute, label=keep_label, reusable=False, per_block=per_block
    )


def _block_components(
    index: tuple[int, ...], source: zarr.Array, grid: Grid, invert: bool
) -> components.BlockComponents:
    block = np.asarray(source[grid.core(index)], dtype=bool)
    return components.BlockComponents(
        ~block if invert else block, components.block_edges(index, grid.counts), 1
    )


def _face_file(faces: Path, index: tuple[int, ...]) -> Path:
    return faces / ("_".join(map(str, index)) + ".npz")


def _summarize_task(
    index: tuple[int, ...],
    *,
    source: zarr.Array,
    grid: Grid,
    invert: bool,
    faces: Path,
    decide: components.Decision,
) -> tuple[tuple[int, np.ndarray, np.ndarray], bool]:
    """The block's crossing components (for the join), and whether it keeps all its own."""
    found = _block_components(index, source, grid, invert)
    faces_of: dict[str, Any] = found.faces()  # names -> arrays (not savez's own keywords)
    np.savez_compressed(_face_file(faces, index), **faces_of)
    return found.summary(), found.keeps_own(decide)


def _match_task(index: tuple[int, ...], *, faces: Path, grid: Grid) -> list[np.ndarray]:
    with np.load(_face_file(faces, index)) as own:
        out = []
        for axis, above in grid.neighbours_above(index):
            with np.load(_face_file(faces, above)) as other:
                out.append(components.face_pairs(own[f"{axis}hi"], other[f"{axis}lo"], 1))
    return out


def _kept_task(
    core: Region,
    *,
    source: zarr.Array,
    grid: Grid,
    invert: bool,
    keep: np.ndarray,
    decide: components.Decision,
    keeps_all: bool,
) -> np.ndarray:
    if keeps_all:  # the block as it is: no labelling
        return np.asarray(source[core], dtype=bool)
    kept = _block_components(grid.index_of(core), source, grid, invert).kept(keep, decide)
    return ~kept if invert else kept


def _results(p: Params, _shape: tuple[int, ...]) -> tuple[Result, ...]:
    if not stages.builtin_segmentation(p):
        return ()
    return (
        stages.OPENED,
        *((stages.FILLED,) if p.mask.fill_holes else ()),
        *((stages.MASK,) if p.min_voxels > 0 else ()),
    )


def _body(run: Run, inputs: Mapping[str, Any]) -> zarr.Array | None:
    if not stages.builtin_segmentation(run.params):
        return None  # a python segmenter makes its objects from the image
    return clean_mask(run, inputs["threshold"])


STAGE = stages.Stage("mask", ("preprocess", "threshold"), _results, body=_body, per_timepoint=True)
"""Detection and opening, hole filling, small-object removal."""

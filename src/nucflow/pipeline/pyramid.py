"""The pyramid stage: levels 1, 2, … of ``labels.ome.zarr``."""

from __future__ import annotations

import zarr

from nucflow import (
    fingerprint,
    stages,
)
from nucflow.pipeline.rundir import Run


def pyramid(run: Run) -> None:
    """Levels 1, 2, … of ``labels.ome.zarr`` (:mod:`nucflow.pyramid`): one pass per level.

    Each level is read from the stored level before it, over the data region only (labels are
    0 elsewhere). Blocks an earlier attempt finished (marks in ``.work/pyramid/``) are skipped
    on ``--resume`` when the labels are the ones it downsampled (same fingerprint chain).
    """
    from nucflow import pyramid as pyramid_levels

    marks = run.work / "pyramid"
    keep = fingerprint.reusable(run, stages.PYRAMID.name, marks)
    fingerprint.record(
        run, stages.PYRAMID.name
    )  # before any block: every mark from now on is of it
    path = run.output / "labels.ome.zarr"
    # The stored label image's shape: with a leading time axis, level factors are 1 on it and
    # every time point is covered (each has a data region of its own).
    shape = tuple(zarr.open_array(str(path / "0"), mode="r").shape)
    region = run.region if len(shape) == len(run.region) else None
    factors = pyramid_levels.level_factors(shape, run.params.voxel_size)
    shapes = pyramid_levels.build(
        run.runner, path, factors, method="nearest", region=region, marks=marks, keep=keep
    )
    run.facts["pyramid_shapes"] = [list(s) for s in shapes]

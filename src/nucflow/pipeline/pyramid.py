"""The pyramid stage: levels 1, 2, … of ``labels.ome.zarr``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import zarr

from nucflow import (
    fingerprint,
    stages,
)
from nucflow import pyramid as pyramid_levels
from nucflow.config import Params
from nucflow.pipeline.rundir import Run
from nucflow.stages import Result


def pyramid(run: Run) -> None:
    """Levels 1, 2, … of ``labels.ome.zarr`` (:mod:`nucflow.pyramid`): one pass per level.

    Each level is read from the stored level before it, over the data region only (labels are
    0 elsewhere). Blocks an earlier attempt finished (marks in ``.work/pyramid/``) are skipped
    on ``--resume`` when the labels are the ones it downsampled (same fingerprint chain).
    """
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


def _results(p: Params, shape: tuple[int, ...]) -> tuple[Result, ...]:
    levels = len(pyramid_levels.level_factors(shape, p.voxel_size))
    return (replace(stages.PYRAMID, passes=tuple(f"level{k}" for k in range(1, levels + 1))),)


def _body(run: Run, _inputs: Mapping[str, Any]) -> None:
    pyramid(run)


STAGE = stages.Stage("pyramid", ("segment",), _results, body=_body)
"""The label image's coarser levels, once for the whole label image (every time point)."""

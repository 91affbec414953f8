"""The table stage: each nucleus' row made by the block owning its seed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nucflow import (
    fingerprint,
    objects,
    stages,
)
from nucflow import table as table_stage
from nucflow.config import Params
from nucflow.pipeline.rundir import Run, calibrated
from nucflow.pipeline.segment import label_image, object_reach, segment_grid
from nucflow.pipeline.store import region_shape
from nucflow.stages import Result


def table(run: Run) -> table_stage.Table:
    """One row per nucleus, made final by the block owning its seed (:mod:`nucflow.table`).

    The driver holds counts and a sample of at most ``table.QC_SAMPLE_ROWS`` rows. With
    ``measure.drop_border``, the owner leaves out its nuclei touching the border, and a pass
    over the blocks near the border erases them from ``labels.ome.zarr``
    (:func:`nucflow.table.clear_border`).
    """
    p = run.params
    shape = region_shape(run.region)
    grid = segment_grid(run, shape)
    reach = object_reach(p)
    labels = label_image(run, mode="r+")
    measured = table_stage.Objects(
        object_spec(run), labels, table_stage.intensity_readers(run.stack, p.measure.channels)
    )
    made = table_stage.gather(
        run.runner,
        grid,
        sums=run.work / "blocks",
        out=run.work / "table",
        offset=run.offset,
        full_shape=tuple(run.stack.data.shape),
        reach=reach,
        finalize={
            "voxel_size": p.voxel_size,
            "shape": shape,
            "origin": run.offset,
            "max_radius": _truncation_limit(p),
            "channel_suffixes": table_stage.channel_suffixes(p.measure.channels),
            "label_dtype": str(labels.dtype),
        },
        metadata=table_stage.metadata(
            p, calibrated=calibrated(run), channel=run.config.get("channel")
        ),
        measured=measured,
        drop_border=p.measure.drop_border,
    )
    if p.measure.drop_border:
        fingerprint.forget(
            run, stages.SEGMENT.name
        )  # the labels are no longer the segmentation's alone
        table_stage.clear_border(
            run.runner, grid, labels=labels, out=run.work / "table", offset=run.offset, reach=reach
        )
        run.facts["dropped_border"] = made.dropped
    return made


def _truncation_limit(p: Params) -> float:
    """The ``max_radius`` :func:`nucflow.measure.finalize` flags by: the builtin's, or for a
    python segmenter one that only its cut objects' seed distance
    (:data:`nucflow.segmenters.TRUNCATED`) exceeds."""
    return p.segment.max_radius if p.segment.method == "builtin" else 2 * max(p.voxel_size)


def object_spec(run: Run, primary: str = "") -> objects.Spec:
    """The object-level properties of ``measure.properties``, checked against the stack
    (``primary``: the suffix of the input's own channel, :func:`nucflow.table.channel_suffixes`).
    """
    p = run.params
    return objects.Spec.of(
        p.measure.properties,
        ndim=len(p.voxel_size),
        voxel_size=p.voxel_size,
        suffixes=table_stage.channel_suffixes(p.measure.channels, primary),
        settings=objects.Settings(
            p.measure.percentiles, p.measure.shell_width, p.measure.neighbour_distance
        ),
    )


def _results(p: Params, _shape: tuple[int, ...]) -> tuple[Result, ...]:
    neighbours = (stages.NEIGHBOURS,) if objects.cross_block(p.measure.properties) else ()
    return (stages.TABLE, *neighbours, *((stages.BORDER,) if p.measure.drop_border else ()))


def _body(run: Run, _inputs: Mapping[str, Any]) -> table_stage.Table:
    return table(run)


STAGE = stages.Stage("table", ("segment", "input"), _results, body=_body, per_timepoint=True)
"""One row per nucleus, by the block owning its seed."""

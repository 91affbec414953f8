"""The preprocess flow (`nucflow run --flow preprocess`): the `filter.steps` chain as one
overlapped pass, written as OME-Zarr to `<output>/filtered.ome.zarr`.

Example: the seed recipe "closing 5×5 then opening 2×2" on a 2D image is
`--set 'filter.steps=[{closing: {size: [5, 5]}}, {opening: {size: [2, 2]}}]'`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nucflow import flowrun, pipeline, stages

FILTERED = stages.Result("filtered", stored=False)  # the one overlapped pass, as OME-Zarr


def _filter_steps_valid(stack: Any, params: Any) -> None:
    """Every ``filter.steps`` entry names a filter and takes its parameters."""
    stages.configured_steps(params, ndim=stack.data.ndim)


def _filter(job: pipeline.Run, _inputs: Mapping[str, Any]) -> dict[str, Any]:
    path = pipeline.write_stack(job, pipeline.configured_filters(job), "filtered.ome.zarr")
    return {"stack": path.name}


STAGES = (
    stages.Stage(
        "filter",
        ("input",),
        stages.only(FILTERED),
        (_filter_steps_valid,),
        body=_filter,
        one_timepoint="filters",
    ),
)


def run(job: pipeline.Run) -> dict[str, Any]:
    return flowrun.run(job, STAGES)

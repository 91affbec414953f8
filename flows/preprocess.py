"""The preprocess flow (`nucflow run --flow preprocess`): the `filter.steps` chain as one
overlapped pass, written as OME-Zarr to `<output>/filtered.ome.zarr`.

Example: the seed recipe "closing 5×5 then opening 2×2" on a 2D image is
`--set 'filter.steps=[{closing: {size: [5, 5]}}, {opening: {size: [2, 2]}}]'`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nucflow import pipeline, stages
from nucflow.errors import ParameterError

STAGES = stages.PREPROCESS  # checked before the run starts


def check_timepoints(timepoints: Sequence[int] | None) -> None:
    """Refuse several time points (checked before the output is claimed, and by :func:`run`)."""
    if timepoints is not None and len(timepoints) > 1:
        raise ParameterError(
            f"--flow preprocess filters one time point but {len(timepoints)} are selected; "
            "pass one, e.g. --timepoints 0"
        )


def run(job: pipeline.Run) -> dict[str, Any]:
    check_timepoints(job.timepoints)
    with job.stage("filter"):
        path = pipeline.write_stack(job, pipeline.configured_filters(job), "filtered.ome.zarr")
    return pipeline.finish_stack(job, path)

"""The preprocess flow (`nucflow run --flow preprocess`): the `filter.steps` chain as one
overlapped pass, written as OME-Zarr to `<output>/filtered.ome.zarr`.

Example: the seed recipe "closing 5×5 then opening 2×2" on a 2D image is
`--set 'filter.steps=[{closing: {size: [5, 5]}}, {opening: {size: [2, 2]}}]'`.
"""

from __future__ import annotations

from typing import Any

from nucflow import pipeline, stages
from nucflow.errors import ParameterError

STAGES = stages.PREPROCESS  # checked before the run starts


def run(job: pipeline.Run) -> dict[str, Any]:
    if job.timepoints is not None and len(job.timepoints) > 1:
        raise ParameterError(
            f"--flow preprocess filters one time point but {len(job.timepoints)} are selected; "
            "pass one, e.g. --timepoints 0"
        )
    with job.stage("filter"):
        path = pipeline.write_stack(job, pipeline.configured_filters(job), "filtered.ome.zarr")
    return pipeline.finish_stack(job, path)

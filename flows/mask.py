"""The mask flow (`nucflow run --flow mask`): the nuclei flow's first three stages, then the
foreground mask written as OME-Zarr to `<output>/mask.ome.zarr` (uint8, 1 = nucleus).

A small example of a flow: the stages it reuses are `nucflow.pipeline`'s, and the one it adds
is declared here, with its result, its body and what it reads. Plan, ETA, `--resume` and
`nucflow status` follow from the stages, as for the nuclei flow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dask.array as da
import numpy as np

from nucflow import flowrun, pipeline, stages

MASK_OUTPUT = stages.Result("mask-output", stored=False)  # mask.ome.zarr and its levels


def _write_mask(job: pipeline.Run, inputs: Mapping[str, Any]) -> dict[str, Any]:
    stored = inputs["mask"]  # .work's mask, on the run's blocks
    mask = da.from_zarr(stored).astype(np.uint8)
    return {"stack": pipeline.write_stack(job, mask, "mask.ome.zarr").name}


STAGES = (
    *pipeline.NUCLEI[:3],  # preprocess, threshold, mask
    stages.Stage(
        "write", ("mask",), stages.only(MASK_OUTPUT), body=_write_mask, one_timepoint="writes"
    ),
)


def run(job: pipeline.Run) -> dict[str, Any]:
    return flowrun.run(job, STAGES)

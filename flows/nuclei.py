"""The nuclei flow (`nucflow run`): preprocess, detection (local, or a global threshold), mask,
seam-free segmentation, the table, the label pyramid, the outputs.

Every stage is a pass (or a few) from stored inputs to stored outputs under the output's
`.work/`: each task holds one block and its halo, so memory does not grow with the stack, and
`--resume` skips finished stages; segmentation writes labels and per-block sums block by block,
and each nucleus' row is made by the block that owns its seed. A time-lapse runs the stages up
to the table once per selected time point (`nucflow.timelapse.each`), each as if it were a stack
of its own; the label pyramid is then written level by level, once for the whole label image.
The stages are `nucflow.pipeline`'s, one module each.
"""

from __future__ import annotations

from typing import Any

from nucflow import flowrun, pipeline

STAGES = pipeline.NUCLEI


def run(job: pipeline.Run) -> dict[str, Any]:
    return flowrun.run(job, STAGES)

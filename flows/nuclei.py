"""The nuclei flow (`nucflow run`): preprocess, detection (local, or a global threshold), mask,
seam-free segmentation, the table.

Every stage is a pass (or a few) from stored inputs to stored outputs under the output's
`.work/`: each task holds one block and its halo, so memory does not grow with the stack, and
`--resume` skips finished stages; segmentation writes labels and per-block sums block by block,
and each nucleus' row is made by the block that owns its seed.
"""

from __future__ import annotations

from typing import Any

from nucflow import pipeline, progress, stages

STAGES = stages.NUCLEI  # what each stage reads and stores; checked before the run starts


def run(job: pipeline.Run) -> dict[str, Any]:
    progress.expect(job, progress.nuclei_passes(job.params))  # passes per stage, for the ETA
    with job.stage("preprocess"):
        image = pipeline.preprocess(job)
    with job.stage("threshold"):
        found = pipeline.foreground(job, image)
    with job.stage("mask"):
        mask = pipeline.clean_mask(job, found)
    with job.stage("segment"):
        pipeline.segment(job, mask)
    with job.stage("table"):
        table = pipeline.table(job)
    return pipeline.finish(job, table)

"""The nuclei flow (`nucflow run`): preprocess, detection (local, or a global threshold), mask,
seam-free segmentation, the table.

Every stage is a pass (or a few) from stored inputs to stored outputs under the output's
`.work/`: each task holds one block and its halo, so memory does not grow with the stack, and
`--resume` skips finished stages; segmentation writes labels and per-block sums block by block,
and each nucleus' row is made by the block that owns its seed. A time-lapse runs these stages
once per selected time point (`nucflow.timelapse.each`), each as if it were a stack of its own.
"""

from __future__ import annotations

from typing import Any

from nucflow import pipeline, progress, stages, timelapse

STAGES = stages.NUCLEI  # what each stage reads and stores; checked before the run starts


def run(job: pipeline.Run) -> dict[str, Any]:
    progress.expect(job, progress.nuclei_passes(job.params))  # passes per stage, for the ETA
    return pipeline.finish(job, timelapse.each(job, segment))


def segment(job: pipeline.Run) -> pipeline.table_stage.Table:
    """The stages of one stack (one time point of a time-lapse), up to its table."""
    with job.stage("preprocess"):
        image = pipeline.preprocess(job)
    with job.stage("threshold"):
        found = pipeline.foreground(job, image)
    with job.stage("mask"):
        mask = pipeline.clean_mask(job, found)
    with job.stage("segment"):
        pipeline.segment(job, mask)
    with job.stage("table"):
        return pipeline.table(job)

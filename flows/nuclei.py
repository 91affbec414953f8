"""The nuclei flow (`nucflow run`): preprocess, global threshold, mask, seam-free segmentation.

Every stage is a pass (or a few) from stored inputs to stored outputs under the output's
`.work/`: each task holds one block and its halo, so memory does not grow with the stack, and
`--resume` skips finished stages; segmentation writes labels and table parts block by block.
"""

from __future__ import annotations

from typing import Any

from nucflow import pipeline, progress


def run(job: pipeline.Run) -> dict[str, Any]:
    progress.expect(job, progress.nuclei_passes(job.params))  # passes per stage, for the ETA
    with job.stage("preprocess"):
        image = pipeline.preprocess(job)
    with job.stage("threshold"):
        threshold = pipeline.global_threshold(job, image)
    with job.stage("mask"):
        mask = pipeline.clean_mask(job, image, threshold)
    with job.stage("segment"):
        table = pipeline.segment(job, mask)
    return pipeline.finish(job, table)

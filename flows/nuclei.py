"""The nuclei flow (`nucflow run`): preprocess, global threshold, mask, seam-free segmentation.

Each intermediate stack is persisted under the output's `.work/` so global passes read it once and
`--resume` skips finished stages; segmentation writes labels and table parts block by block.
"""

from __future__ import annotations

from typing import Any

from nucflow import pipeline


def run(job: pipeline.Run) -> dict[str, Any]:
    with job.stage("preprocess"):
        image = pipeline.persist(job, pipeline.preprocess(job), "preprocessed", label="preprocess")
    with job.stage("threshold"):
        threshold = pipeline.global_threshold(job, image)
    with job.stage("mask"):
        mask = pipeline.persist(
            job, pipeline.clean_mask(job, image, threshold), "mask", label="mask"
        )
    with job.stage("segment"):
        table = pipeline.segment(job, mask)
    return pipeline.finish(job, table)

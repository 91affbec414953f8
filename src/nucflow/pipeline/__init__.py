"""The nuclei pipeline's stages as stored passes, and the run's output directory.

One module per stage — :mod:`~nucflow.pipeline.preprocess`, :mod:`~nucflow.pipeline.threshold`,
:mod:`~nucflow.pipeline.mask`, :mod:`~nucflow.pipeline.segment`,
:mod:`~nucflow.pipeline.table`, :mod:`~nucflow.pipeline.pyramid`,
:mod:`~nucflow.pipeline.write` — each a few passes of the one stored-pass engine
(:mod:`~nucflow.pipeline.store`) from stored inputs to stored outputs under ``.work/``, on a
:class:`Run` (:mod:`~nucflow.pipeline.rundir`: the output directory and run.json). Flows
(``flows/*.py``) compose them; each module's ``STAGE`` (a :class:`nucflow.stages.Stage`)
says what the stage reads, stores and depends on, its checks and its body; :data:`NUCLEI` is the
nuclei flow.
"""

from nucflow import stages
from nucflow import table as table_stage
from nucflow.pipeline import mask as _mask
from nucflow.pipeline import preprocess as _preprocess
from nucflow.pipeline import pyramid as _pyramid
from nucflow.pipeline import segment as _segment
from nucflow.pipeline import table as _table
from nucflow.pipeline import threshold as _threshold
from nucflow.pipeline import write as _write
from nucflow.pipeline.mask import clean_mask, select_components
from nucflow.pipeline.preprocess import configured_filters, preprocess, write_stack
from nucflow.pipeline.pyramid import pyramid
from nucflow.pipeline.rundir import (
    LABELS,
    RUN_JSON,
    WORK,
    Run,
    calibrated,
    check_apart,
    data_region,
    fail,
    open_run,
    recorded_run,
    segment_halo,
    timepoint_folder,
    write_run_json,
)
from nucflow.pipeline.segment import label_chunks, label_dtype, label_image, segment
from nucflow.pipeline.store import blocks_of, filter_pass
from nucflow.pipeline.table import object_spec, table
from nucflow.pipeline.threshold import detect_params, foreground
from nucflow.pipeline.write import complete, finish, finish_stack, write_outputs, write_table

#: The nuclei flow's stages, in order (``flows/nuclei.py`` runs them).
NUCLEI: tuple[stages.Stage, ...] = (
    _preprocess.STAGE,
    _threshold.STAGE,
    _mask.STAGE,
    _segment.STAGE,
    _table.STAGE,
    _pyramid.STAGE,
    _write.STAGE,
)

__all__ = [
    "LABELS",
    "NUCLEI",
    "RUN_JSON",
    "WORK",
    "Run",
    "blocks_of",
    "calibrated",
    "check_apart",
    "clean_mask",
    "complete",
    "configured_filters",
    "data_region",
    "detect_params",
    "fail",
    "filter_pass",
    "finish",
    "finish_stack",
    "foreground",
    "label_chunks",
    "label_dtype",
    "label_image",
    "object_spec",
    "open_run",
    "preprocess",
    "pyramid",
    "recorded_run",
    "segment",
    "segment_halo",
    "select_components",
    "table",
    "table_stage",
    "timepoint_folder",
    "write_run_json",
    "write_outputs",
    "write_stack",
    "write_table",
]

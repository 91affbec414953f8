"""The last stage: the table files, QC pictures and the final run.json."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import dask.array as da
import pandas as pd

from nucflow import (
    measure,
    stages,
)
from nucflow import pyramid as pyramid_levels
from nucflow import table as table_stage
from nucflow.config import Params
from nucflow.errors import NucflowWarning
from nucflow.pipeline.relabel import check as relabel_check
from nucflow.pipeline.relabel import renumber
from nucflow.pipeline.rundir import Run, calibrated, release, run_record, write_run_json
from nucflow.pipeline.segment import label_dtype
from nucflow.stages import Result


def finish_stack(run: Run, path: Path) -> dict[str, Any]:
    """Mark a filter-only run complete (its stack is ``path``)."""
    return complete(run, {"stack": path.name})


def complete(run: Run, counts: dict[str, Any]) -> dict[str, Any]:
    """The run's end: run.json says complete (with ``counts``), written last; the intermediates
    removed; the output released. A flow's last act (:func:`nucflow.flowrun.run`)."""
    if run.lock is not None:
        run.lock.check()  # never "complete" over another run's output
    shutil.rmtree(run.work, ignore_errors=True)
    write_run_json(run, "complete", counts=counts)
    release(run)
    return counts


def write_table(run: Run, table: table_stage.Table, empty: pd.DataFrame) -> str:
    """``nuclei.parquet`` and ``nuclei.csv`` (:func:`nucflow.table.write`), listed first."""
    for name in table_stage.OUTPUT_NAMES:
        run.entry(name)
    return table_stage.write(
        table, run.output, single_file_rows=run.params.measure.single_file_rows, empty=empty
    )


def finish(run: Run, table: table_stage.Table) -> dict[str, Any]:
    """The write stage (:func:`write_outputs`), then the final run.json (:func:`complete`)."""
    with run.stage("write"):
        counts = write_outputs(run, table)
    return complete(run, counts)


def write_outputs(run: Run, table: table_stage.Table) -> dict[str, Any]:
    """Write the table and the QC pictures; the counts run.json records."""
    p = run.params
    empty = table.empty
    if empty is None:
        empty = measure.empty_table(
            len(run.region),
            table_stage.channel_suffixes(p.measure.channels),
            str(label_dtype(run.stack.data.shape)),
        )
    written = write_table(run, table, empty)
    if p.output.relabel == "sequential":  # last: every stage before reads the seed-derived ids
        parts = [run.output / "nuclei.parquet"] if written != "dataset" else _parts(run)
        run.facts["relabel"] = f"sequential: 1..{renumber(run, parts)}, seed ids in seed_label"
    from nucflow import labels_table

    rows = labels_table.write(run.output / "labels.ome.zarr", run.output / "nuclei.parquet")
    run.facts["labels_table"] = f"labels.ome.zarr/tables/{labels_table.NAME} ({rows} rows)"
    if written == "dataset":
        run.facts["table"] = (
            f"nuclei.parquet/ is a partitioned dataset of {len(table.parts)} part(s), rows "
            f"grouped by block; no nuclei.csv above measure.single_file_rows = "
            f"{p.measure.single_file_rows:,} rows"
        )
    counts: dict[str, Any] = {"nuclei": table.rows, "truncated": table.truncated}
    if p.qc:
        from nucflow import qc, report

        labels = da.from_zarr(str(run.output / "labels.ome.zarr" / "0"))
        if run.timepoints is not None:  # the pictures show the stack's (first) time point
            labels = labels[run.stack.timepoint]
        labels = labels[run.region]
        sample = table.sample
        windows = qc.write(run.entry("qc"), run.data, labels, sample, origin=run.offset)
        run.facts["qc_outline_windows_yx"] = [[[s.start, s.stop] for s in w] for w in windows]
        if len(sample) < table.rows:
            run.facts["qc_sample_rows"] = len(sample)
        run.facts["qc_report"] = f"qc/{report.NAME}"
        # from what this run stored, as run.json will say it (that is written last)
        record = run_record(run, "complete", counts=counts)
        report.write(run.output, record=record, image=run.data, labels=labels)
    if run.timepoints is not None:
        counts["timepoints"] = run.facts.get("timepoints", {}).get("counts", {})
    if table.truncated and p.segment.method != "builtin":
        halo = p.segment.halo_um
        warnings.warn(
            f"{table.truncated} nuclei touch the outer face of a block's halo "
            f"(segment.halo_um = {halo:g}); they may be cut: rerun with "
            f"--set segment.halo_um={1.5 * halo:g} (objects must fit in the halo)",
            stacklevel=2,
        )
    elif table.truncated:
        max_radius = p.segment.max_radius
        fix = (
            f"rerun with --set segment.max_radius={1.5 * max_radius:g} (or a larger --diameter)"
            if calibrated(run)
            else "the input has no voxel size: pass --voxel-size (anisotropic voxels counted as "
            "cubes make nuclei look elongated), then check --diameter"
        )
        warnings.warn(
            f"{table.truncated} nuclei reached segment.max_radius = {max_radius:g}; they may be "
            f"cut: {fix}",
            stacklevel=2,
            category=NucflowWarning,
        )
    return counts


def _body(run: Run, inputs: Mapping[str, Any]) -> dict[str, Any]:
    return write_outputs(run, inputs["table"])


def _parts(run: Run) -> list[Path]:
    folder = run.output / "nuclei.parquet"
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(("_", ".")))


def _results(p: Params, shape: tuple[int, ...]) -> tuple[Result, ...]:
    if p.output.relabel != "sequential":
        return (stages.WRITE,)
    levels = len(pyramid_levels.level_factors(shape, p.voxel_size))
    grids = ("blocks", *(f"level{k}" for k in range(1, levels + 1)))
    return (stages.WRITE, replace(stages.RELABEL, passes=grids))


STAGE = stages.Stage("write", ("table", "pyramid"), _results, (relabel_check,), body=_body)
"""The table files and QC pictures (then the run completes: :func:`complete`)."""

"""``nucflow synth`` and ``nucflow demo``: synthetic stacks, and a whole run scored against its
ground truth."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from nucflow.cli.commands import execute
from nucflow.cli.parser import _parser
from nucflow.errors import (
    OutputError,
)


def _synth(args: argparse.Namespace) -> None:
    import dataclasses

    from nucflow import io, synth

    given = {
        "brightness_spread": args.brightness_spread,
        "attenuation": args.attenuation,
        "illumination": args.illumination,
        "irregularity": args.irregularity,
        "psf_um": tuple(args.psf) if args.psf else None,
        "photons": args.photons,
    }
    start = synth.LIGHTSHEET if args.conditions == "lightsheet" else synth.UNIFORM
    conditions = dataclasses.replace(start, **{k: v for k, v in given.items() if v is not None})
    made = synth.make_nuclei(
        tuple(args.shape),
        n_nuclei=args.nuclei,
        diameter=args.diameter,
        voxel_size=tuple(args.voxel_size) if args.voxel_size else None,
        seed=args.seed,
        conditions=conditions,
    )
    io.write_ome_zarr(args.output, made.image, made.voxel_size, labels={"truth": made.truth})
    print(
        f"nucflow synth: {made.truth.max()} nuclei, shape {made.image.shape}, voxel size "
        f"{made.voxel_size} µm -> {args.output} (truth at {args.output}/labels/truth)"
    )


def _demo(args: argparse.Namespace) -> None:
    import numpy as np
    import zarr

    from nucflow import io, outdir, synth
    from nucflow.evaluate import accuracy_report

    folder = Path(args.output).resolve()
    if folder.is_dir() and any(folder.iterdir()) and not args.overwrite:
        raise OutputError(f"demo folder {folder} exists; pass --overwrite or another --output")
    found = outdir.check_claimable(folder, resume=False, overwrite=True)
    made_directory = outdir.make_directory(folder)
    claim = outdir.claim(folder, found, overwrite=True)
    claim.made_directory = made_directory
    made = synth.make_nuclei(DEMO_SHAPE, conditions=synth.LIGHTSHEET, **DEMO_STACK)
    source = claim.entry("input.ome.zarr")
    io.write_ome_zarr(source, made.image, made.voxel_size, labels={"truth": made.truth})
    chunks = [str(n // 2) for n in DEMO_SHAPE]
    run_args = _parser().parse_args(
        ["run", "--input", str(source), "--output", str(claim.entry("run")), "--chunks", *chunks]
    )
    start = time.perf_counter()
    job, result = execute(run_args)
    elapsed = time.perf_counter() - start
    labels = np.asarray(zarr.open_array(str(job.output / "labels.ome.zarr" / "0"), mode="r"))
    report = accuracy_report(labels, made.truth, made.brightness)
    _add_to_run_json(job.output, accuracy=report)
    from nucflow import report as qc_report

    page = qc_report.write(job.output)  # again, now that run.json holds the accuracy
    print(_demo_summary(made, result, report, job, elapsed, "x".join(chunks), source, page))


#: The demo's stack: light-sheet-like (5x brightness range, 3x attenuation with depth, half the
#: light lost across the sheet, irregular touching nuclei), 2 x 0.5 x 0.5 µm voxels.
DEMO_SHAPE = (48, 256, 256)


DEMO_STACK: dict[str, Any] = {
    "n_nuclei": 260,
    "diameter": 8.0,
    "voxel_size": (2.0, 0.5, 0.5),
    "cluster_fraction": 0.5,
    "seed": 0,
}


def _demo_summary(made, result, report, job, elapsed, blocks, source, page) -> str:
    def three(values: list) -> str:
        return " / ".join("-" if v is None else f"{v:.2f}" for v in values)

    return (
        f"nucflow demo: light-sheet-like stack {made.image.shape} (voxel {made.voxel_size} µm): "
        f"{made.truth.max()} true nuclei,\n"
        "  5x brightness range, 3x attenuation with depth, uneven light, irregular touching "
        f"nuclei; blocks of {blocks}\n"
        f"  found      {result['nuclei']} nuclei ({result['truncated']} truncated)\n"
        f"  accuracy   F1 {report['f1_iou50']:.3f} at IoU 0.5, {report['f1_iou70']:.3f} at IoU "
        f"0.7 (precision {report['precision']:.3f}, recall {report['recall']:.3f}); "
        f"{report['splits']} split, {report['merges']} merged\n"
        f"  recall     by brightness dim/mid/bright {three(report['recall_by_brightness'])}; "
        f"by depth top/mid/bottom {three(report['recall_by_depth'])}\n"
        f"  time       {elapsed:.1f} s ({made.image.size / elapsed / 1e6:.2f} Mvoxel/s), stages "
        + ", ".join(f"{k} {v:.1f}s" for k, v in job.timings.items())
        + f"\n  outputs    {job.output}/nuclei.parquet, nuclei.csv, labels.ome.zarr, run.json "
        "(with this accuracy), qc/\n"
        f"  report     {page} (open it in a browser)\n"
        f"  input      {source} (ground truth at labels/truth)"
    )


def _add_to_run_json(output: Path, **facts: Any) -> None:
    """Facts known after the run (the demo's accuracy), written atomically like the rest."""
    from nucflow.pipeline import RUN_JSON
    from nucflow.table import write_atomic

    record = json.loads((output / RUN_JSON).read_text())
    record.update(facts)
    write_atomic(output / RUN_JSON, json.dumps(record, indent=2).encode())

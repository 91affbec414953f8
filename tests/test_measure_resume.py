"""`nucflow measure --resume` reuses each block's stored sums and rows, and recomputes what a
changed label image or changed properties make stale; the result equals a fresh run's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import zarr

from nucflow import io
from nucflow.cli import main
from nucflow.synth import make_nuclei

CHUNKS = "chunks=[8,16,16]"  # 3 x 4 x 4 = 48 blocks of the 24x64x64 stack
BLOCKS = 48
FIRST = "measure.properties=[extent]"
SECOND = "measure.properties=[extent,intensity_median,neighbours]"


def _measure(labels, source, out, properties, *flags) -> int:
    argv = ["measure", "--labels", str(labels), "--input", str(source), "--output", str(out)]
    return main([*argv, *flags, "--set", CHUNKS, "--set", properties])


def _record(out) -> dict:
    return json.loads((out / "run.json").read_text())


def _lose_one_block(out) -> None:
    """Remove one block's stored sums and rows (a block owning nuclei)."""
    part = sorted((out / ".work" / "table").glob("*.parquet"))[1]
    part.unlink()
    (out / ".work" / "blocks" / part.name).unlink()


def test_measure_resume_reuses_stored_blocks(tmp_path):
    made = make_nuclei((24, 64, 64), n_nuclei=16, seed=11)
    source = tmp_path / "s.ome.zarr"
    io.write_ome_zarr(source, made.image, made.voxel_size)
    labels = tmp_path / "labels.zarr"
    zarr.save_array(str(labels), made.truth, zarr_format=2)
    out = tmp_path / "out"
    assert _measure(labels, source, out, FIRST) == 0
    # A directory where nuclei.csv goes: every attempt fails at the very end, its blocks kept.
    (out / "nuclei.csv").unlink()
    (out / "nuclei.csv" / "x").mkdir(parents=True)
    assert _measure(labels, source, out, FIRST, "--resume") == 1
    record = _record(out)
    assert record["status"] == "failed"
    assert record["blocks"] == {"total": BLOCKS, "computed": BLOCKS}  # the work was cleared

    _lose_one_block(out)
    assert _measure(labels, source, out, FIRST, "--resume") == 1
    record = _record(out)
    assert record["blocks"] == {"total": BLOCKS, "computed": 1}
    assert record["table_blocks"] == {"total": BLOCKS, "computed": 1}

    # other properties: the sums are reused, every row is made again
    assert _measure(labels, source, out, SECOND, "--resume") == 1
    record = _record(out)
    assert record["blocks"] == {"total": BLOCKS, "computed": 0}
    assert record["table_blocks"] == {"total": BLOCKS, "computed": BLOCKS}
    assert "properties ['extent'] ->" in record["stages"]["measure-table"]["reason"]

    # another label image at the same path: everything is made again
    changed = made.truth.copy()
    changed[changed == 5] = 0
    zarr.open_array(str(labels), mode="r+")[:] = changed
    assert _measure(labels, source, out, SECOND, "--resume") == 1
    record = _record(out)
    assert record["blocks"] == {"total": BLOCKS, "computed": BLOCKS}
    assert record["stages"]["measure-sums"]["reason"] == "the labels changed"

    # one block of each pass lost, then a resume to the end: as a fresh run
    _lose_one_block(out)
    shutil.rmtree(out / "nuclei.csv")
    assert _measure(labels, source, out, SECOND, "--resume") == 0
    record = _record(out)
    assert record["status"] == "complete"
    assert record["blocks"] == {"total": BLOCKS, "computed": 1}
    assert record["table_blocks"] == {"total": BLOCKS, "computed": 1}

    fresh = tmp_path / "fresh"
    assert _measure(labels, source, fresh, SECOND) == 0
    table = pd.read_parquet(out / "nuclei.parquet")
    assert 5 not in table["label"].to_numpy() and len(table) == len(np.unique(changed)) - 1
    pd.testing.assert_frame_equal(table, pd.read_parquet(fresh / "nuclei.parquet"))
    assert (out / "nuclei.csv").read_bytes() == (fresh / "nuclei.csv").read_bytes()

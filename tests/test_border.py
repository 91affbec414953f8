"""`measure.drop_border`: nuclei touching the stack's border leave the table and the label
image, as `skimage.segmentation.clear_border` on the one-block result, on every chunking."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import zarr
from skimage.segmentation import clear_border

from nucflow import io
from nucflow.cli import main
from nucflow.synth import make_nuclei

# the shell and the neighbours look beyond a nucleus: the dropped nuclei still count there
PROPERTIES = "measure.properties=[extent,euler_number,shell_intensity_mean,neighbours]"
SETTINGS = ["measure.shell_width=1.5", "measure.neighbour_distance=12", "qc.enabled=false"]


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    root = tmp_path_factory.mktemp("border")
    out = {}
    for ndim, shape, n, seed in ((3, (24, 64, 64), 16, 11), (2, (96, 96), 20, 12)):
        made = make_nuclei(shape, n_nuclei=n, seed=seed)
        path = root / f"s{ndim}.ome.zarr"
        io.write_ome_zarr(path, made.image, made.voxel_size)
        out[ndim] = path
    return out


def _run(source, out, chunks, *extra: str) -> tuple[pd.DataFrame, np.ndarray]:
    argv = ["run", "--input", str(source), "--output", str(out), "--chunks", *map(str, chunks)]
    flags = [a for a in extra if a.startswith("--")]
    sets = [x for s in [PROPERTIES, *SETTINGS, *extra] if s not in flags for x in ("--set", s)]
    assert main([*argv, *flags, *sets]) == 0
    labels = np.asarray(zarr.open_array(str(out / "labels.ome.zarr" / "0"), mode="r"))
    return pd.read_parquet(out / "nuclei.parquet"), labels


@pytest.fixture(scope="module")
def one_block(stacks, tmp_path_factory):
    """Table and labels of one block holding the whole stack, nothing dropped."""
    root = tmp_path_factory.mktemp("one")
    found = {}
    for ndim, source in stacks.items():
        shape = zarr.open_group(str(source))["0"].shape
        found[ndim] = _run(source, root / f"o{ndim}", shape)
    return found


@pytest.mark.parametrize(
    ("ndim", "chunks"),
    [
        (3, (7, 20, 23)),
        (3, (12, 13, 64)),
        (3, (24, 17, 30)),
        (3, (24, 64, 64)),
        (2, (17, 29)),
        (2, (40, 13)),
        (2, (31, 22)),
    ],
)
def test_drop_border_equals_clear_border_of_the_one_block_result(
    ndim, chunks, stacks, one_block, tmp_path
):
    whole_table, whole_labels = one_block[ndim]
    border = whole_table["touches_border"].to_numpy()
    assert 0 < border.sum() < len(whole_table)  # some, not all, nuclei touch the border
    table, labels = _run(stacks[ndim], tmp_path / "out", chunks, "measure.drop_border=true")
    np.testing.assert_array_equal(labels, clear_border(whole_labels))
    kept = whole_table[~border].reset_index(drop=True)
    pd.testing.assert_frame_equal(table, kept, rtol=1e-9)
    # a dropped nucleus is still a neighbour of the kept ones
    assert table["neighbours_count"].sum() > 0
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["dropped_border"] == int(border.sum())
    assert record["counts"]["nuclei"] == len(kept)


STOPPED_FLOW = """
from nucflow import pipeline

STAGES = pipeline.NUCLEI


def run(job):
    found = pipeline.foreground(job, pipeline.preprocess(job))
    pipeline.segment(job, pipeline.clean_mask(job, found))
    pipeline.table(job)
    raise RuntimeError("stopped after the table stage")
"""


def test_resume_after_the_border_was_cleared_segments_again(stacks, one_block, tmp_path):
    """The erasing pass changes labels.ome.zarr in place: a run stopped after it must not
    reuse those labels as the segmentation's (the shell would see the erased nuclei as
    background)."""
    flow = tmp_path / "stopped.py"
    flow.write_text(STOPPED_FLOW)
    out = tmp_path / "out"
    chunks = (8, 32, 32)
    drop = "measure.drop_border=true"
    argv = ["run", "--input", str(stacks[3]), "--output", str(out), "--chunks", *map(str, chunks)]
    sets = [a for s in [PROPERTIES, *SETTINGS, drop] for a in ("--set", s)]
    assert main([*argv, "--flow", str(flow), *sets]) == 1
    assert not (out / ".work" / "segment.fingerprint.json").exists()
    # --flow=nuclei: a resume continues the recorded flow (stopped.py) unless told otherwise
    table, labels = _run(stacks[3], out, chunks, drop, "--resume", "--flow=nuclei")
    record = json.loads((out / "run.json").read_text())
    assert record["stages"]["segment"] == {
        "action": "computed",
        "fingerprint": record["stages"]["segment"]["fingerprint"],
        "reason": "not finished",
    }
    whole_table, whole_labels = one_block[3]
    np.testing.assert_array_equal(labels, clear_border(whole_labels))
    kept = whole_table[~whole_table["touches_border"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(table, kept, rtol=1e-9)

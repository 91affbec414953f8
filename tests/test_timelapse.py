"""Time-lapses: every time point of a TCZYX OME-Zarr, an ImageJ TZYX TIFF and a 2D+t movie
gives the rows and labels of that time point run alone; ``--timepoints`` selects and refuses
bad values in one line; a run killed mid-movie resumes with its finished time points reused."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from nucflow import io, synth, timelapse
from nucflow.cli import main
from nucflow.errors import ParameterError
from nucflow.table import read_table

T = 3
INTERVAL_S = 30.0
SHAPE3D, CHUNKS3D, VOXEL3D = (16, 48, 48), ("8", "24", "24"), (2.0, 1.0, 1.0)
SHAPE2D, CHUNKS2D, VOXEL2D = (64, 64), ("32", "32"), (1.0, 1.0)


def _frames(shape, voxel, seed0) -> list[np.ndarray]:
    """Three different stacks (nuclei move between time points: other seeds)."""
    return [
        synth.make_nuclei(shape, n_nuclei=8, diameter=8.0, voxel_size=voxel, seed=seed0 + t).image
        for t in range(T)
    ]


def _ome_zarr_movie(path: Path, movie: np.ndarray, voxel, axes: str = "tczyx") -> Path:
    """TCZYX (or TZYX) OME-Zarr as ome-zarr-py writes it (time scale in seconds)."""
    import ome_zarr.writer

    root = zarr.open_group(str(path), mode="w")
    data = movie[:, None] if "c" in axes else movie
    scale = {"t": INTERVAL_S, **({"c": 1.0} if "c" in axes else {})}
    ome_zarr.writer.write_image(
        data,
        root,
        axes=axes,
        scale_factors=[],
        scale={**scale, **dict(zip("zyx", voxel, strict=True))},
        axes_units={"t": "second", **{a: "micrometer" for a in "zyx"}},
        storage_options={"chunks": (1, 1, 8, 24, 24)[-data.ndim :]},
    )
    return path


def _imagej_movie(path: Path, movie: np.ndarray, voxel, axes: str, interval=INTERVAL_S) -> Path:
    """ImageJ hyperstack (TZYX or TYX) with µm calibration and a frame interval (if given)."""
    metadata = {"axes": axes, "unit": "um", **({"finterval": interval} if interval else {})}
    if len(voxel) == 3:
        metadata["spacing"] = voxel[0]
    resolution = (1 / voxel[-1], 1 / voxel[-2])
    tifffile.imwrite(path, movie, imagej=True, resolution=resolution, metadata=metadata)
    return path


def _run(source: Path, out: Path, chunks, *extra: str) -> tuple[pd.DataFrame, np.ndarray]:
    argv = ["run", "--input", str(source), "--output", str(out), "--chunks", *chunks, *extra]
    assert main(argv) == 0, argv
    labels = np.asarray(zarr.open_array(str(out / "labels.ome.zarr" / "0"), mode="r"))
    return pd.read_parquet(out / "nuclei.parquet"), labels


@pytest.fixture(scope="module")
def movie3d(tmp_path_factory) -> dict:
    """The 3D movie as OME-Zarr and ImageJ TIFF, and each time point run alone."""
    folder = tmp_path_factory.mktemp("movie3d")
    frames = _frames(SHAPE3D, VOXEL3D, seed0=10)
    movie = np.stack(frames)
    singles = []
    for t, frame in enumerate(frames):
        alone = folder / f"t{t}.ome.zarr"
        io.write_ome_zarr(alone, frame, VOXEL3D)
        singles.append(_run(alone, folder / f"alone{t}", CHUNKS3D))
    return {
        "frames": frames,
        "singles": singles,
        "zarr": _ome_zarr_movie(folder / "movie.ome.zarr", movie, VOXEL3D),
        "tzyx": _ome_zarr_movie(folder / "tzyx.ome.zarr", movie, VOXEL3D, "tzyx"),
        "tiff": _imagej_movie(folder / "movie.tif", movie, VOXEL3D, "TZYX"),
    }


@pytest.fixture(scope="module")
def movie3d_run(movie3d, tmp_path_factory) -> tuple[Path, pd.DataFrame, np.ndarray]:
    out = tmp_path_factory.mktemp("movie3d_run") / "out"
    return (out, *_run(movie3d["zarr"], out, CHUNKS3D))


def _assert_each_time_point_alone(table, labels, singles, timepoints) -> None:
    assert table["t"].dtype == np.int64
    assert sorted(set(table["t"])) == list(timepoints)
    np.testing.assert_allclose(table["t_s"], table["t"] * INTERVAL_S)
    for t in timepoints:
        rows = table[table["t"] == t].drop(columns=["t", "t_s"]).reset_index(drop=True)
        alone_table, alone_labels = singles[t]
        assert len(rows) > 0
        pd.testing.assert_frame_equal(rows, alone_table)
        np.testing.assert_array_equal(labels[t], alone_labels)
        # a row's label is its value in the label image at its t
        seeds = labels[t][tuple(np.round(rows[f"centroid_{a}"]).astype(int) for a in "zyx")]
        assert (np.isin(rows["label"], np.unique(labels[t]))).all() and seeds.any()


# --- io ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zarr", "tzyx", "tiff"])
def test_open_stack_reads_each_time_point_lazily(movie3d, kind):
    frames = movie3d["frames"]
    stack = io.open_stack(movie3d[kind])
    assert (stack.n_timepoints, stack.timepoint, stack.time_interval_s) == (T, 0, INTERVAL_S)
    assert stack.voxel_size == VOXEL3D and stack.data.shape == SHAPE3D
    np.testing.assert_array_equal(stack.data.compute(), frames[0])  # the contract: t 0
    np.testing.assert_array_equal(io.open_stack(movie3d[kind], timepoint=2).data, frames[2])
    later = pickle.loads(pickle.dumps(stack.at(1)))  # what a process/SLURM worker receives
    assert later.timepoint == 1
    np.testing.assert_array_equal(later.data.compute(), frames[1])
    np.testing.assert_array_equal(later.reader[(slice(2, 5), slice(0, 7), slice(3, 9))],
                                  frames[1][2:5, 0:7, 3:9])  # fmt: skip
    box = (slice(1, 9), slice(5, 30), slice(0, 48))
    np.testing.assert_array_equal(stack.crop(box).at(2).data.compute(), frames[2][box])
    with pytest.raises(ParameterError, match=r"`timepoint` 3 is out of range: .* has 3 time"):
        stack.at(3)


def test_ome_tiff_time_increment(movie3d, tmp_path):
    path = tmp_path / "movie.ome.tif"
    sizes = {f"PhysicalSize{a}": v for a, v in zip("ZYX", VOXEL3D, strict=True)}
    metadata = {"axes": "TZYX", "TimeIncrement": 0.5, "TimeIncrementUnit": "min", **sizes}
    tifffile.imwrite(path, np.stack(movie3d["frames"]), ome=True, metadata=metadata)
    stack = io.open_stack(path, timepoint=1)
    assert (stack.n_timepoints, stack.time_interval_s, stack.voxel_size) == (T, 30.0, VOXEL3D)
    np.testing.assert_array_equal(stack.data.compute(), movie3d["frames"][1])


def test_a_stack_without_time_axis_has_one_time_point(movie3d):
    alone = io.open_stack(movie3d["zarr"].parent / "t0.ome.zarr")
    assert (alone.n_timepoints, alone.timepoint, alone.time_interval_s) == (1, 0, None)
    with pytest.raises(ParameterError, match=r"`timepoint` 1 is out of range"):
        io.open_stack(movie3d["zarr"].parent / "t0.ome.zarr", timepoint=1)


def test_time_point_view_writes_and_clears_one_time_point(tmp_path):
    labels = io.create_label_zarr(tmp_path / "l.ome.zarr", (4, 6), (2, 3), None, timepoints=3)
    assert (labels.shape, labels.chunks) == ((3, 4, 6), (1, 2, 3))
    for t in range(3):
        view = pickle.loads(pickle.dumps(io.TimePoint(labels, t)))  # as a worker gets it
        view[1:3, 0:3] = t + 1
        assert view.shape == (4, 6) and view[1:2, 0:1].item() == t + 1
    io.clear_timepoint(labels, 1)
    stored = np.asarray(labels[:])
    assert not stored[1].any() and stored[0, 1:3, 0:3].min() == 1 and stored[2].max() == 3
    chunks = tmp_path / "l.ome.zarr" / "0" / "c"  # zarr 3: chunk keys c/t/y/x
    chunk_folders = {p.name for p in chunks.iterdir() if p.is_dir()}
    assert chunk_folders == {"0", "2"}  # time point 1's chunks deleted, the others kept


# --- whole runs ------------------------------------------------------------------------------


def test_ome_zarr_movie_equals_each_time_point_alone(movie3d, movie3d_run):
    out, table, labels = movie3d_run
    assert labels.shape == (T, *SHAPE3D)
    _assert_each_time_point_alone(table, labels, movie3d["singles"], range(T))
    # NGFF: a leading axis of type time, scaled by the interval in seconds
    meta = io.ome_metadata(zarr.open_group(str(out / "labels.ome.zarr"), mode="r"))
    meta = meta["multiscales"][0]
    assert meta["axes"][0] == {"name": "t", "type": "time", "unit": "second"}
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"] == [INTERVAL_S, *VOXEL3D]
    record = json.loads((out / "run.json").read_text())
    alone_records = [
        json.loads((movie3d["zarr"].parent / f"alone{t}" / "run.json").read_text())
        for t in range(T)
    ]
    per_t = {  # counts and the noise level each time point found alone
        str(t): {**alone["counts"], "noise": alone["noise"]}
        for t, alone in enumerate(alone_records)
    }
    assert record["counts"]["timepoints"] == per_t
    assert record["counts"]["nuclei"] == len(table)
    assert not (out / ".work").exists()


def test_ome_zarr_py_reads_the_labels_time_axis(movie3d_run):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    out, _, labels = movie3d_run
    path = out / "labels.ome.zarr"
    nodes = list(Reader(parse_url(str(path)))())
    (node,) = [n for n in nodes if Path(n.zarr.subpath()) == path.resolve()]
    assert [a["type"] for a in node.metadata["axes"]] == ["time", "space", "space", "space"]
    np.testing.assert_array_equal(np.asarray(node.data[0]), labels)


def test_imagej_tiff_movie_equals_each_time_point_alone(movie3d, tmp_path):
    table, labels = _run(movie3d["tiff"], tmp_path / "out", CHUNKS3D)
    _assert_each_time_point_alone(table, labels, movie3d["singles"], range(T))


def test_2d_movie_equals_each_frame_alone(tmp_path):
    frames = _frames(SHAPE2D, VOXEL2D, seed0=20)
    singles = []
    for t, frame in enumerate(frames):
        io.write_ome_zarr(tmp_path / f"f{t}.ome.zarr", frame, VOXEL2D)
        singles.append(_run(tmp_path / f"f{t}.ome.zarr", tmp_path / f"alone{t}", CHUNKS2D))
    # no frame interval: a t column and no t_s
    movie = _imagej_movie(tmp_path / "movie.tif", np.stack(frames), VOXEL2D, "TYX", None)
    table, labels = _run(movie, tmp_path / "out", CHUNKS2D)
    assert labels.shape == (T, *SHAPE2D) and "area_um2" in table and "t_s" not in table
    for t in range(T):
        rows = table[table["t"] == t].drop(columns=["t"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(rows, singles[t][0])
        np.testing.assert_array_equal(labels[t], singles[t][1])


def test_timepoints_selects_some(movie3d, tmp_path):
    table, labels = _run(movie3d["zarr"], tmp_path / "out", CHUNKS3D, "--timepoints", "0,2")
    _assert_each_time_point_alone(table, labels, movie3d["singles"], (0, 2))
    assert labels.shape == (T, *SHAPE3D) and not labels[1].any()  # t stays the input's index


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("0:5", "--timepoints '0:5' reaches time point 5 but {p} has 3 time points; use indices "
                "0..2, e.g. --timepoints 0:3 (slice START:STOP[:STEP]) or --timepoints 0,1,2"),
        ("1,3", "--timepoints '1,3' reaches time point 3 but {p} has 3 time points; use indices "
                "0..2, e.g. --timepoints 0:3 (slice START:STOP[:STEP]) or --timepoints 0,1,2"),
        ("2:1", "--timepoints '2:1' selects no time point of the 3 in {p}; select some of 0..2, "
                "e.g. --timepoints 0:3 (slice START:STOP[:STEP]) or --timepoints 0,1,2"),
        ("one", "--timepoints 'one' is not a slice or a list of time point indices; e.g. "
                "--timepoints 0:3 (slice START:STOP[:STEP]) or --timepoints 0,1,2"),
        ("-1", "--timepoints '-1' is not a slice or a list of time point indices; e.g. "
               "--timepoints 0:3 (slice START:STOP[:STEP]) or --timepoints 0,1,2"),
        ("0::0", "--timepoints '0::0': the step must be > 0, e.g. --timepoints 0:3 (slice "
                 "START:STOP[:STEP]) or --timepoints 0,1,2"),
    ],
)  # fmt: skip
def test_bad_timepoints_exit_2_with_one_line(movie3d, tmp_path, capsys, given, message):
    out = tmp_path / "out"
    argv = ["run", "--input", str(movie3d["zarr"]), "--output", str(out), "--timepoints", given]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"nucflow run: error: {message.format(p=movie3d['zarr'])}\n"
    assert not out.exists()  # refused before the output is claimed
    # every suggestion is valid on this input (a fixed "0:10" was not, on 3 time points)
    stack = io.open_stack(movie3d["zarr"])
    for suggested in re.findall(r"--timepoints (\S+)", err)[1:]:
        assert timelapse.select(suggested, stack), suggested


def test_preprocess_flow_with_several_time_points_exits_2_before_claiming(
    movie3d, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = ["run", "--flow", "preprocess", "--input", str(movie3d["zarr"]), "--output", str(out)]
    assert main([*argv, "--timepoints", "0,2"]) == 2
    assert capsys.readouterr().err == (
        "nucflow run: error: --flow preprocess filters one time point but 2 are selected; pass "
        "one, e.g. --timepoints 0\n"
    )
    assert not out.exists()  # refused before the output is claimed
    assert main([*argv, "--timepoints", "1"]) == 0
    assert (out / "filtered.ome.zarr").is_dir()


def test_timepoints_on_a_stack_without_time_axis_exit_2(movie3d, tmp_path, capsys):
    alone = movie3d["zarr"].parent / "t0.ome.zarr"
    argv = ["plan", "--input", str(alone), "--timepoints", "0"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"nucflow plan: error: --timepoints '0': {alone} has no time axis (one time point); "
        "drop --timepoints\n"
    )


def test_plan_counts_blocks_times_time_points(movie3d, capsys):
    argv = ["plan", "--input", str(movie3d["zarr"]), "--chunks", *CHUNKS3D, "--timepoints", "1:3"]
    assert main(argv) == 0
    assert "blocks     8 of (8, 24, 24) voxels x 2 time point(s) = 16 blocks" in (
        capsys.readouterr().out
    )


def test_tune_on_a_movie_says_its_first_time_point_noise(movie3d, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["tune", "--input", str(movie3d["tiff"]), "--region", "0:16", "0:48", "0:48"]
    assert main([*argv, "--output", str(out), "--timepoints", "2"]) == 0
    noise = json.loads((out / "run.json").read_text())["counts"]["timepoints"]["2"]["noise"]
    assert f"noise level {noise:.4g} (estimated on this region" in capsys.readouterr().out


def test_partitioned_table_holds_every_time_point(movie3d, movie3d_run, tmp_path):
    out = tmp_path / "out"
    extra = ("--set", "measure.single_file_rows=5")  # above it: one part per block and t
    assert main(["run", "--input", str(movie3d["zarr"]), "--output", str(out), "--chunks",
                 *CHUNKS3D, *extra]) == 0  # fmt: skip
    assert (out / "nuclei.parquet").is_dir() and not (out / "nuclei.csv").exists()
    parts = sorted(p.name for p in (out / "nuclei.parquet").glob("part-*.parquet"))
    assert {name.split("_")[0] for name in parts} == {f"part-t{t:04d}" for t in range(T)}
    table = read_table(out).sort_values(["t", "label"], ignore_index=True)
    pd.testing.assert_frame_equal(table, movie3d_run[1], check_like=False)


# --- resume ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def killed_movie(movie3d, run_cli, tmp_path_factory) -> tuple[Path, list[int]]:
    """A run of the OME-Zarr movie SIGKILLed after its first time point; tests resume copies."""
    out = tmp_path_factory.mktemp("killed") / "out"
    # in a session of its own, so that the kill takes the whole run
    proc = type(run_cli)(tuple(map(int, CHUNKS3D))).start(movie3d["zarr"], out)

    def first_done() -> bool:  # run.json says so at the next stage's start
        with contextlib.suppress(OSError, ValueError, KeyError):
            return 0 in json.loads((out / "run.json").read_text())["timepoints"]["done"]
        return False

    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None and not first_done():
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "running", "the kill must land mid-movie"
    assert (out / ".work" / "t0000" / "done.json").exists()
    finished = record["timepoints"]["done"]
    assert 0 in finished and len(finished) < T
    return out, finished


@pytest.mark.timeout(300)
def test_resume_after_kill_mid_movie_reuses_finished_time_points(
    movie3d, movie3d_run, killed_movie, tmp_path, capsys
):
    out, finished = tmp_path / "out", killed_movie[1]
    shutil.copytree(killed_movie[0], out)
    assert main(["status", str(out)]) == 1  # stopped
    said = capsys.readouterr().out
    assert f"  movie     {len(finished)}/{T} time points done; at t {len(finished)} (" in said

    table, labels = _run(movie3d["zarr"], out, CHUNKS3D, "--resume")
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["timepoints"]["reused"] == finished
    # no stage of a finished time point ran again
    ran = {name.split(" ")[1] for name in record["progress"]["stages"] if " t" in name}
    assert ran == {f"t{t}" for t in range(T) if t not in finished}
    pd.testing.assert_frame_equal(table, movie3d_run[1])
    np.testing.assert_array_equal(labels, movie3d_run[2])


@pytest.mark.timeout(300)
def test_resume_without_the_label_image_recomputes_every_time_point(
    movie3d, movie3d_run, killed_movie, tmp_path
):
    out = tmp_path / "out"
    shutil.copytree(killed_movie[0], out)
    shutil.rmtree(out / "labels.ome.zarr")  # what the finished time points wrote is gone
    table, labels = _run(movie3d["zarr"], out, CHUNKS3D, "--resume")
    assert json.loads((out / "run.json").read_text())["timepoints"]["reused"] == []
    pd.testing.assert_frame_equal(table, movie3d_run[1])
    np.testing.assert_array_equal(labels, movie3d_run[2])


@pytest.mark.timeout(300)
def test_resume_with_another_voxel_size_equals_the_fresh_run(movie3d, killed_movie, tmp_path):
    other = ("--voxel-size", "2", "0.8", "0.8")
    fresh_table, fresh_labels = _run(movie3d["zarr"], tmp_path / "fresh", CHUNKS3D, *other)
    out = tmp_path / "out"
    shutil.copytree(killed_movie[0], out)
    table, labels = _run(movie3d["zarr"], out, CHUNKS3D, "--resume", *other)
    assert json.loads((out / "run.json").read_text())["timepoints"]["reused"] == []
    pd.testing.assert_frame_equal(table, fresh_table)
    np.testing.assert_array_equal(labels, fresh_labels)
    meta = io.ome_metadata(zarr.open_group(str(out / "labels.ome.zarr"), mode="r"))
    meta = meta["multiscales"][0]
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"] == [30.0, 2.0, 0.8, 0.8]


def test_plan_shows_the_time_axis(movie3d, capsys):
    argv = ["plan", "--input", str(movie3d["tiff"]), "--chunks", *CHUNKS3D]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "shape (3, 16, 48, 48) (t, z, y, x; 3 time points, each (16, 48, 48))" in out
    assert re.search(r"\ntime       about [\d.]+ s for 3 time point\(s\) on ", out), out


def test_status_of_a_complete_movie_lists_no_stage_left_to_do(movie3d_run, capsys):
    """The label pyramid runs once for the movie: it was planned per time point, and status
    ended a complete run's stage list with ``pyramid t1 -``."""
    out = movie3d_run[0]
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    stages = next(line for line in capsys.readouterr().out.splitlines() if "stages  " in line)
    assert " -" not in stages and stages.count("pyramid") == 1, stages
    plan = json.loads((out / "run.json").read_text())["progress"]["plan"]
    assert [name for name in plan if not name.endswith(tuple(f" t{t}" for t in range(T)))] == [
        "pyramid",
        "write",
    ]

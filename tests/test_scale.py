"""Scale: a dense terabyte store plans within bounds; passes hold one block whatever the size.

The dense store is 2048 x 16384 x 16384 uint16 (1.1 TB nominal) with every chunk present: one
real chunk of synthetic nuclei is written and hard-linked to every other chunk key, so the
store costs a few MB and `nucflow plan` sees what it would see on a real dense terabyte.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from nucflow import config, synth

DENSE_SHAPE = (2048, 16384, 16384)
STORE_CHUNKS = (64, 512, 512)


@pytest.fixture(scope="module")
def dense_terabyte(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dense") / "dense.zarr"
    made = synth.make_nuclei(STORE_CHUNKS, n_nuclei=400, diameter=8.0, seed=11)
    array = zarr.create_array(
        str(path), shape=DENSE_SHAPE, chunks=STORE_CHUNKS, dtype="uint16", fill_value=0
    )
    array.attrs["voxel_size_um"] = list(made.voxel_size)
    array[tuple(slice(0, c) for c in STORE_CHUNKS)] = made.image
    first = path / "c" / "0" / "0" / "0"
    assert first.is_file()
    grid = [n // c for n, c in zip(DENSE_SHAPE, STORE_CHUNKS, strict=True)]
    for i in range(grid[0]):
        for j in range(grid[1]):
            folder = path / "c" / str(i) / str(j)
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(grid[2]):
                if (i, j, k) != (0, 0, 0):
                    os.link(first, folder / str(k))
    return path


def test_default_blocks_grow_for_large_stacks():
    assert config.default_chunks((192, 3072, 3072)) == (64, 256, 256)
    assert config.default_chunks(DENSE_SHAPE) == (64, 512, 512)
    assert config.default_chunks((4096, 4096)) == (1024, 1024)


def _high_water_kib(pid: int) -> int:
    """VmHWM of a live process (KiB): its peak resident memory since it started its program."""
    try:
        with open(f"/proc/{pid}/status") as status:
            found = [line for line in status if line.startswith("VmHWM:")]
    except OSError:  # it has just ended
        return 0
    return int(found[0].split()[1]) if found else 0


@pytest.mark.slow
def test_dense_terabyte_plans_in_bounded_memory(dense_terabyte):
    code = "from nucflow.cli import main; raise SystemExit(main())"
    cmd = [sys.executable, "-c", code, "plan", "--input", str(dense_terabyte), "--diameter", "8"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_kib = 0
    while proc.poll() is None:  # the plan's own high-water mark: wait4's ru_maxrss also holds
        peak_kib = max(peak_kib, _high_water_kib(proc.pid))  # the forked test process's pages
        time.sleep(0.05)
    wall = time.perf_counter() - start
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    peak_gib = peak_kib / 2**20
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "of (64, 512, 512) voxels" in lines["blocks"]
    n_blocks = int(re.search(r"blocks\s+(\d+)", lines["blocks"]).group(1))
    assert n_blocks == 32 * 32 * 32
    n_tasks = int(re.search(r"tasks\s+(\d+)", lines["tasks"]).group(1))
    assert n_tasks < 1_000_000
    assert "per TB" in out
    assert peak_gib < 2.0, (peak_gib, out)
    print(json.dumps({"wall_s": round(wall, 1), "peak_gib": round(peak_gib, 2), "tasks": n_tasks}))
    assert np.isfinite(wall)


_MEMORY_TROUBLE = (
    "Pausing worker",
    "Memory use is high",
    "Unmanaged memory use is high",
    "Restarting worker",
    "exceeded",
    "was killed",
)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore:.*reached segment.max_radius:UserWarning")
def test_memory_limited_local_cluster_never_pauses_spills_or_restarts(tmp_path):
    """Two workers of 600 MiB each (178 MiB of it the interpreter and imports) run a stack
    whose float32 intermediates are 134 MiB each: each task holds one 32x128x128 block and
    its halo, so no worker reaches the spill threshold (70 %), pauses (80 %) or is restarted
    by its nanny. (At 300 MiB the same run pauses its workers: the check can fail.)"""
    from nucflow import cluster, flowrun, io, pipeline
    from nucflow import config as config_module

    made = synth.make_nuclei((128, 512, 512), n_nuclei=1200, diameter=8.0, seed=5)
    source = tmp_path / "stack.ome.zarr"
    io.write_ome_zarr(source, made.image, made.voxel_size)
    conf = config_module.load(None, options={"chunks": [32, 128, 128]})
    stack = io.open_stack(source, chunks=(32, 128, 128))
    params = config_module.resolve(conf, shape=stack.data.shape, voxel_size=stack.voxel_size)
    settings = {"n_workers": 2, "threads_per_worker": 1, "memory_limit": "600MiB"}
    with cluster.connect("local", settings=settings, progress=False) as runner:
        client = runner.client
        workers = set(client.scheduler_info()["workers"])
        job = pipeline.open_run(stack, params, tmp_path / "out", runner=runner, config=conf)
        counts = flowrun.load_flow("nuclei").run(job)
        assert set(client.scheduler_info()["workers"]) == workers  # none restarted
        spilled = client.run(lambda dask_worker: dask_worker.data.spilled_total.disk)
        logs = [
            message
            for nanny in (False, True)
            for entries in client.get_worker_logs(nanny=nanny).values()
            for _, message in entries
        ]
    assert counts["nuclei"] > 1000
    assert set(spilled.values()) == {0}, spilled
    trouble = [m for m in logs if any(t in m for t in _MEMORY_TROUBLE)]
    assert not trouble, trouble

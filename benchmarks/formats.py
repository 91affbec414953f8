"""Read throughput per input format, and the S3 overhead against local zarr.

One uint16 stack (synthetic nuclei, voxel (1, 0.5, 0.5) µm) is written in each container with
the library made for it: OME-Zarr (nucflow's writer: zarr v2, Blosc lz4, chunks 32x256x256),
BigDataViewer HDF5 and N5 (pybdv, chunks 32x256x256, gzip as pybdv writes both), Imaris .ims
(h5py in Imaris's layout, gzip, chunks 32x256x256), Zeiss CZI (pylibCZIrw, one uncompressed
subblock per plane), OME-TIFF (tifffile, 256x256 tiles, uncompressed), and the same OME-Zarr
uploaded to moto's S3 server on 127.0.0.1 (a subprocess of this script; reads go through s3fs
as for a real bucket, with no network latency: the overhead measured is the protocol's and
s3fs's, not a WAN's).

The stack is mostly background (nuclei fill a few %), so it compresses well: gzip and lz4
decode fast here. For each, ``open_stack`` opens it with blocks of 32x256x256 voxels (and the
CZI also with blocks as wide as its planes) and one *block
pass* reads every block once through ``Stack.reader`` (what the first pass of a run does), one
block after another on one thread: MB/s per core = stack bytes / wall time. The files were
just written, so local reads come from the page cache (decoding, not the disk, is measured).
Each figure is the best of three passes.

Usage::

    python benchmarks/formats.py                          # 3 sizes (~3 min on 2 cores)
    python benchmarks/formats.py --sizes 32x256x256       # one size
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from formats_writers import write_bdv, write_czi, write_ims  # noqa: E402

from nucflow import io, synth  # noqa: E402

BLOCK = (32, 256, 256)
VOXEL = (1.0, 0.5, 0.5)


def _moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    return proc, url


def _upload(local: Path, url: str) -> str:
    import boto3

    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    if "bench" not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket="bench")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.upload_file(str(path), "bench", f"{local.name}/{path.relative_to(local).as_posix()}")
    return f"s3://bench/{local.name}"


def write_all(
    image: np.ndarray, folder: Path, s3_url: str
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The stack in every format: name -> (path, blocks)."""
    import tifffile

    views = image[None, None]
    zarr_path = folder / f"{'x'.join(map(str, image.shape))}.ome.zarr"
    io.write_ome_zarr(zarr_path, image, VOXEL, chunks=BLOCK)
    tif = folder / "stack.ome.tif"
    tifffile.imwrite(tif, image, ome=True, tile=(256, 256), metadata={"axes": "ZYX"})
    ims = folder / "stack.ims"
    write_ims(ims, views, VOXEL, chunks=BLOCK)
    czi = str(write_czi(folder / "stack.czi", views, VOXEL))
    return {
        "OME-Zarr (local)": (str(zarr_path), BLOCK),
        "OME-Zarr on S3 (moto, 127.0.0.1)": (_upload(zarr_path, s3_url), BLOCK),
        "BDV XML + HDF5": (str(_bdv(folder / "bdv.h5", views)), BLOCK),
        "BDV XML + N5": (str(_bdv(folder / "bdv.n5", views)), BLOCK),
        "Imaris .ims": (str(ims), BLOCK),
        "CZI (pylibCZIrw regions)": (czi, BLOCK),
        "CZI, blocks of whole planes": (czi, (BLOCK[0], *image.shape[1:])),
        "OME-TIFF": (str(tif), BLOCK),
    }


def _bdv(path: Path, views: np.ndarray) -> Path:
    import contextlib

    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        return write_bdv(path, views, VOXEL, chunks=BLOCK)


def block_pass(path: str, blocks: tuple[int, ...]) -> float:
    """Seconds to read every block of the stack once, one after another."""
    stack = io.open_stack(path, chunks=blocks)
    boxes = [
        tuple(
            slice(sum(c[:i]), sum(c[: i + 1])) for c, i in zip(stack.data.chunks, idx, strict=True)
        )
        for idx in itertools.product(*(range(len(c)) for c in stack.data.chunks))
    ]
    start = time.perf_counter()
    for box in boxes:
        stack.reader[box]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["32x256x256", "64x512x512", "128x768x768"])
    args = parser.parse_args()
    proc, url = _moto()
    rows = []
    try:
        for size in args.sizes:
            shape = tuple(int(n) for n in size.split("x"))
            made = synth.make_nuclei(shape, n_nuclei=max(10, np.prod(shape) // 40000), diameter=8.0)
            image = made.image
            mb = image.nbytes / 1e6
            with tempfile.TemporaryDirectory(prefix="nucflow-formats-") as tmp:
                paths = write_all(image, Path(tmp), url)
                local = None
                for name, (path, blocks) in paths.items():
                    seconds = min(block_pass(path, blocks) for _ in range(3))
                    local = seconds if local is None else local
                    rows.append((size, f"{mb:.0f}", name, seconds, mb / seconds, seconds / local))
                    print(f"{size:>12} {name:34} {seconds:7.3f} s {mb / seconds:8.0f} MB/s "
                          f"{seconds / local:5.2f}x local zarr", flush=True)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait()
    print("\n| stack | MB | format | block pass (s) | MB/s per core | vs local OME-Zarr |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for size, mb, name, seconds, rate, ratio in rows:
        print(f"| {size} | {mb} | {name} | {seconds:.3f} | {rate:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()

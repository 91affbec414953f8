"""Peak RSS of the label-pyramid passes alone, on a copy of a run's ``labels.ome.zarr``.

The copy keeps level 0 only; the pyramid is then built down to a ``--plane`` ² plane (smaller
than nucflow's 1024, so that a benchmark-sized stack gets several levels), on dask's threads.
Run it once per label image, each in a fresh process, e.g. on ``benchmarks/memory.py``'s
outputs (``--keep``)::

    for s in 1x 4x; do
        python benchmarks/pyramid_memory.py /tmp/nucflow-memory/$s-threads-out/labels.ome.zarr
    done

Memory is bounded if the peak does not grow with the label image: each task holds one chunk
of the new level and one piece (about one chunk) of the level before.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import dask
import zarr

from nucflow import pyramid


class Threads:
    """The runner interface ``pyramid.build`` uses, on dask's threads."""

    def compute(self, *collections, label: str = "") -> tuple:
        return dask.compute(*collections, scheduler="threads", num_workers=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", type=Path, help="a run's labels.ome.zarr")
    parser.add_argument("--plane", type=int, default=64, help="last level's largest y/x size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "labels.ome.zarr"
        copy.mkdir()
        for name in (".zattrs", ".zgroup", "0"):
            (shutil.copytree if name == "0" else shutil.copy)(args.labels / name, copy / name)
        group = zarr.open_group(str(copy), mode="r+")
        meta = group.attrs.asdict()["multiscales"]
        meta[0]["datasets"] = meta[0]["datasets"][:1]
        group.attrs["multiscales"] = meta
        scale = meta[0]["datasets"][0]["coordinateTransformations"][0]["scale"]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        factors = pyramid.level_factors(group["0"].shape, scale, max_plane=args.plane)
        shapes = pyramid.build(Threads(), copy, factors, method="nearest")
        took = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.labels}: levels {shapes}")
    print(f"  {took:.1f} s, peak RSS {peak:.0f} MiB (before the passes {before:.0f} MiB)")


if __name__ == "__main__":
    main()

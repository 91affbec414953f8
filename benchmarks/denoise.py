"""Cost per Mvoxel of the seam-exact denoisers (nucflow.filters.nl_means, bilateral, noise_sigma).

Run ``nice -n 10 python benchmarks/denoise.py`` (~3 min; ``--shape Z Y X`` and ``--chunks Z Y X``
change the stack, ``--noise-only`` times the noise estimate alone). Everything runs on ONE
thread (dask's synchronous scheduler, BLAS/OpenMP limited to 1 thread), so the numbers are per
core: a synthetic uint16 stack from ``nucflow.synth.make_nuclei`` (voxel 1 x 0.5 x 0.5 µm,
nuclei of 8 µm, with its noise) is filtered dask-chunked and, as the reference, by the
whole-array call (scikit-image's ``estimate_sigma`` / ``denoise_nl_means``; the bilateral's own
kernel on the whole array, since ``skimage.restoration.denoise_bilateral`` is 2D only). CPU
seconds per Mvoxel of the stack (halo work included for the chunked runs; CPU rather than wall
time, as the machine is shared) and whether the results agree are printed.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import dask  # noqa: E402
import dask.array as da  # noqa: E402
import numpy as np  # noqa: E402
import skimage.restoration as restoration  # noqa: E402

from nucflow import filters, synth  # noqa: E402
from nucflow.filters import denoise  # noqa: E402


def _time(func):
    """CPU seconds of this (single-threaded) process: the shared machine's wall time is not."""
    start = time.process_time()
    result = func()
    return time.process_time() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 128, 128))
    parser.add_argument("--chunks", type=int, nargs=3, default=(32, 64, 64))
    parser.add_argument("--noise-only", action="store_true", help="time noise_sigma only")
    args = parser.parse_args()
    made = synth.make_nuclei(tuple(args.shape), n_nuclei=20, diameter=8.0, seed=0)
    image = made.image
    mvox = image.size / 1e6
    chunked = da.from_array(image, chunks=tuple(args.chunks))
    print(f"stack {image.shape} {image.dtype} ({mvox:.2f} Mvoxel), dask chunks {args.chunks},")
    print("one thread (synchronous scheduler); CPU s per Mvoxel, nucflow chunked vs whole array")

    t_ours, sigma = _time(lambda: filters.noise_sigma(chunked))
    t_ref, ref = _time(lambda: restoration.estimate_sigma(image.astype(np.float64)))
    _row("noise_sigma (estimate_sigma)", t_ours, t_ref, mvox, f"sigma {sigma:.3f} == {ref:.3f}")
    if args.noise_only:
        return

    nlm = {"patch_size": 5, "patch_distance": 6, "h": 0.8 * sigma, "sigma": sigma}
    t_ours, ours = _time(lambda: filters.nl_means(chunked, **nlm).compute())
    t_ref, ref = _time(
        lambda: restoration.denoise_nl_means(image, **nlm, preserve_range=True).astype(np.float32)
    )
    _row("nl_means 5/6 fast (h=0.8 sigma)", t_ours, t_ref, mvox, _agree(ours, ref))
    nlm_small = {**nlm, "patch_size": 3, "patch_distance": 3}
    t_ours, ours = _time(lambda: filters.nl_means(chunked, **nlm_small).compute())
    t_ref, ref = _time(
        lambda: restoration.denoise_nl_means(image, **nlm_small, preserve_range=True).astype(
            np.float32
        )
    )
    _row("nl_means 3/3 fast", t_ours, t_ref, mvox, _agree(ours, ref))

    for sigma_um in (0.5, 1.0):
        voxels = tuple(sigma_um / v for v in made.voxel_size)
        bil = {"sigma_spatial": voxels, "sigma_color": 2 * sigma}
        t_ours, ours = _time(lambda bil=bil: filters.bilateral(chunked, **bil).compute())
        t_ref, ref = _time(
            lambda bil=bil: denoise._block_bilateral(image, **bil, truncate=3.0, mode="reflect")
        )
        window = "x".join(str(2 * d + 1) for d in filters.depth_of("bilateral", **bil))
        _row(f"bilateral {sigma_um} µm ({window})", t_ours, t_ref, mvox, _agree(ours, ref))


def _agree(ours: np.ndarray, ref: np.ndarray) -> str:
    if np.array_equal(ours, ref):
        return "identical"
    return f"max rel diff {np.max(np.abs(ours - ref) / np.maximum(np.abs(ref), 1e-12)):.1e}"


def _row(name: str, ours: float, ref: float, mvox: float, note: str) -> None:
    print(f"  {name:34s} nucflow {ours / mvox:7.2f}  whole {ref / mvox:7.2f} s/Mvox  {note}")


if __name__ == "__main__":
    with dask.config.set(scheduler="sync"):
        main()

"""The threshold stage: global values computed once over the stack (a threshold, or the noise
level of the local detection), before any block decides what is foreground."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, cast

import dask
import dask.array as da
import numpy as np
import zarr

from nucflow import (
    detect,
    filters,
    fingerprint,
    histogram,
    io,
    stages,
)
from nucflow import table as table_stage
from nucflow.blockpass import Grid, padded, pass_graph
from nucflow.config import Params
from nucflow.detect import DetectParams
from nucflow.errors import ConfigError
from nucflow.pipeline.rundir import Run
from nucflow.pipeline.store import (
    fresh_histograms,
    histogram_files,
    histogram_task,
    histograms_of,
    shifted,
)


def foreground(run: Run, image: zarr.Array) -> Above | Detected:
    """What the mask stage reads: the local detection, or the image above a global threshold.

    Either needs one global pass first: the background noise (a histogram of the stack) or
    the threshold. Stored in ``.work/threshold.json`` for ``--resume``.
    """
    p = run.params
    if p.threshold.method == "local":
        noise = _stack_value(run, "noise", partial(_noise, run, image))
        return Detected(image, detect_params(p, noise, tuple(image.shape)))
    return Above(image, _stack_value(run, "threshold", partial(_threshold, run, image)))


def detect_params(p: Params, noise: float, shape: tuple[int, ...]) -> DetectParams:
    return DetectParams(
        stack_shape=shape,
        smoothing=()
        if p.preprocess.tissue_mask
        else tuple(p.preprocess.sigma / v for v in p.voxel_size),
        voxel_size=p.voxel_size,
        blob_radius=p.detect.blob_radius,
        peak_radius=p.segment.peak_radius,
        max_radius=p.segment.max_radius,
        snr=p.detect.snr,
        fraction=p.detect.fraction,
        noise=noise,
    )


def _stack_value(run: Run, name: str, compute: Callable[[], float]) -> float:
    """A number computed from the whole stack, reused by ``--resume`` when still valid."""
    done = run.work / "threshold.json"
    if fingerprint.reusable(run, stages.THRESHOLD.name, done):
        stored = json.loads(done.read_text())
        if name in stored:
            run.facts[name] = stored[name]
            return stored[name]
    value = compute()
    table_stage.write_atomic(done, json.dumps({name: value}).encode())
    fingerprint.record(run, stages.THRESHOLD.name)
    run.facts[name] = value
    return value


def _threshold(run: Run, image: zarr.Array) -> float:
    p = run.params
    if p.threshold.method == "value":
        assert p.threshold.value is not None  # stages.check refused a method without a value
        return float(p.threshold.value)
    value_range = _value_range(image)
    with dask.config.set(scheduler=run.runner.scheduler):
        value = filters.threshold(
            da.from_zarr(image),
            method=p.threshold.method,
            value_range=value_range,
        )
    return float(value) * p.threshold.factor


# Bins of the noise estimate: a coarse histogram finds the mode, a fine one spans the values
# up to a little above it (both derived from the stack's range-free histogram).
_MODE_BINS, _NOISE_BINS, _ABOVE_MODE = 1024, 4096, 8


def _value_range(image: zarr.Array) -> tuple[float, float] | None:
    """The (min, max) a ranged pass stored with its result, if any."""
    stored = image.attrs.get("value_range")
    if not isinstance(stored, list | tuple):
        return None
    low, high = stored
    return float(cast(float, low)), float(cast(float, high))


def _noise(run: Run, image: zarr.Array) -> float:
    """The background noise of the stored image (:func:`nucflow.detect.noise_level`), from
    equal-width histograms derived from its range-free one (no pass over it when the pass
    that stored it kept its histograms)."""
    values = stack_histogram(run, image)
    low, high = values.low, values.high
    if not high > low:
        return 1.0  # a constant image: no blob passes any positive threshold anyway
    # Values at the minimum are left out: a top-hat is exactly 0 wherever the opening touches
    # the image, a spike that is not the noise's mode.
    above_min = float(np.nextafter(np.float32(low), np.float32(np.inf)))
    edges = np.linspace(above_min, high, _MODE_BINS + 1)
    top = float(edges[min(int(np.argmax(values.counts_in(edges))) + _ABOVE_MODE, _MODE_BINS)])
    fine_edges = np.linspace(above_min, top, _NOISE_BINS + 1)
    return detect.noise_level(values.counts_in(fine_edges), fine_edges)


def stack_histogram(run: Run, image: zarr.Array) -> histogram.Histogram:
    """The sum of the stored preprocessed image's block histograms, read one at a time (the
    driver's memory stays bounded); a pass makes them if its own pass did not store them."""
    folder = histograms_of(run, stages.PREPROCESSED.name)
    grid = Grid(tuple(image.shape), run.params.chunks)
    files = histogram_files(folder)
    if len(files) != len(grid):
        folder = fresh_histograms(run, stages.PREPROCESSED.name)
        tasks = [
            partial(histogram_task, core, source=image, folder=folder) for _, core in grid.blocks()
        ]
        run.runner.compute(pass_graph(tasks, "histograms"), label="histograms")
        files = histogram_files(folder)
    return histogram.Histogram.of(path.read_bytes() for path in files)


class Above:
    """``source > threshold`` as a readable stack (for a pass reading it with a halo)."""

    def __init__(self, source: Any, threshold: float) -> None:
        self.source, self.threshold = source, threshold
        self.shape, self.dtype = tuple(source.shape), np.dtype(bool)

    def __getitem__(self, key: tuple) -> np.ndarray:
        return np.asarray(self.source[key]) > self.threshold


class Detected:
    """The local detection's foreground as a readable stack; each read adds its own halo."""

    def __init__(self, source: Any, params: DetectParams) -> None:
        self.source, self.params = source, params
        self.shape, self.dtype = tuple(source.shape), np.dtype(bool)

    def __getitem__(self, key: tuple) -> np.ndarray:
        wanted = tuple(slice(*k.indices(n)[:2]) for k, n in zip(key, self.shape, strict=True))
        read = padded(wanted, self.params.halo(), self.shape)
        core = shifted(wanted, tuple(-r.start for r in read))
        origin = tuple(r.start for r in read)
        return detect.foreground(np.asarray(self.source[read]), self.params, core, origin=origin)


def _threshold_complete(_stack: io.Stack, params: Params) -> None:
    if params.threshold.method == "value" and params.threshold.value is None:
        raise ConfigError("`threshold.method` is value but `threshold.value` is null; set both")


def _body(run: Run, inputs: Mapping[str, Any]) -> Above | Detected | None:
    if not stages.builtin_segmentation(run.params):
        return None  # a python segmenter needs no threshold
    return foreground(run, inputs["preprocess"])


def _results(p: Params, _shape: tuple[int, ...]) -> tuple[stages.Result, ...]:
    return (stages.THRESHOLD,) if stages.builtin_segmentation(p) else ()


STAGE = stages.Stage(
    "threshold",
    ("preprocess",),
    _results,
    (_threshold_complete,),
    body=_body,
    per_timepoint=True,
)
"""The global values before local work; what decides the foreground of every block."""

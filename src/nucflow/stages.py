"""What a stage is: :class:`Stage` (what it reads, the results it stores, the parameters they
depend on, its passes, its checks, its body) and :class:`Result`; the stored results declared.

A flow (``flows/*.py``) is a tuple of stages, run in order by :func:`nucflow.flowrun.run`; each
stage is a few passes from stored inputs to stored outputs (:mod:`nucflow.blockpass`). The
nuclei pipeline's stages are in :mod:`nucflow.pipeline` (one module per stage, each with its
``STAGE``); a flow may declare stages of its own. Everything that needs a flow's structure asks
its stages:

- :mod:`nucflow.fingerprint`: the parameters each stored result depends on (``--resume``);
- :mod:`nucflow.flowrun`: the passes each stage runs (the run's ETA), and the stage bodies;
- :mod:`nucflow.plan`: tasks per stage, and the stage list it prints;
- ``nucflow run``: :func:`check` validates the whole configuration against the stack before
  the output directory is claimed, so a mistake costs neither a claimed directory nor a
  stage's work.

A test runs each flow and compares what it stored and the passes it ran with its stages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nucflow import filters
from nucflow.errors import ConfigError, NucflowError

if TYPE_CHECKING:
    from nucflow import io
    from nucflow.config import Params

__all__ = [
    "Result",
    "Stage",
    "flow_passes",
    "only",
    "builtin_segmentation",
    "preprocessing_needed",
    "RESULT_PARAMS",
    "pass_grids",
    "check",
    "pools_while_smoothing",
    "configured_steps",
    "Body",
]

Check = Callable[["io.Stack", "Params"], None]
Body = Callable[[Any, Mapping[str, Any]], Any]  # (nucflow.pipeline.Run, inputs) -> its result


@dataclass(frozen=True)
class Result:
    """One stored result of a stage, made by ``passes`` passes over the grid each names.

    ``name`` is how ``.work/`` holds it (``<name>.zarr`` and ``<name>.done``, or the file
    the stage documents) and how its fingerprint is filed (``<name>.fingerprint.json``);
    ``params`` are the :class:`~nucflow.config.Params` fields it depends on besides the
    results before it (``None``: all of them). A result with ``stored=False`` is remade by
    every run (its passes still count for the ETA).
    """

    name: str
    passes: tuple[str, ...] = ("blocks",)
    params: tuple[str, ...] | None = None
    stored: bool = True
    reduction: bool = False  # also a histogram reduction over the blocks (not a pass)


@dataclass(frozen=True)
class Stage:
    """A stage of a flow: the results it makes from what it ``reads``, and the body that makes
    them.

    ``reads`` names the input stack (``"input"``) or earlier stages (their last result);
    ``results(params, shape)`` says which results this configuration makes on a stack of
    ``shape`` (spatial axes), in order; ``checks`` validate the configuration against the stack
    before anything is written. ``body(run, inputs)`` does the stage's work on a
    :class:`nucflow.pipeline.Run` (``inputs``: what each stage in ``reads`` returned, by name)
    and returns what later stages read. ``per_timepoint`` stages run once per time point of a
    time-lapse (:func:`nucflow.timelapse.each`), the others once per run; ``one_timepoint``
    (a verb, e.g. "filters") marks a stage that handles a single time point only.
    """

    name: str
    reads: tuple[str, ...]
    results: Callable[[Params, tuple[int, ...]], tuple[Result, ...]]
    checks: tuple[Check, ...] = field(default=())
    body: Body | None = field(default=None, compare=False)
    per_timepoint: bool = False
    one_timepoint: str = ""

    def passes(self, params: Params, shape: tuple[int, ...]) -> tuple[str, ...]:
        """The grids of this stage's passes, in order: ``"blocks"``, ``"cells"``,
        ``"border"`` or ``"level<k>"`` (level k of the label pyramid)."""
        return tuple(grid for result in self.results(params, shape) for grid in result.passes)


# ----------------------------------------------------------------------------- checks


def configured_steps(p: Params, *, ndim: int) -> list[tuple[str, dict[str, Any]]]:
    """``filter.steps`` with lengths in voxels, each step checked against its filter.

    Raises
    ------
    ConfigError
        A step names no filter, or its filter does not take its parameters.
    """
    steps = []
    for index, (name, given) in enumerate(p.filter_steps):
        if name not in filters.STEPS:
            raise ConfigError(
                f"`filter.steps[{index}]`: unknown filter {name!r}; use one of "
                f"{', '.join(filters.STEPS)}"
            )
        where = f"`filter.steps[{index}]` ({name})"
        _check_axes(where, given, ndim, (*filters.STEPS[name].lengths, "size", "radius"))
        try:
            in_voxels = filters.in_voxels(name, given, p.voxel_size)  # µm -> voxels
            filters.depth_of(name, ndim=ndim, **in_voxels)  # checks the step's parameters
        except NucflowError as e:
            raise ConfigError(f"{where}: {_as_written(str(e), given)}") from None
        steps.append((name, in_voxels))
    return steps


def _check_axes(where: str, given: Mapping[str, Any], ndim: int, keys: Sequence[str]) -> None:
    """A per-axis value with the wrong number of axes (a 2D ``size: [5, 5]`` on a 3D stack),
    said with the key the user wrote (the filter itself would name the footprint made of it)."""
    for key in keys:
        value = given.get(key)
        if isinstance(value, (list, tuple)) and len(value) != ndim:
            fixed = [value[0]] * (ndim - len(value)) + list(value[-ndim:])
            axes = " ".join("ZYX"[-ndim:])
            raise ConfigError(
                f"{where}: `{key}: {list(value)}` has {len(value)} values but the stack has "
                f"{ndim} axes; give one per axis ({axes}), e.g. `{key}: {fixed}`, or one number"
            )


def _as_written(message: str, given: Mapping[str, Any]) -> str:
    """``message`` with the footprint named by the key it was made of (``size``, ``radius``)."""
    if "footprint" in given:
        return message
    for key in ("size", "radius"):
        if key in given:
            return message.replace("`footprint`", f"`{key}`")
    return message


# ----------------------------------------------------------------------------- results

_PREPROCESS_PARAMS = (
    "voxel_size", "chunks", "sigma", "background", "background_radius",
    "background_downsample", "tissue_mask",
)  # fmt: skip

# the Gaussian pass; with the exact top-hat or no background it is the preprocessing
SMOOTHED = Result("smoothed", params=_PREPROCESS_PARAMS)
# the reduced-resolution background: cell minima (stored by the Gaussian's pass when blocks are
# whole cells: pools_while_smoothing), then the background on the cells
CELLS = Result("cells", ("cells",), ("chunks", "background_downsample"))
BACKGROUND = Result(
    "background",
    ("cells",),
    ("voxel_size", "background", "background_radius", "background_downsample"),
)
PREPROCESSED = Result("preprocessed", params=_PREPROCESS_PARAMS)
# the global threshold, or the noise level and the local detection's rules: a histogram
# reduction (not a pass), stored in threshold.json
THRESHOLD = Result(
    "threshold",
    (),
    (
        "threshold_method", "threshold_value", "threshold_factor", "blob_radius", "snr",
        "fraction", "peak_radius", "max_radius",
    ),
    reduction=True,
)  # fmt: skip
# detection (or the threshold) and the opening in one pass; hole filling and small-object
# removal are global: three passes each (block components, join, keep; the keep pass is
# skipped when every component is kept, the result then being its source)
OPENED = Result("opened", params=("opening_radius",))
FILLED = Result("filled", ("blocks",) * 3, ("fill_holes", "min_volume"))
MASK = Result("mask", ("blocks",) * 3, ("opening_radius", "fill_holes", "min_volume"))
# labels.ome.zarr and the per-block sums in .work/blocks/
SEGMENT = Result("segment")
# the rows, then (with the `neighbours` property) the neighbour pass over the same blocks
TABLE = Result("table", stored=False)
NEIGHBOURS = Result("neighbours", stored=False)
# (measure.drop_border) erasing the border nuclei from the labels, on the blocks near the border
BORDER = Result("border", ("border",), stored=False)
# levels 1, 2, … of labels.ome.zarr, one pass per level (nucflow.pyramid; _pyramid_results)
PYRAMID = Result("pyramid", (), ("voxel_size",))
# table files, QC pictures, run.json
WRITE = Result("write", (), stored=False)
# (output.relabel: sequential) labels.ome.zarr renumbered 1..N: a pass per level (grids as the
# pyramid's, level 0 on the blocks), changing the stored segmentation in place
RELABEL = Result("relabel", ("blocks",), stored=False)
# nucflow measure: each block's sums of the labels (an input: fingerprint.add_input) and the
# channels, then the rows made from them
MEASURE_SUMS = Result("measure-sums", params=("chunks", "channels"))
MEASURE_TABLE = Result("measure-table")

RESULT_PARAMS: dict[str, tuple[str, ...] | None] = {
    r.name: r.params
    for r in (
        SMOOTHED, CELLS, BACKGROUND, PREPROCESSED, THRESHOLD, OPENED, FILLED, MASK, SEGMENT,
        PYRAMID, MEASURE_SUMS, MEASURE_TABLE,
    )
}  # fmt: skip
"""Every stored result -> the parameters its fingerprint covers (``None``: all)."""


def pools_while_smoothing(p: Params) -> bool:
    """Does the Gaussian's pass also store the cell minima (no pass of their own)?

    Yes when every block is a whole number of cells (each block then pools into cells of its
    own) and the Gaussian is a block pass (not the tissue mask's normalized convolution).
    """
    whole = all(
        c % f == 0 for c, f in zip(p.chunks, p.preprocess.background_downsample, strict=True)
    )
    return whole and not p.preprocess.tissue_mask


# ----------------------------------------------------------------------------- flows


def pass_grids(
    flow: Sequence[Stage], params: Params, shape: tuple[int, ...]
) -> dict[str, tuple[str, ...]]:
    """Stage name -> the grids of its passes, in order, for this configuration and a stack of
    ``shape`` (spatial axes)."""
    return {stage.name: stage.passes(params, shape) for stage in flow}


def flow_passes(flow: Sequence[Stage], params: Params, shape: tuple[int, ...]) -> dict[str, int]:
    """Stage name -> how many passes it runs (the run's ETA counts them)."""
    return {name: len(grids) for name, grids in pass_grids(flow, params, shape).items()}


def builtin_segmentation(p: Params) -> bool:
    """Does the nuclei flow segment by its own rules (threshold, mask, seeds)? A python
    segmenter (``segment.method: python:...``) needs neither the threshold nor the mask."""
    return p.segment.method == "builtin"


def preprocessing_needed(p: Params) -> bool:
    """Does the nuclei flow's segmentation read the preprocessed stack?"""
    return builtin_segmentation(p) or p.segment.input == "preprocessed"


def only(*results: Result) -> Callable[[Params, tuple[int, ...]], tuple[Result, ...]]:
    """A stage's ``results`` when they do not depend on the configuration."""
    return lambda _params, _shape: results


def check(flow: Sequence[Stage], stack: io.Stack, params: Params) -> None:
    """Validate the configuration of every stage of ``flow`` against ``stack``.

    Raises
    ------
    ConfigError
        One line naming the configuration key and the fix.
    """
    for stage in flow:
        for run_check in stage.checks:
            run_check(stack, params)

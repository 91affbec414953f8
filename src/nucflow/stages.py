"""The flows' stages, declared: what each reads and stores, what it depends on, its passes.

A flow (``flows/*.py``) runs its stages in order; each stage is a few passes from stored inputs
to stored outputs (:mod:`nucflow.blockpass`). This module is the one description of that
structure, and everything that needs it derives from it:

- :mod:`nucflow.fingerprint`: the parameters each stored result depends on (``--resume``);
- :mod:`nucflow.progress`: the passes each stage runs (the run's ETA);
- :mod:`nucflow.plan`: tasks per stage, and the stage list it prints;
- ``nucflow run``: :func:`check` validates the whole configuration against the stack before
  the output directory is claimed, so a mistake costs neither a claimed directory nor a
  stage's work.

The stage bodies live in :mod:`nucflow.pipeline`; a test runs each flow and compares what it
stored and the passes it ran with these declarations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from nucflow import filters
from nucflow.errors import ConfigError, NucflowError

if TYPE_CHECKING:
    from nucflow import io
    from nucflow.config import Params

__all__ = [
    "Result",
    "Stage",
    "NUCLEI",
    "PREPROCESS",
    "RESULT_PARAMS",
    "pass_grids",
    "check",
    "pools_while_smoothing",
    "configured_steps",
]

Check = Callable[["io.Stack", "Params"], None]


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


@dataclass(frozen=True)
class Stage:
    """A stage of a flow: the results it makes from what it ``reads``.

    ``reads`` names the input stack (``"input"``) or earlier stages (their last result);
    ``results(params, shape)`` says which results this configuration makes on a stack of
    ``shape`` (spatial axes), in order; ``checks`` validate the configuration against the stack
    before anything is written.
    """

    name: str
    reads: tuple[str, ...]
    results: Callable[[Params, tuple[int, ...]], tuple[Result, ...]]
    checks: tuple[Check, ...] = field(default=())

    def passes(self, params: Params, shape: tuple[int, ...]) -> tuple[str, ...]:
        """The grids of this stage's passes, in order: ``"blocks"``, ``"cells"``,
        ``"border"`` or ``"level<k>"`` (level k of the label pyramid)."""
        return tuple(grid for result in self.results(params, shape) for grid in result.passes)


# ----------------------------------------------------------------------------- checks


def _tissue_mask_matches(stack: io.Stack, params: Params) -> None:
    """A tissue mask must open and have the stack's spatial shape (the whole file's, for a
    region of it: ``nucflow tune``)."""
    if not params.tissue_mask:
        return
    from nucflow import io

    try:
        mask = io.open_stack(params.tissue_mask)
    except NucflowError as e:
        raise ConfigError(f"`preprocess.tissue_mask`: {e}") from None
    if tuple(mask.data.shape) != stack.uncropped_shape:
        raise ConfigError(
            f"`preprocess.tissue_mask` {params.tissue_mask} has shape {tuple(mask.data.shape)} "
            f"but the input has {stack.uncropped_shape}; give a mask of the input's shape"
        )


def _threshold_complete(_stack: io.Stack, params: Params) -> None:
    if params.threshold_method == "value" and params.threshold_value is None:
        raise ConfigError("`threshold.method` is value but `threshold.value` is null; set both")


def _filter_steps_valid(stack: io.Stack, params: Params) -> None:
    """Every ``filter.steps`` entry names a filter and takes its parameters."""
    configured_steps(params, ndim=stack.data.ndim)


def configured_steps(p: Params, *, ndim: int) -> list[tuple[str, dict[str, Any]]]:
    """``filter.steps`` with lengths in voxels, each step checked against its filter.

    Raises
    ------
    ConfigError
        A step names no filter, or its filter does not take its parameters.
    """
    steps = []
    for name, given in p.filter_steps:
        if name not in filters.STEPS:
            raise ConfigError(
                f"`filter.steps`: unknown filter {name!r}; use one of {', '.join(filters.STEPS)}"
            )
        try:
            in_voxels = filters.in_voxels(name, given, p.voxel_size)  # µm -> voxels
            filters.depth_of(name, ndim=ndim, **in_voxels)  # checks the step's parameters
        except NucflowError as e:
            raise ConfigError(f"`filter.steps`: {e}") from None
        steps.append((name, in_voxels))
    return steps


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
# the preprocess flow's one overlapped pass, written as OME-Zarr
FILTERED = Result("filtered", stored=False)
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


def _preprocess_results(p: Params, _shape: tuple[int, ...]) -> tuple[Result, ...]:
    exact = p.background == "tophat" and max(p.background_downsample) == 1
    if exact or p.background == "none":
        return (PREPROCESSED,)
    cells = replace(CELLS, passes=()) if pools_while_smoothing(p) else CELLS
    return (SMOOTHED, cells, BACKGROUND, PREPROCESSED)


def pools_while_smoothing(p: Params) -> bool:
    """Does the Gaussian's pass also store the cell minima (no pass of their own)?

    Yes when every block is a whole number of cells (each block then pools into cells of its
    own) and the Gaussian is a block pass (not the tissue mask's normalized convolution).
    """
    whole = all(c % f == 0 for c, f in zip(p.chunks, p.background_downsample, strict=True))
    return whole and not p.tissue_mask


def _mask_results(p: Params, _shape: tuple[int, ...]) -> tuple[Result, ...]:
    return (OPENED, *((FILLED,) if p.fill_holes else ()), *((MASK,) if p.min_voxels > 0 else ()))


def _table_results(p: Params, _shape: tuple[int, ...]) -> tuple[Result, ...]:
    neighbours = (NEIGHBOURS,) if "neighbours" in p.properties else ()
    return (TABLE, *neighbours, *((BORDER,) if p.drop_border else ()))


def _pyramid_results(p: Params, shape: tuple[int, ...]) -> tuple[Result, ...]:
    from nucflow import pyramid

    levels = len(pyramid.level_factors(shape, p.voxel_size))
    return (replace(PYRAMID, passes=tuple(f"level{k}" for k in range(1, levels + 1))),)


# ----------------------------------------------------------------------------- flows

NUCLEI: tuple[Stage, ...] = (
    Stage("preprocess", ("input",), _preprocess_results, (_tissue_mask_matches,)),
    Stage("threshold", ("preprocess",), lambda _p, _s: (THRESHOLD,), (_threshold_complete,)),
    Stage("mask", ("preprocess", "threshold"), _mask_results),
    Stage("segment", ("mask", "input"), lambda _p, _s: (SEGMENT,)),
    Stage("table", ("segment", "input"), _table_results),
    Stage("pyramid", ("segment",), _pyramid_results),
    Stage("write", ("table", "pyramid"), lambda _p, _s: (WRITE,)),
)
"""The nuclei flow (``flows/nuclei.py``)."""

PREPROCESS: tuple[Stage, ...] = (
    Stage("filter", ("input",), lambda _p, _s: (FILTERED,), (_filter_steps_valid,)),
)
"""The preprocess flow (``flows/preprocess.py``): ``filter.steps`` as one overlapped pass."""


def pass_grids(
    flow: Sequence[Stage], params: Params, shape: tuple[int, ...]
) -> dict[str, tuple[str, ...]]:
    """Stage name -> the grids of its passes, in order, for this configuration and a stack of
    ``shape`` (spatial axes)."""
    return {stage.name: stage.passes(params, shape) for stage in flow}


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

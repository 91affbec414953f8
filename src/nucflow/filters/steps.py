"""The step registry: every filter that :func:`~nucflow.filters.chain` can run, described once.

A step is a :class:`StepKind`: the function run on one block (with its halo), the halo it
needs, the checker that turns user parameters into checked ones, and, for steps that need a
number computed over the whole stack first (a noise level, the value range), a resolver that
computes it with a dask reduction before any block runs. The public filters of the same name
and :func:`~nucflow.filters.chain` both go through this table.

Adding a filter: write the three functions, call :func:`register` in the module that defines
them (imported by ``nucflow/filters/__init__.py``), and add a test against the whole-array call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import dask.array as da
import numpy as np

from nucflow.errors import ParameterError

Step = tuple[str, Mapping[str, Any]]


class StepKind(NamedTuple):
    """How one step runs; see :func:`register`."""

    block: Callable[..., np.ndarray]
    """``block(array, **params) -> array``, the whole-array function applied to one block."""
    depth: Callable[..., tuple[int, ...]]
    """``depth(**params)``: halo per axis (one value: the same on every axis)."""
    check: Callable[..., dict[str, Any]]
    """``check(ndim, **given) -> params``; raises ParameterError naming the argument."""
    resolve: Callable[[da.Array, dict[str, Any]], dict[str, Any]] | None = None
    """``resolve(step_input, params) -> params``: fills the parameters the checker left as
    None with whole-stack values (one dask reduction); None when the step needs none."""
    lengths: tuple[str, ...] = ()
    """Parameters that are lengths: µm in ``filter.steps`` (see ``in_voxels``), voxels here."""


STEPS: dict[str, StepKind] = {}
"""Steps usable in :func:`~nucflow.filters.chain`: name -> :class:`StepKind`."""


def register(name: str, kind: StepKind) -> None:
    """Make ``name`` usable in :func:`~nucflow.filters.chain` and ``filter.steps``."""
    if name in STEPS:
        raise ValueError(f"filter step {name!r} is registered twice")
    STEPS[name] = kind


def _checked(name: str, ndim: int, params: Mapping[str, Any]) -> dict:
    if name not in STEPS:
        raise ParameterError(f"step name must be one of {sorted(STEPS)}, got {name!r}")
    try:
        return STEPS[name].check(ndim, **params)
    except TypeError as err:  # unknown or missing keyword
        raise ParameterError(f"bad parameters for step {name!r}: {err}") from None


def _checked_steps(steps: Sequence[Step], ndim: int) -> list[tuple[str, dict]]:
    if not steps:
        raise ParameterError("`steps` must contain at least one (name, params) pair, got none")
    checked = []
    for step in steps:
        if not (isinstance(step, tuple | list) and len(step) == 2):
            raise ParameterError(f"`steps` entries must be (name, params) pairs, got {step!r}")
        checked.append((step[0], _checked(step[0], ndim, step[1])))
    return checked


def _unresolved(name: str, params: Mapping[str, Any]) -> bool:
    """True when a step still waits for whole-stack values (its resolver fills the Nones)."""
    return STEPS[name].resolve is not None and any(v is None for v in params.values())


def _step_depth(name: str, ndim: int, params: dict) -> tuple[int, ...]:
    depth = STEPS[name].depth(**params)
    return depth * ndim if len(depth) == 1 else depth


def depth_of(step_name: str, *, ndim: int | None = None, **params: Any) -> tuple[int, ...]:
    """Halo (voxels per axis) a step needs so that chunked and whole-array results agree.

    Parameters
    ----------
    step_name : str
        A key of :data:`STEPS` (``"gaussian"``, ``"median"``, ``"white_tophat"``, ...).
    ndim : int, optional
        Number of axes. Inferred from a per-axis ``sigma``/``size`` or from the footprint;
        3 when the parameters do not fix it (scalar ``sigma``/``size``, ``sobel``).
    **params
        The step's parameters, as for the filter of the same name.

    Returns
    -------
    depth : tuple of int
        Gaussian: ``ceil(truncate * sigma)``; median/uniform: ``size // 2``; erosion/dilation:
        footprint half-extent, summed over a decomposed sequence; opening, closing and
        top-hats: twice that; sobel: 1; nl_means: ``patch_distance + patch_size // 2``;
        bilateral: the window's half-width.
    """
    if ndim is None:
        ndim = _infer_ndim(params)
    return _step_depth(step_name, ndim, _checked(step_name, ndim, params))


def _infer_ndim(params: Mapping[str, Any]) -> int:
    for key in ("sigma", "size", "sigma_spatial"):
        if key in params and np.ndim(params[key]):
            return len(np.ravel(params[key]))
    fp = params.get("footprint")
    if isinstance(fp, np.ndarray):
        return fp.ndim
    if isinstance(fp, Sequence) and fp and isinstance(fp[0], tuple):
        return np.asarray(fp[0][0]).ndim
    return 3

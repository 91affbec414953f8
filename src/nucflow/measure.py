"""Per-nucleus measurements from mergeable per-block sums.

Each block reports, for every label in its core, sums that add up across blocks: voxel count,
coordinate sums and products (integers, so exact in any order), bounding box, intensity sum, sum of
squares, min and max per channel, and the farthest distance from the seed. :func:`combine` adds the
parts of all blocks and :func:`finalize` turns the totals into the contract columns — so a nucleus
spread over many blocks is measured exactly as if it lay in one.

Axis lengths are those of the solid ellipsoid (ellipse in 2D) with the same second moments in
physical units, as in ``skimage.measure.regionprops(..., spacing=voxel_size)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["block_stats", "combine", "finalize", "empty_table", "table_columns"]

_AXES = {2: "yx", 3: "zyx"}


def _products(axes: str) -> list[str]:
    return [f"{a}{b}" for i, a in enumerate(axes) for b in axes[i:]]


def block_stats(
    labels: np.ndarray,
    seed_distance: np.ndarray,
    intensities: Mapping[str, np.ndarray],
    *,
    origin: Sequence[int],
) -> pd.DataFrame:
    """Mergeable sums for every label of one block.

    Parameters
    ----------
    labels : (M, N[, P]) ndarray of uint64
        The block's core labels.
    seed_distance : (M, N[, P]) ndarray of float32
        Distance from each labelled voxel to its seed, µm.
    intensities : mapping of str to (M, N[, P]) ndarray
        Channel suffix ("" for the segmentation channel, "_c1", ...) -> intensities of the core.
    origin : sequence of int
        Global coordinates of ``labels[0, 0(, 0)]``.

    Returns
    -------
    pandas.DataFrame
        One row per label, indexed by label.
    """
    axes = _AXES[labels.ndim]
    inside = labels > 0
    flat = np.flatnonzero(inside)
    values = labels.ravel()[flat]
    # Group by label with one stable sort, then reduce each quantity in turn: a table with a
    # column per quantity and a row per voxel held ~15x the block's labelled voxels in memory.
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[len(values) > 0, sorted_values[1:] != sorted_values[:-1]])
    flat = flat[order]
    del values, order

    def grouped(quantity: np.ndarray, how: np.ufunc) -> np.ndarray:
        return how.reduceat(quantity, starts) if len(starts) else quantity[:0]

    n = np.diff(np.r_[starts, len(flat)]).astype(np.int64)
    columns: dict[str, np.ndarray] = {"n": n}
    # Coordinates relative to the block keep every sum small; shifted to the stack exactly.
    local = [c.astype(np.int64, copy=False) for c in np.unravel_index(flat, labels.shape)]
    shift = np.asarray(origin, np.int64)
    sums = {a: grouped(c, np.add) for a, c in zip(axes, local, strict=True)}
    for i, a in enumerate(axes):
        columns[f"s_{a}"] = sums[a] + n * shift[i]
    for pair in _products(axes):
        i, j = axes.index(pair[0]), axes.index(pair[1])
        product = grouped(local[i] * local[j], np.add)
        columns[f"s_{pair}"] = (
            product + shift[j] * sums[pair[0]] + shift[i] * sums[pair[1]] + n * shift[i] * shift[j]
        )
    for how, ufunc in (("min", np.minimum), ("max", np.maximum)):
        for i, a in enumerate(axes):
            columns[f"{how}_{a}"] = grouped(local[i], ufunc).astype(np.int64) + shift[i]
    del local
    columns["seed_distance"] = grouped(seed_distance.ravel()[flat], np.maximum)
    for suffix, image in intensities.items():
        value = image.ravel()[flat].astype(np.float64)
        columns[f"isum{suffix}"] = grouped(value, np.add)
        columns[f"isq{suffix}"] = grouped(value * value, np.add)
        columns[f"imin{suffix}"] = grouped(value, np.minimum)
        columns[f"imax{suffix}"] = grouped(value, np.maximum)
    index = pd.Index(sorted_values[starts], name="label")
    return pd.DataFrame(columns, index=index)


def combine(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Add up the per-block sums of labels that span several blocks."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame()
    stacked = pd.concat(parts)
    if stacked.index.is_unique:
        return stacked.sort_index()
    rules = {c: _rule(c) for c in stacked.columns}
    return stacked.groupby(level=0).agg(rules).sort_index()


def _rule(column: str) -> str:
    if column.startswith(("min_", "imin", "first")):
        return "min"
    if column.startswith(("max_", "imax", "seed_distance")):
        return "max"
    return "sum"


def table_columns(ndim: int, channel_suffixes: Sequence[str] = ("",)) -> list[str]:
    """The contract's column order for a 2D or 3D table."""
    axes = _AXES[ndim]
    size = "volume_um3" if ndim == 3 else "area_um2"
    columns = ["label"]
    columns += [f"centroid_{a}" for a in axes] + [f"centroid_{a}_um" for a in axes]
    columns += [f"bbox_min_{a}" for a in axes] + [f"bbox_max_{a}" for a in axes]
    columns += [
        "n_voxels",
        size,
        "equivalent_diameter_um",
        "major_axis_length_um",
        "minor_axis_length_um",
    ]
    for suffix in channel_suffixes:
        columns += [f"intensity_{s}{suffix}" for s in ("mean", "min", "max", "std", "sum")]
    return columns + ["touches_border", "truncated"]


def empty_table(
    ndim: int, channel_suffixes: Sequence[str] = ("",), label_dtype: str = "uint64"
) -> pd.DataFrame:
    """A table with every column and no rows."""
    columns = table_columns(ndim, channel_suffixes)
    dtypes = {c: label_dtype if c == "label" else _dtype(c) for c in columns}
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in dtypes.items()})


def _dtype(column: str) -> str:
    if column in ("touches_border", "truncated"):
        return "bool"
    if column == "label":
        return "uint64"
    if column.startswith(("bbox_", "n_voxels")):
        return "int64"
    return "float64"


def finalize(
    totals: pd.DataFrame,
    *,
    voxel_size: Sequence[float],
    shape: Sequence[int],
    max_radius: float,
    channel_suffixes: Sequence[str] = ("",),
    origin: Sequence[int] | None = None,
    label_dtype: str = "uint64",
) -> pd.DataFrame:
    """Turn combined sums into the contract table.

    Parameters
    ----------
    totals : pandas.DataFrame
        Output of :func:`combine`.
    voxel_size : sequence of float
        µm per voxel along each axis.
    shape : sequence of int
        Spatial shape of the imaged region (for ``touches_border``).
    max_radius : float
        The segmentation's ``max_radius``; a nucleus reaching it is ``truncated``.
    channel_suffixes : sequence of str
        Suffixes of the measured channels, "" first.
    origin : sequence of int, optional
        Stack coordinates of the region's first voxel (default: 0 on every axis).
    label_dtype : str, optional
        The label image's dtype: ``label`` is of it, so a join with the image's values needs
        no cast (uint32 for stacks up to 4.29 G voxels).

    Returns
    -------
    pandas.DataFrame
        One row per nucleus, sorted by label, columns from :func:`table_columns`.
    """
    ndim = len(shape)
    if totals.empty:
        return empty_table(ndim, channel_suffixes, label_dtype)
    axes = _AXES[ndim]
    voxel = np.asarray(voxel_size, float)
    n = totals["n"].to_numpy(np.float64)
    out: dict[str, np.ndarray] = {"label": totals.index.to_numpy(np.uint64).astype(label_dtype)}
    centroid = np.stack([totals[f"s_{a}"].to_numpy(np.float64) / n for a in axes], 1)
    for i, a in enumerate(axes):
        out[f"centroid_{a}"] = centroid[:, i]
    for i, a in enumerate(axes):
        out[f"centroid_{a}_um"] = centroid[:, i] * voxel[i]
    for a in axes:
        out[f"bbox_min_{a}"] = totals[f"min_{a}"].to_numpy(np.int64)
    for a in axes:
        out[f"bbox_max_{a}"] = totals[f"max_{a}"].to_numpy(np.int64) + 1
    size = n * float(np.prod(voxel))
    out["n_voxels"] = totals["n"].to_numpy(np.int64)
    out["volume_um3" if ndim == 3 else "area_um2"] = size
    out["equivalent_diameter_um"] = (
        (6 * size / math.pi) ** (1 / 3) if ndim == 3 else np.sqrt(4 * size / math.pi)
    )
    major, minor = _axis_lengths(totals, centroid, n, voxel, axes)
    out["major_axis_length_um"], out["minor_axis_length_um"] = major, minor
    for suffix in channel_suffixes:
        mean = totals[f"isum{suffix}"].to_numpy() / n
        variance = np.maximum(totals[f"isq{suffix}"].to_numpy() / n - mean**2, 0.0)
        out[f"intensity_mean{suffix}"] = mean
        out[f"intensity_min{suffix}"] = totals[f"imin{suffix}"].to_numpy(np.float64)
        out[f"intensity_max{suffix}"] = totals[f"imax{suffix}"].to_numpy(np.float64)
        out[f"intensity_std{suffix}"] = np.sqrt(variance)
        out[f"intensity_sum{suffix}"] = totals[f"isum{suffix}"].to_numpy(np.float64)
    lo = np.stack([out[f"bbox_min_{a}"] for a in axes], 1)
    hi = np.stack([out[f"bbox_max_{a}"] for a in axes], 1)
    start = np.zeros(ndim, np.int64) if origin is None else np.asarray(origin, np.int64)
    out["touches_border"] = np.any(lo == start, 1) | np.any(hi == start + np.asarray(shape), 1)
    out["truncated"] = totals["seed_distance"].to_numpy() > max_radius - voxel.max()
    return pd.DataFrame(out, columns=table_columns(ndim, channel_suffixes)).reset_index(drop=True)


def _axis_lengths(totals, centroid, n, voxel, axes) -> tuple[np.ndarray, np.ndarray]:
    """Full axis lengths of the solid ellipsoid with the region's physical covariance."""
    ndim = len(axes)
    covariance = np.empty((len(n), ndim, ndim))
    for i, a in enumerate(axes):
        for j in range(i, ndim):
            pair = f"{a}{axes[j]}"
            second = totals[f"s_{pair}"].to_numpy(np.float64) / n
            value = (second - centroid[:, i] * centroid[:, j]) * voxel[i] * voxel[j]
            covariance[:, i, j] = covariance[:, j, i] = value
    eigen = np.clip(np.linalg.eigvalsh(covariance), 0, None)
    # a solid ellipse has variance a²/4 per semi-axis a, a solid ellipsoid a²/5
    scale = 4.0 if ndim == 2 else 2.0 * math.sqrt(5.0)
    return scale * np.sqrt(eigen[:, -1]), scale * np.sqrt(eigen[:, 0])

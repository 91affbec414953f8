"""``--diameter auto``: the typical nucleus diameter estimated from the stack, once, before the
passes.

A few blocks spread along the stack's diagonal are read (a fixed choice: the same stack gives
the same estimate), and scikit-image's scale-space blob detector (:func:`skimage.feature.blob_log`,
the scale-normalised Laplacian of Gaussian over a range of scales) finds the blobs in each, with
per-axis scales so that every scale is one physical length in µm. A ball of radius ``r`` answers
most at ``sigma = r / sqrt(ndim)``; the estimate is twice the median radius of the blobs found.
Everything after it is the run with that diameter, so seam-freedom is untouched: the estimate
is one number computed before any block pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dask.array as da
import numpy as np

from nucflow.errors import ParameterError

__all__ = ["Estimate", "estimate"]

#: Blocks read, and their shape per axis count (voxels): a few hundred nuclei at 8 µm.
SAMPLE_BLOCKS = 3
SAMPLE_SHAPE = {2: (512, 512), 3: (48, 192, 192)}
_SCALES = 14  # scales tried, log-spaced between the smallest and the largest radius
_MIN_RADIUS_VOXELS = 1.5  # smaller blobs are noise, whatever the voxel size
_THRESHOLD_REL = 0.1  # blobs at least this fraction of the block's strongest response
_STRONG = 0.25  # of the strong blobs' response (see _blob_radii)


@dataclass(frozen=True)
class Estimate:
    """The estimated diameter and what it rests on.

    Attributes
    ----------
    diameter : float
        Twice the median blob radius, µm (pixels without a voxel size).
    blobs : int
        Blobs found in the sample.
    blocks : int
        Blocks read.
    """

    diameter: float
    blobs: int
    blocks: int

    def describe(self) -> str:
        """One line for the console and the logs."""
        return (
            f"--diameter auto: {self.diameter:.3g} (median of {self.blobs} blobs in "
            f"{self.blocks} sample blocks)"
        )


def estimate(data: da.Array, voxel_size: tuple[float, ...]) -> Estimate:
    """Estimate the typical nucleus diameter of a stack.

    Parameters
    ----------
    data : (Z, Y, X) or (Y, X) dask array
        The stack (only the sample blocks are read).
    voxel_size : tuple of float
        µm per voxel along each axis.

    Returns
    -------
    Estimate

    Raises
    ------
    ParameterError
        When no blob is found (an empty or flat stack): the diameter must then be given.
    """
    radii: list[np.ndarray] = []
    regions = _sample(data.shape)
    for region in regions:
        block = np.asarray(data[region].compute(), np.float32)
        radii.append(_blob_radii(block, voxel_size))
    found = np.concatenate(radii)
    if found.size == 0:
        raise ParameterError(
            "--diameter auto found no nuclei in the sample blocks; pass --diameter in µm"
        )
    return Estimate(float(2 * np.median(found)), int(found.size), len(regions))


def _sample(shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Up to :data:`SAMPLE_BLOCKS` distinct blocks centred along the stack's diagonal."""
    block = tuple(min(b, n) for b, n in zip(SAMPLE_SHAPE[len(shape)], shape, strict=True))
    regions: list[tuple[slice, ...]] = []
    for i in range(SAMPLE_BLOCKS):
        at = (i + 0.5) / SAMPLE_BLOCKS
        starts = [
            min(max(0, round(at * n - b / 2)), n - b) for n, b in zip(shape, block, strict=True)
        ]
        region = tuple(slice(s, s + b) for s, b in zip(starts, block, strict=True))
        if region not in regions:
            regions.append(region)
    return regions


def _blob_radii(block: np.ndarray, voxel_size: tuple[float, ...]) -> np.ndarray:
    """Radii (µm) of the blobs of one block, scales in µm converted to voxels per axis."""
    from skimage.feature import blob_log

    ndim = block.ndim
    voxel = np.asarray(voxel_size, float)
    smallest = _MIN_RADIUS_VOXELS * float(voxel.min())
    # a nucleus must fit twice in the block's thinnest physical extent
    largest = float(min(n * v for n, v in zip(block.shape, voxel, strict=True))) / 4
    if largest <= smallest or float(block.max()) <= float(block.min()):
        return np.empty(0)
    to_sigma = 1 / math.sqrt(ndim)  # a ball of radius r answers most at sigma = r / sqrt(ndim)
    finest = smallest * to_sigma / voxel
    centred = block - float(np.median(block))
    blobs = blob_log(
        centred,
        min_sigma=tuple(finest),
        max_sigma=tuple(largest * to_sigma / voxel),
        num_sigma=_SCALES,
        log_scale=True,
        threshold=None,
        threshold_rel=_THRESHOLD_REL,
        exclude_border=True,
    )
    if len(blobs) == 0:
        return np.empty(0)
    sigma = blobs[:, ndim]  # voxels along axis 0: the same length in µm on every axis
    # A blob at the smallest scale tried is no scale-space maximum (its response still grows
    # towards finer scales): noise, not a nucleus.
    keep = sigma > finest[0] * (1 + 1e-6)
    blobs, sigma = blobs[keep], sigma[keep]
    if len(blobs) == 0:
        return np.empty(0)
    # Noise leaves many weak blobs at fine scales: keep those answering at least a quarter as
    # strongly as the strong ones (the 90th percentile), nuclei whatever their number.
    strength = _strength(centred, blobs, voxel)
    keep = strength >= _STRONG * strength.max()
    return np.asarray(sigma[keep] * voxel[0] / to_sigma)


def _strength(image: np.ndarray, blobs: np.ndarray, voxel: np.ndarray) -> np.ndarray:
    """Scale-normalised negative Laplacian of Gaussian (physical units) at each blob, at its
    own scale."""
    from scipy import ndimage

    ndim = image.ndim
    out = np.empty(len(blobs))
    for sigma in np.unique(blobs[:, ndim]):
        rows = blobs[:, ndim] == sigma
        per_axis = sigma * voxel[0] / voxel  # voxels per axis of one physical sigma
        at = tuple(blobs[rows, :ndim].astype(int).T)
        total = np.zeros(int(rows.sum()))
        for axis in range(ndim):
            order = [0] * ndim
            order[axis] = 2
            second = ndimage.gaussian_filter(image, per_axis, order=order)
            total += second[at] / voxel[axis] ** 2
        out[rows] = -total * (sigma * voxel[0]) ** 2
    return out

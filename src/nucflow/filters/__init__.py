"""Chunk-exact image filters on dask arrays.

Every function takes a 2D or 3D dask array and returns a lazy dask array equal to the
whole-array scipy / scikit-image result, whatever the chunking. Local filters are registered
steps (:mod:`~nucflow.filters.steps`) run by one engine (:mod:`~nucflow.filters.overlap`): the
halo depth is derived from the parameters, chunks smaller than the depth are merged, and
``map_overlap(boundary="none")`` lets scipy's own edge mode act only at the true image edge,
so results are bit-identical to the whole-array call (see the tests). Steps that need a
whole-stack number (a noise level, the value range) get it from one dask reduction before the
pass, never per block. Global operations (:func:`remove_small_objects`, :func:`fill_holes`,
:func:`threshold`) use dask reductions and never gather the image in the driver.

Modules, one concern each:

- ``steps``: the step registry (:data:`STEPS`, :func:`register`, :func:`depth_of`);
- ``overlap``: the engine (:func:`chain`, :func:`chain_read`, :class:`BlockFilter`);
- ``local``: Gaussian, mean, median, Sobel, grey morphology, normalized convolution;
- ``denoise``: non-local means, bilateral, the whole-stack noise estimate;
- ``footprints``: :func:`ellipsoid`, :func:`box_size` and :func:`in_voxels` (lengths -> voxels);
- ``background``: :func:`subtract_background`;
- ``masks``: :func:`remove_small_objects`, :func:`fill_holes`;
- ``thresholds``: :func:`threshold` and exact order statistics.

Units of length, one rule: **the functions of this package take voxels** wherever the call
they equal does (``gaussian``'s ``sigma`` as ``scipy.ndimage.gaussian_filter``, ``median``'s
``size``, ``nl_means``' ``patch_size``/``patch_distance``, ``bilateral``'s ``sigma_spatial``);
**a parameter named radius or one that comes with a voxel size is µm** (``ellipsoid(radius_um,
voxel_size)``, ``box_size``, ``subtract_background(radius=, voxel_size=)``). The configured
steps (``filter.steps`` in ``configs/nuclei.yaml``) are physical: their lengths are µm and
:func:`in_voxels` alone converts them (counts such as ``size`` or ``patch_size`` stay voxels,
intensities such as ``h`` stay intensities).
"""

from __future__ import annotations

from nucflow.filters import denoise as _denoise  # noqa: F401  (registers its steps)
from nucflow.filters.background import background_steps, subtract_background
from nucflow.filters.denoise import bilateral, nl_means, noise_sigma
from nucflow.filters.footprints import Footprint, box_size, ellipsoid, in_voxels
from nucflow.filters.local import (
    black_tophat,
    closing,
    dilation,
    erosion,
    gaussian,
    median,
    normalized_convolution,
    opening,
    sobel,
    uniform,
    white_tophat,
)
from nucflow.filters.masks import fill_holes, remove_small_objects
from nucflow.filters.overlap import BlockFilter, chain, chain_read
from nucflow.filters.steps import STEPS, Step, StepKind, depth_of, register
from nucflow.filters.thresholds import threshold

__all__ = [
    "gaussian",
    "uniform",
    "median",
    "sobel",
    "erosion",
    "dilation",
    "opening",
    "closing",
    "white_tophat",
    "black_tophat",
    "normalized_convolution",
    "nl_means",
    "bilateral",
    "noise_sigma",
    "subtract_background",
    "background_steps",
    "remove_small_objects",
    "fill_holes",
    "threshold",
    "ellipsoid",
    "box_size",
    "in_voxels",
    "chain",
    "chain_read",
    "BlockFilter",
    "depth_of",
    "register",
    "STEPS",
    "Step",
    "StepKind",
    "Footprint",
]

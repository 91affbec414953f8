"""Object-level measurements: any property of a whole nucleus, computed on its bbox crop.

The moment columns of :mod:`nucflow.measure` add up across blocks; solidity, Feret diameter,
percentiles or a surface mesh do not. They need the whole object. Every nucleus lies within a
known reach of the block that owns it, so the task that makes its row (:mod:`nucflow.table`)
reads the box around its own nuclei from the final label image and the intensity stacks and
measures each nucleus on its bbox crop — the same crop ``skimage.measure.regionprops`` takes
from the whole label image, so the values are those of
``regionprops_table(whole_labels, whole_image, spacing=voxel_size)``, on any chunking.

:data:`PROPERTIES` is the registry: a name in ``measure.properties`` -> how the value is
computed, its columns and unit. Column names start with the property name; a ``_um``,
``_um2`` or ``_um3`` suffix gives the unit (in 3D, regionprops' "area" is a volume:
``area_convex`` -> ``volume_convex_um3``), then the channel suffix (``_c1``, ...) for
per-channel properties. Properties that today's moment columns already give
(``area``, ``centroid``, ``intensity_mean``, ...) are accepted and add no column.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError, cKDTree
from scipy.spatial.distance import pdist
from skimage.measure import (
    euler_number,
    find_contours,
    marching_cubes,
    mesh_surface_area,
    regionprops,
)
from skimage.morphology import convex_hull_image

from nucflow.errors import ConfigError

__all__ = [
    "PROPERTIES",
    "DEFAULT_PROPERTIES",
    "Spec",
    "Crop",
    "default_columns",
    "measure_rows",
    "neighbour_columns",
]

_AXES = {2: "yx", 3: "zyx"}

#: What ``measure.properties`` holds unless configured: the cheap ones. The convex hull
#: (solidity, area_convex) and Feret diameter cost more than the whole rest of the pipeline on
#: dense stacks (+9.5 s on the 7.4 s of benchmarks/pipeline.py), so they are asked for by name.
DEFAULT_PROPERTIES = ("extent", "euler_number")


@dataclass
class Crop:
    """One nucleus: its bbox crop, intensities, and what its properties are computed from.

    Attributes
    ----------
    mask : (M, N[, P]) ndarray of bool
        The nucleus in its bounding box (regionprops' ``image``).
    intensity : (M, N[, P], C) ndarray
        The channels over the same box, channel last (C = 0 when no property asks for
        intensities: none are read).
    origin : tuple of int
        Global coordinates of ``mask[0, 0(, 0)]``.
    voxel_size : tuple of float
        µm per voxel.
    around : callable, optional
        ``around(margin)`` -> (labels, intensity, origin) of the box grown by ``margin`` voxels
        per axis (clipped to the stack), for properties that look outside the nucleus.
    label : int
        The nucleus' label.
    """

    mask: np.ndarray
    intensity: np.ndarray
    origin: tuple[int, ...]
    voxel_size: tuple[float, ...]
    around: Callable[[Sequence[int]], tuple[np.ndarray, np.ndarray, tuple[int, ...]]] | None
    label: int

    @cached_property
    def region(self) -> Any:
        """``skimage.measure.regionprops`` of the crop (lazy, cached per property)."""
        intensity = self.intensity if self.intensity.shape[-1] else None
        return regionprops(self.mask.astype(np.uint8), intensity, spacing=self.voxel_size)[0]

    @cached_property
    def convex(self) -> np.ndarray:
        """The convex hull of :attr:`mask` (regionprops' ``image_convex``), also for flat
        nuclei: scikit-image returns an empty hull (and a warning) for a 3D object one voxel
        thick, so the hull is taken in the axes the object extends along."""
        flat = tuple(n for n in self.mask.shape if n > 1)
        if len(flat) <= 1:  # a voxel or a line: its bbox is its hull
            return np.ones(self.mask.shape, bool)
        if len(flat) < self.mask.ndim:
            return convex_hull_image(self.mask.reshape(flat)).reshape(self.mask.shape)
        if self.mask.ndim == 2:
            return convex_hull_image(self.mask)
        try:
            return _convex_hull_3d(self.mask)
        except QhullError:  # coplanar voxel centres: no hull; the object is the best answer
            return self.mask

    @cached_property
    def mesh_area(self) -> float:
        """Area (µm²) of the marching-cubes mesh of :attr:`mask` (surface area and sphericity
        share it)."""
        verts, faces, _, _ = marching_cubes(
            np.pad(self.mask, 1).astype(np.float32), level=0.5, spacing=self.voxel_size
        )
        return float(mesh_surface_area(verts, faces))

    @cached_property
    def values(self) -> np.ndarray:
        """(voxels, C) intensities inside the nucleus."""
        return self.intensity[self.mask]


@dataclass(frozen=True)
class Settings:
    """Parameters of the nucflow-specific properties (all lengths in µm).

    The defaults are configs/nuclei.yaml's at its default diameter (tests/test_config.py
    checks that they agree); a run passes its own (:class:`nucflow.config.Measure`).
    """

    percentiles: tuple[float, ...] = (5.0, 25.0, 75.0, 95.0)
    shell_width: float = 1.2
    neighbour_distance: float = 16.0


Compute = Callable[[Crop, Settings], list[float]]


@dataclass(frozen=True)
class Property:
    """How one entry of ``measure.properties`` is computed and named.

    Attributes
    ----------
    unit : int or "ndim"
        Power of µm of the value (0: none; "ndim": area in 2D, volume in 3D).
    compute : callable or None
        ``compute(crop, settings)`` -> values in column order; None: an existing column.
    parts : str
        "" (one value), "axes" (one per spatial axis) or "percentiles".
    per_channel : bool
        One set of columns per measured channel (the properties that read intensities).
    dims : tuple of int
        Dimensionalities it exists for.
    alias : str
        The existing moment column(s) it equals (documentation; no column is added).
    table : bool
        A cross-block measurement: computed from the rows of the nuclei around each one, in a
        pass of its own after the table (:func:`nucflow.table.neighbours`), not from the crop.
    columns : tuple of str
        The fixed column names of a ``table`` property.
    isotropic : bool
        scikit-image computes it for equal voxel sides only (2D perimeters).
    """

    unit: int | str = 0
    compute: Compute | None = None
    parts: str = ""
    per_channel: bool = False
    dims: tuple[int, ...] = (2, 3)
    alias: str = ""
    table: bool = False
    isotropic: bool = False
    columns: tuple[str, ...] = ()


#: scikit-image's tolerance for a voxel centre on a hull facet (``convex_hull_image``)
_HULL_TOLERANCE = 1e-10


def _convex_hull_3d(mask: np.ndarray) -> np.ndarray:
    """``skimage.morphology.convex_hull_image(mask)`` for a 3D mask, ~2x faster.

    The same hull (of the voxels' face centres, as scikit-image's ``offset_coordinates``), from
    the surface voxels only (interior voxels are never hull vertices), and the same test of each
    voxel centre against every facet (inside if ``normal · x + offset < 1e-10``), solved per
    row along x as an interval instead of voxel by voxel.
    """
    surface = np.argwhere(mask & ~ndimage.binary_erosion(mask))
    first = ConvexHull(surface)
    corners = first.points[first.vertices][:, None, :] + _FACE_OFFSETS
    hull = ConvexHull(np.unique(corners.reshape(-1, 3), axis=0))
    normal, offset = hull.equations[:, :3], hull.equations[:, 3]
    nz, ny, nx = mask.shape
    z, y = (a.ravel() for a in np.meshgrid(np.arange(nz), np.arange(ny), indexing="ij"))
    rest = offset[:, None] + normal[:, 0:1] * z + normal[:, 1:2] * y  # (facets, rows)
    along = normal[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = (_HULL_TOLERANCE - rest) / along[:, None]
    above, below, level = along > 0, along < 0, along == 0
    high = bound[above].min(0) if above.any() else np.full(len(z), np.inf)
    low = bound[below].max(0) if below.any() else np.full(len(z), -np.inf)
    rows_ok = (rest[level] < _HULL_TOLERANCE).all(0)
    x = np.arange(nx)
    inside = (x > low[:, None]) & (x < high[:, None]) & rows_ok[:, None]
    return inside.reshape(mask.shape)


_FACE_OFFSETS = np.array(
    [[-0.5, 0, 0], [0.5, 0, 0], [0, -0.5, 0], [0, 0.5, 0], [0, 0, -0.5], [0, 0, 0.5]]
)


def _rp(name: str) -> Compute:
    """A scalar regionprops property (one value, or one per channel)."""

    def compute(crop: Crop, _settings: Settings) -> list[float]:
        return list(np.atleast_1d(np.asarray(getattr(crop.region, name), np.float64)))

    return compute


def _rp_axes(name: str, *, position: bool = False) -> Compute:
    """A regionprops property with one value per axis (and per channel: axes first)."""

    def compute(crop: Crop, _settings: Settings) -> list[float]:
        value = np.asarray(getattr(crop.region, name), np.float64)
        value = value.reshape(len(crop.mask.shape), -1)
        if position:  # regionprops measured the crop: shift to the stack (µm)
            shift = np.asarray(crop.origin, float) * np.asarray(crop.voxel_size)
            value = value + shift[:, None]
        return list(value.T.ravel())  # channel-major, so each channel's columns are together

    return compute


def _feret_diameter_max(crop: Crop, _settings: Settings) -> list[float]:
    """regionprops' ``feret_diameter_max``, with pdist over the hull of its contour points only.

    The largest distance between points of a set is between two vertices of their convex hull,
    and pdist computes each pair alike: the same value, without the O(points²) memory that a
    large nucleus' contour costs regionprops (10^4 points -> 400 MB).
    """
    hull_image = np.pad(crop.convex, 2)
    if hull_image.ndim == 2:
        coordinates = np.vstack(find_contours(hull_image, 0.5, fully_connected="high"))
    else:
        coordinates = marching_cubes(hull_image, level=0.5)[0]
    scaled = coordinates * np.asarray(crop.voxel_size)
    try:
        scaled = scaled[ConvexHull(scaled).vertices]
    except QhullError:  # flat point sets: every point, as regionprops
        pass
    return [math.sqrt(np.max(pdist(scaled, "sqeuclidean")))]


def _extent(crop: Crop, _settings: Settings) -> list[float]:
    """regionprops' ``extent`` (``area / area_bbox``, both in µm), without its object."""
    voxel = np.prod(np.asarray(crop.voxel_size, np.float64))
    return [float((np.sum(crop.mask) * voxel) / (crop.mask.size * voxel))]


def _euler_number(crop: Crop, _settings: Settings) -> list[float]:
    """regionprops' ``euler_number`` (full connectivity), without its object."""
    return [float(euler_number(crop.mask, crop.mask.ndim))]


def _area_convex(crop: Crop, _settings: Settings) -> list[float]:
    return [float(crop.convex.sum()) * math.prod(crop.voxel_size)]


def _solidity(crop: Crop, _settings: Settings) -> list[float]:
    return [float(crop.mask.sum()) / float(crop.convex.sum())]


def _surface_area(crop: Crop, _settings: Settings) -> list[float]:
    """Area of the marching-cubes mesh of the nucleus (µm²)."""
    return [crop.mesh_area]


def _sphericity(crop: Crop, _settings: Settings) -> list[float]:
    """π^(1/3) (6 V)^(2/3) / A: 1 for a ball, smaller for any other shape (V: voxel volume)."""
    volume = float(crop.mask.sum()) * math.prod(crop.voxel_size)
    return [math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / crop.mesh_area]


def _median(crop: Crop, _settings: Settings) -> list[float]:
    return list(np.median(crop.values, axis=0))


def _percentiles(crop: Crop, settings: Settings) -> list[float]:
    # (q, C) -> channel-major, as the columns
    return list(np.percentile(crop.values, settings.percentiles, axis=0).T.ravel())


def _shell_margin(settings: Settings, voxel_size: Sequence[float]) -> tuple[int, ...]:
    return tuple(math.ceil(settings.shell_width / v) + 1 for v in voxel_size)


def _shell_mean(crop: Crop, settings: Settings) -> list[float]:
    """Mean intensity of the background voxels within ``shell_width`` µm of the nucleus.

    Voxels of other nuclei are not part of the shell; a nucleus with no such voxel gets NaN.
    """
    if crop.around is None:
        raise ValueError("shell_intensity_mean needs the crop's surroundings")
    labels, intensity, origin = crop.around(_shell_margin(settings, crop.voxel_size))
    inside = labels == crop.label
    distance = ndimage.distance_transform_edt(~inside, sampling=crop.voxel_size)
    band = (distance <= settings.shell_width) & (labels == 0)
    if not band.any():
        return [math.nan] * intensity.shape[-1]
    return list(intensity[band].astype(np.float64).mean(axis=0))


_LENGTH, _AREA = 1, 2
PROPERTIES: dict[str, Property] = {
    # today's moment columns (always in the table; listing them adds nothing)
    "area": Property("ndim", alias="volume_um3 / area_um2"),
    "centroid": Property(_LENGTH, alias="centroid_*_um"),
    "bbox": Property(alias="bbox_min_* / bbox_max_*"),
    "num_pixels": Property(alias="n_voxels"),
    "equivalent_diameter_area": Property(_LENGTH, alias="equivalent_diameter_um"),
    "axis_major_length": Property(_LENGTH, alias="major_axis_length_um"),
    "axis_minor_length": Property(_LENGTH, alias="minor_axis_length_um"),
    "intensity_mean": Property(alias="intensity_mean", per_channel=True),
    "intensity_min": Property(alias="intensity_min", per_channel=True),
    "intensity_max": Property(alias="intensity_max", per_channel=True),
    "intensity_std": Property(alias="intensity_std", per_channel=True),
    # regionprops on the nucleus' crop
    "area_bbox": Property("ndim", _rp("area_bbox")),
    "area_convex": Property("ndim", _area_convex),
    "area_filled": Property("ndim", _rp("area_filled")),
    "solidity": Property(0, _solidity),
    "extent": Property(0, _extent),
    "euler_number": Property(0, _euler_number),
    "feret_diameter_max": Property(_LENGTH, _feret_diameter_max),
    "eccentricity": Property(0, _rp("eccentricity"), dims=(2,)),
    "orientation": Property(0, _rp("orientation"), dims=(2,)),
    "perimeter": Property(_LENGTH, _rp("perimeter"), dims=(2,), isotropic=True),
    "perimeter_crofton": Property(_LENGTH, _rp("perimeter_crofton"), dims=(2,), isotropic=True),
    "inertia_tensor_eigvals": Property(_AREA, _rp_axes("inertia_tensor_eigvals"), parts="axes"),
    "centroid_weighted": Property(
        _LENGTH, _rp_axes("centroid_weighted", position=True), parts="axes", per_channel=True
    ),
    # nucflow's own
    "surface_area": Property(_AREA, _surface_area, dims=(3,)),
    "sphericity": Property(0, _sphericity, dims=(3,)),
    "intensity_median": Property(0, _median, per_channel=True),
    "intensity_percentile": Property(0, _percentiles, parts="percentiles", per_channel=True),
    "shell_intensity_mean": Property(0, _shell_mean, per_channel=True),
    "neighbours": Property(table=True, columns=("neighbours_count", "neighbours_nearest_um")),
}


def cross_block(properties: Sequence[str]) -> bool:
    """Whether any of ``properties`` is measured across blocks, from the table's rows (a pass
    after the table: ``neighbours``)."""
    return any(PROPERTIES[name].table for name in properties if name in PROPERTIES)


def _unit_suffix(unit: int | str, ndim: int) -> str:
    power = ndim if unit == "ndim" else int(unit)
    return {0: "", 1: "_um", 2: "_um2", 3: "_um3"}[power]


def _base_name(name: str, prop: Property, ndim: int) -> str:
    # regionprops calls a 3D region's volume its "area"
    return name.replace("area", "volume", 1) if ndim == 3 and prop.unit == "ndim" else name


def property_columns(
    name: str, ndim: int, suffixes: Sequence[str], settings: Settings
) -> list[str]:
    """The columns property ``name`` adds, in the order of its values."""
    prop = PROPERTIES[name]
    if prop.alias:
        return []
    if prop.columns:
        return list(prop.columns)
    base = _base_name(name, prop, ndim)
    unit = _unit_suffix(prop.unit, ndim)
    if prop.parts == "axes":
        parts = (
            [f"_{a}" for a in _AXES[ndim]]
            if name.startswith("centroid")
            else [f"_{i}" for i in range(ndim)]
        )
    elif prop.parts == "percentiles":
        parts = [f"_{q:g}" for q in settings.percentiles]
    else:
        parts = [""]
    channels = suffixes if prop.per_channel else [""]
    return [f"{base}{p}{unit}{c}" for c in channels for p in parts]


@dataclass(frozen=True)
class Spec:
    """What the object pass measures: checked property names and their settings."""

    properties: tuple[str, ...]
    ndim: int
    voxel_size: tuple[float, ...]
    suffixes: tuple[str, ...] = ("",)
    settings: Settings = field(default_factory=Settings)

    @classmethod
    def of(
        cls,
        properties: Sequence[str],
        *,
        ndim: int,
        voxel_size: Sequence[float],
        suffixes: Sequence[str] = ("",),
        settings: Settings | None = None,
    ) -> Spec:
        """Check ``measure.properties`` against the registry and the stack.

        Raises
        ------
        ConfigError
            An unknown property, one that does not exist in this dimensionality, or one
            scikit-image computes for isotropic voxels only on an anisotropic stack.
        """
        voxel = tuple(float(v) for v in voxel_size)
        for name in properties:
            _check(name, ndim, voxel)
        unique = tuple(dict.fromkeys(properties))
        return cls(unique, ndim, voxel, tuple(suffixes), settings or Settings())

    @property
    def crop_properties(self) -> tuple[str, ...]:
        """The properties computed on each nucleus' crop."""
        return tuple(n for n in self.properties if PROPERTIES[n].compute is not None)

    @property
    def neighbours(self) -> bool:
        """Whether a cross-block (``table``) property asks for the pass after the table."""
        return cross_block(self.properties)

    def columns(self) -> list[str]:
        """Every column the object pass and the neighbour pass add, in table order."""
        out: list[str] = []
        for name in self.properties:
            out += property_columns(name, self.ndim, self.suffixes, self.settings)
        return out

    def margin(self) -> tuple[int, ...]:
        """Voxels per axis read around each nucleus' bbox (the shell), 0 without."""
        if "shell_intensity_mean" not in self.properties:
            return (0,) * self.ndim
        return _shell_margin(self.settings, self.voxel_size)


def default_columns(ndim: int) -> list[str]:
    """The columns :data:`DEFAULT_PROPERTIES` add (after the moment columns)."""
    return Spec.of(DEFAULT_PROPERTIES, ndim=ndim, voxel_size=(1.0,) * ndim).columns()


def _check(name: str, ndim: int, voxel: tuple[float, ...]) -> None:
    if not isinstance(name, str) or name not in PROPERTIES:
        close = difflib.get_close_matches(str(name), list(PROPERTIES), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else "known: " + ", ".join(PROPERTIES)
        raise ConfigError(f"`measure.properties`: unknown property {name!r}; {hint}")
    prop = PROPERTIES[name]
    if ndim not in prop.dims:
        raise ConfigError(
            f"`measure.properties`: {name!r} exists for {'/'.join(map(str, prop.dims))}D "
            f"stacks only and this stack is {ndim}D; remove it"
            + ("" if name != "surface_area" else " (2D: use perimeter)")
        )
    if prop.isotropic and len(set(voxel)) != 1:
        raise ConfigError(
            f"`measure.properties`: scikit-image computes {name!r} for square pixels only and "
            f"the voxel size is {list(voxel)}; remove it"
        )


def empty_columns(spec: Spec) -> dict[str, pd.Series]:
    """Every added column with no rows (float64)."""
    dtypes = {c: ("int64" if c == "neighbours_count" else "float64") for c in spec.columns()}
    return {c: pd.Series(dtype=t) for c, t in dtypes.items()}


def measure_rows(
    rows: pd.DataFrame,
    *,
    labels: Any,
    intensities: Mapping[str, Any],
    spec: Spec,
    shape: Sequence[int],
) -> pd.DataFrame:
    """The crop properties of ``rows``' nuclei, one row each, in the order of ``rows``.

    Parameters
    ----------
    rows : pandas.DataFrame
        Final table rows with ``label`` and the global ``bbox_min_*``/``bbox_max_*``.
    labels : array-like
        The final label image (global coordinates; anything sliceable, e.g. a zarr array).
    intensities : mapping of str to array-like
        Channel suffix -> reader of that channel (same coordinates), in column order.
    spec : Spec
    shape : sequence of int
        Spatial shape of the stack.

    Returns
    -------
    pandas.DataFrame
        The columns of ``spec``'s crop properties. Reads one box: the union of the nuclei's
        bboxes grown by :meth:`Spec.margin` — the block's nuclei, with no other block's voxels
        beyond their reach.
    """
    names = spec.crop_properties
    columns = [
        c for n in names for c in property_columns(n, spec.ndim, spec.suffixes, spec.settings)
    ]
    if not len(rows) or not names:
        return pd.DataFrame({c: np.zeros(len(rows)) for c in columns}, index=rows.index)
    axes = _AXES[spec.ndim]
    lo = rows[[f"bbox_min_{a}" for a in axes]].to_numpy(np.int64)
    hi = rows[[f"bbox_max_{a}" for a in axes]].to_numpy(np.int64)
    margin = np.asarray(spec.margin())
    if not any(PROPERTIES[n].per_channel for n in names):
        intensities = {}  # shape alone: the stack's channels are not read (nor decompressed)
    box = _Box.read(lo.min(0) - margin, hi.max(0) + margin, labels, intensities, shape)
    values = np.empty((len(rows), len(columns)))
    for i, label in enumerate(rows["label"].to_numpy()):
        crop_labels, intensity, origin = box.crop(lo[i], hi[i])
        crop = Crop(
            mask=crop_labels == label,
            intensity=intensity,
            origin=origin,
            voxel_size=spec.voxel_size,
            around=partial(box.crop, lo[i], hi[i]),
            label=int(label),
        )
        values[i] = [v for n in names for v in _compute(n)(crop, spec.settings)]
    return pd.DataFrame(values, columns=columns, index=rows.index)


def _compute(name: str) -> Compute:
    compute = PROPERTIES[name].compute
    assert compute is not None, name  # Spec.crop_properties holds computed properties only
    return compute


@dataclass(frozen=True)
class _Box:
    """Labels and channels (channel last) of one box of the stack, read once per task."""

    start: np.ndarray
    labels: np.ndarray
    intensity: np.ndarray
    shape: np.ndarray

    @classmethod
    def read(cls, lo, hi, labels: Any, intensities: Mapping[str, Any], shape) -> _Box:
        shape = np.asarray(shape)
        start, stop = np.maximum(lo, 0), np.minimum(hi, shape)
        where = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
        found = np.asarray(labels[where])
        channels = [np.asarray(r[where]) for r in intensities.values()]
        stacked = np.stack(channels, -1) if channels else np.empty((*found.shape, 0), np.uint8)
        return cls(start, found, stacked, shape)

    def crop(self, lo, hi, grow=0) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
        """(labels, intensity, origin) of the bbox ``[lo, hi)`` grown by ``grow`` voxels per
        axis, clipped to the stack."""
        a = np.maximum(np.asarray(lo) - grow, 0)
        b = np.minimum(np.asarray(hi) + grow, self.shape)
        local = tuple(
            slice(int(x - s), int(y - s)) for x, y, s in zip(a, b, self.start, strict=True)
        )
        return self.labels[local], self.intensity[local], tuple(int(x) for x in a)


def neighbour_columns(
    own: np.ndarray, others: np.ndarray, *, distance: float
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of each of ``own``'s centroids among ``others`` (which include ``own``).

    Parameters
    ----------
    own : (K, D) ndarray
        Centroids (µm) of the nuclei to report on.
    others : (L, D) ndarray
        Every centroid within ``distance`` of any of them (``own``'s included).
    distance : float
        µm.

    Returns
    -------
    count : (K,) ndarray of int64
        Other nuclei whose centroid lies within ``distance``.
    nearest : (K,) ndarray of float64
        Distance to the nearest other centroid; NaN when none lies within ``distance``.
    """
    if not len(own):
        return np.zeros(0, np.int64), np.zeros(0)
    tree = cKDTree(others)
    found = tree.query_ball_point(own, distance, return_length=True)
    count = np.asarray(found, np.int64) - 1  # the nucleus itself
    if len(others) < 2:
        return count, np.full(len(own), np.nan)
    nearest = tree.query(own, k=2)[0][:, 1]
    # a centroid beyond `distance` may not be the nearest: those beyond were not read
    return count, np.where(nearest <= distance, nearest, np.nan)

"""Synthetic nuclei stacks with ground truth, for the demo, the tests and the benchmarks.

The stacks imitate a fluorescence nuclear stain: ellipsoidal nuclei of varied size, shape,
orientation and brightness, some of them in touching clusters, on an uneven background, blurred by
an anisotropic point-spread function and corrupted by shot and read noise. The ground truth gives
each nucleus its own label; where two ellipsoids overlap the voxel goes to the one whose surface is
farther away (smallest normalised radius), so truth labels are disjoint.

:class:`Conditions` adds what makes real light-sheet volumes hard: a log-normal brightness spread
(cell cycle, stain uptake), attenuation with depth, illumination falling off across the sheet,
irregular (non-ellipsoidal) outlines, a wide axial point-spread function and fewer photons.
:data:`LIGHTSHEET` is the hard case the demo and the accuracy benchmark use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nucflow.errors import ParameterError

__all__ = ["LIGHTSHEET", "UNIFORM", "Conditions", "SyntheticStack", "make_nuclei"]


@dataclass(frozen=True)
class Conditions:
    """How the stain is imaged; the defaults give the even, bright stacks of :func:`make_nuclei`.

    Attributes
    ----------
    brightness_spread : float
        Standard deviation of the natural log of each nucleus' brightness (log-normal, median 1);
        0 draws brightness uniformly in [0.55, 1.45].
    attenuation : float
        Signal at the top over signal at the bottom of the stack (exponential along z, along y
        in 2D); 1 = none.
    illumination : float
        Fraction of the light lost from one side of the sheet to the other (linear along x).
    irregularity : float
        Relative amplitude of smooth bumps and dents on each nucleus' outline; 0 = ellipsoids.
    psf_um : tuple of float, optional
        Standard deviation of the Gaussian point-spread function per axis, µm; default
        0.35 µm axially, 0.25 µm laterally.
    photons : float
        Expected photons per voxel of a brightness-1 nucleus (shot noise scales with it).
    """

    brightness_spread: float = 0.0
    attenuation: float = 1.0
    illumination: float = 0.0
    irregularity: float = 0.0
    psf_um: tuple[float, ...] | None = None
    photons: float = 900.0

    def __post_init__(self) -> None:
        limits = {
            "brightness_spread": self.brightness_spread >= 0,
            "attenuation": self.attenuation >= 1,
            "illumination": 0 <= self.illumination < 1,
            "irregularity": 0 <= self.irregularity < 1,
            "photons": self.photons > 0,
        }
        for name, ok in limits.items():
            if not ok:
                raise ParameterError(f"`{name}` is out of range, got {getattr(self, name)}")


UNIFORM = Conditions()
#: Light-sheet-like: 5x brightness range, 3x attenuation, half the light lost across the sheet,
#: irregular outlines, an axial PSF four times the lateral one, a third of the photons.
LIGHTSHEET = Conditions(
    brightness_spread=0.45,
    attenuation=3.0,
    illumination=0.5,
    irregularity=0.15,
    psf_um=(1.2, 0.3, 0.3),
    photons=300.0,
)


@dataclass(frozen=True)
class SyntheticStack:
    """A synthetic image and its ground truth.

    Attributes
    ----------
    image : (M, N[, P]) ndarray of uint16
        The simulated stain.
    truth : (M, N[, P]) ndarray of uint32
        Ground-truth labels, 0 for background, 1..n for nuclei.
    voxel_size : tuple of float
        Voxel size in µm, one per axis.
    diameter : float
        The typical nucleus diameter in µm used to draw the nuclei.
    brightness : (n,) ndarray of float
        Signal of nucleus ``label`` at ``brightness[label - 1]``, relative to a brightness-1
        nucleus at the top of an evenly lit stack (attenuation and illumination included).
    """

    image: np.ndarray
    truth: np.ndarray
    voxel_size: tuple[float, ...]
    diameter: float
    brightness: np.ndarray


def make_nuclei(
    shape: tuple[int, ...] = (64, 256, 256),
    *,
    n_nuclei: int = 150,
    diameter: float = 8.0,
    voxel_size: tuple[float, ...] | None = None,
    cluster_fraction: float = 0.4,
    seed: int = 0,
    conditions: Conditions = UNIFORM,
) -> SyntheticStack:
    """Draw a synthetic nuclei stack.

    Parameters
    ----------
    shape : tuple of 2 or 3 int
        Image shape in voxels.
    n_nuclei : int
        Number of nuclei to place (fewer if the image is too full).
    diameter : float
        Typical nucleus diameter in µm; individual nuclei vary by ±25 %.
    voxel_size : tuple of float, optional
        Voxel size in µm; default (1.0, 0.5, 0.5) in 3D and (0.5, 0.5) in 2D.
    cluster_fraction : float
        Fraction of nuclei placed touching an earlier nucleus.
    seed : int
        Random seed; the same arguments give the same stack.
    conditions : Conditions
        Imaging conditions (brightness spread, attenuation, ...); default even and bright.

    Returns
    -------
    SyntheticStack
    """
    ndim = len(shape)
    if ndim not in (2, 3) or min(shape) < 1:
        raise ParameterError(f"`shape` must be 2 or 3 positive sizes, got {tuple(shape)}")
    if diameter <= 0:
        raise ParameterError(f"`diameter` must be > 0 µm, got {diameter}")
    if n_nuclei < 0:
        raise ParameterError(f"`n_nuclei` must be >= 0, got {n_nuclei}")
    voxel = np.asarray(voxel_size or ((1.0, 0.5, 0.5) if ndim == 3 else (0.5, 0.5)), float)
    rng = np.random.default_rng(seed)
    extent = np.asarray(shape) * voxel
    nuclei = _place_nuclei(rng, extent, n_nuclei, diameter, cluster_fraction, conditions)
    outline = _outline_noise(rng, tuple(shape), voxel, diameter, conditions.irregularity)
    truth, signal = _rasterize(nuclei, tuple(shape), voxel, outline)
    falloff = _falloff(tuple(shape), conditions)
    image = _acquire(rng, signal * falloff, voxel, conditions, falloff)
    brightness = np.array([b for *_, b in nuclei], float) * _at_centres(nuclei, falloff, voxel)
    return SyntheticStack(
        image, truth, tuple(float(v) for v in voxel), float(diameter), brightness[: truth.max()]
    )


def _place_nuclei(rng, extent, n_nuclei, diameter, cluster_fraction, conditions):
    """Random non-overlapping ellipsoids (centre, semi-axes, rotation, brightness), µm."""
    ndim = len(extent)
    placed: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]] = []
    for _ in range(n_nuclei * 30):
        if len(placed) == n_nuclei:
            break
        radius = diameter / 2 * rng.uniform(0.75, 1.25)
        semi = radius * rng.uniform(0.85, 1.15, ndim)
        if placed and rng.random() < cluster_fraction:
            centre_of, semi_of = placed[rng.integers(len(placed))][:2]
            direction = rng.normal(size=ndim)
            direction /= np.linalg.norm(direction)
            centre = centre_of + direction * (semi_of.mean() + semi.mean()) * 0.92
        else:
            centre = rng.uniform(0, extent)
        if not _fits(centre, semi, placed, extent):
            continue
        rotation = _random_rotation(rng, ndim)
        if conditions.brightness_spread:
            brightness = float(np.exp(rng.normal(0.0, conditions.brightness_spread)))
        else:
            brightness = float(rng.uniform(0.55, 1.45))
        placed.append((centre, semi, rotation, brightness))
    return placed


def _fits(centre, semi, placed, extent) -> bool:
    """Centre inside the image, and no more than a sliver of overlap with earlier nuclei."""
    if np.any(centre < 0) or np.any(centre >= extent):
        return False
    for other_centre, other_semi, _, _ in placed:
        if np.linalg.norm(centre - other_centre) < 0.85 * (semi.mean() + other_semi.mean()):
            return False
    return True


def _random_rotation(rng, ndim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(ndim, ndim)))
    return q * np.sign(np.diag(r))


def _outline_noise(rng, shape, voxel, diameter, irregularity) -> np.ndarray | None:
    """A smooth field (unit spread, features ~ a third of a diameter) that bends the outlines."""
    if not irregularity:
        return None
    field = ndimage.gaussian_filter(
        rng.normal(size=shape).astype(np.float32), diameter / 6 / np.asarray(voxel)
    )
    return np.clip(irregularity * field / field.std(), -0.5, 0.5)


def _falloff(shape, conditions: Conditions) -> np.ndarray | float:
    """Attenuation with depth (first axis of 3D, y of 2D) times illumination across x."""
    if conditions.attenuation == 1 and conditions.illumination == 0:
        return 1.0
    depth = np.linspace(0, 1, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    across = np.linspace(0, 1, shape[-1])
    falloff = conditions.attenuation**-depth * (1 - conditions.illumination * across)
    return falloff.astype(np.float32)


def _at_centres(nuclei, falloff: np.ndarray | float, voxel) -> np.ndarray | float:
    """The falloff at each nucleus' centre (the falloff has size-1 axes where it is flat)."""
    if isinstance(falloff, float):
        return falloff
    index = [
        tuple(min(int(c / v), n - 1) for c, v, n in zip(centre, voxel, falloff.shape, strict=True))
        for centre, *_ in nuclei
    ]
    return np.array([falloff[i] for i in index], float)


def _rasterize(nuclei, shape, voxel, outline=None):
    """Truth labels and a noise-free stain (brighter towards the centre, with texture)."""
    truth = np.zeros(shape, np.uint32)
    best = np.full(shape, np.inf, np.float32)
    signal = np.zeros(shape, np.float32)
    for label, (centre, semi, rotation, brightness) in enumerate(nuclei, start=1):
        reach = semi.max() * (1.5 if outline is not None else 1.0) / voxel
        lo = np.maximum(np.floor(centre / voxel - reach).astype(int), 0)
        hi = np.minimum(np.ceil(centre / voxel + reach).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        grids = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi, strict=True)), indexing="ij")
        offsets = np.stack([g * v - c for g, v, c in zip(grids, voxel, centre, strict=True)], -1)
        q = np.sum((offsets @ rotation / semi) ** 2, axis=-1).astype(np.float32)
        if outline is not None:
            q /= (1.0 + outline[box]) ** 2  # a bump pushes the surface out by that fraction
        inside = (q <= 1.0) & (q < best[box])
        truth[box][inside] = label
        best[box][inside] = q[inside]
        signal[box][inside] = brightness * (0.8 + 0.2 * (1.0 - q[inside]))
    return truth, signal


def _acquire(rng, signal, voxel, conditions: Conditions, falloff) -> np.ndarray:
    """Blur, uneven background, texture, shot and read noise; 12-bit-like uint16."""
    texture = ndimage.gaussian_filter(rng.normal(size=signal.shape).astype(np.float32), 1.0)
    stained = signal * (1.0 + 0.6 * texture)
    if conditions.psf_um is None:
        psf_sigma = np.array(
            [0.35 if v == voxel.max() and len(voxel) == 3 else 0.25 for v in voxel]
        )
    else:
        psf_sigma = np.asarray(conditions.psf_um, float)[-len(voxel) :]  # 2D: lateral
    blurred = ndimage.gaussian_filter(stained, psf_sigma / voxel)
    grids = np.meshgrid(*(np.linspace(0, 1, n) for n in signal.shape), indexing="ij")
    background = 0.12 + 0.10 * grids[-1] + 0.06 * np.sin(3.0 * grids[-2])
    photons = (blurred + background * falloff) * conditions.photons
    noisy = rng.poisson(np.maximum(photons, 0)).astype(np.float32) + rng.normal(
        100, 8, photons.shape
    )
    return np.clip(noisy, 0, 65535).astype(np.uint16)

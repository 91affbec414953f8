"""The format registry: which reader opens a path.

``open_stack`` asks each registered ``Format`` in turn whether it claims the path (a cheap
look at markers or magic bytes, no parsing) and lets the first that does read it. The
built-in formats are registered in ``nucflow/io/__init__.py``, most specific first; a new
format is a module with a ``Format`` and one ``register_format`` call there.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from pathlib import Path
from typing import Protocol

from nucflow.errors import FormatError, InputPathError
from nucflow.io.source import Image, is_url, natural_key, split_scene

_ZARR_GROUP_FILES = ("zarr.json", ".zgroup")

__all__ = ["Format", "input_paths", "read_image", "register_format", "supported_formats"]


class Format(Protocol):
    """One family of files nucflow can open."""

    @property
    def description(self) -> str:
        """What it opens, for error messages (e.g. "TIFF/BigTIFF/OME-TIFF/ImageJ TIFF")."""
        ...

    @property
    def folder_marker(self) -> str | None:
        """What it looks for in a folder, for the message about a folder no format claims."""
        ...

    def claims(self, path: str) -> bool:
        """Whether ``path`` (an existing file or folder, or a glob pattern) is of this format."""
        ...

    def read(self, path: str, level: int) -> Image:
        """Read the metadata of ``path`` at pyramid ``level``; no pixel is read."""
        ...


_FORMATS: list[Format] = []


def register_format(fmt: Format) -> None:
    """Add ``fmt`` to the formats ``open_stack`` tries, after those already registered."""
    _FORMATS.append(fmt)


def supported_formats() -> str:
    """The registered formats, as one phrase for error messages."""
    names = [f.description for f in _FORMATS]
    return ", ".join(names[:-1]) + ", or " + names[-1] if len(names) > 1 else "".join(names)


def read_image(path: str, level: int) -> Image:
    """Open ``path`` with the first registered format that claims it.

    A glob pattern that matches one path opens that path; one that matches several is
    offered to the formats as it is (a stack of slices).
    """
    exists = os.path.isdir(path) or os.path.isfile(path) or is_url(path) or _is_scene(path)
    if not exists and glob.has_magic(path):
        matches = sorted(glob.glob(path), key=natural_key)
        if not matches:
            raise InputPathError(f"input pattern {path} matches no files; check the pattern")
        if len(matches) == 1:
            return read_image(matches[0], level)
    elif not exists:
        raise InputPathError(f"input {path} does not exist; check the path")
    for fmt in _FORMATS:
        if fmt.claims(path):
            return dataclasses.replace(fmt.read(path, level), format=fmt.description)
    if os.path.isdir(path):
        looked_for = " and no ".join(f.folder_marker for f in _FORMATS if f.folder_marker)
        raise FormatError(
            f"{path} is a folder with no {looked_for}; supported: {supported_formats()}"
        )
    raise FormatError(f"{path} is not an image nucflow can read; supported: {supported_formats()}")


def _is_scene(path: str) -> bool:
    """``FILE.czi#2``: a scene of a vendor file that exists (``bioio_format``)."""
    file, scene = split_scene(path)
    return scene is not None and os.path.isfile(file)


def input_paths(path: str | os.PathLike[str]) -> list[Path]:
    """Every path an input spelled ``path`` reads, resolved (symlinks followed).

    A glob pattern gives each file it matches; a file or folder gives itself; and each of them
    inside a zarr hierarchy also gives the hierarchy's root group (``image.ome.zarr/0`` is part
    of ``image.ome.zarr``, whose ``labels/`` a writer must not touch either). A URL gives none:
    outputs are local, so no output can lie inside it. A BigDataViewer XML also gives the HDF5
    file or N5 folder holding its pixels.
    """
    name = os.fspath(path)
    if is_url(name):
        return []  # nothing on this machine's file system
    name, _ = split_scene(name)  # a scene of a vendor file reads the file
    if not os.path.exists(name) and glob.has_magic(name):
        found = [Path(p).resolve() for p in sorted(glob.glob(name))]
    else:
        found = [Path(name).resolve()]
    # A BigDataViewer XML's pixels live in the HDF5 file or N5 folder it names.
    from nucflow.io.bdv_format import pixel_files

    found += [Path(p).resolve() for each in found for p in pixel_files(str(each))]
    return list(dict.fromkeys(p for each in found for p in (each, _zarr_root(each))))


def _zarr_root(path: Path) -> Path:
    """The outermost zarr group holding ``path`` (``path`` itself if none does)."""
    root = path
    for parent in path.parents:
        if not any((parent / marker).is_file() for marker in _ZARR_GROUP_FILES):
            break
        root = parent
    return root

"""Damaged inputs, fuzzed from a fixed seed: a complete output or one clear line, nothing else.

Small zarr v2/v3 arrays, OME-Zarr 0.4/0.5 images and TIFF/OME-TIFF files are damaged at random
(truncated or byte-flipped chunks, headers and metadata, missing chunks and metadata keys,
wrong dtype or shape in the metadata, broken multiscales). For each, ``nucflow run`` must exit
0 with a complete output, or exit 2 with one error line naming the input — never exit 1, a
traceback, a hang, or a run.json that says "complete" after a failure. The cases are kept: the
seed is fixed, so every run tries the same ones.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import tifffile
import zarr

from nucflow import io, synth
from nucflow.cli import main

SEED = 20261129
FORMATS = ("zarr2", "zarr3", "ome-zarr-0.4", "ome-zarr-0.5", "tiff", "ome-tiff")
N_CASES = 60
METADATA = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


# --- the undamaged inputs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    """One small 16x48x48 uint16 stack with four nuclei, in every format."""
    made = synth.make_nuclei((16, 48, 48), n_nuclei=4, diameter=6.0, seed=1)
    image, voxel = made.image, made.voxel_size
    root = tmp_path_factory.mktemp("originals")
    paths = {f: root / name for f, name in zip(FORMATS, (
        "v2.zarr", "v3.zarr", "img04.ome.zarr", "img05.ome.zarr", "img.tif", "img.ome.tif"
    ), strict=True)}  # fmt: skip
    for fmt in ("zarr2", "zarr3"):
        arr = zarr.create_array(
            str(paths[fmt]),
            shape=image.shape,
            chunks=(8, 24, 24),
            dtype=image.dtype,
            zarr_format=2 if fmt == "zarr2" else 3,
        )
        arr[:] = image
    io.write_ome_zarr(paths["ome-zarr-0.4"], image, voxel, chunks=(8, 24, 24))
    group = zarr.open_group(str(paths["ome-zarr-0.5"]), mode="w", zarr_format=3)
    level = group.create_array("0", shape=image.shape, chunks=(8, 24, 24), dtype=image.dtype)
    level[:] = image
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    transform = [{"type": "scale", "scale": list(voxel)}]
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": transform}]}
        ],
    }
    tifffile.imwrite(paths["tiff"], image, tile=(16, 16))
    tifffile.imwrite(
        paths["ome-tiff"],
        image,
        ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeZ": voxel[0], "PhysicalSizeX": voxel[2]},
    )
    return paths


# --- the damage --------------------------------------------------------------------------


def _files(root: Path) -> tuple[list[Path], list[Path]]:
    """(metadata files, chunk files) of a zarr store, or ([], [the file]) of a TIFF."""
    if root.is_file():
        return [], [root]
    files = sorted(p for p in root.rglob("*") if p.is_file())
    meta = [p for p in files if p.name in METADATA]
    return meta, [p for p in files if p.name not in METADATA]


def _truncate(rng: random.Random, path: Path) -> str:
    data = path.read_bytes()
    keep = rng.randrange(0, max(1, len(data)))
    path.write_bytes(data[:keep])
    return f"truncated {path.name} to {keep} of {len(data)} bytes"


def _flip(rng: random.Random, path: Path, *, head: int | None = None) -> str:
    data = bytearray(path.read_bytes())
    if not data:
        return f"{path.name} is empty"
    span = min(len(data), head) if head else len(data)
    where = sorted(rng.sample(range(span), min(span, rng.randint(1, 8))))
    for i in where:
        data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"flipped bits at {where} of {path.name}"


def _json_paths(node, prefix=()) -> list[tuple]:
    """Paths (tuples of keys/indices) of every value inside a JSON document."""
    out = []
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_json_paths(value, (*prefix, key)))
    return out


def _edit_json(path: Path, edit: Callable[[dict], str]) -> str:
    doc = json.loads(path.read_text())
    what = edit(doc)
    path.write_text(json.dumps(doc))
    return f"{path.name}: {what}"


def _drop_key(rng: random.Random, path: Path) -> str:
    def edit(doc: dict) -> str:
        keys = [p for p in _json_paths(doc) if isinstance(p[-1], str)]
        victim = rng.choice(keys)
        parent = doc
        for k in victim[:-1]:
            parent = parent[k]
        del parent[victim[-1]]
        return f"removed {'/'.join(map(str, victim))}"

    return _edit_json(path, edit)


_DTYPES_V2 = ["<f8", "|b1", "<c8", "|S4", ">u2", "<i8", "|u1", "<M8[s]", "nonsense", 7]
_DTYPES_V3 = ["float64", "bool", "complex64", "int8", "uint64", "string", "nonsense", 7]


def _wrong_dtype(rng: random.Random, path: Path) -> str:
    def edit(doc: dict) -> str:
        key = "dtype" if "dtype" in doc else "data_type"
        doc[key] = rng.choice(_DTYPES_V2 if key == "dtype" else _DTYPES_V3)
        return f"{key} = {doc[key]!r}"

    return _edit_json(path, edit)


def _wrong_shape(rng: random.Random, path: Path) -> str:
    def edit(doc: dict) -> str:
        shape = list(doc["shape"])
        choice = rng.randrange(5)
        if choice == 0:
            shape = shape[1:]  # one axis fewer
        elif choice == 1:
            shape = [*shape, 2]  # one axis more
        elif choice == 2:
            shape[rng.randrange(len(shape))] *= 2
        elif choice == 3:
            shape[rng.randrange(len(shape))] = 0
        else:
            shape[rng.randrange(len(shape))] = -3
        doc["shape"] = shape
        return f"shape = {shape}"

    return _edit_json(path, edit)


def _break_multiscales(rng: random.Random, path: Path) -> str:
    def edit(doc: dict) -> str:
        attrs = doc.get("attributes", doc)  # zarr v3 keeps attributes inside zarr.json
        ome = attrs.get("ome", attrs)
        ms = ome["multiscales"]
        choice = rng.randrange(8)
        if choice == 0:
            ome["multiscales"] = {}
        elif choice == 1:
            ome["multiscales"] = "0"
        elif choice == 2:
            ms[0]["datasets"] = []
        elif choice == 3:
            ms[0]["datasets"][0] = {"path": "missing"}
        elif choice == 4:
            ms[0]["datasets"][0]["coordinateTransformations"] = [{"type": "scale", "scale": "x"}]
        elif choice == 5:
            ms[0]["axes"] = ms[0]["axes"][:2]
        elif choice == 6:
            ms[0]["axes"] = [{"name": 3, "type": None}] * 3
        else:
            ms[0]["datasets"] = [None]
        return f"multiscales damage {choice}"

    return _edit_json(path, edit)


TIFF_KINDS = ("truncate", "flip", "flip-header")
ZARR_KINDS = ("truncate-chunk", "flip-chunk", "missing-chunk", "truncate-meta", "flip-meta",
              "missing-meta", "drop-key", "dtype", "shape")  # fmt: skip
OME_KINDS = (*ZARR_KINDS, "multiscales", "multiscales")  # broken multiscales twice as often


def _damage(rng: random.Random, root: Path, fmt: str) -> str:
    """Apply one random kind of damage to the copy at ``root``: ``"kind: what was done"``."""
    meta, chunks = _files(root)
    kind = rng.choice(
        TIFF_KINDS if fmt.endswith("tiff") else OME_KINDS if fmt.startswith("ome") else ZARR_KINDS
    )
    return f"{kind}: {_apply(rng, kind, root, meta, chunks)}"


def _apply(rng: random.Random, kind: str, root: Path, meta: list, chunks: list) -> str:
    array_meta = [p for p in meta if p.name == ".zarray" or (
        p.name == "zarr.json" and json.loads(p.read_text()).get("node_type") == "array"
    )]  # fmt: skip
    match kind:
        case "truncate":
            return _truncate(rng, root)
        case "flip" | "flip-header":
            return _flip(rng, root, head=512 if kind == "flip-header" else None)
        case "truncate-chunk":
            return _truncate(rng, rng.choice(chunks))
        case "flip-chunk":
            return _flip(rng, rng.choice(chunks))
        case "missing-chunk" | "missing-meta":
            victim = rng.choice(chunks if kind == "missing-chunk" else meta)
            victim.unlink()
            return f"removed {victim.relative_to(root)}"
        case "truncate-meta":
            return _truncate(rng, rng.choice(meta))
        case "flip-meta":
            return _flip(rng, rng.choice(meta))
        case "drop-key":
            keyed = [p for p in meta if json.loads(p.read_text())]  # an empty .zattrs has none
            return _drop_key(rng, rng.choice(keyed))
        case "dtype":
            return _wrong_dtype(rng, rng.choice(array_meta))
        case "shape":
            return _wrong_shape(rng, rng.choice(array_meta))
    holder = [p for p in meta if p.parent == root and p.name in (".zattrs", "zarr.json")]
    return _break_multiscales(rng, holder[0])


# --- the test ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", range(N_CASES))
def test_damaged_input_gives_a_complete_output_or_one_line(originals, tmp_path, capsys, case):
    rng = random.Random(SEED + case)
    fmt = FORMATS[case % len(FORMATS)]
    source = tmp_path / originals[fmt].name
    if originals[fmt].is_dir():
        shutil.copytree(originals[fmt], source)
    else:
        shutil.copy(originals[fmt], source)
    damage = _damage(rng, source, fmt)
    out = tmp_path / "out"
    argv = ["run", "--input", str(source), "--output", str(out), "--diameter", "6"]
    argv += ["--chunks", "8", "24", "24", "--set", "qc.enabled=false"]

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    context = f"{fmt}, {damage}: exit {code}\n{err[-3000:]}"

    record = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    assert "Traceback" not in err, context
    if code == 0:
        assert record.get("status") == "complete", context
        assert (out / "nuclei.parquet").exists() and (out / "labels.ome.zarr").exists()
        return
    assert code == 2, context
    ours = [line for line in err.splitlines() if line.startswith("nucflow run:")]
    assert len(ours) == 1, context
    assert ours[0].startswith("nucflow run: error: "), context
    assert str(source) in ours[0], context  # names the input (or a file inside it)
    assert record.get("status") != "complete", context
    assert not (out / "nuclei.parquet").exists(), context


def test_the_cases_cover_every_format_and_kind_of_damage(originals, tmp_path):
    """The fixed seed draws every kind of damage for each family of formats: no idle fuzzing."""
    drawn: dict[str, set[str]] = {"tiff": set(), "zarr": set(), "ome": set()}
    for case in range(N_CASES):
        fmt = FORMATS[case % len(FORMATS)]
        source = tmp_path / str(case) / originals[fmt].name
        source.parent.mkdir()
        copy = shutil.copytree if originals[fmt].is_dir() else shutil.copy
        copy(originals[fmt], source)
        family = "tiff" if fmt.endswith("tiff") else "ome" if fmt.startswith("ome") else "zarr"
        drawn[family].add(_damage(random.Random(SEED + case), source, fmt).split(":")[0])
    assert drawn["tiff"] == set(TIFF_KINDS)
    assert drawn["zarr"] | drawn["ome"] == set(OME_KINDS)
    assert "multiscales" in drawn["ome"]


# --- the containers of BigDataViewer and Imaris, and inputs by URL -------------------------


@pytest.fixture(scope="module")
def containers(tmp_path_factory) -> dict[str, Path]:
    """The 16x48x48 stack as BDV XML + HDF5, BDV XML + N5 (pybdv) and Imaris .ims (h5py)."""
    pytest.importorskip("pybdv")
    from formats_writers import write_bdv, write_ims

    made = synth.make_nuclei((16, 48, 48), n_nuclei=4, diameter=6.0, seed=1)
    views = made.image[None, None]
    root = tmp_path_factory.mktemp("containers")
    return {
        "bdv-hdf5": write_bdv(root / "bdv.h5", views, made.voxel_size),
        "bdv-n5": write_bdv(root / "bdvn5.n5", views, made.voxel_size),
        "imaris": write_ims(root / "stack.ims", views, made.voxel_size),
    }


def _copy(containers: dict[str, Path], fmt: str, folder: Path) -> Path:
    """A copy of one container (the XML with its HDF5 file or N5 folder) in ``folder``."""
    source = containers[fmt]
    shutil.copy(source, folder / source.name)
    for data in (source.with_suffix(".h5"), source.with_suffix(".n5")):
        if data.is_file():
            shutil.copy(data, folder / data.name)
        elif data.is_dir():
            shutil.copytree(data, folder / data.name)
    return folder / source.name


def _cut(path: Path, share: float) -> str:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * share)])
    return f"{path.name} truncated to {share:.0%}"


def _edit_xml(path: Path, old: str, new: str) -> str:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    return f"{path.name}: {old!r} -> {new!r}"


_EXTRA_SETUP = "<ViewSetup><id>7</id><size>48 48 16</size></ViewSetup></ViewSetups>"

# (format, damage, what the one line must say); each damage returns the file it names.
CONTAINER_CASES = {
    "truncated-hdf5": ("bdv-hdf5", lambda s: _cut(s.with_suffix(".h5"), 0.5), "bdv.h5"),
    "truncated-hdf5-header": (
        "bdv-hdf5", lambda s: _cut(s.with_suffix(".h5"), 0.001), "re-copy or re-export"
    ),
    "truncated-ims": ("imaris", lambda s: _cut(s, 0.6), "stack.ims"),
    "truncated-ims-header": ("imaris", lambda s: _cut(s, 0.001), "stack.ims"),
    "xml-not-well-formed": ("bdv-hdf5", lambda s: _cut(s, 0.5), "not well-formed XML"),
    "xml-wrong-loader": (
        "bdv-hdf5", lambda s: _edit_xml(s, 'format="bdv.hdf5"', 'format="spimreconstruction"'),
        "image loader 'spimreconstruction' is not supported",
    ),
    "xml-missing-setup": (
        "bdv-hdf5", lambda s: _edit_xml(s, "</ViewSetups>", _EXTRA_SETUP),
        "has no view of setup 7 at time point 0",
    ),
    "n5-missing-setup": (
        "bdv-n5", lambda s: _edit_xml(s, "</ViewSetups>", _EXTRA_SETUP),
        "has no view of setup 7 at time point 0",
    ),
    "n5-missing-container": (
        "bdv-n5", lambda s: shutil.rmtree(s.with_suffix(".n5")) or "bdvn5.n5 deleted",
        "bdvn5.n5, which does not exist; keep the N5 folder where the XML says",
    ),
    "xml-wrong-size": (
        "bdv-hdf5", lambda s: _edit_xml(s, "<size>48 48 16</size>", "<size>48 48 8</size>"),
        "says its setups are (8, 48, 48) (z, y, x) but",
    ),
    "ims-missing-channel": (
        "imaris", lambda s: _h5_delete(s, "DataSet/ResolutionLevel 0/TimePoint 0/Channel 0/Data"),
        "has no TimePoint 0/Channel 0 at resolution level 0",
    ),
}  # fmt: skip


def _h5_delete(path: Path, name: str) -> str:
    import h5py

    with h5py.File(path, "a") as f:
        del f[name]
    return f"{path.name}: {name} deleted"


@pytest.mark.parametrize("case", sorted(CONTAINER_CASES))
def test_damaged_container_gives_one_line(containers, tmp_path, capsys, case):
    fmt, damage, expected = CONTAINER_CASES[case]
    source = _copy(containers, fmt, tmp_path)
    what = damage(source)
    out = tmp_path / "out"
    argv = ["run", "--input", str(source), "--output", str(out), "--diameter", "6"]
    capsys.readouterr()
    code = main([*argv, "--set", "qc.enabled=false"])
    err = capsys.readouterr().err
    context = f"{case} ({what}): exit {code}\n{err[-3000:]}"
    assert code == 2 and "Traceback" not in err, context
    ours = [line for line in err.splitlines() if line.startswith("nucflow run:")]
    assert len(ours) == 1 and ours[0].startswith("nucflow run: error: "), context
    assert str(tmp_path) in ours[0] and expected in ours[0], context  # names the file, the fix
    assert not (out / "nuclei.parquet").exists(), context


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", range(8))
def test_byte_flipped_hdf5_gives_a_complete_output_or_one_line(containers, tmp_path, capsys, case):
    """Random bytes of the HDF5 file (BDV's or an .ims) flipped, from a fixed seed."""
    rng = random.Random(SEED + 1000 + case)
    fmt = ("bdv-hdf5", "imaris")[case % 2]
    source = _copy(containers, fmt, tmp_path)
    data = source.with_suffix(".h5") if fmt == "bdv-hdf5" else source
    raw = bytearray(data.read_bytes())
    for _ in range(rng.randint(1, 40)):
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    data.write_bytes(bytes(raw))
    out = tmp_path / "out"
    argv = ["run", "--input", str(source), "--output", str(out), "--diameter", "6"]
    capsys.readouterr()
    code = main([*argv, "--chunks", "8", "24", "24", "--set", "qc.enabled=false"])
    err = capsys.readouterr().err
    context = f"{fmt} case {case}: exit {code}\n{err[-3000:]}"
    assert "Traceback" not in err and code in (0, 2), context
    if code == 2:
        ours = [line for line in err.splitlines() if line.startswith("nucflow run:")]
        assert len(ours) == 1 and str(tmp_path) in ours[0], context


def test_unreachable_url_gives_one_line(tmp_path, capsys):
    argv = ["run", "--input", "https://127.0.0.1:9/stack.ome.zarr", "--output", str(tmp_path / "o")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("nucflow run: error: input https://127.0.0.1:9/stack.ome.zarr"), err


@pytest.mark.parametrize("suffix", [".czi", ".nd2", ".lif"])
def test_damaged_vendor_file_gives_one_line(tmp_path, capsys, suffix):
    """A vendor file that is not one (bytes from a fixed seed): exit 2, one line."""
    plugin = {".czi": "bioio_czi", ".nd2": "bioio_nd2", ".lif": "bioio_lif"}[suffix]
    pytest.importorskip(plugin)
    source = tmp_path / f"stack{suffix}"
    source.write_bytes(random.Random(SEED).randbytes(5000))
    capsys.readouterr()
    code = main(["run", "--input", str(source), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"nucflow run: error: {source} cannot be opened by "), err
    assert "re-copy or re-export it" in err

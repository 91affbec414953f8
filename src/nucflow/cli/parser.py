"""The command line's arguments: one parser, usage errors as one line with exit code 2."""

from __future__ import annotations

import argparse
from typing import NoReturn


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _diameter(text: str) -> float | str:
    """``--diameter``: a number or ``auto``."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in µm or auto, got {text!r}") from None


def _stack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (defaults: configs/nuclei.yaml)")
    parser.add_argument(
        "--input", required=True, help="zarr, OME-Zarr, TIFF, or a folder of TIFF slices"
    )
    parser.add_argument(
        "--diameter",
        type=_diameter,
        help="typical nucleus diameter, µm (pixels if no voxel size), or auto: estimated from "
        "a few sample blocks",
    )
    parser.add_argument(
        "--voxel-size", type=float, nargs="+", metavar="Z Y X", help="override µm per voxel"
    )
    parser.add_argument("--channel", type=int, help="channel holding the nuclear stain")
    parser.add_argument(
        "--chunks", type=int, nargs="+", metavar="Z Y X", help="block shape in voxels"
    )
    parser.add_argument(
        "--timepoints",
        metavar="START:STOP|T,T,...",
        help="time points of a time-lapse to segment (default: all), e.g. 0:10 or 0,3,7",
    )
    _scheduler_options(parser)


def _scheduler_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument(
        "--cluster", default="threads", help="threads, processes, local, slurm or tcp://HOST:PORT"
    )
    parser.add_argument("--scheduler-file", help="connect to the scheduler described by this file")
    parser.add_argument(
        "--dashboard-address",
        metavar="HOST:PORT",
        help="local/slurm: where the dask dashboard listens (default 127.0.0.1:0, this machine)",
    )
    parser.add_argument("--jobs", type=int, help="SLURM: number of worker jobs")
    parser.add_argument("--adapt", metavar="MIN:MAX", help="SLURM: adaptive number of worker jobs")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nucflow", description="Seam-free nuclei segmentation for stacks of any size."
    )
    parser.add_argument("--version", action="version", version=f"nucflow {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser("demo", help="synthetic 3D stack -> full run; prints a summary")
    demo.add_argument(
        "--output", default="nucflow-demo", help="folder for the demo (default ./nucflow-demo)"
    )
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier demo folder")
    demo.add_argument("--debug", action="store_true", help="show tracebacks")

    synth = commands.add_parser("synth", help="write a synthetic OME-Zarr stack with ground truth")
    synth.add_argument("output", help="OUTPUT.zarr")
    synth.add_argument("--shape", type=int, nargs="+", default=[64, 256, 256], metavar="Z Y X")
    synth.add_argument("--nuclei", type=int, default=150)
    synth.add_argument("--diameter", type=float, default=8.0, help="µm")
    synth.add_argument("--voxel-size", type=float, nargs="+", metavar="Z Y X", help="µm")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--conditions",
        choices=("uniform", "lightsheet"),
        default="uniform",
        help="imaging conditions to start from: even and bright (default), or light-sheet-like "
        "(brightness spread, attenuation, uneven light, irregular nuclei, wide axial PSF)",
    )
    synth.add_argument(
        "--brightness-spread", type=float, help="sd of log brightness per nucleus (0: uniform)"
    )
    synth.add_argument("--attenuation", type=float, help="signal top/bottom of the stack (>= 1)")
    synth.add_argument("--illumination", type=float, help="light lost across x, 0..1")
    synth.add_argument("--irregularity", type=float, help="bumps on the outlines, 0..1")
    synth.add_argument("--psf", type=float, nargs="+", metavar="Z Y X", help="PSF sd, µm")
    synth.add_argument("--photons", type=float, help="photons per voxel of a bright nucleus")
    synth.add_argument("--debug", action="store_true", help="show tracebacks")

    run = commands.add_parser("run", help="segment and measure nuclei")
    _stack_options(run)
    run.add_argument("--output", required=True, help="output directory")
    run.add_argument(
        "--flow", help="nuclei (default), preprocess, or a flow .py file (--resume: the recorded)"
    )
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue an interrupted run")
    again.add_argument("--overwrite", action="store_true", help="replace an earlier nucflow output")

    measure = commands.add_parser(
        "measure", help="measure a stack on an existing label image (no segmentation)"
    )
    measure.add_argument("--labels", required=True, help="label image, e.g. RUN/labels.ome.zarr")
    measure.add_argument("--input", required=True, help="the stack to measure (labels' shape)")
    measure.add_argument("--output", required=True, help="output directory")
    measure.add_argument("--channel", type=int, help="channel of --input to measure")
    _scheduler_options(measure)
    again = measure.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="redo an interrupted measurement")
    again.add_argument("--overwrite", action="store_true", help="replace an earlier nucflow output")

    plan = commands.add_parser("plan", help="blocks, halo, tasks and memory before a run")
    _stack_options(plan)

    tune = commands.add_parser(
        "tune", help="the nuclei flow on one region, with its QC pictures, to check parameters"
    )
    _stack_options(tune)
    tune.add_argument(
        "--region",
        required=True,
        nargs="+",
        metavar="START:STOP",
        help="the region, one START:STOP per axis (Z Y X), in voxels of the input",
    )
    tune.add_argument("--output", required=True, help="output directory of the trial run")
    tune.add_argument("--overwrite", action="store_true", help="replace an earlier trial")

    status = commands.add_parser(
        "status",
        help="what a run is doing or did (exit 0 complete, 3 running, 1 failed)",
    )
    status.add_argument("output", help="the run's --output directory")
    status.add_argument("--debug", action="store_true", help="show tracebacks")

    view = commands.add_parser("view", help="open a run's input, labels and table in napari")
    view.add_argument("output", help="the run's --output directory")
    view.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _version() -> str:
    from nucflow import __version__

    return __version__

"""Command line: ``nucflow demo | synth | run | measure | plan | status``.

Exit codes: 0 success; 2 bad input or usage (one line on stderr naming the thing and the fix);
1 unexpected failure (a traceback only with ``--debug``). ``nucflow status`` says the run's state
in its exit code: 0 complete, 3 running, 1 failed or stopped (2 as above: not a nucflow output).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from nucflow.errors import (
    NucflowError,
    OutputError,
    ParameterError,
    Terminated,
    environment_message,
)

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _stack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (defaults: configs/nuclei.yaml)")
    parser.add_argument(
        "--input", required=True, help="zarr, OME-Zarr, TIFF, or a folder of TIFF slices"
    )
    parser.add_argument(
        "--diameter", type=float, help="typical nucleus diameter, µm (pixels if no voxel size)"
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


def _one_malloc_arena() -> None:
    """Have glibc serve every thread from one heap (unless MALLOC_ARENA_MAX says otherwise).

    By default each worker thread gets heaps of its own, and the block-sized arrays freed in
    them stay mapped: on ``benchmarks/memory.py`` peak RSS fell from 938 to 623 MiB with one
    arena, at the same speed (numpy kernels, not allocations, take the time).
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 1)


_M_ARENA_MAX = -8  # glibc malloc.h


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nucflow`` console script."""
    args = _parser().parse_args(argv)
    handler = {
        "demo": _demo,
        "synth": _synth,
        "run": _run,
        "measure": _measure,
        "plan": _plan,
        "tune": _tune,
        "status": _status,
        "view": _view,
    }[args.command]
    _one_malloc_arena()
    previous = _sigterm_raises()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.formatwarning = _one_line_warning
            code = handler(args)
    except NucflowError as error:
        if args.debug:
            raise
        print(f"nucflow {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated): run.json says so
        name = "SIGTERM" if isinstance(stop, Terminated) else "SIGINT"
        print(f"nucflow {args.command}: interrupted ({name})", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    except BrokenPipeError:  # `nucflow status OUT | head -1`: the reader has what it wanted
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the interpreter closes it)
        return 0
    except Exception as error:  # an unexpected failure, reported without a traceback unless --debug
        if args.debug:
            raise
        # The machine's (read-only, full, forbidden), not a bug: said as such.
        if message := environment_message(error, getattr(args, "output", None)):
            print(f"nucflow {args.command}: error: {message}", file=sys.stderr)
            return 2
        print(
            f"nucflow {args.command}: unexpected error: {type(error).__name__}: {error} "
            "(rerun with --debug for a traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return code or 0


def _sigterm_raises() -> Any:
    """Make SIGTERM (``kill``, SLURM's end of walltime) raise :class:`Terminated` in the main
    thread, so a run records itself as interrupted; returns the handler it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated("SIGTERM")

    return signal.signal(signal.SIGTERM, terminate)


def console() -> NoReturn:
    """The ``nucflow`` command: :func:`main`, then an exit without the interpreter's teardown.

    When ``main`` returns, every output is written and closed and every cluster is shut down;
    freeing the objects of the ~1600 modules a run imports would still add ~0.35 s to each
    command. Threads are joined and the libraries' exit handlers run as usual; then
    :func:`_skip_teardown`, registered before them, ends the process with ``main``'s code.
    """
    global _EXIT_CODE
    _EXIT_CODE = main()
    sys.exit(_EXIT_CODE)


_EXIT_CODE: int | None = None  # set once main returned (not on an uncaught exception)


def _skip_teardown() -> None:
    if _EXIT_CODE is None:  # not the console command, or it failed with a traceback
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_CODE)


atexit.register(_skip_teardown)  # at import, so it runs after every handler registered later


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"nucflow: warning: {message}\n"


# ----------------------------------------------------------------------------- run / plan


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "diameter": args.diameter,
        "voxel_size": args.voxel_size,
        "channel": args.channel,
        "chunks": args.chunks,
    }


def _prepare(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """Config, stack and resolved parameters from the command line."""
    from nucflow import config as config_module
    from nucflow import io, plan

    config = config_module.load(
        args.config,
        options=_options(args),
        overrides=args.set,
        recorded=getattr(args, "recorded_config", None),
    )
    voxel = config["voxel_size"]
    stack = io.open_stack(args.input, channel=config["channel"], voxel_size=voxel)
    given = getattr(args, "region", None)  # nucflow tune: the region is the stack
    box = _region(given, stack.data.shape) if given else None
    shape = stack.crop(box).data.shape if box else stack.data.shape
    params = config_module.resolve(config, shape=shape, voxel_size=stack.voxel_size)
    # Reopen on the run's blocks: the default (~128 MiB blocks, shaped by the stack) would make
    # each task's memory depend on the stack's shape.
    stack = io.open_stack(
        args.input, channel=config["channel"], chunks=params.chunks, voxel_size=voxel
    )
    if box:
        stack = stack.crop(box)
    _check_channels(params, stack, args.input)
    plan.check_native_chunks(stack)
    return stack, params, config


def _warn_cost(params: Any, stack: Any) -> None:
    """One line before the work starts when the blocks are too small for their halo."""
    from nucflow import pipeline
    from nucflow.plan import cost_warning

    region = pipeline.data_region(stack, params.chunks)
    found = cost_warning(params, tuple(s.stop - s.start for s in region))
    if found:
        warnings.warn(found, stacklevel=2)


def _warn_pixels(stack: Any, known: bool | None = None) -> None:
    """One line when lengths are pixels (``known``: the stack's voxel size is, unless told):
    said once the command's checks have passed."""
    if not (stack.voxel_size_known if known is None else known):
        axes = " ".join(stack.axes.upper())
        warnings.warn(
            f"no voxel size in {stack.path}: lengths (--diameter, the table's _um columns) are "
            f"in pixels; pass --voxel-size {axes} in µm",
            stacklevel=2,
        )


def _check_channels(params: Any, stack: Any, path: str) -> None:
    for c in params.channels:
        if not 0 <= c < stack.n_channels:
            raise ParameterError(
                f"`measure.channels` holds {c} but {path} has {stack.n_channels} channel(s); "
                f"use 0..{stack.n_channels - 1}"
            )


def _region(given: Sequence[str], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """``--region 0:32 100:356 100:356`` as slices, checked against the stack's shape."""
    axes = "Z Y X" if len(shape) == 3 else "Y X"
    if len(given) != len(shape):
        raise ParameterError(
            f"--region has {len(given)} ranges but the stack has {len(shape)} axes; pass {axes}"
        )
    box = []
    for text, n in zip(given, shape, strict=True):
        start, sep, stop = text.partition(":")
        if not (sep and start.isdigit() and stop.isdigit() and int(start) < int(stop) <= n):
            raise ParameterError(
                f"--region {text!r} must be START:STOP with 0 <= START < STOP <= {n} "
                f"(the stack is {' x '.join(map(str, shape))} voxels, {axes})"
            )
        box.append(slice(int(start), int(stop)))
    return tuple(box)


def _adapt(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    low, sep, high = text.partition(":")
    if not (sep and low.isdigit() and high.isdigit() and int(low) <= int(high)):
        raise ParameterError(
            f"--adapt {text!r} must be MIN:MAX with 0 <= MIN <= MAX, e.g. --adapt 1:8"
        )
    return int(low), int(high)


def _cluster_options(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    """Keywords of ``cluster.connect`` / ``cluster.describe`` from the command line."""
    return {
        "scheduler_file": args.scheduler_file,
        "jobs": args.jobs,
        "adapt": _adapt(args.adapt),
        "settings": config["cluster"],
        "dashboard_address": args.dashboard_address,
    }


def _continue_recorded(args: argparse.Namespace) -> None:
    """``--resume``: what the command line leaves out comes from the recorded run (its
    run.json: config, flow, time points), so the run continues as it was started."""
    from nucflow import pipeline

    record = pipeline.recorded_run(args.output) if args.resume else None
    if record is None:
        return
    args.recorded_config = record.get("config")
    if getattr(args, "flow", "") is None:
        args.flow = record.get("flow")
    selected = (record.get("timepoints") or {}).get("selected")
    if getattr(args, "timepoints", "") is None and selected:
        args.timepoints = ",".join(map(str, selected))


def execute(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Run a flow for parsed ``run`` arguments; returns the run and the flow's result."""
    from nucflow import flowrun, timelapse

    _continue_recorded(args)
    args.flow = args.flow or "nuclei"
    stack, params, config = _prepare(args)
    points = timelapse.select(getattr(args, "timepoints", None), stack)
    if points:  # the run's stack is its first time point (the QC pictures show it)
        stack = stack.at(points[0])
    flow = flowrun.load_flow(args.flow)
    _check_flow(flow, stack, params, points, name=args.flow)
    if args.flow == "nuclei":
        _warn_cost(params, stack)
    return _in_run(args, stack, params, config, flow.run, timepoints=points)


def _check_flow(
    flow: ModuleType,
    stack: Any,
    params: Any,
    timepoints: Sequence[int] | None = None,
    *,
    name: str = "nuclei",
) -> None:
    """The whole configuration checked against the stack, by the flow's stages (and the time
    points they take), before the output is claimed: also the keys this flow does not read
    (``filter.steps`` in the nuclei flow), so a bad value never waits for another flow."""
    from nucflow import flowrun, stages

    flowrun.check(flow.STAGES, stack, params, timepoints, name=name)
    stages.configured_steps(params, ndim=stack.data.ndim)


def _in_run(
    args: argparse.Namespace,
    stack: Any,
    params: Any,
    config: dict[str, Any],
    body: Any,
    *,
    timepoints: tuple[int, ...] | None = None,
    voxel_size_known: bool | None = None,
) -> tuple[Any, dict[str, Any]]:
    """``body(run)`` on the run claiming ``args.output`` on ``args.cluster``; a failure marks
    the run failed. ``timepoints``: those of a time-lapse to segment; ``voxel_size_known``:
    whether lengths are µm (default: the stack says)."""
    from nucflow import cluster, pipeline

    with cluster.connect(args.cluster, **_cluster_options(args, config)) as runner:
        if not args.debug:
            _quiet_distributed_info()
        job = pipeline.open_run(
            stack,
            params,
            args.output,
            runner=runner,
            config=config,
            resume=args.resume,
            overwrite=args.overwrite,
            timepoints=timepoints,
        )
        if getattr(args, "flow", None):  # what --resume continues
            job.facts["flow"] = args.flow
        _warn_pixels(stack, voxel_size_known)
        try:
            result = body(job)
        except BaseException as error:
            pipeline.fail(job, error)
            raise
    return job, result


def _quiet_distributed_info() -> None:
    """Keep distributed's INFO records off the command's stderr (the batch job's log).

    distributed logs at INFO to stderr once imported; the clusters mute its handler only while
    open, and a comm that the event loop closes after that logs "Batched Comm Closed" with a
    traceback. Its warnings and errors still show; ``--debug`` keeps distributed's own level.
    """
    if "distributed" in sys.modules:  # its import sets the level this overrides
        logger = logging.getLogger("distributed")
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))


def _run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    job, result = execute(args)
    elapsed = time.perf_counter() - start
    made = (
        f"{result['nuclei']} nuclei ({result['truncated']} truncated)"
        if "nuclei" in result
        else result.get("stack", "outputs")
    )
    print(f"nucflow run: {made} in {elapsed:.1f} s -> {job.output}")
    if "table" in job.facts:  # a partitioned table and no CSV: say so where the user looks
        print(f"nucflow run: {job.facts['table']}", file=sys.stderr)


def _measure(args: argparse.Namespace) -> None:
    from nucflow import config as config_module
    from nucflow import io, remeasure

    start = time.perf_counter()
    _continue_recorded(args)
    config = config_module.load(
        None,
        options={"channel": args.channel},
        overrides=args.set,
        recorded=getattr(args, "recorded_config", None),
    )
    remeasure.check_output(args.output, args.labels)
    labels = remeasure.open_labels(args.labels, voxel_size=config["voxel_size"])
    stack = io.open_stack(args.input, channel=config["channel"], voxel_size=config["voxel_size"])
    remeasure.check_match(labels, stack, config["voxel_size"])
    voxel = labels.voxel_size if labels.voxel_size_known else stack.voxel_size
    params = config_module.resolve(config, shape=stack.data.shape, voxel_size=voxel)
    params = remeasure.without_qc(params)
    stack = io.open_stack(
        args.input, channel=config["channel"], chunks=params.chunks, voxel_size=config["voxel_size"]
    )
    _check_channels(params, stack, args.input)
    job, counts = _in_run(
        args,
        stack,
        params,
        config,
        partial(remeasure.measure_run, labels=labels),
        voxel_size_known=labels.voxel_size_known or stack.voxel_size_known,
    )
    elapsed = time.perf_counter() - start
    print(f"nucflow measure: {counts['nuclei']} labels in {elapsed:.1f} s -> {job.output}")


def _tune(args: argparse.Namespace) -> None:
    """The nuclei flow on a region: what it finds there, and the pictures to check it by."""
    args.flow, args.resume = "nuclei", False
    start = time.perf_counter()
    job, result = execute(args)
    facts = job.facts
    if "timepoints" in facts:  # a time-lapse: what its first time point found
        facts = next(iter(facts["timepoints"]["counts"].values()))
    noise = facts.get("noise")
    found = (
        f"noise level {noise:.4g} (estimated on this region; a full run estimates it on the "
        "whole stack)"
        if noise is not None
        else f"global threshold {facts['threshold']:.4g}"
    )
    qc = job.output / "qc"
    pictures = ", ".join(
        str(qc / name)
        for name in ("outlines.png", "depth.png", "distributions.png")
        if (qc / name).exists()
    )
    print(
        f"nucflow tune: region {' '.join(args.region)}: {result['nuclei']} nuclei "
        f"({result['truncated']} truncated) in {time.perf_counter() - start:.1f} s; {found}\n"
        f"  check      {pictures}\n"
        f"  table      {job.output / 'nuclei.parquet'} (coordinates within the region)\n"
        "  adjust     --diameter, --set detect.snr=... (dimmer nuclei: lower), "
        "detect.fraction=... (larger outlines: lower), detect.blob_radius=... (configs/nuclei.yaml)"
    )


def _plan(args: argparse.Namespace) -> None:
    from nucflow import cluster, flowrun, timelapse
    from nucflow.plan import make_plan

    stack, params, config = _prepare(args)
    points = timelapse.select(args.timepoints, stack)
    if points:
        stack = stack.at(points[0])
    flow = flowrun.load_flow("nuclei")
    _check_flow(flow, stack, params)
    # checks the cluster options before the calibration runs
    where = cluster.describe(args.cluster, **_cluster_options(args, config))
    timepoints = len(points) if points else None
    _warn_pixels(stack)
    print(make_plan(stack, params, config, flow, timepoints=timepoints))
    print(f"cluster    {where}")


def _status(args: argparse.Namespace) -> int:
    from nucflow.status import status

    report = status(args.output)
    with contextlib.suppress(BrokenPipeError):  # `| head -1`: the state is still the exit code
        print(report.text, flush=True)
    return report.exit_code


def _view(args: argparse.Namespace) -> None:
    from nucflow import view

    view.show(args.output)


# ----------------------------------------------------------------------------- synth / demo


def _synth(args: argparse.Namespace) -> None:
    import dataclasses

    from nucflow import io, synth

    given = {
        "brightness_spread": args.brightness_spread,
        "attenuation": args.attenuation,
        "illumination": args.illumination,
        "irregularity": args.irregularity,
        "psf_um": tuple(args.psf) if args.psf else None,
        "photons": args.photons,
    }
    start = synth.LIGHTSHEET if args.conditions == "lightsheet" else synth.UNIFORM
    conditions = dataclasses.replace(start, **{k: v for k, v in given.items() if v is not None})
    made = synth.make_nuclei(
        tuple(args.shape),
        n_nuclei=args.nuclei,
        diameter=args.diameter,
        voxel_size=tuple(args.voxel_size) if args.voxel_size else None,
        seed=args.seed,
        conditions=conditions,
    )
    io.write_ome_zarr(args.output, made.image, made.voxel_size, labels={"truth": made.truth})
    print(
        f"nucflow synth: {made.truth.max()} nuclei, shape {made.image.shape}, voxel size "
        f"{made.voxel_size} µm -> {args.output} (truth at {args.output}/labels/truth)"
    )


def _demo(args: argparse.Namespace) -> None:
    import numpy as np
    import zarr

    from nucflow import io, outdir, synth
    from nucflow.evaluate import accuracy_report

    folder = Path(args.output).resolve()
    if folder.is_dir() and any(folder.iterdir()) and not args.overwrite:
        raise OutputError(f"demo folder {folder} exists; pass --overwrite or another --output")
    found = outdir.check_claimable(folder, resume=False, overwrite=True)
    made_directory = outdir.make_directory(folder)
    claim = outdir.claim(folder, found, overwrite=True)
    claim.made_directory = made_directory
    made = synth.make_nuclei(DEMO_SHAPE, conditions=synth.LIGHTSHEET, **DEMO_STACK)
    source = claim.entry("input.ome.zarr")
    io.write_ome_zarr(source, made.image, made.voxel_size, labels={"truth": made.truth})
    chunks = [str(n // 2) for n in DEMO_SHAPE]
    run_args = _parser().parse_args(
        ["run", "--input", str(source), "--output", str(claim.entry("run")), "--chunks", *chunks]
    )
    start = time.perf_counter()
    job, result = execute(run_args)
    elapsed = time.perf_counter() - start
    labels = np.asarray(zarr.open_array(str(job.output / "labels.ome.zarr" / "0"), mode="r"))
    report = accuracy_report(labels, made.truth, made.brightness)
    _add_to_run_json(job.output, accuracy=report)
    print(_demo_summary(made, result, report, job, elapsed, "x".join(chunks), source))


#: The demo's stack: light-sheet-like (5x brightness range, 3x attenuation with depth, half the
#: light lost across the sheet, irregular touching nuclei), 2 x 0.5 x 0.5 µm voxels.
DEMO_SHAPE = (48, 256, 256)
DEMO_STACK: dict[str, Any] = {
    "n_nuclei": 260,
    "diameter": 8.0,
    "voxel_size": (2.0, 0.5, 0.5),
    "cluster_fraction": 0.5,
    "seed": 0,
}


def _demo_summary(made, result, report, job, elapsed, blocks, source) -> str:
    def three(values: list) -> str:
        return " / ".join("-" if v is None else f"{v:.2f}" for v in values)

    return (
        f"nucflow demo: light-sheet-like stack {made.image.shape} (voxel {made.voxel_size} µm): "
        f"{made.truth.max()} true nuclei,\n"
        "  5x brightness range, 3x attenuation with depth, uneven light, irregular touching "
        f"nuclei; blocks of {blocks}\n"
        f"  found      {result['nuclei']} nuclei ({result['truncated']} truncated)\n"
        f"  accuracy   F1 {report['f1_iou50']:.3f} at IoU 0.5, {report['f1_iou70']:.3f} at IoU "
        f"0.7 (precision {report['precision']:.3f}, recall {report['recall']:.3f}); "
        f"{report['splits']} split, {report['merges']} merged\n"
        f"  recall     by brightness dim/mid/bright {three(report['recall_by_brightness'])}; "
        f"by depth top/mid/bottom {three(report['recall_by_depth'])}\n"
        f"  time       {elapsed:.1f} s ({made.image.size / elapsed / 1e6:.2f} Mvoxel/s), stages "
        + ", ".join(f"{k} {v:.1f}s" for k, v in job.timings.items())
        + f"\n  outputs    {job.output}/nuclei.parquet, nuclei.csv, labels.ome.zarr, run.json "
        "(with this accuracy), qc/\n"
        f"  input      {source} (ground truth at labels/truth)"
    )


def _add_to_run_json(output: Path, **facts: Any) -> None:
    """Facts known after the run (the demo's accuracy), written atomically like the rest."""
    from nucflow.pipeline import RUN_JSON
    from nucflow.table import write_atomic

    record = json.loads((output / RUN_JSON).read_text())
    record.update(facts)
    write_atomic(output / RUN_JSON, json.dumps(record, indent=2).encode())

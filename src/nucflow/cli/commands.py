"""The commands ``run``, ``measure``, ``tune``, ``plan``, ``status`` and ``view``: parsed
arguments to a run of a flow (:mod:`nucflow.flowrun`) on a claimed output directory."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from functools import partial
from types import ModuleType
from typing import Any

from nucflow.errors import NucflowWarning, ParameterError


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
    if config["diameter"] == "auto":
        _estimate_diameter(config, stack.crop(box) if box else stack)
        args.diameter_source = "auto"
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


def _estimate_diameter(config: dict[str, Any], stack: Any) -> None:
    """``--diameter auto``: the estimate replaces ``auto`` in the config (run.json records the
    number, so ``--resume`` continues with it), said in one line."""
    from nucflow import diameter

    found = diameter.estimate(stack.data, stack.voxel_size)
    print(f"nucflow: {found.describe()}", flush=True)
    config["diameter"] = found.diameter


def _warn_cost(params: Any, stack: Any) -> None:
    """One line before the work starts when the blocks are too small for their halo."""
    from nucflow import pipeline
    from nucflow.plan import cost_warning

    region = pipeline.data_region(stack, params.chunks)
    found = cost_warning(params, tuple(s.stop - s.start for s in region))
    if found:
        warnings.warn(found, stacklevel=2, category=NucflowWarning)


def _warn_pixels(stack: Any, known: bool | None = None) -> None:
    """One line when lengths are pixels (``known``: the stack's voxel size is, unless told):
    said once the command's checks have passed."""
    if not (stack.voxel_size_known if known is None else known):
        axes = " ".join(stack.axes.upper())
        warnings.warn(
            f"no voxel size in {stack.path}: lengths (--diameter, the table's _um columns) are "
            f"in pixels; pass --voxel-size {axes} in µm",
            stacklevel=2,
            category=NucflowWarning,
        )


def _check_channels(params: Any, stack: Any, path: str) -> None:
    for c in params.measure.channels:
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
    if getattr(args, "diameter", None) is None and record.get("diameter_source") == "auto":
        args.diameter_source = "auto"  # the recorded estimate continues, still said to be one
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
        job.facts["diameter"] = params.diameter
        job.facts["diameter_source"] = getattr(args, "diameter_source", "given")
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
    if "qc_report" in job.facts:
        page = job.output / job.facts["qc_report"]
        print(f"nucflow run: QC report {page} (open it in a browser)")
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
        for name in ("report.html", "outlines.png", "depth.png", "distributions.png")
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
    life = cluster.lifetime(args.cluster, **_cluster_options(args, config))
    timepoints = len(points) if points else None
    _warn_pixels(stack)
    made = make_plan(stack, params, config, flow, timepoints=timepoints)
    print(made)
    print(f"cluster    {where}")
    if life is not None:
        print(f"walltime   {_walltime_line(made.block_seconds, life.shortest, params.chunks)}")


def _walltime_line(block_seconds: float, lifetime: float, chunks: Sequence[int]) -> str:
    """Whether a block fits a worker's time before its walltime retirement (a quarter of it)."""
    line = (
        f"a worker computes for at least {lifetime:.0f} s before it retires; one block takes "
        f"{block_seconds:.1f} s on one thread"
    )
    if block_seconds <= lifetime / 4:
        return line
    smaller = " ".join(map(str, (*chunks[:-2], *(max(1, c // 2) for c in chunks[-2:]))))
    warnings.warn(
        f"one block takes {block_seconds:.1f} s, more than a quarter of a worker's "
        f"{lifetime:.0f} s before its walltime: pass --chunks {smaller} or a longer walltime",
        stacklevel=2,
        category=NucflowWarning,
    )
    return line + " (too long: see the warning)"


def _status(args: argparse.Namespace) -> int:
    from nucflow.status import status

    report = status(args.output)
    with contextlib.suppress(BrokenPipeError):  # `| head -1`: the state is still the exit code
        print(report.text, flush=True)
    return report.exit_code


def _view(args: argparse.Namespace) -> None:
    from nucflow import view

    view.show(args.output)

"""Running a flow: its stages in order, each body given what the stages it reads returned.

A flow is a module in ``flows/`` (or any ``.py`` file) with ``STAGES``, a tuple of
:class:`nucflow.stages.Stage`, and ``run(job)``, usually ``flowrun.run(job, STAGES)``.
Everything a run needs to know about the flow comes from its stages: the checks before the
output is claimed (:func:`check`), the passes for the ETA and ``nucflow plan``
(:func:`nucflow.stages.flow_passes`), the results ``--resume`` may reuse (their fingerprints),
and what ``nucflow status`` shows (the stage list run.json records). Stages marked
``per_timepoint`` run once per time point of a time-lapse (:func:`nucflow.timelapse.each`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

from nucflow import pipeline, progress, stages, timelapse
from nucflow.config import resource_path
from nucflow.errors import ParameterError

__all__ = ["load_flow", "check", "run"]


def load_flow(name: str) -> ModuleType:
    """The flow ``name`` (``nuclei``, ``preprocess``, ``mask``: shipped) or a ``.py`` file.

    Raises
    ------
    ParameterError
        No such flow, or the module has no ``STAGES`` and ``run``.
    """
    path = Path(name) if name.endswith(".py") else resource_path("flows", f"{name}.py")
    if not path.is_file():
        raise ParameterError(
            f"--flow {name!r}: no such flow ({path}); use nuclei, preprocess, mask or a .py file"
        )
    spec = importlib.util.spec_from_file_location(f"nucflow_flow_{path.stem}", path)
    assert spec is not None and spec.loader is not None  # a .py file always has a loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not (isinstance(getattr(module, "STAGES", None), tuple) and callable(module.run)):
        raise ParameterError(
            f"--flow {name!r}: {path} defines no STAGES (a tuple of nucflow.stages.Stage) and "
            "run(job); see flows/mask.py for a small flow"
        )
    return module


def check(
    flow: Sequence[stages.Stage],
    stack: Any,
    params: Any,
    timepoints: Sequence[int] | None,
    *,
    name: str,
) -> None:
    """Every stage's checks, and the time points the stages can take, before the output is
    claimed.

    Raises
    ------
    ConfigError, ParameterError
        One line naming the key or option and the fix.
    """
    stages.check(flow, stack, params)
    for stage in flow:
        if stage.one_timepoint and timepoints is not None and len(timepoints) > 1:
            raise ParameterError(
                f"--flow {name} {stage.one_timepoint} one time point but {len(timepoints)} are "
                "selected; pass one, e.g. --timepoints 0"
            )


def run(job: pipeline.Run, flow: Sequence[stages.Stage]) -> dict[str, Any]:
    """Run ``flow``'s stages on ``job``, then complete it; returns the counts run.json records
    (the last stage's result).

    The ``per_timepoint`` stages (they must follow one another) run for each selected time
    point as a run of its own; the stages after them read the movie's result.
    """
    shape = tuple(job.stack.data.shape)
    progress.expect(job, stages.flow_passes(flow, job.params, shape))
    # A flow that handles one time point runs it as the stack itself (no movie machinery).
    single = any(stage.one_timepoint for stage in flow)
    each = [] if single else [stage for stage in flow if stage.per_timepoint]
    made: dict[str, Any] = {}
    for stage in flow:
        if stage in each:
            if stage is each[0]:
                names = [stage.name for stage in each]
                made[each[-1].name] = timelapse.each(
                    job, partial(_run_stages, each), per_timepoint=names
                )
            continue
        made[stage.name] = _run_stage(job, stage, made)
    return pipeline.complete(job, made[flow[-1].name])


def _run_stages(flow: Sequence[stages.Stage], job: pipeline.Run) -> Any:
    made: dict[str, Any] = {}
    for stage in flow:
        made[stage.name] = _run_stage(job, stage, made)
    return made[flow[-1].name]


def _run_stage(job: pipeline.Run, stage: stages.Stage, made: dict[str, Any]) -> Any:
    if stage.body is None:
        raise ParameterError(f"stage {stage.name!r} has no body: give its Stage a body=")
    inputs = {name: made[name] for name in stage.reads if name in made}
    with job.stage(stage.name):
        return stage.body(job, inputs)

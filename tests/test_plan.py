"""``nucflow plan``'s figures agree with one another: the one-block time and the total on a
stack of one block, whatever the threads; a time-lapse says its T."""

from __future__ import annotations

import re

import pytest

from nucflow import flowrun, io
from nucflow.config import load, resolve
from nucflow.plan import make_plan


def _lines(text: str) -> dict[str, str]:
    return dict(line.split(None, 1) for line in text.splitlines())


def test_one_block_takes_its_block_time_whatever_the_threads(stack3d):
    """The issue's contradiction: "one block 2.5 s on one thread", then "time about 1 s on 2
    worker thread(s)" for a stack that is that one block (a pass cannot split a block)."""
    stack = io.open_stack(stack3d[0])
    config = load(options={"chunks": [40, 128, 128]})
    params = resolve(config, shape=stack.data.shape, voxel_size=stack.voxel_size)
    plan = make_plan(stack, params, config, flowrun.load_flow("nuclei"), threads=4)
    lines = _lines(str(plan))
    one = float(re.match(r"block  ([\d.]+) s on one thread", lines["one"]).group(1))
    total = re.fullmatch(
        r"about ([\d.]+) s on 1 of 4 worker thread\(s\) \(1 block\(s\) a pass\); divide by "
        r"the threads you give it, up to one per block",
        lines["time"],
    )
    assert total, lines["time"]
    assert float(total.group(1)) == one
    assert plan.estimate_seconds == pytest.approx(plan.block_seconds, rel=1e-9)

"""A process that dies or hangs mid-step makes the others stop with a clear error, within a bound, instead of
waiting forever. The ranks are started by hand (conftest.start_ranks): no torchrun agent stops the survivor
for us, so what is tested is the trainer's own handling (gloo's closed connection, the process-group timeout)."""

from __future__ import annotations

import subprocess
import time

import pytest

from aha.backends.torch.tracking import read_metrics

from .conftest import start_ranks, torchrun

pytestmark = pytest.mark.slow


def _finish(process: subprocess.Popen, deadline: float) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        pytest.fail(f"rank still running after the bound; its stderr ends:\n{stderr[-3000:]}")
    return process.returncode, stderr


def test_a_rank_that_dies_mid_step_stops_the_other_with_an_error(settings, tmp_path):
    config = {**settings, "output_dir": str(tmp_path / "run"), "max_steps": 3, "ddp_timeout": 600}
    started = time.monotonic()
    survivor, dying = start_ranks(config, "die@2:1")
    deadline = started + 90  # imports and a step take 10-30 s on 2 busy cores; far below the 600 s timeout
    code, stderr = _finish(survivor, deadline)
    assert _finish(dying, deadline)[0] == 1
    assert code != 0
    assert "RankLostError: rank 0 of 2" in stderr and "another process of the run died or stopped answering" in stderr
    assert "--resume" in stderr


def test_a_rank_that_hangs_mid_step_stops_the_other_after_ddp_timeout(settings, tmp_path):
    config = {**settings, "output_dir": str(tmp_path / "run"), "max_steps": 3, "ddp_timeout": 8}
    survivor, hanging = start_ranks(config, "hang@2:1")
    try:
        code, stderr = _finish(survivor, time.monotonic() + 90)
    finally:
        hanging.kill()
        hanging.communicate()
    assert code != 0
    assert "RankLostError: rank 0 of 2" in stderr and "another process of the run died or stopped answering" in stderr


@pytest.mark.parametrize("sharding", [{}, {"lora_r": 0, "fsdp": True}], ids=["replicated", "fsdp"])
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(settings, tmp_path, sharding):
    """Rank 1's losses of step 2 are NaN: both ranks skip step 2 (none waits in a collective the other never
    reaches) and train on at step 3."""
    config = {**settings, **sharding, "output_dir": str(tmp_path / "run"), "max_steps": 3, "ddp_timeout": 60}
    done = torchrun(config, "nan@2:1", timeout=90)
    rows = read_metrics(tmp_path / "run")
    assert [row["skipped_steps"] for row in rows] == [0, 1, 1]
    assert rows[0]["grad_norm"] > 0 and rows[2]["grad_norm"] > 0 and rows[1]["grad_norm"] != rows[1]["grad_norm"]
    assert "step 2: a non-finite loss (nan) in micro-batch 1/2; optimizer step skipped" in done.stderr  # rank 1
    assert ("step 2: a non-finite loss or gradient on another process; optimizer step skipped" in done.stderr
            if not sharding else "of another process; optimizer step skipped" in done.stderr)  # rank 0

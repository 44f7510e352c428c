"""Multi-process runs for the tests: torchrun (the launcher users run) or one process per rank started by hand
with torchrun's environment (for the fault tests: no agent stops the survivors for us); gloo on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.conftest import one_thread, prompt_file, save_tiny_model, tiny_model_dir  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")


@pytest.fixture(scope="session")
def settings(tiny_model_dir, prompt_file):
    """Per process: 2 prompts x 4 completions in 2 micro-batches of 4; the step's global batch is 4 prompts
    on 2 processes. Prompt-keyed sampling: a prompt's completions are the same on 1 or 2 processes."""
    return dict(model=str(tiny_model_dir), dataset=str(prompt_file), num_generations=4,
                per_device_train_batch_size=4, gradient_accumulation_steps=2, max_completion_length=10,
                max_prompt_length=32, learning_rate=1e-3, lora_r=4, lora_alpha=8, logging_steps=1,
                log_completions_steps=1, seed=0, dtype="float32", sampling_seed="prompt",
                reward_funcs=["tests/trainer/rewards.py:digit_fraction"])


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(config: dict, *faults: str, processes: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N worker.py CONFIG [FAULT]`; fails the test with the output on
    error."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               str(WORKER), json.dumps(config), *faults]
    done = subprocess.run(command, cwd=ROOT, env=_environment(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def start_ranks(config: dict, fault: str, *, processes: int = 2) -> list[subprocess.Popen]:
    """One worker per rank with the environment torchrun would give it, and no agent watching them."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = []
    for rank in range(processes):
        env = {**_environment(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
               "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        ranks.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(config), fault], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return ranks

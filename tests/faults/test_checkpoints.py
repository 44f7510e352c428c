"""Checkpoints survive: a process killed mid-save, SIGTERM, a corrupted or truncated file, a pickle."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aha.backends.torch import TrainConfig, Trainer
from aha.backends.torch.checkpoint import CheckpointError, MANIFEST, latest_checkpoint, list_checkpoints
from aha.backends.torch.tracking import read_metrics

REPO = Path(__file__).resolve().parents[2]


def start_training(values: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "tests/faults/run_training.py"), json.dumps(values), *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def names(run: Path) -> list[str]:
    return [path.name for path in list_checkpoints(run)]


def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(base_config):
    values = {**base_config, "max_steps": 3, "save_steps": 1}
    run = Path(values["output_dir"])
    process = start_training(values, "2")  # SIGKILL once checkpoint-2's files are written, before its manifest
    _, err = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, err[-2000:]
    assert names(run) == ["checkpoint-1"] and (run / ".checkpoint-2.tmp").is_dir()
    assert latest_checkpoint(run) == run / "checkpoint-1"

    resumed = Trainer(TrainConfig.from_dict({**values, "resume": str(run)}))
    assert resumed.step == 1
    resumed.train()
    assert resumed.step == 3 and names(run) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not (run / ".checkpoint-2.tmp").exists()
    assert [row["step"] for row in read_metrics(run)] == [1, 2, 3]


def test_sigterm_saves_and_exits_cleanly_then_resumes(base_config):
    values = {**base_config, "max_steps": 50}
    run = Path(values["output_dir"])
    process = start_training(values)
    deadline = time.monotonic() + 240
    while len(read_metrics(run)) < 2:  # the handlers are installed once steps are being logged
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-2000:]
    assert "SIGTERM: saving a checkpoint after this step" in out
    stopped = int(latest_checkpoint(run).name.split("-")[1])
    assert 2 <= stopped < 50 and f"stopped at step {stopped} of 50" in out
    assert json.loads((run / "summary.json").read_text())["stopped_early"] is True
    assert [row["step"] for row in read_metrics(run)] == list(range(1, stopped + 1))

    resumed = Trainer(TrainConfig.from_dict({**values, "max_steps": stopped + 1, "resume": str(run)}))
    assert resumed.step == stopped
    resumed.train()
    assert resumed.step == stopped + 1 and latest_checkpoint(run).name == f"checkpoint-{stopped + 1}"
    assert [row["step"] for row in read_metrics(run)] == list(range(1, stopped + 2))


@pytest.fixture
def two_checkpoints(base_config):
    values = {**base_config, "max_steps": 2, "save_steps": 1}
    Trainer(TrainConfig.from_dict(values)).train()
    return values, Path(values["output_dir"])


def test_corrupted_or_truncated_checkpoint_is_named_on_resume(two_checkpoints):
    values, run = two_checkpoints
    weights = run / "checkpoint-2" / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:100] + bytes([original[100] ^ 0x01]) + original[101:])  # one flipped bit
    with pytest.raises(CheckpointError, match=r"checkpoint-2: file adapter_model\.safetensors is corrupted \(sha256 "
                                              r"differs from manifest\.json\); resume from the one before instead: "
                                              r"--resume .*checkpoint-1"):
        Trainer(TrainConfig.from_dict({**values, "resume": str(run)}))
    weights.write_bytes(original)
    optimizer = run / "checkpoint-2" / "optimizer.pt"
    size = optimizer.stat().st_size
    with open(optimizer, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=rf"file optimizer\.pt is truncated or overwritten \({size // 2} bytes, "
                                              rf"manifest\.json says {size}\)"):
        Trainer(TrainConfig.from_dict({**values, "resume": str(run)}))
    assert Trainer(TrainConfig.from_dict({**values, "resume": str(run / "checkpoint-1")})).step == 1


class Payload:
    """Unpickling this runs a shell command: what a malicious optimizer.pt could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_optimizer_file_carrying_a_pickle_is_refused(two_checkpoints, tmp_path):
    values, run = two_checkpoints
    checkpoint, marker = run / "checkpoint-2", tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "extra": Payload(marker)}, checkpoint / "optimizer.pt")
    manifest = json.loads((checkpoint / MANIFEST).read_text())  # an attacker who rewrites the manifest too
    data = (checkpoint / "optimizer.pt").read_bytes()
    manifest["files"]["optimizer.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: refused to load: it holds objects other than tensors"):
        Trainer(TrainConfig.from_dict({**values, "resume": str(run)}))
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    """Checkpoints and models load through safetensors; the one pickle reader is restricted to tensors."""
    calls = []
    for file in sorted((REPO / "backends").rglob("*.py")):
        text = file.read_text()
        calls += [text[m.start():text.index(")", m.start()) + 1] for m in re.finditer(r"torch\.load\(", text)]
        assert "pickle.load(" not in text and "weights_only=False" not in text, file
    assert calls and all("weights_only=True" in call for call in calls), calls

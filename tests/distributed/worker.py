"""One process of a multi-process training run for tests/distributed: `worker.py CONFIG_JSON [FAULT]`.

Started by `torchrun --nproc-per-node 2 tests/distributed/worker.py ...`, or once per rank with the
environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Rank 0 saves the gradient of every
optimizer step in output_dir/gradients.pt (recording.py). FAULT "die@K:R" makes rank R leave with
os._exit(1) in step K, after its rollout and before its update (a crash, the OOM killer); "hang@K:R"
makes it sleep there instead (a stuck process); "nan@K:R" makes its losses of step K NaN.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

from aha.backends.torch import TrainConfig
from aha.backends.torch.trainer import Trainer
from recording import record_gradients  # this folder is on sys.path: it holds the script

torch.set_num_threads(1)
config = TrainConfig.from_dict(json.loads(sys.argv[1]))
if len(sys.argv) > 2:
    kind, _, where = sys.argv[2].partition("@")
    fault_step, fault_rank = map(int, where.split(":"))
    update = Trainer._update

    def faulty_update(self, batch):
        if int(os.environ["RANK"]) == fault_rank and self.step + 1 == fault_step:
            if kind == "die":
                os._exit(1)
            time.sleep(3600)
        return update(self, batch)

    if kind in ("die", "hang"):
        Trainer._update = faulty_update
trainer = Trainer(config)
if len(sys.argv) > 2 and kind == "nan":
    loss = trainer.algorithm.loss

    def nan_loss(*args, **kwargs):
        value, metrics = loss(*args, **kwargs)
        if int(os.environ["RANK"]) == fault_rank and trainer.step + 1 == fault_step:
            value = value * float("nan")
        return value, metrics

    trainer.algorithm.loss = nan_loss
gradients = record_gradients(trainer)
trainer.train()
if int(os.environ["RANK"]) == 0:
    torch.save(gradients, Path(config.output_dir) / "gradients.pt")

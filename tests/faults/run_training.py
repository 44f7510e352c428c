"""Run one training in this process, for the tests that kill or signal it: run_training.py CONFIG_JSON [DIE_AT_SAVE]

DIE_AT_SAVE=k: SIGKILL this process while checkpoint-k is being written (its files are written, its
manifest not yet): what a power cut or the OOM killer does mid-save.
"""

import json
import os
import signal
import sys

import torch

from aha.backends.torch import TrainConfig, Trainer
from aha.backends.torch import checkpoint

torch.set_num_threads(1)
if len(sys.argv) > 2:
    die_at, hash_and_sync = f".checkpoint-{sys.argv[2]}.tmp", checkpoint._hash_and_sync

    def dying(folder):
        if folder.name == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return hash_and_sync(folder)

    checkpoint._hash_and_sync = dying
Trainer(TrainConfig.from_dict(json.loads(sys.argv[1]))).train()

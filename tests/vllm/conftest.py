"""The trainer's tiny model and data (tests/trainer/conftest.py), for runs with rollout="vllm" on a stand-in."""
import pytest
import torch

from tests.trainer.conftest import base_config, prompt_file, save_tiny_model, tiny_model_dir  # noqa: F401


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

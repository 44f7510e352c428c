"""The trainer's tiny model and data (tests/trainer/conftest.py), for runs with rollout="vllm" on a stand-in."""
from tests.trainer.conftest import (  # noqa: F401
    base_config, one_thread, prompt_file, save_tiny_model, tiny_model_dir)

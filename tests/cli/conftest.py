"""The trainer's tiny-model fixtures, shared."""

from tests.trainer.conftest import base_config, one_thread, prompt_file, tiny_model_dir  # noqa: F401

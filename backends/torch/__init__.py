"""The torch production backend: fused log-probs, models (LoRA/QLoRA), rollout, trainer.

`from aha.backends.torch import Trainer, TrainConfig` is the Python entry point; the heavy
modules are imported on first use so `aha.backends.torch.logprobs` stays light.
"""

__all__ = ["TrainConfig", "Trainer"]


def __getattr__(name: str):
    if name == "TrainConfig":
        from .config import TrainConfig
        return TrainConfig
    if name == "Trainer":
        from .trainer import Trainer
        return Trainer
    raise AttributeError(name)

"""The `aha` command: config precedence, unknown keys, and the sub-commands that wrap library calls."""

from __future__ import annotations

import pytest
import yaml

from aha.backends.torch.config import ConfigError, TrainConfig
from aha.cli import main


def test_unknown_yaml_key_names_it_and_suggests(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("num_generations: 4\nlearning_rat: 0.1\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'learning_rat'" in err and "did you mean 'learning_rate'" in err


def test_unknown_key_suggestion_text():
    with pytest.raises(ConfigError, match="unknown key 'num_generation' in config; did you mean 'num_generations'"):
        TrainConfig.from_dict({"num_generation": 4})


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"num_generations": 4, "learning_rate": 0.5, "reward_funcs": ["exact_answer"]}))
    config = TrainConfig.from_yaml(path, {"learning_rate": "3e-4"})
    assert config.learning_rate == 3e-4 and config.num_generations == 4
    assert config.reward_funcs == ("exact_answer",)


def test_invalid_values_name_the_field():
    with pytest.raises(ConfigError, match="loss_type must be one of"):
        TrainConfig(loss_type="dappo")
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        TrainConfig(temperature=0)
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        TrainConfig(num_generations=3, per_device_train_batch_size=4)


def test_train_runs_from_flags(base_config, tmp_path):
    flags = []
    for key, value in {**base_config, "max_steps": 1}.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    assert main(["train", *flags]) == 0
    out = tmp_path / "run"
    assert (out / "metrics.jsonl").exists() and (out / "checkpoint-1").is_dir()
    assert main(["plot", str(out)]) == 0
    assert main(["export", str(out), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").exists()

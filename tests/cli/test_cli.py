"""The `aha` command: config precedence, unknown keys, and the sub-commands that wrap library calls."""

from __future__ import annotations

import json

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
    with pytest.raises(ConfigError, match="temperature must be a finite number > 0"):
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


def test_flag_strings_convert_by_field_type():
    config = TrainConfig.from_dict({"output_dir": "123", "model": "7", "num_generations": "4.0",
                                    "epsilon_high": "1", "save_total_limit": "none", "reward_funcs": ["1", "b"],
                                    "load_in_4bit": "true", "lora_r": "8"})
    assert config.output_dir == "123" and config.model == "7" and config.num_generations == 4
    assert config.epsilon_high == 1.0 and config.save_total_limit is None and config.reward_funcs == ("1", "b")
    assert config.load_in_4bit is True
    with pytest.raises(ConfigError, match="seed must be an integer, got '1.5'"):
        TrainConfig.from_dict({"seed": "1.5"})
    with pytest.raises(ConfigError, match="max_steps must be an integer"):
        TrainConfig.from_dict({"max_steps": "many"})


def test_settings_that_would_fail_late_fail_at_once():
    for values, message in [({"save_total_limit": 0}, "save_total_limit must be >= 1"),
                            ({"lora_r": 0, "load_in_4bit": True}, "set lora_r > 0"),
                            ({"lora_r": -1}, "lora_r must be >= 0"),
                            ({"temperature": float("inf")}, "temperature must be a finite number")]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_dict(values)


def test_resume_continues_with_the_saved_config(base_config, tmp_path):
    flags = []
    for key, value in {**base_config, "max_steps": 1, "learning_rate": 0.005}.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    assert main(["train", *flags]) == 0
    run = tmp_path / "run"
    assert main(["train", "--resume", str(run), "--max-steps", "2"]) == 0
    saved = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["config"]
    assert saved["learning_rate"] == 0.005 and saved["model"] == base_config["model"] and saved["max_steps"] == 2

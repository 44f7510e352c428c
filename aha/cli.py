"""The `aha` command: train, conformance, plot, export.

`aha train` flags are generated from TrainConfig's fields (`--num-generations 8`), so every flag is
also a YAML key and the two can never drift apart. Flags override the file given with --config.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, get_args, get_type_hints

USAGE_EXAMPLES = """examples:
  aha train                                   # the embedded demo: GRPO + LoRA on a built-in task
  aha train --algo rloo --model Qwen/Qwen2.5-1.5B-Instruct --dataset data.jsonl --load-in-4bit
  aha train --config run.yaml --max-steps 50  # flags override the file
  aha conformance                             # the executable spec against every backend
  aha plot runs/aha                           # curves.png from metrics.jsonl
  aha export runs/aha --merge --out merged/   # adapter merged into the base weights
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="aha", description="RL post-training for LLMs",
                                     epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(commands)
    commands.add_parser("conformance", help="run the conformance suite (same as python -m aha.conformance)",
                        add_help=False)
    plot = commands.add_parser("plot", help="save curves.png of a run folder")
    plot.add_argument("run_dir")
    export = commands.add_parser("export", help="write a merged model from a run or checkpoint folder")
    export.add_argument("run_dir")
    export.add_argument("--merge", action="store_true", required=True, help="merge the LoRA adapter into the base")
    export.add_argument("--out", required=True, help="output folder")

    if argv[:1] == ["conformance"]:
        from aha.conformance.cli import main as conformance_main
        return conformance_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "train":
        return _train(args)
    if args.command == "plot":
        from aha.backends.torch.tracking import plot_run
        print(plot_run(args.run_dir))
        return 0
    from aha.backends.torch.checkpoint import export_merged
    print(export_merged(args.run_dir, args.out))
    return 0


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    from aha.backends.torch.config import TrainConfig

    train = commands.add_parser("train", help="train with grpo, rloo, ppo or online_dpo",
                                argument_default=argparse.SUPPRESS)
    train.add_argument("--config", help="YAML file of TrainConfig keys; flags override it")
    hints = get_type_hints(TrainConfig)
    for spec in dataclasses.fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        hint = hints[spec.name]
        kinds = [a for a in get_args(hint) if a is not type(None)] or [hint]
        if hint is bool:
            train.add_argument(flag, action=argparse.BooleanOptionalAction)
        elif any(getattr(k, "__origin__", None) is tuple for k in kinds) or getattr(hint, "__origin__", None) is tuple:
            train.add_argument(flag, nargs="+")
        else:
            train.add_argument(flag)  # a string: TrainConfig converts it by the field's type


def _saved_config(resume: str) -> dict[str, Any]:
    """The config a run was saved with (its latest checkpoint's trainer_state.json), minus `resume`."""
    import json
    from pathlib import Path

    from aha.backends.torch.checkpoint import TRAINER_STATE, latest_checkpoint

    path = Path(resume)
    found = path if (path / TRAINER_STATE).exists() else latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"--resume {resume}: no checkpoint-* folder found there")
    saved = json.loads((found / TRAINER_STATE).read_text()).get("config", {})
    return {key: value for key, value in saved.items() if key != "resume"}


def _train(args: argparse.Namespace) -> int:
    import torch

    from aha.backends.torch.chat import ChatTemplateError
    from aha.backends.torch.checkpoint import CheckpointError
    from aha.backends.torch.config import ConfigError, TrainConfig
    from aha.backends.torch.data import DatasetError
    from aha.backends.torch.distributed import RankLostError, shutdown
    from aha.backends.torch.rewards import RewardFunctionError
    from aha.backends.torch.trainer import NonFiniteLossError, Trainer

    from aha.backends.torch.demo.preset import with_demo_defaults

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    config_path = getattr(args, "config", None)
    try:
        values = TrainConfig.read_yaml(config_path) if config_path else {}
        resume = overrides.get("resume") or values.get("resume")
        # A resumed run continues with the config it was saved with; given keys still win.
        saved = _saved_config(resume) if resume else {}
        config = TrainConfig.from_dict(with_demo_defaults({**saved, **values, **overrides}),
                                       source=config_path or "command line")
        Trainer(config).train()
        shutdown()  # leave torchrun's process group (several processes); nothing in one process
    except (ConfigError, DatasetError, RewardFunctionError, CheckpointError, ChatTemplateError,
            NonFiniteLossError, torch.OutOfMemoryError, FileNotFoundError, RankLostError) as error:
        # Bad input and faults the run cannot get past: one clear message, no traceback.
        print(f"aha train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

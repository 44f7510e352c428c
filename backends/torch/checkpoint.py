"""Checkpoints that survive crashes, resume bit-for-bit, and load in other tools.

`run_dir/checkpoint-<step>/` holds:
    adapter_config.json, adapter_model.safetensors   LoRA/QLoRA (peft format: peft, transformers, vLLM)
    or config.json, model*.safetensors               full fine-tuning (`from_pretrained` format)
    tokenizer files                                  so the folder (or an export) is self-contained
    optimizer.pt, scheduler.pt                       state_dicts; loaded with torch.load(weights_only=True)
    extra_modules/<name>.safetensors                 e.g. a PPO value head
    rng_state.json                                   python, numpy, torch CPU and CUDA generators
    trainer_state.json                               what the trainer passed (step, data position, config, ...)
    manifest.json                                    sha256 and size of every file above, checked on load

Atomicity: everything is written into a hidden temporary folder beside the final one, each file
and folder is fsynced, the manifest is written last, and one `os.rename` publishes the folder. A
crash leaves either the complete new checkpoint or none (plus a hidden temp folder that the next
save removes); older checkpoints are pruned only after the new one is published.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .models import Policy

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
_FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not fit what it is loaded into."""


def save_checkpoint(run_dir: str | Path, step: int, *, policy: Policy, optimizer: torch.optim.Optimizer | None,
                    scheduler=None, trainer_state: dict, extra_modules: dict[str, nn.Module] | None = None,
                    save_total_limit: int | None = None) -> Path:
    """Write `run_dir/checkpoint-<step>/` atomically and return it; then keep only the newest
    `save_total_limit` checkpoints (None keeps all)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    extra_modules = extra_modules or {}
    for name in extra_modules:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"extra module name {name!r}: use letters, digits, '_', '.', '-'")
    if save_total_limit is not None and save_total_limit < 1:
        raise ValueError(f"save_total_limit must be >= 1 or None, got {save_total_limit}")
    for stale in run_dir.glob(".checkpoint-*.tmp"):  # left by a save that was killed
        shutil.rmtree(stale)

    final = run_dir / f"checkpoint-{step}"
    temp = run_dir / f".checkpoint-{step}.tmp"
    temp.mkdir()
    try:
        kind = "adapter" if policy.is_peft else "full"
        if policy.is_peft:
            policy.save_adapter(temp)
        else:
            policy.save_full(temp)
        policy.tokenizer.save_pretrained(str(temp))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), temp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), temp / "scheduler.pt")
        if extra_modules:
            from safetensors.torch import save_file

            (temp / "extra_modules").mkdir()
            for name, module in extra_modules.items():
                state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
                save_file(state, temp / "extra_modules" / f"{name}.safetensors")
        (temp / "rng_state.json").write_text(json.dumps(_rng_state()))
        (temp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        files = _hash_and_sync(temp)
        manifest = {"format": _FORMAT_VERSION, "step": step, "kind": kind, "base_model": policy.name_or_path,
                    "extra_modules": sorted(extra_modules), "files": files}
        _write_synced(temp / MANIFEST, json.dumps(manifest, indent=2))
        _fsync_dir(temp)
        if final.exists():  # saving the same step again (e.g. after a resume): swap, then drop the old one
            trash = run_dir / f".checkpoint-{step}.old"
            os.rename(final, trash)
            os.rename(temp, final)
            shutil.rmtree(trash)
        else:
            os.rename(temp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if save_total_limit is not None:
        for old in list_checkpoints(run_dir)[:-save_total_limit]:
            trash = run_dir / f".{old.name}.deleting"
            os.rename(old, trash)  # never visible as a half-deleted checkpoint
            shutil.rmtree(trash)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a manifest) in `run_dir`, oldest step first."""
    found = []
    for path in Path(run_dir).glob("checkpoint-*"):
        match = _CHECKPOINT_NAME.fullmatch(path.name)
        if match and (path / MANIFEST).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in `run_dir`, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def verify_checkpoint(path: str | Path) -> dict:
    """Check every file against the manifest; return the manifest or raise CheckpointError naming the file."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}; not a complete checkpoint")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: file {MANIFEST} is corrupted ({error})") from None
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: file {name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{path}: file {name} is truncated or overwritten ({size} bytes, "
                                  f"{MANIFEST} says {expected['bytes']})")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{path}: file {name} is corrupted (sha256 differs from {MANIFEST})")
    return manifest


def load_checkpoint(path: str | Path, *, policy: Policy, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, extra_modules: dict[str, nn.Module] | None = None,
                    restore_rng: bool = True) -> dict:
    """Verify, then restore weights (in place), optimizer, scheduler, extra modules and RNG
    states; return the trainer_state that was saved."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    kind = "adapter" if policy.is_peft else "full"
    if manifest["kind"] != kind:
        raise CheckpointError(f"{path}: holds {manifest['kind']} weights but the policy is {kind} "
                              "(LoRA vs full fine-tuning must match)")
    extra_modules = extra_modules or {}
    if sorted(extra_modules) != manifest["extra_modules"]:
        raise CheckpointError(f"{path}: saved extra modules {manifest['extra_modules']}, "
                              f"asked to load {sorted(extra_modules)}")
    policy.load_trained_weights(path)
    for name, target in (("optimizer.pt", optimizer), ("scheduler.pt", scheduler)):
        if target is None:
            continue
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: no {name} saved, but one was passed to restore")
        target.load_state_dict(_load_tensors(path / name))
    if extra_modules:
        from safetensors.torch import load_file

        for name, module in extra_modules.items():
            module.load_state_dict(load_file(path / "extra_modules" / f"{name}.safetensors"))
    if restore_rng:
        _set_rng_state(json.loads((path / "rng_state.json").read_text()))
    return json.loads((path / TRAINER_STATE).read_text())


def export_merged(checkpoint_or_run_dir: str | Path, out_dir: str | Path, *, base_model: str | None = None,
                  dtype: str = "auto") -> Path:
    """A standalone model in `out_dir` (safetensors + config + tokenizer) for `from_pretrained` or vLLM.

    LoRA: the base model is loaded unquantized (a QLoRA adapter is merged into the original
    weights, the usual practice; the merged model therefore differs from the trained 4-bit model
    by the quantization error) and `merge_and_unload` folds W + (α/r)·B·A into each layer.
    base_model overrides the path recorded in the checkpoint. Full fine-tuning: a copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(checkpoint_or_run_dir)
    if not (source / MANIFEST).is_file():
        source = latest_checkpoint(source)
        if source is None:
            raise CheckpointError(f"{checkpoint_or_run_dir}: neither a checkpoint nor a run folder with one")
    manifest = verify_checkpoint(source)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    if manifest["kind"] == "adapter":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_model or manifest["base_model"], dtype=torch_dtype)
        model = PeftModel.from_pretrained(base, str(source)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch_dtype)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(out_dir))
    return out_dir


def _load_tensors(file: Path) -> dict:
    """torch.load restricted to tensors and plain containers (weights_only=True): a pickle that would
    build any other object, and so could run code, is refused."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{file}: refused to load: it holds objects other than tensors and plain "
                              f"containers, which only an unsafe unpickler would build ({error})") from None


def _rng_state() -> dict:
    version, mt_state, gauss_next = random.getstate()
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": [version, list(mt_state), gauss_next],
             "numpy": [bit_generator, keys.tolist(), position, has_gauss, cached_gaussian],
             "torch": torch.get_rng_state().tolist(), "cuda": []}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, mt_state, gauss_next = state["python"]
    random.setstate((version, tuple(mt_state), gauss_next))
    bit_generator, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((bit_generator, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():  # a run resumed on fewer GPUs restores those it has
        states = state["cuda"][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states])


def _hash_and_sync(folder: Path) -> dict[str, dict]:
    """sha256 and size of every file under `folder`, each fsynced; subfolders fsynced too."""
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
        files[file.relative_to(folder).as_posix()] = {"sha256": _sha256(file), "bytes": file.stat().st_size}
    for sub in (p for p in folder.rglob("*") if p.is_dir()):
        _fsync_dir(sub)
    return files


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(file: Path, text: str) -> None:
    with open(file, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

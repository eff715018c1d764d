"""Model I/O in the HF-style layout, written atomically.

A saved model is a directory with config.json, model.safetensors and tokenizer.json. A training run adds
trainer_state.json + optimizer.safetensors and keeps each checkpoint in its own directory:

    RUN/checkpoints/step_0000500/{config.json, model.safetensors, tokenizer.json, trainer_state.json, optimizer.safetensors}
    RUN/latest -> checkpoints/step_0000500          (a symlink, swapped atomically)
    RUN/config.json -> latest/config.json           (and model.safetensors, tokenizer.json, trainer_state.json)

A checkpoint directory is written under a temporary name and renamed into place, then `latest` is re-pointed with
an atomic rename: a process killed at any moment leaves the previous checkpoint whole and loadable. No pickle
anywhere: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from tokenizers import Tokenizer

from ftplm.config import ModelConfig, load_model_config, model_config_dict
from ftplm.errors import FtplmError
from ftplm.model import LanguageModel, build_model
from ftplm.tokenizer import load_tokenizer, same_tokenizer

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
RUN_LINKS = MODEL_FILES + ("trainer_state.json",)


def unwrap(model: torch.nn.Module) -> LanguageModel:
    """The plain model inside DDP / FSDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = cast(torch.nn.Module, getattr(model, "module", None) or model._orig_mod)
    return model  # type: ignore[return-value]  # what remains is the model itself


def _atomic_write(path: Path, write: Any) -> None:
    """Call write(tmp_path), fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temp file + rename)."""
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2)))


def save_pretrained(model: torch.nn.Module, tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Write config.json, model.safetensors and tokenizer.json (each atomically) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    _atomic_write(directory / "model.safetensors", lambda p: save_model(model, str(p), metadata={"format": "pt"}))
    _atomic_write(directory / "tokenizer.json", lambda p: tokenizer.save(str(p)))
    write_json(directory / "config.json", model_config_dict(model.cfg))
    return directory


def resolve(path: str | Path) -> Path:
    """A run directory, a checkpoint directory or a saved model: the directory holding the model files."""
    path = Path(path)
    if not path.exists():
        raise FtplmError(f"no such run or model directory: {path}")
    if not path.is_dir():
        raise FtplmError(f"{path} is not a directory (expected a run or saved model)")
    if not (path / "config.json").exists():
        raise FtplmError(f"{path} holds no model (no config.json): is it a run that has not saved a checkpoint yet?")
    return path


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[LanguageModel, Tokenizer]:
    """Model (eval mode) and tokenizer from a run or saved-model directory; corrupt files give FtplmError."""
    directory = resolve(path)
    cfg = load_model_config(directory / "config.json")
    tokenizer = load_tokenizer(directory / "tokenizer.json")
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise FtplmError(
            f"{directory}: tokenizer has {tokenizer.get_vocab_size()} tokens but the model only {cfg.vocab_size}"
        )
    model = build_model(cfg)
    try:
        missing, unexpected = load_model(model, str(directory / "model.safetensors"), strict=False, device=str(device))
    except FileNotFoundError:
        raise FtplmError(f"no model.safetensors in {directory}") from None
    except (SafetensorError, RuntimeError, OSError, ValueError) as e:
        raise FtplmError(f"corrupt checkpoint {directory / 'model.safetensors'}: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise FtplmError(
            f"checkpoint {directory} does not match its config (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return model.to(device).eval(), tokenizer


# --------------------------------------------------------------------------------------------------------
# training checkpoints
# --------------------------------------------------------------------------------------------------------
def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"state.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, sd["param_groups"]


def save_checkpoint(
    run: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Write RUN/checkpoints/step_N atomically and point RUN/latest at it. keep: older step dirs kept (-1 all)."""
    ckpt_root = run / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".step_{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_pretrained(model, tokenizer, tmp)
    tensors, groups = _optimizer_tensors(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    _atomic_write(tmp / "optimizer.safetensors", lambda p: save_file(tensors, str(p)))
    write_json(tmp / "trainer_state.json", {**trainer_state, "step": step, "optimizer_param_groups": groups})
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    link_tmp = run / ".latest.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(final.relative_to(run), link_tmp)
    os.replace(link_tmp, run / "latest")
    for name in RUN_LINKS:
        link = run / name
        if not link.is_symlink():
            if link.exists():
                link.unlink()
            os.symlink(Path("latest") / name, link)
    _fsync_dir(run)
    _prune(ckpt_root, final, keep)
    return final


def save_snapshot(
    run: Path, step: int, model: torch.nn.Module, tokenizer: Tokenizer, trainer_state: dict[str, Any]
) -> Path:
    """Write RUN/snapshots/step_N atomically: weights, config, tokenizer and state, no optimizer. A snapshot is a
    model to evaluate (`load` reads it), not a point to resume from: cheap enough to keep dozens."""
    root = run / "snapshots"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step_{step:07d}", root / f".step_{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tokenizer, tmp)
    write_json(tmp / "trainer_state.json", {**trainer_state, "step": step})
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    _fsync_dir(root)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(ckpt_root: Path, latest: Path, keep: int) -> None:
    if keep < 0:
        return
    older = sorted(p for p in ckpt_root.glob("step_*") if p != latest and p.name < latest.name)
    for p in older[: max(0, len(older) - keep)]:
        shutil.rmtree(p, ignore_errors=True)


def checkpoints(run: str | Path, snapshots: bool = False) -> list[Path]:
    """All complete step checkpoints of a run, oldest first; with snapshots, its weights-only snapshots too (one
    per step, the snapshot where both exist)."""
    dirs = ["checkpoints", "snapshots"] if snapshots else ["checkpoints"]
    by_step = {p.name: p for d in dirs for p in (Path(run) / d).glob("step_*") if (p / "model.safetensors").exists()}
    return [by_step[name] for name in sorted(by_step)]


def load_trainer_state(run: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """trainer_state.json and the optimizer/RNG tensors of the latest checkpoint of a run."""
    latest = run / "latest"
    if not latest.exists():
        raise FtplmError(f"{run} has no checkpoint to resume from")
    try:
        state = json.loads((latest / "trainer_state.json").read_text())
        tensors = load_file(str(latest / "optimizer.safetensors"))
    except FileNotFoundError as e:
        raise FtplmError(f"incomplete checkpoint in {latest.resolve()}: {Path(e.filename).name} is missing") from None
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise FtplmError(f"corrupt checkpoint in {latest.resolve()}: {str(e).splitlines()[0]}") from None
    return state, tensors


def restore_optimizer(optimizer: torch.optim.Optimizer, groups: list[dict], tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise FtplmError(f"optimizer state does not match the model: {e}") from None


def model_config_of(run: str | Path) -> ModelConfig:
    return load_model_config(resolve(run) / "config.json")


def init_source(path: str | Path, tokenizer_path: Path) -> dict[str, Any]:
    """What `train --init-from PATH` starts from: its model config, weights file, step and resolved path. The
    tokenizer must be the one the new data was prepared with, or the embeddings would mean other tokens."""
    directory = resolve(path)
    if not (directory / "model.safetensors").is_file():
        raise FtplmError(f"--init-from: no model.safetensors in {directory}")
    if not same_tokenizer(load_tokenizer(directory / "tokenizer.json"), load_tokenizer(tokenizer_path)):
        raise FtplmError(
            f"--init-from: {path} uses another tokenizer than the data ({tokenizer_path}); "
            f"prepare the data with `ftplm prepare --tokenizer {path}`"
        )
    state = directory / "trainer_state.json"
    try:
        step = json.loads(state.read_text()).get("step") if state.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        step = None
    return {
        "path": str(directory.resolve()),
        "step": step,
        "config": load_model_config(directory / "config.json"),
        "weights": directory / "model.safetensors",
    }


def check_weights_fit(cfg: ModelConfig, weights: Path, source: str | Path) -> None:
    """Fail fast (before any training set-up) when a weights file cannot be loaded into a model of this config."""
    with torch.device("meta"):
        model = build_model(cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    aliases: dict[int, set[str]] = {}  # tied weights are stored once, under any one of their names
    for name, p in model.named_parameters(remove_duplicate=False):
        shapes[name] = tuple(p.shape)
        aliases.setdefault(id(p), set()).add(name)
    try:
        with safe_open(str(weights), "pt") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError) as e:
        raise FtplmError(f"corrupt checkpoint {weights}: {str(e).splitlines()[0]}") from None
    for names in aliases.values():
        if len(names) > 1 and names & stored.keys():
            stored.update({n: stored[next(iter(names & stored.keys()))] for n in names})
    differ = sorted(n for n in shapes.keys() | stored.keys() if shapes.get(n) != stored.get(n))
    if differ:
        name = differ[0]
        raise FtplmError(
            f"--init-from {source}: its weights do not fit this model config ({name}: "
            f"{stored.get(name, 'missing')} in the checkpoint, {shapes.get(name, 'not in the model')} here)"
        )


def run_data_dir(path: str | Path) -> Path | None:
    """The prepared data directory a run (or one of its checkpoints) was trained on, if recorded and present."""
    state = resolve(path) / "trainer_state.json"
    if not state.exists():
        return None
    try:
        data_dir = Path(json.loads(state.read_text())["data_dir"])
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        return None
    return data_dir if (data_dir / "meta.json").exists() else None

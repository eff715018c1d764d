"""Model and training configuration: dataclasses, named presets, validation, JSON round trip.

Every field the paper leaves open (widths, N, P, gamma, decoder depth) lives here with the default we chose;
docs/training.md ("Configuration") documents the same table.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from ftplm.errors import FtplmError
from ftplm.loggers import check_names as check_logger_names

ModelType = Literal["ftp", "gpt"]
DecoderInputs = Literal["tokens", "masked"]


@dataclass
class ModelConfig:
    """Shape of a model. The GPT baseline uses only the trunk fields; FTP adds the decoder fields."""

    model_type: ModelType = "ftp"
    vocab_size: int = 8192
    # embedding and LM-head rows rounded up to a multiple of this (tensor-core friendly products; the trainer uses
    # 64 on CUDA, 1 elsewhere); the padding ids are never predicted: their logits are cut off, their loss masked
    vocab_multiple: int = 1
    block_size: int = 256  # context length of the encoder trunk
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False
    # --- FTP only -------------------------------------------------------------------------------------
    n_future: int = 4  # N: tokens the decoder predicts from each position
    n_pseudo: int = 8  # P: length of the pseudo-sequence the decoder cross-attends to
    gamma: float = 0.8  # loss weight of offset k is gamma**(k-1)
    dec_n_layer: int = 1
    dec_n_head: int = 4
    dec_n_embd: int = 256
    # LayerNorm (no parameters) on each pseudo-vector before the pseudo-position embedding: off by default (the
    # published runs were made without it); on `mini` (3 seeds) it removed FTP's early gradient spikes, val ppl -4%
    pseudo_norm: bool = False
    # Variants that make the decoder rely on h_t rather than on its teacher-forced inputs x_t..x_{t+N-1}; the paper's
    # design is the default. "masked": every input is a learned mask embedding, so h_t alone predicts all N tokens
    # (drafting then takes all N-1 drafts from one decoder pass). input_dropout: each input replaced by the mask
    # with this probability during training. future_bow: weight of an extra loss in which the mean of the
    # pseudo-sequence, through the LM head, predicts each of the next N tokens (a bag of future words): the
    # topic-level content of the future must be in h_t itself, not reachable through the decoder's inputs.
    decoder_inputs: DecoderInputs = "tokens"
    input_dropout: float = 0.0
    future_bow: float = 0.0

    def validate(self) -> ModelConfig:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise FtplmError(f"invalid model config: {msg}")

        need(self.model_type in ("ftp", "gpt"), f"model_type must be 'ftp' or 'gpt', got {self.model_type!r}")
        for name in ("vocab_size", "vocab_multiple", "block_size", "n_layer", "n_head", "n_embd"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, f"{name} must be a positive integer")
        need(self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        if self.model_type == "ftp":
            for name in ("n_future", "n_pseudo", "dec_n_layer", "dec_n_head", "dec_n_embd"):
                need(
                    isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                    f"{name} must be a positive integer",
                )
            need(
                self.dec_n_embd % self.dec_n_head == 0,
                f"dec_n_embd ({self.dec_n_embd}) must be divisible by dec_n_head ({self.dec_n_head})",
            )
            need(0.0 < self.gamma <= 1.0, f"gamma must be in (0, 1], got {self.gamma}")
            need(isinstance(self.pseudo_norm, bool), f"pseudo_norm must be true or false, got {self.pseudo_norm!r}")
            need(
                self.decoder_inputs in ("tokens", "masked"),
                f"decoder_inputs must be 'tokens' or 'masked', got {self.decoder_inputs!r}",
            )
            need(0.0 <= self.input_dropout <= 1.0, f"input_dropout must be in [0, 1], got {self.input_dropout}")
            need(self.future_bow >= 0.0, f"future_bow must be >= 0, got {self.future_bow}")
        return self

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and LM-head matrices: vocab_size rounded up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


@dataclass
class TrainConfig:
    """How to train. Stopping: whichever of max_steps / max_tokens / time_budget comes first."""

    batch_size: int = 16  # sequences per micro-batch (per process)
    grad_accum: int = 1
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_tokens: int | None = None
    time_budget: float | None = None  # seconds
    eval_interval: int = 250
    eval_iters: int = 20
    save_interval: int = 500
    keep_checkpoints: int = 0  # older step checkpoints kept besides the latest (-1 = all)
    snapshots: int = 0  # weights-only copies kept on a schedule (train.snapshot_steps), at most this many
    log_interval: int = 10
    seed: int = 1337
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the hardware has native bf16
    compile: bool | None = None  # torch.compile the model; None: on CUDA (where it pays), not on CPU
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])  # ftplm.loggers.LOGGERS; jsonl is always on

    def validate(self) -> TrainConfig:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise FtplmError(f"invalid training config: {msg}")

        for name in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "save_interval", "log_interval"):
            need(getattr(self, name) > 0, f"{name} must be positive")
        need(self.learning_rate > 0, "learning_rate must be positive")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        need(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        need(self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)")
        need(self.keep_checkpoints >= -1, "keep_checkpoints must be >= 0, or -1 to keep all")
        need(self.snapshots >= 0, "snapshots must be >= 0")
        for name in ("max_steps", "max_tokens", "time_budget"):
            value = getattr(self, name)
            need(value is None or value > 0, f"{name} must be positive")
        need(self.dtype in ("auto", "bf16", "fp32"), f"dtype must be 'auto', 'bf16' or 'fp32', got {self.dtype!r}")
        self.loggers = check_logger_names(self.loggers)
        return self


@dataclass
class Preset:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)


# Named presets (litgpt style). vocab_size is overwritten by the tokenizer of the prepared data.
PRESETS: dict[str, Preset] = {
    # Seconds on a laptop CPU: tests and CI.
    "tiny": Preset(
        ModelConfig(
            block_size=64,
            n_layer=2,
            n_head=2,
            n_embd=64,
            n_future=4,
            n_pseudo=4,
            dec_n_layer=1,
            dec_n_head=2,
            dec_n_embd=32,
        ),
        TrainConfig(
            batch_size=8, learning_rate=3e-3, warmup_steps=10, eval_interval=50, eval_iters=4, save_interval=50
        ),
    ),
    # ~5M parameters: the demo's model, a few hundred steps in minutes on 2 CPU cores without native bf16.
    "mini": Preset(
        ModelConfig(
            block_size=128,
            n_layer=4,
            n_head=4,
            n_embd=256,
            n_future=4,
            n_pseudo=8,
            dec_n_layer=1,
            dec_n_head=4,
            dec_n_embd=128,
        ),
        TrainConfig(
            batch_size=16, learning_rate=2e-3, warmup_steps=20, eval_interval=100, eval_iters=10, save_interval=100
        ),
    ),
    # ~14M parameters: useful in an hour on 2 CPU cores (with native bf16; a few hours in fp32).
    "small": Preset(
        ModelConfig(
            block_size=256,
            n_layer=6,
            n_head=6,
            n_embd=384,
            n_future=4,
            n_pseudo=8,
            dec_n_layer=1,
            dec_n_head=4,
            dec_n_embd=256,
        ),
        TrainConfig(
            batch_size=16, learning_rate=1e-3, warmup_steps=100, eval_interval=200, eval_iters=20, save_interval=200
        ),
    ),
    # The paper's scale (12-layer encoder, 3-layer decoder, ctx 1024): for GPUs.
    "base": Preset(
        ModelConfig(
            block_size=1024,
            n_layer=12,
            n_head=12,
            n_embd=768,
            n_future=4,
            n_pseudo=8,
            dec_n_layer=3,
            dec_n_head=8,
            dec_n_embd=512,
        ),
        TrainConfig(
            batch_size=16,
            grad_accum=4,
            learning_rate=6e-4,
            warmup_steps=1000,
            eval_interval=500,
            eval_iters=50,
            save_interval=1000,
        ),
    ),
}


def preset(name: str, model_type: ModelType = "ftp") -> Preset:
    """A fresh copy of a named preset for the given model type."""
    if name not in PRESETS:
        raise FtplmError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[name]
    return Preset(dataclasses.replace(p.model, model_type=model_type), dataclasses.replace(p.train))


def with_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of a config dataclass with fields replaced; unknown fields or wrong types are an error."""
    names = {f.name: f for f in fields(cfg)}
    for key in overrides:
        if key not in names:
            raise FtplmError(f"unknown config field {key!r} for {type(cfg).__name__}")
    return check_types(dataclasses.replace(cfg, **overrides), type(cfg).__name__)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse "key=value" where value is JSON if it parses as JSON, else a bare string."""
    if "=" not in text:
        raise FtplmError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def config_from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build a config dataclass from a dict, checking field names and types (JSON gives int/float/str/bool)."""
    if not isinstance(data, dict):
        raise FtplmError(f"{where}: expected a JSON object")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise FtplmError(f"{where}: unknown field(s) {', '.join(unknown)}")
    return check_types(cls(**data), where)


def check_types(cfg: Any, where: str) -> Any:
    """Check field types against the field's kind (JSON, YAML and --set give int/float/str/bool/list), in place:
    numbers where numbers belong (an integral float is accepted for an int), true/false for flags."""
    numbers = {"int": int, "float": float, "int | None": int, "float | None": float}
    for f in fields(cfg):
        value, kind = getattr(cfg, f.name), str(f.type)
        if value is None and "None" in kind:
            continue
        if kind in numbers:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise FtplmError(f"{where}: field {f.name} must be a number, got {value!r}")
            if numbers[kind] is int and not isinstance(value, int):
                if not float(value).is_integer():
                    raise FtplmError(f"{where}: field {f.name} must be an integer, got {value!r}")
                setattr(cfg, f.name, int(value))
        elif kind == "bool" and not isinstance(value, bool):
            raise FtplmError(f"{where}: field {f.name} must be true or false, got {value!r}")
    return cfg


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON config file as a dict of field -> value; any problem is one FtplmError line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except FileNotFoundError:
        raise FtplmError(f"no such config file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FtplmError(f"cannot read config file {path}: {e}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise FtplmError(f"corrupt config file {path}: {str(e).splitlines()[0]}") from None
    if path.suffix not in (".json", ".yaml", ".yml"):
        raise FtplmError(f"config file {path} must end in .yaml, .yml or .json")
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise FtplmError(f"config file {path} must hold a mapping of field: value")
    return data


def write_config_file(path: Path, data: dict[str, Any], header: str) -> None:
    """A resolved config as YAML (atomically), readable again by load_config_file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)


def parse_duration(text: str) -> float:
    """'90' / '90s' / '5m' / '1.5h' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m:
        raise FtplmError(f"invalid duration {text!r}: use e.g. 90s, 5m or 1.5h")
    value = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if value <= 0:
        raise FtplmError(f"invalid duration {text!r}: must be positive")
    return value


def load_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FtplmError(f"no config.json in {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FtplmError(f"corrupt {path}: {e}") from None
    data = {k: v for k, v in data.items() if k not in ("architectures", "ftplm_version")}
    return config_from_dict(ModelConfig, data, str(path)).validate()


def model_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    return {"architectures": ["FTPModel" if cfg.model_type == "ftp" else "GPTModel"], **dataclasses.asdict(cfg)}

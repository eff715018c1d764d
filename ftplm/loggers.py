"""Experiment loggers (`--logger`): every one is fed the same records the trainer writes to log.jsonl.

A record is a flat-ish dict with a "step" (train records: loss, lr, tokens, ...; validation records: "val": {...}).
`log.jsonl` is always written (ftplm's reports read it); `csv`, `tensorboard` and `wandb` are extra views of the
same records, flattened to scalar metrics named like "train/loss" and "val/ppl". On resume every logger drops what
was written after the checkpoint the run continues from, so curves never hold steps twice.
"""

from __future__ import annotations

import csv
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftplm.errors import FtplmError

Record = dict[str, Any]


def flatten(record: Record) -> dict[str, float | int]:
    """Scalar metrics of a record: {"step", "loss", "val": {"ppl", "offset_acc": [...]}} -> train/loss, val/ppl,
    val/offset_acc/1, ... (offsets count from 1, as k in the docs); bookkeeping fields keep their names."""
    out: dict[str, float | int] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                put(f"{name}/{key}", inner)
        elif isinstance(value, (list, tuple)):
            for i, inner in enumerate(value, start=1):
                put(f"{name}/{i}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value

    for key, value in record.items():
        if key != "step":
            put(key if key in ("val", "tokens", "elapsed") else f"train/{key}", value)
    return out


class Logger:
    """What a trainer needs of a logger. `start` gets the resolved config and the step the run (re)starts at."""

    def start(self, config: dict[str, Any], step: int) -> None:
        pass

    def log(self, record: Record) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JsonlLogger(Logger):
    """RUN/log.jsonl: one JSON record a line, exactly as given (what `ftplm report` and `read_log` read)."""

    def __init__(self, run: Path) -> None:
        self.path = run / "log.jsonl"

    def start(self, config: dict[str, Any], step: int) -> None:
        keep = [line for line in _lines(self.path) if json.loads(line).get("step", 0) <= step] if step else []
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, record: Record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class CsvLogger(Logger):
    """RUN/metrics.csv: a row per record, a column per metric; the header grows when a new metric appears
    (the file is rewritten then, as Lightning's CSVLogger does), so train and validation rows share one table."""

    def __init__(self, run: Path) -> None:
        self.path = run / "metrics.csv"
        self.columns: list[str] = ["step"]

    def start(self, config: dict[str, Any], step: int) -> None:
        rows = self._rows() if step else []
        rows = [r for r in rows if int(float(r["step"])) <= step]
        for row in rows:
            self.columns += [c for c in row if c not in self.columns]
        self._write(rows)

    def log(self, record: Record) -> None:
        row = {"step": record["step"], **flatten(record)}
        if any(c not in self.columns for c in row):
            self.columns += [c for c in row if c not in self.columns]
            self._write(self._rows() + [row])
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)

    def _rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]

    def _write(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)


class TensorBoardLogger(Logger):
    """RUN/tensorboard/: scalars for `tensorboard --logdir RUN`; a resumed run purges events after its step."""

    def __init__(self, run: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FtplmError("--logger tensorboard needs tensorboard: pip install 'ftplm[tensorboard]'") from None
        self.run, self.writer_class = run, SummaryWriter
        self.writer: Any = None

    def start(self, config: dict[str, Any], step: int) -> None:
        self.writer = self.writer_class(log_dir=str(self.run / "tensorboard"), purge_step=step + 1 if step else None)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", step)

    def log(self, record: Record) -> None:
        for name, value in flatten(record).items():
            self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbLogger(Logger):
    """Weights & Biases. Offline by default (files in RUN/wandb/, `wandb sync` uploads them later), so it works
    without network; WANDB_MODE=online logs live. A resumed run continues the same wandb run (id in RUN/wandb_id)."""

    def __init__(self, run: Path) -> None:
        try:
            import wandb
        except ImportError:
            raise FtplmError("--logger wandb needs wandb: pip install 'ftplm[wandb]'") from None
        self.run = run
        self.session: Any = None
        self.wandb: Any = wandb  # its init() is typed more narrowly than the modes it accepts

    def start(self, config: dict[str, Any], step: int) -> None:
        id_file = self.run / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.session = self.wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ftplm"),
            name=self.run.name,
            id=run_id,
            resume="allow",
            dir=str(self.run),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),
        )

    def log(self, record: Record) -> None:
        self.session.log(flatten(record), step=record["step"])

    def close(self) -> None:
        if self.session is not None:
            self.session.finish()


# The one list of loggers: `--logger` choices, validation and the docs read it. jsonl is always on.
LOGGERS: dict[str, Callable[[Path], Logger]] = {
    "jsonl": JsonlLogger,
    "csv": CsvLogger,
    "tensorboard": TensorBoardLogger,
    "wandb": WandbLogger,
}


def check_names(names: list[str]) -> list[str]:
    """The logger names to run: jsonl first and always, then the others asked for, each once."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise FtplmError(f"loggers must be a list of names from: {', '.join(LOGGERS)}")
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise FtplmError(f"unknown logger {unknown[0]!r}; choose from: {', '.join(LOGGERS)}")
    return ["jsonl"] + [n for n in dict.fromkeys(names) if n != "jsonl"]


class Loggers(Logger):
    """All of a run's loggers as one."""

    def __init__(self, run: Path, names: list[str]) -> None:
        self.loggers = [LOGGERS[name](run) for name in check_names(names)]

    def start(self, config: dict[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.start(config, step)

    def log(self, record: Record) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

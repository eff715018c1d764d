"""Shared fixtures: a tiny prepared corpus and tiny trained FTP / GPT runs, built once per test session."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from ftplm.data import documents, prepare
from ftplm.train import train

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """800 labelled wiki-vital documents as a local .jsonl corpus (exercises the local-file path too)."""
    path = tmp_path_factory.mktemp("corpus") / "wiki.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for doc in itertools.islice(documents("wiki-vital"), 0, 8000, 10):
            f.write(json.dumps({"id": doc.doc_id, "text": doc.text, "label": doc.label}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_data(tiny_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(str(tiny_corpus), out, vocab_size=512, val_frac=0.1, test_frac=0.15)
    return out


def _train_tiny(data: Path, out: Path, model_type: str, steps: int = 40) -> Path:
    train(
        data,
        out,
        model_type=model_type,
        preset_name="tiny",
        progress=False,
        train_overrides={"max_steps": steps, "eval_interval": steps, "save_interval": steps},
    )
    return out


@pytest.fixture(scope="session")
def tiny_ftp_run(tiny_data, tmp_path_factory) -> Path:
    return _train_tiny(tiny_data, tmp_path_factory.mktemp("runs") / "ftp", "ftp")


@pytest.fixture(scope="session")
def tiny_gpt_run(tiny_data, tmp_path_factory) -> Path:
    return _train_tiny(tiny_data, tmp_path_factory.mktemp("runs") / "gpt", "gpt")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a busy 2-core machine: one torch thread avoids OpenMP spin-waiting (several times faster).
    Use per module with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

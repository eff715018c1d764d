"""`ftplm prepare --corpus hf:...` streams a Hugging Face `datasets` dataset into token shards in bounded memory.

Offline: the datasets are local (save_to_disk folders and a folder of .jsonl files read by datasets' own loader).
"""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from ftplm.cli import main
from ftplm.data import TokenData, documents, prepare, split_of
from ftplm.errors import FtplmError
from ftplm.tokenizer import load_tokenizer

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(2000)]
    return [{"text": " ".join(rng.choice(words) for _ in range(120)), "label": i % 3} for i in range(1200)]


@pytest.fixture(scope="module")
def saved(rows, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def _split_texts(data: Path, split: str) -> list[str]:
    d = TokenData(data)
    tok = load_tokenizer(d.tokenizer_path)
    ids = np.concatenate([np.asarray(s) for s in d.shards[split]])
    docs = np.split(ids, np.flatnonzero(ids == d.eos_id) + 1)[:-1]
    return [tok.decode(doc[:-1].tolist()) for doc in docs]


def _traced_peak(corpus: str, out: Path) -> tuple[dict, int]:
    tracemalloc.start()
    try:
        meta = prepare(corpus, out, vocab_size=300, shard_tokens=20_000)
        return meta, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streams_into_bounded_shards_in_order(saved, rows, tmp_path):
    small = tmp_path / "small"
    datasets.Dataset.from_list(rows[:400]).save_to_disk(str(small))
    _, small_peak = _traced_peak(f"hf:{small}", tmp_path / "small_data")
    meta, peak = _traced_peak(f"hf:{saved}", tmp_path / "data")
    # 3x the corpus, about the same peak: memory follows the batch sizes, not the corpus, but for the duplicate
    # filter's hash per document (~70 bytes, against ~700 bytes of text each here)
    extra_bytes = sum(len(r["text"]) for r in rows[400:])
    allowed = extra_bytes / 4 + 100 * len(rows[400:])
    assert peak - small_peak < allowed, f"peak grew {peak - small_peak:,} bytes for {extra_bytes:,} more text"
    train = meta["splits"]["train"]
    assert len(train["shards"]) > 5 and all(s["tokens"] <= 20_000 for s in train["shards"])
    assert (
        sum(s["tokens"] for s in train["shards"]) == train["tokens"] == TokenData(tmp_path / "data").num_tokens("train")
    )
    # every document lands, whole and in order, in the split its id hashes to (one pass routes all splits)
    for split in ("train", "val", "test"):
        want = [r["text"] for n, r in enumerate(rows) if split_of(f"{saved}:{n}", 0.05, 0.10, 0) == split]
        assert _split_texts(tmp_path / "data", split) == want
    assert meta["splits"]["test"]["documents"] > 0


def test_local_data_files_folder_and_dataset_dict(rows, tmp_path):
    folder = tmp_path / "jsonl"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for r in rows[:200]:
            f.write(json.dumps(r) + "\n")
    docs = list(documents(f"hf:{folder}"))
    assert [d.text for d in docs] == [r["text"] for r in rows[:200]] and docs[4].label == "1"
    dd = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:50]), "test": datasets.Dataset.from_list(rows[50:60])}
    ).save_to_disk(str(dd))
    assert [d.text for d in documents(f"hf:{dd}")] == [r["text"] for r in rows[:50]]


def test_dataset_without_text_column_is_one_line(tmp_path, capsys):
    path = tmp_path / "notext"
    datasets.Dataset.from_list([{"content": "x"}]).save_to_disk(str(path))
    with pytest.raises(FtplmError, match="has no 'text' column"):
        list(documents(f"hf:{path}"))
    assert main(["prepare", "--corpus", f"hf:{path}", "--out", str(tmp_path / "out")]) == 2
    assert "has no 'text' column (columns: content)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

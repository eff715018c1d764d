"""`ftplm.load(...)`: a trained model together with its tokenizer, speaking text."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tokenizers import Tokenizer

from ftplm.checkpoint import load_pretrained, save_pretrained
from ftplm.errors import FtplmError
from ftplm.generate import Sampling, generate
from ftplm.model import LanguageModel
from ftplm.tokenizer import EOS


class TextModel:
    """A GPT or FTP model plus its tokenizer. `.model` is the plain torch module."""

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, path: Path | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.eos_id: int | None = tokenizer.token_to_id(EOS)

    @property
    def config(self):
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise FtplmError(f"expected text, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ) -> str:
        """The continuation of `prompt` (text, or token ids) as text, without the prompt."""
        ids = self.generate_ids(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos)
        if stop_at_eos and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.decode(ids)

    def generate_ids(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ) -> list[int]:
        """New token ids only (including a final EOS when one was produced)."""
        sampling = Sampling(temperature, top_k, top_p)
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = generate(self.model, idx, max_new_tokens, sampling, seed, self.eos_id if stop_at_eos else None)
        return out[0, len(ids) :].tolist()

    @torch.no_grad()
    def state_vectors(self, text: str) -> np.ndarray:
        """Per-token top-layer vectors (T, n_embd) of a text (truncated to the context)."""
        ids = self.encode(text)[: self.config.block_size]
        if not ids:
            raise FtplmError("cannot embed empty text")
        idx = torch.tensor([ids], device=self.device)
        return self.model.state_vectors(idx)[0].float().cpu().numpy()

    def embed(self, texts: list[str], pooling: Literal["mean", "last"] = "mean") -> np.ndarray:
        """L2-normalised document vectors (len(texts), n_embd): mean- or last-token-pooled state vectors."""
        if pooling not in ("mean", "last"):
            raise FtplmError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        if isinstance(texts, str):
            texts = [texts]
        vectors = []
        for text in texts:
            h = self.state_vectors(text)
            v = h.mean(0) if pooling == "mean" else h[-1]
            vectors.append(v / max(np.linalg.norm(v), 1e-12))
        return np.stack(vectors) if vectors else np.zeros((0, self.config.n_embd), dtype=np.float32)

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_pretrained(self.model, self.tokenizer, directory)


def load(path: str | Path, device: str | torch.device = "cpu") -> TextModel:
    """Load a run directory (its latest checkpoint), a checkpoint directory, or a saved model."""
    model, tokenizer = load_pretrained(path, device)
    return TextModel(model, tokenizer, Path(path))

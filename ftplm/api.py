"""`ftplm.load(...)`: a trained model together with its tokenizer, speaking text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tokenizers import Tokenizer

from ftplm.checkpoint import load_pretrained, save_pretrained
from ftplm.errors import FtplmError
from ftplm.generate import DecodeSession, GenerationConfig, as_config, generate_batch
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

    def generate(self, prompt: str | list[int], config: GenerationConfig | int | None = None, **options: Any) -> str:
        """The continuation of `prompt` (text, or token ids) as text, without the prompt, the final EOS and anything
        from the first stop string on. `config`: a GenerationConfig, or max_new_tokens; options: any of its fields
        (temperature, top_k, top_p, seed, stop_at_eos, stop, speculative, draft_len, tree, adaptive)."""
        config = as_config(config, None, options)
        return self.text(self.generate_ids(prompt, config), config)

    def generate_ids(
        self, prompt: str | list[int], config: GenerationConfig | int | None = None, **options: Any
    ) -> list[int]:
        """New token ids only (including a final EOS when one was produced).

        speculative = "ftp" (FTP models: the decoder drafts for itself; "ftp-recycling" and "ftp-lookup" combine it
        with the train-free drafters), "recycling" or "lookup" (any model; ftplm.drafters lists them all), or
        "auto" (`ftplm.drafters.auto_drafter`: the fastest on our models for this temperature) gives the same tokens
        as plain decoding (greedy) or the same distribution (sampling), in fewer trunk passes.
        """
        return self._generate([self._ids(prompt)], as_config(config, None, options))[0]

    def generate_batch(
        self, prompts: list[str] | list[list[int]], config: GenerationConfig | int | None = None, **options: Any
    ) -> list[str]:
        """The continuations of several prompts (texts or token ids, of any lengths), generated together as one
        batch, each up to max_new_tokens within the context (`generate`'s options and conventions)."""
        config = as_config(config, None, options)
        return [self.text(ids, config) for ids in self._generate([self._ids(p) for p in prompts], config)]

    def text(self, ids: list[int], config: GenerationConfig) -> str:
        """Generated ids as text: cut at EOS (when stopping there) and before the first stop string."""
        if config.stop_at_eos and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        text = self.decode(ids)
        cut = [i for i in (text.find(s) for s in config.stop) if i >= 0]
        return text[: min(cut)] if cut else text

    def session(self) -> DecodeSession:
        """A decoding session on this model (rows added and stepped at will: ftplm.generate.DecodeSession)."""
        return DecodeSession(self.model, self.eos_id)

    def _generate(self, prompts: list[list[int]], config: GenerationConfig) -> list[list[int]]:
        return generate_batch(self.model, prompts, config, eos_id=self.eos_id)

    def _ids(self, prompt: str | list[int]) -> list[int]:
        return self.encode(prompt) if isinstance(prompt, str) else list(prompt)

    @torch.no_grad()
    def state_vectors(self, text: str) -> np.ndarray:
        """Per-token top-layer vectors (T, n_embd) of a text (truncated to the context): FTP's semantic states."""
        ids = self.encode(text)[: self.config.block_size]
        if not ids:
            raise FtplmError("cannot embed empty text")
        idx = torch.tensor([ids], device=self.device)
        return self.model.state_vectors(idx)[0].float().cpu().numpy()

    @torch.no_grad()
    def embed(self, texts: list[str], pooling: Literal["mean", "last"] = "mean", batch_size: int = 32) -> np.ndarray:
        """L2-normalised document vectors (len(texts), n_embd): mean- or last-token-pooled state vectors.

        Texts are truncated to the context and run in right-padded batches (sorted by length): the trunk is causal,
        so padding after a text cannot change its vectors, and pooling reads only its own positions.
        """
        if pooling not in ("mean", "last"):
            raise FtplmError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        if isinstance(texts, str):
            texts = [texts]
        ids = [self.encode(t)[: self.config.block_size] for t in texts]
        if any(not x for x in ids):
            raise FtplmError("cannot embed empty text")
        out = np.zeros((len(ids), self.config.n_embd), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        self.model.eval()
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            lengths = torch.tensor([len(ids[i]) for i in rows], device=self.device)
            idx = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=self.device)
            for r, i in enumerate(rows):
                idx[r, : len(ids[i])] = torch.tensor(ids[i])
            h = self.model.state_vectors(idx).float()
            if pooling == "mean":
                valid = (torch.arange(idx.size(1), device=self.device) < lengths[:, None]).unsqueeze(-1)
                v = (h * valid).sum(1) / lengths[:, None]
            else:
                v = h[torch.arange(len(rows)), lengths - 1]
            out[rows] = torch.nn.functional.normalize(v, dim=-1).cpu().numpy()
        return out

    # --- scoring: the log-likelihoods perplexity and lm-evaluation-harness (ftplm.lmeval) are built on ------------
    def loglikelihood(self, context: str | list[int], continuation: str | list[int]) -> tuple[float, bool]:
        """log p(continuation | context), summed over the continuation's tokens, and whether greedy decoding would
        produce exactly them. See loglikelihood_batch."""
        return self.loglikelihood_batch([(context, continuation)])[0]

    def loglikelihood_batch(
        self, pairs: list[tuple[str | list[int], str | list[int]]], batch_size: int = 16, max_length: int | None = None
    ) -> list[tuple[float, bool]]:
        """loglikelihood of many (context, continuation) pairs, in batches. Texts are encoded separately (put a
        word-boundary space at the start of the continuation); an empty context means the start of a document (EOS,
        the separator training saw before every document). Each token sees at most max_length tokens before it
        (default: the context length): earlier context is dropped, a longer continuation scored in rolling windows."""
        L = self._max_length(max_length)
        windows = []
        for context, continuation in pairs:
            ctx = self._ids(context) or [self._eos()]
            windows.append(rolling_windows(ctx + self._ids(continuation), len(ctx), L))
        return self._score_windows(windows, batch_size)

    def score(
        self, texts: Sequence[str | list[int]], batch_size: int = 16, max_length: int | None = None
    ) -> list[float]:
        """Total log-likelihood of each text as a document of its own (after EOS): every token scored once, in
        rolling windows of max_length tokens, so a text longer than the context is scored whole (`rolling_windows`:
        lm-eval's loglikelihood_rolling)."""
        L = self._max_length(max_length)
        windows = [rolling_windows([self._eos(), *self._ids(t)], 1, L) for t in texts]
        return [logp for logp, _ in self._score_windows(windows, batch_size)]

    def perplexity(self, text: str | list[int], max_length: int | None = None) -> float:
        """exp(mean negative log-likelihood per token) of a text scored by `score`."""
        n = len(self._ids(text))
        if n == 0:
            raise FtplmError("the perplexity of an empty text is undefined")
        return math.exp(-self.score([text], max_length=max_length)[0] / n)

    def _max_length(self, max_length: int | None) -> int:
        block = self.config.block_size
        if max_length is None:
            return block
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= block:
            raise FtplmError(f"max_length must be in 1..{block} (the model's context length), got {max_length!r}")
        return max_length

    def _eos(self) -> int:
        if self.eos_id is None:
            raise FtplmError(f"the tokenizer has no {EOS} token to start a document with")
        return self.eos_id

    @torch.no_grad()
    def _score_windows(self, windows: list[list[tuple[list[int], int]]], batch_size: int) -> list[tuple[float, bool]]:
        """For each item, a list of windows (tokens, n): the summed log-probability of the last n tokens of each
        window given the window's tokens before them, and whether every scored token was the most likely one.

        All windows run together, longest first, in right-padded batches (the trunk is causal: padding after a window
        cannot change its scores); the next-token head runs only at scored positions (a multiple-choice continuation
        is a few tokens of a long window). Float32, whatever the training dtype.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise FtplmError(f"batch_size must be a positive integer, got {batch_size!r}")
        flat = [(item, ids, n) for item, ws in enumerate(windows) for ids, n in ws if n > 0]
        flat.sort(key=lambda w: -len(w[1]))
        logp, greedy = [0.0] * len(windows), [True] * len(windows)  # nothing to score: log 1
        self.model.eval()
        for start in range(0, len(flat), batch_size):
            batch = flat[start : start + batch_size]
            T = len(batch[0][1]) - 1
            tokens = torch.zeros(len(batch), T + 1, dtype=torch.long)
            scored = torch.zeros(len(batch), T, dtype=torch.bool)
            for r, (_, ids, n) in enumerate(batch):
                tokens[r, : len(ids)] = torch.tensor(ids)
                scored[r, len(ids) - 1 - n : len(ids) - 1] = True
            tokens, scored = tokens.to(self.device), scored.to(self.device)
            idx, targets = tokens[:, :-1], tokens[:, 1:][scored]
            h = self.model.state_vectors(idx)
            logits = self.model.next_token_logits(h[scored][None], idx[scored][None])[0].float()
            token_logp = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0].double()
            hits = logits.argmax(-1) == targets
            counts = scored.sum(1).tolist()
            for (item, _, _), lp, hit in zip(batch, token_logp.split(counts), hits.split(counts)):
                logp[item] += float(lp.sum())
                greedy[item] &= bool(hit.all())
        return list(zip(logp, greedy))

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_pretrained(self.model, self.tokenizer, directory)


def rolling_windows(tokens: list[int], first: int, max_length: int) -> list[tuple[list[int], int]]:
    """(window, n) pairs that score tokens[first:] (first >= 1), each token exactly once and with as much context as
    fits: chunks of max_length predictions, each window the max_length inputs before its chunk's last token.
    For a text after EOS (first = 1) these are the windows lm-eval's get_rolling_token_windows(context_len=1) and
    make_disjoint_window give HF models' loglikelihood_rolling; for a context + continuation that fits, the one
    window HF models' loglikelihood scores (left-truncated to max_length + 1 tokens)."""
    return [
        (tokens[max(0, end - 1 - max_length) : end], end - start)
        for start in range(first, len(tokens), max_length)
        for end in [min(start + max_length, len(tokens))]
    ]


def load(path: str | Path, device: str | torch.device = "cpu") -> TextModel:
    """Load a run directory (its latest checkpoint), a checkpoint directory, or a saved model."""
    model, tokenizer = load_pretrained(path, device)
    return TextModel(model, tokenizer, Path(path))

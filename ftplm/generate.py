"""Sampling and plain autoregressive generation with a KV cache (same loop for GPT and FTP).

FTP's p(x_{t+1} | x_<=t) is its decoder's first output: the trunk runs incrementally with its KV cache, and each new
state vector h_t is decoded for one token. `--temperature 0` means greedy everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ftplm.errors import FtplmError
from ftplm.model import LanguageModel


@dataclass(frozen=True)
class Sampling:
    """How to turn logits into a token. temperature 0 = greedy (argmax)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise FtplmError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise FtplmError(f"top_k must be a positive integer, got {self.top_k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise FtplmError(f"top_p must be in (0, 1], got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution we sample from (..., V): temperature, then top-k, then top-p (nucleus) filtering."""
        logits = logits.float()
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)).float()
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.size(-1):
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p is not None and self.top_p < 1:
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            drop = (sorted_probs.cumsum(-1) - sorted_probs) >= self.top_p  # keep the smallest prefix reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One token per row of logits (B, V) -> (B,)."""
        if self.greedy:
            return logits.argmax(-1)
        return torch.multinomial(self.probs(logits), 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def check_budget(model: LanguageModel, prompt_len: int, max_new_tokens: int) -> int:
    """Validate lengths; returns how many tokens can actually be generated within the context."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise FtplmError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if prompt_len == 0:
        raise FtplmError("the prompt is empty")
    block = model.cfg.block_size
    if prompt_len >= block and max_new_tokens > 0:
        raise FtplmError(f"prompt of {prompt_len} tokens leaves no room in the model's context of {block} tokens")
    return min(max_new_tokens, block - prompt_len)


@torch.no_grad()
def generate(
    model: LanguageModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int | None = None,
    eos_id: int | None = None,
) -> torch.Tensor:
    """Plain KV-cache generation. idx (B, T) -> (B, T + n) with n <= max_new_tokens.

    Generation stops at the context length (no sliding window: positions are learned) and, when eos_id is given,
    once every row has produced it (finished rows are padded with eos_id).
    """
    if idx.dim() != 2:
        raise FtplmError("idx must be a (batch, time) tensor of token ids")
    n_new = check_budget(model, idx.size(1), max_new_tokens)
    model.eval()
    generator = make_generator(seed, idx.device)
    cache = model.new_cache()
    tokens = idx
    h = model.state_vectors(idx, cache)
    logits = model.next_token_logits(h[:, -1:], idx[:, -1:])[:, -1]
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    out = [idx]
    for i in range(n_new):
        nxt = sampling.sample(logits, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(finished, eos_id)
            finished |= nxt == eos_id
        out.append(nxt[:, None])
        if i == n_new - 1 or (eos_id is not None and bool(finished.all())):
            break
        h = model.state_vectors(nxt[:, None], cache)
        logits = model.next_token_logits(h, nxt[:, None])[:, -1]
    tokens = torch.cat(out, dim=1)
    return tokens

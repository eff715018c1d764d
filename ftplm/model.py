"""The GPT baseline and the Future Token Prediction (FTP) model, in one file, top to bottom.

Both share the same causal transformer trunk. GPT puts a tied LM head on the trunk's top-layer vectors.
FTP treats the trunk as an encoder: each top-layer vector h_t (the "semantic state vector") is projected to a short
pseudo-sequence of P vectors, and a small transformer decoder that sees the past *only* through cross-attention
to that pseudo-sequence predicts the next N tokens x_{t+1..t+N} (teacher-forced on x_t..x_{t+N-1}).

    tokens ──► trunk (n_layer causal blocks) ──► h_t ──┬─► GPT:  lm_head(h_t)               -> p(x_{t+1})
                                                       └─► FTP:  Linear(h_t) -> P x d_dec pseudo-sequence
                                                                 decoder(x_t..x_{t+N-1} | pseudo) -> p(x_{t+1..t+N})
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ftplm.config import ModelConfig
from ftplm.errors import FtplmError
from ftplm.kernels import Linear, linear_cross_entropy


class KVCache:
    """Keys and values of every layer for incremental decoding.

    `length` positions are valid; rolling back (e.g. after a rejected speculative draft) is just lowering it.
    Storage is allocated on first use with the dtype the attention produces (bf16 under autocast).
    """

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.n_layer = n_layer
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values (B, H, T, hd) after the valid ones; return all valid keys/values."""
        B, H, T, hd = k.shape
        keys, values = self.k, self.v
        if keys is None or values is None or keys.shape[1] != B or keys.dtype != k.dtype:
            shape = (self.n_layer, B, H, self.max_len, hd)
            keys = self.k = k.new_zeros(shape)
            values = self.v = v.new_zeros(shape)
        end = self.length + T
        if end > self.max_len:
            raise FtplmError(f"sequence of {end} tokens exceeds the context length ({self.max_len})")
        keys[layer, :, :, self.length : end] = k
        values[layer, :, :, self.length : end] = v
        return keys[layer, :, :, :end], values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def select(self, rows: torch.Tensor | slice) -> KVCache:
        """A cache of only these batch rows, copied: it then grows independently of this one."""
        out = KVCache(self.n_layer, self.max_len)
        out.length = self.length
        if self.k is not None and self.v is not None:
            out.k, out.v = self.k[:, rows], self.v[:, rows]
            if isinstance(rows, slice):  # a view; indexing with a tensor already copied
                out.k, out.v = out.k.clone(), out.v.clone()
        return out


@dataclass
class DecoderStart:
    """The FTP decoder after its first step at M positions (the step that gives next-token logits): the
    pseudo-sequences' cross-attention keys/values and the self-attention cache. Drafting continues from a row of it
    instead of recomputing both (ftplm.drafters.ftp)."""

    memory_kv: list[tuple[torch.Tensor, torch.Tensor]]
    cache: KVCache

    def row(self, i: int) -> DecoderStart:
        return self.select(slice(i, i + 1))

    def select(self, rows: torch.Tensor | slice) -> DecoderStart:
        """These rows (a tensor may repeat them: tree drafting); the cache is copied, so each grows on its own."""
        return DecoderStart([(k[rows], v[rows]) for k, v in self.memory_kv], self.cache.select(rows))

    @staticmethod
    def cat(starts: list[DecoderStart]) -> DecoderStart:
        """The rows of several starts (of one decoder length) as one, copied: drafting for a batch of rows."""
        memory_kv = [
            (torch.cat([s.memory_kv[i][0] for s in starts]), torch.cat([s.memory_kv[i][1] for s in starts]))
            for i in range(len(starts[0].memory_kv))
        ]
        cache = KVCache(starts[0].cache.n_layer, starts[0].cache.max_len)
        cache.length = starts[0].cache.length
        if any(s.cache.length != cache.length for s in starts):
            raise ValueError("decoder starts of different lengths cannot be batched")
        if cache.length:
            cache.k = torch.cat([s.cache.k for s in starts], dim=1)  # type: ignore[misc]  # a started cache has its tensors
            cache.v = torch.cat([s.cache.v for s in starts], dim=1)  # type: ignore[misc]  # a started cache has its tensors
        return DecoderStart(memory_kv, cache)


def causal_mask(n_query: int, n_past: int, device: torch.device) -> torch.Tensor:
    """Boolean (n_query, n_past + n_query) mask: query i sees every past key and the new keys 0..i."""
    new = torch.ones(n_query, n_query, dtype=torch.bool, device=device).tril()
    past = torch.ones(n_query, n_past, dtype=torch.bool, device=device)
    return torch.cat([past, new], dim=1)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention through PyTorch SDPA (flash / memory-efficient kernels where available)."""

    def __init__(self, n_embd: int, n_head: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        n_past = 0
        if cache is not None:
            n_past = cache.length
            k, v = cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if attn_mask is not None:  # caller-provided (e.g. a speculative draft tree)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        elif n_past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, n_past, x.device), dropout_p=dropout)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class CrossAttention(nn.Module):
    """Decoder queries attend to a memory (the pseudo-sequence); no mask, the memory is all 'past'."""

    def __init__(self, n_embd: int, n_head: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.q = Linear(n_embd, n_embd, bias=bias)
        self.kv = Linear(n_embd, 2 * n_embd, bias=bias)
        self.c_proj = Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of a memory (M, P, C) -> two (M, H, P, hd): computed once per pseudo-sequence."""
        M, P, C = memory.shape
        k, v = self.kv(memory).split(C, dim=2)
        return tuple(t.view(M, P, self.n_head, C // self.n_head).transpose(1, 2) for t in (k, v))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        M, T, C = x.shape
        q = self.q(x).view(M, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(M, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.c_fc = Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = Linear(4 * n_embd, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; with cross=True also attends to a memory (the FTP decoder block)."""

    def __init__(self, n_embd: int, n_head: int, bias: bool, dropout: float, cross: bool = False) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = SelfAttention(n_embd, n_head, bias, dropout)
        self.cross = CrossAttention(n_embd, n_head, bias, dropout) if cross else None
        self.ln_cross = nn.LayerNorm(n_embd, bias=bias) if cross else None
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, bias, dropout)
        self.resid_drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        attn_mask: torch.Tensor | None = None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = x + self.resid_drop(self.attn(self.ln_1(x), cache, layer, attn_mask))
        if self.cross is not None and self.ln_cross is not None:
            x = x + self.resid_drop(self.cross(self.ln_cross(x), memory_kv))
        return x + self.mlp(self.ln_2(x))


class Trunk(nn.Module):
    """Token + learned position embeddings, n_layer causal blocks, final LayerNorm -> top-layer vectors."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.block_size = cfg.block_size
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg.n_embd, cfg.n_head, cfg.bias, cfg.dropout) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        layer: int | None = None,
    ) -> torch.Tensor:
        """Top-layer vectors, or (layer = L) those after the first L blocks, through the same final LayerNorm."""
        T = idx.size(1)
        start = cache.length if cache is not None else 0
        if positions is None:
            if start + T > self.block_size:
                raise FtplmError(f"sequence of {start + T} tokens exceeds the context length ({self.block_size})")
            positions = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        if attn_mask is None and start > 0 and T > 1:  # several new tokens after cached ones: built once, not per layer
            attn_mask = causal_mask(T, start, idx.device)
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # additive once, not converted by SDPA per layer
            autocast = torch.is_autocast_enabled(idx.device.type)
            dtype = torch.get_autocast_dtype(idx.device.type) if autocast else x.dtype
            additive = torch.zeros(attn_mask.shape, dtype=dtype, device=idx.device)
            attn_mask = additive.masked_fill_(~attn_mask, float("-inf"))
        for i, block in enumerate(self.h[:layer]):
            x = block(x, cache, i, attn_mask)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)


@dataclass
class Output:
    """What a training/eval forward pass returns. Metrics are detached and only filled when asked for."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # next-token logits (B, T, V) when requested
    next_token_ce: torch.Tensor | None = None  # mean CE of p(x_{t+1}) over valid targets (the perplexity number)
    offset_ce: torch.Tensor | None = None  # FTP: (N,) mean CE per offset k = 1..N
    offset_acc: torch.Tensor | None = None  # FTP: (N,) top-1 accuracy per offset


MASK = -1  # a decoder input id meaning "no token": the learned mask embedding (FTP variants)
DECODER_SEED_OFFSET = 0x5EED  # FTP's own parts: seeded from the run's seed, apart from the trunk's stream


def _generator(device: torch.device, offset: int) -> torch.Generator | None:
    if device.type == "meta":  # shapes only (FLOP counts): nothing to draw
        return None
    return torch.Generator(device).manual_seed((torch.initial_seed() + offset) % 2**64)


def _init_normal(named: list[tuple[str, nn.Parameter]], depth: int, generator: torch.Generator | None) -> None:
    for name, p in named:
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * depth) if name.endswith("c_proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std, generator=generator)
        elif name.endswith(".bias"):
            nn.init.zeros_(p)


class LanguageModel(nn.Module):
    """What GPT and FTP share: the trunk, init, parameter counts, and the next-token interface generation uses."""

    cfg: ModelConfig
    trunk: Trunk
    lm_head: Linear

    def _init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 x depth), zero biases. Drawn from
        generators seeded by the current seed (torch.manual_seed), not from the global stream that building the
        modules has already used: at one seed FTP and GPT start from the same trunk, and FTP's own parts
        (pseudo-sequence projection, decoder) draw from a generator of their own, scaled by the decoder's depth."""
        trunk = [(n, p) for n, p in self.named_parameters() if n.startswith("trunk.")]
        own = [(n, p) for n, p in self.named_parameters() if not n.startswith("trunk.")]
        _init_normal(trunk, self.cfg.n_layer, _generator(self.device, 0))
        _init_normal(own, self.cfg.dec_n_layer, _generator(self.device, DECODER_SEED_OFFSET))

    def num_params(self, non_embedding: bool = True) -> int:
        """Unique parameter count (tied weights once); non_embedding drops the position embeddings (nanoGPT)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.trunk.wpe.weight.numel()
        return n

    def state_vectors(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        layer: int | None = None,
    ) -> torch.Tensor:
        """Top-layer vectors h_t (B, T, n_embd): FTP's semantic state vectors, GPT's pre-head hidden states.

        layer = L (0..n_layer, evaluation only, no cache): the residual stream after the first L trunk blocks through
        the final LayerNorm instead, to ask where in the trunk a property (topic, smoothness) lives."""
        if layer is not None and (cache is not None or not 0 <= layer <= self.cfg.n_layer):
            raise FtplmError(f"layer must be in 0..{self.cfg.n_layer} and used without a KV cache, got {layer}")
        return self.trunk(idx, cache, positions, attn_mask, layer)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layer, self.cfg.block_size)

    def next_token_logits(self, state_vectors: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Logits of p(x_{t+1} | x_<=t) (B, T, V) from the state vectors h_t and the tokens x_t."""
        raise NotImplementedError

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's logits over the vocabulary: the padding rows (vocab_multiple) cut off, a view."""
        logits = self.lm_head(hidden)
        return logits if logits.size(-1) == self.cfg.vocab_size else logits[..., : self.cfg.vocab_size]

    @property
    def device(self) -> torch.device:
        return self.trunk.wte.weight.device


class GPT(LanguageModel):
    """The baseline: trunk + LM head tied to the token embedding, ordinary next-token loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.trunk = Trunk(cfg)
        self.lm_head = Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.trunk.wte.weight  # tied
        self._init_weights()

    def next_token_logits(self, state_vectors: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.head_logits(state_vectors)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, with_metrics: bool = False) -> Output:
        h = self.trunk(idx)
        if targets is None:
            return Output(logits=self.head_logits(h))
        valid = (targets >= 0).flatten().float()
        loss, _ = linear_cross_entropy(
            h.flatten(0, 1),
            self.lm_head.weight,
            targets.flatten(),
            valid / valid.sum().clamp(min=1),
            classes=self.cfg.vocab_size,
        )
        return Output(loss=loss, next_token_ce=loss.detach())


class FTP(LanguageModel):
    """Future Token Prediction: trunk as encoder -> pseudo-sequence -> small decoder predicting N tokens."""

    offset_weights: torch.Tensor  # a buffer: per-offset loss weights

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        d_dec = cfg.dec_n_embd
        self.trunk = Trunk(cfg)
        # the expansive projection h_t -> P vectors of decoder width, plus a learned pseudo-position embedding
        self.to_pseudo = Linear(cfg.n_embd, cfg.n_pseudo * d_dec, bias=cfg.bias)
        self.pseudo_pos = nn.Parameter(torch.zeros(cfg.n_pseudo, d_dec))
        self.dec_wte = nn.Embedding(cfg.padded_vocab_size, d_dec)
        self.dec_wpe = nn.Embedding(cfg.n_future, d_dec)
        self.dec_h = nn.ModuleList(
            Block(d_dec, cfg.dec_n_head, cfg.bias, cfg.dropout, cross=True) for _ in range(cfg.dec_n_layer)
        )
        self.dec_ln_f = nn.LayerNorm(d_dec, bias=cfg.bias)
        # the learned embedding of a masked decoder input (token id MASK), for the variants that use one
        uses_mask = cfg.decoder_inputs == "masked" or cfg.input_dropout > 0
        self.dec_mask = nn.Parameter(torch.zeros(d_dec)) if uses_mask else None
        self.lm_head = Linear(d_dec, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.dec_wte.weight  # tied to the decoder's token embedding
        self._init_weights()
        weights = torch.tensor([cfg.gamma**k for k in range(cfg.n_future)])
        self.register_buffer("offset_weights", weights, persistent=False)

    @property
    def masked_inputs(self) -> bool:
        """The decoder sees only mask embeddings (the "masked" variant): h_t alone predicts all N tokens."""
        return self.cfg.decoder_inputs == "masked"

    # --- the pieces, usable on their own (generation and speculative drafting call them directly) -----
    def pseudo_sequence(self, state_vectors: torch.Tensor) -> torch.Tensor:
        """(..., n_embd) -> (..., P, dec_n_embd): the decoder's only view of the past."""
        P, d = self.cfg.n_pseudo, self.cfg.dec_n_embd
        pseudo = self.to_pseudo(state_vectors).unflatten(-1, (P, d))
        if self.cfg.pseudo_norm:  # keeps the decoder's cross-attention inputs at unit scale as to_pseudo grows
            pseudo = F.layer_norm(pseudo, (d,))
        return pseudo + self.pseudo_pos

    def memory_kv(self, pseudo: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values of every decoder layer for pseudo-sequences (M, P, d): cache these."""
        return [cast(CrossAttention, block.cross).memory_kv(pseudo) for block in self.dec_h]

    def decode(
        self, tokens: torch.Tensor, memory_kv: list[tuple[torch.Tensor, torch.Tensor]], cache: KVCache | None = None
    ) -> torch.Tensor:
        """Decoder hidden states (M, n, d) for inputs (M, n) given each row's pseudo-sequence keys/values.

        With a cache, the inputs continue the ones already decoded (autoregressive drafting).
        """
        start = cache.length if cache is not None else 0
        n = tokens.size(1)
        if start + n > self.cfg.n_future:
            raise FtplmError(f"the decoder predicts at most n_future={self.cfg.n_future} tokens")
        if self.dec_mask is None:
            x = self.dec_wte(tokens)
        elif self.cfg.decoder_inputs == "masked":  # whatever the tokens: h_t alone predicts (verification, drafting)
            x = self.dec_mask.expand(*tokens.shape, -1)
        else:  # MASK inputs take the mask embedding
            x = torch.where((tokens == MASK).unsqueeze(-1), self.dec_mask, self.dec_wte(tokens.clamp(min=0)))
        x = x + self.dec_wpe.weight[start : start + n]
        for i, block in enumerate(self.dec_h):
            x = block(x, cache, i, memory_kv=memory_kv[i])
        if cache is not None:
            cache.advance(n)
        return self.dec_ln_f(x)

    def new_decoder_cache(self) -> KVCache:
        return KVCache(self.cfg.dec_n_layer, self.cfg.n_future)

    def next_token_logits(self, state_vectors: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.first_decoder_step(state_vectors, idx, keep=False)[0]

    def first_decoder_step(
        self, state_vectors: torch.Tensor, idx: torch.Tensor, keep: bool = True
    ) -> tuple[torch.Tensor, DecoderStart | None]:
        """Next-token logits (B, T, V) at every position, and (keep) the decoder state they came from."""
        B, T, _ = state_vectors.shape
        memory = self.memory_kv(self.pseudo_sequence(state_vectors).flatten(0, 1))
        cache = self.new_decoder_cache() if keep else None
        hidden = self.decode(idx.reshape(B * T, 1), memory, cache)
        logits = self.head_logits(hidden[:, 0]).unflatten(0, (B, T))
        return logits, DecoderStart(memory, cache) if cache is not None else None

    # --- training -------------------------------------------------------------------------------------
    def teacher_forcing(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder inputs x_t..x_{t+N-1} and targets x_{t+1}..x_{t+N} for every position t: two (B, T, N).

        targets[b, t] is x_{t+1} (as for GPT); targets past the end of the sequence are -1 (ignored), and so is
        any input there (replaced by token 0: it can only influence outputs that are themselves masked).
        """
        N = self.cfg.n_future
        future = F.pad(targets, (0, N - 1), value=-1).unfold(1, N, 1)  # future[b, t, k] = targets[b, t+k]
        inputs = torch.cat([idx.unsqueeze(-1), future[..., :-1]], dim=-1).clamp(min=0)
        if self.masked_inputs:
            inputs = torch.full_like(inputs, MASK)
        elif self.training and self.cfg.input_dropout > 0:
            inputs = inputs.masked_fill(torch.rand(inputs.shape, device=inputs.device) < self.cfg.input_dropout, MASK)
        return inputs, future

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, with_metrics: bool = False) -> Output:
        h = self.trunk(idx)
        if targets is None:
            return Output(logits=self.next_token_logits(h, idx))
        B, T = idx.shape
        N = self.cfg.n_future
        inputs, future = self.teacher_forcing(idx, targets)
        pseudo = self.pseudo_sequence(h).flatten(0, 1)  # (B*T, P, d)
        hidden = self.decode(inputs.view(B * T, N), self.memory_kv(pseudo))  # (B*T, N, d)
        future = future.reshape(B * T, N)
        valid = (future >= 0).float()
        n_valid = valid.sum(dim=0)  # per offset k
        weights = self.offset_weights * (n_valid > 0)  # an offset with no valid target gets no weight
        # L = sum_k w_k CE_k / sum_k w_k, with CE_k the mean over valid targets at offset k
        coef = valid * (weights / (weights.sum() * n_valid.clamp(min=1)))
        loss, ce, *argmax = linear_cross_entropy(
            hidden.flatten(0, 1),
            self.lm_head.weight,
            future.flatten(),
            coef.flatten(),
            want_argmax=with_metrics,
            classes=self.cfg.vocab_size,
        )
        offset_ce = (ce.view(B * T, N) * valid).sum(0) / n_valid.clamp(min=1)
        if self.cfg.future_bow > 0:  # the pseudo-sequence's mean predicts each of the next N tokens, unordered
            bow, _ = linear_cross_entropy(  # one softmax per position scores its N targets
                pseudo.mean(1),
                self.lm_head.weight,
                future,
                valid / valid.sum().clamp(min=1),
                classes=self.cfg.vocab_size,
            )
            loss = loss + self.cfg.future_bow * bow
        out = Output(loss=loss, next_token_ce=offset_ce[0], offset_ce=offset_ce)
        if with_metrics:
            correct = (argmax[0].view(B * T, N) == future).float()
            out.offset_acc = (correct * valid).sum(0) / n_valid.clamp(min=1)
        return out


def flops_per_token(model: LanguageModel) -> float:
    """Training FLOPs (forward + backward) per input token, nanoGPT/PaLM style: 6 per matmul weight use + attention.

    GPT: 6 x (block weights + LM head) + 12 L C T. FTP: the same trunk (no head) + the pseudo-sequence projection,
    then per position a decoder sequence of N tokens: its blocks (self-attention over N, cross-attention over the P
    pseudo vectors, whose keys/values are projected once per position) and the LM head on all N outputs (and on the
    pseudo-sequence's mean with future_bow). Embedding lookups and norms are not counted.
    """
    cfg = model.cfg
    count = lambda module: sum(p.numel() for p in module.parameters() if p.dim() >= 2)  # noqa: E731 - a one-line local helper
    trunk = 6 * count(model.trunk.h) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    if cfg.model_type == "gpt":
        return trunk + 6 * cfg.n_embd * cfg.padded_vocab_size
    N, P, d = cfg.n_future, cfg.n_pseudo, cfg.dec_n_embd
    kv = sum(count(cast(CrossAttention, block.cross).kv) for block in cast(nn.ModuleList, model.dec_h))
    per_decoder_token = (
        6 * (count(model.dec_h) - kv) + 12 * cfg.dec_n_layer * d * (N + P) + 6 * d * cfg.padded_vocab_size
    )
    bag_of_future = 6 * d * cfg.padded_vocab_size if cfg.future_bow > 0 else 0  # one head product per position
    return trunk + 6 * count(model.to_pseudo) + 6 * P * kv + N * per_decoder_token + bag_of_future


def build_model(cfg: ModelConfig) -> LanguageModel:
    return FTP(cfg) if cfg.model_type == "ftp" else GPT(cfg)

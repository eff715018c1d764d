"""Future Token Prediction (FTP) as a transformers model, written next to the weights by `ftplm export --format hf`.

Self-contained (torch + transformers only), so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
needs no ftplm. It mirrors ftplm/model.py, with the same module and parameter names (ftplm's state dict loads as is),
but keeps only what inference and fine-tuning on next-token loss need:

    tokens ─► trunk ─► h_t (the semantic state vector; `hidden_states[-1]`)
              h_t ─► to_pseudo ─► P pseudo-vectors ─► one decoder step on x_t, cross-attending to them ─► p(x_{t+1})

The next token at position t depends only on h_t and x_t, so generation caches the trunk's keys/values (a
transformers Cache) and runs the decoder on the new positions only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_ftp import FTPConfig

# transformers 5 renamed the models' `past_key_values` argument and output field to `cache`
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class SelfAttention(nn.Module):
    """Causal multi-head self-attention through SDPA; with a cache, the new keys/values follow the cached ones."""

    def __init__(self, n_embd: int, n_head: int, bias: bool, dropout: float, layer_idx: int = 0) -> None:
        super().__init__()
        self.n_head = n_head
        self.layer_idx = layer_idx
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cache: Cache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        dropout = self.dropout if self.training else 0.0
        if mask is not None:  # padding, or several new tokens after cached ones (FTPTrunk.attention_mask)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:  # no past: causal; one new token: it sees everything
            y = F.scaled_dot_product_attention(q, k, v, is_causal=k.size(2) == T > 1, dropout_p=dropout)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class CrossAttention(nn.Module):
    """Decoder queries attend to a memory (the pseudo-sequence); no mask, the memory is all 'past'."""

    def __init__(self, n_embd: int, n_head: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(n_embd, n_embd, bias=bias)
        self.kv = nn.Linear(n_embd, 2 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        M, T, C = x.shape
        heads = lambda t: t.view(M, -1, self.n_head, C // self.n_head).transpose(1, 2)  # noqa: E731 - a one-line local helper
        k, v = self.kv(memory).split(C, dim=2)
        y = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(k), heads(v), dropout_p=self.dropout if self.training else 0.0
        )
        return self.c_proj(y.transpose(1, 2).reshape(M, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; with cross=True also attends to a memory (the FTP decoder block)."""

    def __init__(
        self, n_embd: int, n_head: int, bias: bool, dropout: float, cross: bool = False, layer_idx: int = 0
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = SelfAttention(n_embd, n_head, bias, dropout, layer_idx)
        self.cross = CrossAttention(n_embd, n_head, bias, dropout) if cross else None
        self.ln_cross = nn.LayerNorm(n_embd, bias=bias) if cross else None
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, bias, dropout)
        self.resid_drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        cache: Cache | None = None,
        mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.resid_drop(self.attn(self.ln_1(x), cache, mask))
        if self.cross is not None and self.ln_cross is not None:
            x = x + self.resid_drop(self.cross(self.ln_cross(x), memory))
        return x + self.mlp(self.ln_2(x))


class FTPTrunk(nn.Module):
    """Token + learned position embeddings, n_layer causal blocks, final LayerNorm -> the state vectors h_t."""

    def __init__(self, config: FTPConfig) -> None:
        super().__init__()
        self.block_size = config.block_size
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(
            Block(config.n_embd, config.n_head, config.bias, config.dropout, layer_idx=i) for i in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> list[torch.Tensor]:
        """The input of every block and the final h_t: n_layer + 1 tensors (B, T, n_embd), h_t last."""
        T = input_ids.size(1)
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: SDPA's causal path, as ftplm runs it
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + T, device=input_ids.device).unsqueeze(0)
            else:  # left padding: count positions from each row's first real token
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        if int(position_ids.max()) >= self.block_size:
            raise ValueError(f"sequence exceeds the context length ({self.block_size} tokens)")
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        mask = self.attention_mask(attention_mask, T, past, x.dtype, x.device)
        hidden = [x]
        for block in self.h:
            x = block(x, cache, mask)
            hidden.append(x)
        hidden[-1] = self.ln_f(x)
        return hidden

    @staticmethod
    def attention_mask(
        padding: torch.Tensor | None, T: int, past: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor | None:
        """Additive (B|1, 1, T, past+T) mask, or None where SDPA needs none (no padding, and no past or one token).

        Query i (position past+i) sees keys 0..past+i that are not padding, and always itself, so that a padding row
        stays finite instead of attending to nothing (NaN, which would then leak through the values).
        """
        if padding is None and (past == 0 or T == 1):
            return None
        S = past + T
        allowed = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)[None, None]
        if padding is not None:
            if padding.dim() != 2 or padding.size(1) != S:
                raise ValueError(f"attention_mask must be 2-D (batch, {S}): the cached and the new tokens")
            itself = torch.arange(S, device=device) == torch.arange(past, S, device=device)[:, None]
            allowed = allowed & padding.to(device).bool()[:, None, None, :] | itself
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


class FTPPreTrainedModel(PreTrainedModel):
    config_class = FTPConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]


class FTPForCausalLM(FTPPreTrainedModel, GenerationMixin):
    """FTP with the usual causal-LM interface: `logits` are the next-token logits (the decoder's first step)."""

    _tied_weights_keys = {"lm_head.weight": "dec_wte.weight"}

    def __init__(self, config: FTPConfig) -> None:
        super().__init__(config)
        d_dec = config.dec_n_embd
        self.trunk = FTPTrunk(config)
        self.to_pseudo = nn.Linear(config.n_embd, config.n_pseudo * d_dec, bias=config.bias)
        self.pseudo_pos = nn.Parameter(torch.zeros(config.n_pseudo, d_dec))
        self.dec_wte = nn.Embedding(config.vocab_size, d_dec)
        self.dec_wpe = nn.Embedding(config.n_future, d_dec)
        self.dec_h = nn.ModuleList(
            Block(d_dec, config.dec_n_head, config.bias, config.dropout, cross=True) for _ in range(config.dec_n_layer)
        )
        self.dec_ln_f = nn.LayerNorm(d_dec, bias=config.bias)
        self.lm_head = nn.Linear(d_dec, config.vocab_size, bias=False)
        self.lm_head.weight = self.dec_wte.weight
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.trunk.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.trunk.wte = value  # type: ignore[assignment]  # transformers passes an nn.Embedding

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def _tie_or_clone_weights(self, output_embeddings: nn.Module, input_embeddings: nn.Module) -> None:
        """transformers 4 ties the head to get_input_embeddings() (the trunk's); FTP's is the decoder's."""
        output_embeddings.weight = self.dec_wte.weight

    def pseudo_sequence(self, state_vectors: torch.Tensor) -> torch.Tensor:
        """(..., n_embd) -> (..., P, dec_n_embd): the decoder's only view of the past."""
        P, d = self.config.n_pseudo, self.config.dec_n_embd
        pseudo = self.to_pseudo(state_vectors).unflatten(-1, (P, d))
        if self.config.pseudo_norm:
            pseudo = F.layer_norm(pseudo, (d,))
        return pseudo + self.pseudo_pos

    def next_token_logits(self, state_vectors: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of x_{t+1}: one decoder step on x_t (decoder position 0) per position t."""
        B, T, _ = state_vectors.shape
        memory = self.pseudo_sequence(state_vectors).flatten(0, 1)  # (B*T, P, d)
        x = self.dec_wte(input_ids.reshape(B * T, 1)) + self.dec_wpe.weight[:1]
        for block in self.dec_h:
            x = block(x, memory=memory)
        return self.lm_head(self.dec_ln_f(x)[:, 0]).view(B, T, -1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Next-token logits, the loss for `labels` (shifted inside, -100 ignored) and the trunk cache.

        hidden_states (output_hidden_states=True): the embeddings, each trunk block's output, the last one being the
        state vectors h_t after the final LayerNorm. logits_to_keep = k > 0: logits of the last k positions only.
        """
        if input_ids is None:
            raise ValueError("FTP needs input_ids (its decoder reads the tokens themselves, not only embeddings)")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            try:
                cache = DynamicCache(config=self.config)
            except TypeError:  # transformers 4
                cache = DynamicCache()
        hidden = self.trunk(input_ids, attention_mask, position_ids, cache if use_cache else None)
        h, ids = hidden[-1], torch.as_tensor(input_ids)
        if logits_to_keep:
            h, ids = h[:, -logits_to_keep:], ids[:, -logits_to_keep:]
        logits = self.next_token_logits(h, ids)
        loss = None
        if labels is not None:
            shifted = labels[:, -logits.size(1) :][:, 1:].to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=-100)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        out = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: cache if use_cache else None},  # type: ignore[arg-type]  # the field's name and type differ across transformers 4/5
            hidden_states=tuple(hidden) if output_hidden_states else None,
        )
        return out if (return_dict if return_dict is not None else self.config.return_dict) else out.to_tuple()

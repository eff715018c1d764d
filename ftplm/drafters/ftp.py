"""FTP self-drafting: the model's own N-token decoder is its drafter, trained with it, at no extra trunk cost.

The verification's targets are the decoder's first step at each state vector h. From h before the root (the last
accepted token) the decoder continues autoregressively to draft up to N-1 tokens; the engine hands that first step
over (`ctx.decoder_start`), so drafting starts by feeding the root alone. chain: argmax (greedy) or draws from the
decoder's distribution q (sampling, verified by min(1, p/q)); tree: the top-k candidates or k draws from q at each
node, along a template of rank paths, one batched decoder step per level. Drafting runs FTP.decode on
DraftDecoder, a lean copy of the decoder shared by every session of a model (rebuilt when a weight changes).
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

from ftplm.config import ModelConfig
from ftplm.drafters.base import Draft, DraftContext, Drafter, Template, build_template_tree, check_template, drafter
from ftplm.errors import FtplmError
from ftplm.kernels import ONEDNN_LINEAR, Linear, pack_weight, packed_linear, weight_key
from ftplm.model import FTP, DecoderStart, KVCache

# 5 nodes, depth 3 (cut to draft_len): the two best first drafts, each continued, the best path one deeper. It beat
# an 11-node tree in 21 of 24 `bench decode` runs (docs/results.md): more nodes cost more than they gain.
DEFAULT_TREE: Template = [(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]


def require_ftp(model, name: str) -> None:
    if getattr(model, "cfg", None) is None or model.cfg.model_type != "ftp":
        raise FtplmError(
            f"speculative={name!r} needs an FTP model (its decoder is the drafter); this is a GPT "
            "model: use 'recycling' or 'lookup'"
        )


class _Product:
    """One linear layer of the draft copy, or (rows) the first rows of its output. Large weights (Linear.MIN_PACKED
    and up) are packed for oneDNN in `dtype` (bf16 where the CPU has it: the inputs are cast to it and the outputs
    back); small ones, which stay in cache between draft steps, run through F.linear on the model's own weight,
    which is faster for them."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype, packed: bool, rows: int | None = None) -> None:
        weight = linear.weight.detach()[:rows]
        bias = None if linear.bias is None else linear.bias.detach()[:rows]
        self.packed = packed and weight.numel() >= Linear.MIN_PACKED
        self.dtype, self.out_features = dtype, weight.size(0)
        self.bias = bias.to(dtype) if self.packed and bias is not None else bias
        self.weight = pack_weight(weight.to(dtype)) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return packed_linear(x.to(self.dtype), self.weight, self.bias, self.out_features).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class _Lean:
    """A module's own forward code run on plain attributes: no nn.Module dispatch, and its leaves replaced by
    `leaf` (Linear -> _Product, LayerNorm -> F.layer_norm, Dropout -> identity)."""

    def __init__(self, module: torch.nn.Module, leaf, children: tuple[str, ...] | None = None) -> None:
        self._forward = type(module).forward
        self.__dict__.update((k, v) for k, v in vars(module).items() if not k.startswith("_"))
        self.__dict__.update((k, p.detach()) for k, p in module.named_parameters(recurse=False))
        self.training = False
        for name, child in module.named_children():
            if children is None or name in children:
                setattr(self, name, leaf(child))

    def __call__(self, *args, **kwargs):
        return self._forward(self, *args, **kwargs)


class DraftDecoder(_Lean):
    """The FTP decoder made for drafting: the model's own decoder step (FTP.decode) on a lean copy of its decoder,
    one token per call for M rows.

    Drafts need only be good, never exact (verification recomputes every target), so the copy may trade precision
    for speed: no per-module dispatch, and on CPUs with native bfloat16 its large products run in bf16 through
    oneDNN with prepacked weights (drafting 1.2-1.4 -> 0.9-1.05 ms per round on `small`). Elsewhere (GPU, float64)
    it equals FTP.decode up to rounding (tested).

    Greedy drafts choose among the first quarter of the token ids only (vocabularies of GREEDY_MIN_VOCAB and more),
    as in FR-Spec (Zhao et al., 2025): BPE numbers tokens roughly most frequent first (the first 2,048 of 8,192
    cover 78% of our text), so the LM head shrinks 4x (3.6-5.6% faster generation, τ unchanged). Sampling keeps the
    whole head: a q without the tail costs acceptance (T = 1: τ 3.76 -> 2.68).
    """

    GREEDY_VOCAB_SHARE, GREEDY_MIN_VOCAB = 4, 4096
    cfg: ModelConfig  # copied from the model with its other plain attributes (_Lean)
    decode = FTP.decode  # the one decoder step, run on this copy's attributes

    def __init__(self, model: FTP) -> None:
        weight = model.lm_head.weight
        packed = ONEDNN_LINEAR and weight.device.type == "cpu" and weight.dtype == torch.float32
        # bf16 for the packed products only: embeddings, norms and attention are not where the time goes
        self.product_dtype = torch.bfloat16 if packed and torch.ops.mkldnn._is_mkldnn_bf16_supported() else weight.dtype

        def leaf(module: torch.nn.Module):
            if isinstance(module, torch.nn.Linear):
                return _Product(module, self.product_dtype, packed)
            if isinstance(module, torch.nn.LayerNorm):
                bias = None if module.bias is None else module.bias.detach()
                return functools.partial(
                    F.layer_norm,
                    normalized_shape=module.normalized_shape,
                    weight=module.weight.detach(),
                    bias=bias,
                    eps=module.eps,
                )
            if isinstance(module, torch.nn.Dropout):
                return _identity
            if isinstance(module, torch.nn.ModuleList):
                return [leaf(child) for child in module]
            return _Lean(module, leaf)

        super().__init__(model, leaf, children=("dec_wte", "dec_wpe", "dec_h", "dec_ln_f"))
        vocab = model.cfg.vocab_size  # the LM head's rows past it are vocabulary padding
        self.head = _Product(model.lm_head, self.product_dtype, packed, vocab)
        self.greedy_vocab = vocab // self.GREEDY_VOCAB_SHARE if vocab >= self.GREEDY_MIN_VOCAB else vocab
        self.greedy_head = (
            _Product(model.lm_head, self.product_dtype, packed, self.greedy_vocab)
            if self.greedy_vocab < vocab
            else self.head
        )

    def start(self, memory_kv: list[tuple[torch.Tensor, torch.Tensor]], cache: KVCache | None = None) -> DecoderStart:
        """A draft state from the model's pseudo-sequence keys/values and, if any, its decoder cache (copied: drafting
        extends it)."""
        cache = KVCache(len(memory_kv), self.cfg.n_future) if cache is None else cache.select(slice(None))
        return DecoderStart(list(memory_kv), cache)

    def step(self, state: DecoderStart, tokens: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        """Feed one token per row (M,) at the next decoder position, or n of them (M, n) at the next n; their
        next-token logits (M, V) or (M, n, V), or with greedy those of the first `greedy_vocab` token ids only: what
        an argmax or top-k draft needs (a masked-inputs model ignores the tokens: FTP.decode)."""
        hidden = self.decode(tokens.view(tokens.size(0), -1), state.memory_kv, state.cache)  # type: ignore[misc]  # FTP's step on this copy's attributes
        return (self.greedy_head if greedy else self.head)(hidden if tokens.dim() == 2 else hidden[:, 0])


# model -> (its decoder weights' keys, the draft copy): built once per model, rebuilt if a weight changes
_DRAFT_DECODERS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, DraftDecoder]] = weakref.WeakKeyDictionary()


def draft_decoder(model) -> DraftDecoder:
    """This model's draft copy (packing the LM head takes ~5 ms: not something to redo per generation)."""
    params = [
        model.dec_wte.weight,
        model.dec_wpe.weight,
        *model.dec_h.parameters(),
        *model.dec_ln_f.parameters(),
        *([] if model.dec_mask is None else [model.dec_mask]),
    ]
    key = tuple(weight_key(p) for p in params)
    cached = _DRAFT_DECODERS.get(model)
    if cached is None or cached[0] != key:
        cached = _DRAFT_DECODERS[model] = key, DraftDecoder(model)
    return cached[1]


@drafter("ftp")
class FTPDrafter(Drafter):
    wants_decoder_start = True
    # rounds of `small` models, 2 CPU threads: 3 drafts (N = 4) 3.9 ms, 7 drafts (N = 8) 5.0 ms, a plain step 2.3
    fixed_cost, node_cost = 0.3, 0.12

    def __init__(self, model, draft_len: int | None = None, tree: bool | Template | None = None) -> None:
        require_ftp(model, "ftp")
        n = model.cfg.n_future
        self.default_draft_len = n - 1
        super().__init__(model, draft_len, tree)
        if self.draft_len > n - 1:
            raise FtplmError(
                f"draft_len for 'ftp' is at most n_future-1 = {n - 1} (the decoder predicts {n} tokens, "
                f"the first being the target's own), got {self.draft_len}"
            )
        self.template = None if not tree else DEFAULT_TREE if tree is True else check_template(tree)
        # taken now, not per round (a drafter lives for one generation); were the weights changed later, stale
        # drafts would still be verified: only speed would suffer
        self.decoder = draft_decoder(model)

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> Draft:
        m, decoder, start = self.model, self.decoder, ctx.decoder_start
        depth = min(self.draft_len, ctx.max_depth)
        if depth <= 0 or ctx.max_nodes <= 0:
            return Draft()
        if start is not None:  # the verification already ran the decoder's first step at h_prev
            state, inputs = decoder.start(start.memory_kv, start.cache), ctx.tokens[-1:]
        else:
            state, inputs = decoder.start(m.memory_kv(m.pseudo_sequence(ctx.h_prev.view(1, -1)))), ctx.tokens[-2:]
        for token in inputs:  # the last step's logits: q of draft 1
            logits = decoder.step(state, torch.tensor([token], device=ctx.h_prev.device), ctx.sampling.greedy)
        if self.template is None:
            return self._chains(state, logits, [min(depth, ctx.max_nodes)], [ctx])[0]
        return self._tree(self.template, ctx, depth, state, logits)

    def batch_key(self) -> object:
        """FTP drafts keep no state: every row with the same settings can be drafted by any of them."""
        return ("ftp", self.draft_len, None if self.template is None else tuple(self.template), id(self.decoder))

    @torch.inference_mode()
    def propose_batch(self, ctxs: list[DraftContext]) -> list[Draft]:
        """Chains for a batch of rows, one decoder step per depth for all of them (trees: row by row)."""
        if self.template is not None or len(ctxs) < 2 or any(c.decoder_start is None for c in ctxs):
            return super().propose_batch(ctxs)
        drafts = [Draft() for _ in ctxs]
        depths = [min(self.draft_len, c.max_depth, c.max_nodes) for c in ctxs]
        live = [i for i, depth in enumerate(depths) if depth > 0]
        if not live:
            return drafts
        state = DecoderStart.cat([ctxs[i].decoder_start for i in live])  # type: ignore[misc]  # live rows all carry a decoder start (checked above)
        tokens = torch.tensor([ctxs[i].tokens[-1] for i in live], device=ctxs[0].h_prev.device)
        logits = self.decoder.step(state, tokens, ctxs[0].sampling.greedy)
        for i, chain in zip(live, self._chains(state, logits, [depths[i] for i in live], [ctxs[i] for i in live])):
            drafts[i] = chain
        return drafts

    def _chains(
        self, state: DecoderStart, logits: torch.Tensor, depths: list[int], ctxs: list[DraftContext]
    ) -> list[Draft]:
        """Chains for the M rows of `state` (logits (M, V): q of each row's first draft), one decoder step per depth
        for all rows; row j takes depths[j] tokens. Greedy (all rows or none): argmax; sampling: a draw from each
        row's q (its own sampling and generator), recorded with it."""
        drafts = [Draft() for _ in depths]
        deepest = max(depths)
        greedy = ctxs[0].sampling.greedy
        # masked inputs: the drafts do not feed the decoder, so every level's logits come from one pass (Medusa-like)
        ahead = (
            self.decoder.step(state, logits.new_zeros(len(depths), deepest - 1, dtype=torch.long), greedy)
            if self.model.masked_inputs and deepest > 1
            else None
        )
        for level in range(deepest):
            if greedy:
                tokens, q = logits.argmax(-1), None
            else:  # each row's own sampling (one softmax for all rows when they share it) and generator
                shared = all(c.sampling == ctxs[0].sampling for c in ctxs)
                q = (
                    ctxs[0].sampling.probs(logits)
                    if shared
                    else torch.stack([c.sampling.probs(row) for c, row in zip(ctxs, logits)])
                )
                tokens = torch.cat([c.sampling.draw(q[j], c.generator) for j, c in enumerate(ctxs)])
            for j, (depth, token) in enumerate(zip(depths, tokens.tolist())):
                if level < depth:
                    drafts[j].add(token, level - 1, None if q is None else q[j])
            if level + 1 < deepest:
                logits = self.decoder.step(state, tokens, greedy) if ahead is None else ahead[:, level]
        return drafts

    def _tree(
        self, template: Template, ctx: DraftContext, depth: int, state: DecoderStart, logits: torch.Tensor
    ) -> Draft:
        """Greedy: the children of a node are the top-k of its q (deterministic: q is left out, one-hot acceptance).
        Sampling: they are k independent draws from q, recorded with it, as in SpecInfer's multi-draft speculative
        sampling: the verifier tests them in turn, each against the residual left by the rejected ones before it,
        which keeps the output distribution exact (a repeated draw is a wasted node, never a wrong one)."""
        paths, parents = build_template_tree(template, depth, ctx.max_nodes)
        draft, has_child = Draft(), set(parents)
        row_of = {-1: 0}  # node -> its row in `logits`
        level_start = 0
        for level in range(1, depth + 1):
            level_nodes = [i for i in range(level_start, len(paths)) if len(paths[i]) == level]
            if not level_nodes:
                break
            level_start = level_nodes[-1] + 1
            k = max(paths[i][-1] for i in level_nodes) + 1
            if ctx.sampling.greedy:
                candidates, q = logits.topk(min(k, logits.size(-1)), dim=-1).indices.tolist(), None
            else:
                q = ctx.sampling.probs(logits)
                candidates = ctx.sampling.draw(q, ctx.generator, k).tolist()
            for i in level_nodes:
                row = row_of[parents[i]]
                rank = paths[i][-1]
                # a rank beyond the vocabulary repeats the last candidate (never accepted twice: harmless)
                token = candidates[row][min(rank, len(candidates[row]) - 1)]
                draft.add(token, parents[i], None if q is None else q[row])
            expand = [i for i in level_nodes if i in has_child]
            if not expand:
                break
            state = state.select(torch.tensor([row_of[parents[i]] for i in expand], device=logits.device))
            tokens = torch.tensor([draft.tokens[i] for i in expand], device=logits.device)
            logits = self.decoder.step(state, tokens, ctx.sampling.greedy)
            row_of = {i: r for r, i in enumerate(expand)}
        return draft

"""FTP self-drafting: the model's own N-token decoder is its drafter, trained with it, at no extra trunk cost.

The verification pass already yields the state vector h at every verified position, and its target distributions
are the decoder's first step there. From h at the position before the root (the last accepted token), the decoder
fed [x_prev, root] gives, first, the distribution the root was drawn from, then continues autoregressively (decoder
KV cache, cross-attention keys/values of the pseudo-sequence computed once) to draft the following tokens, up to
N-1 of them (the decoder has N positions). The engine hands over that first step (`ctx.decoder_start`: its
cross-attention keys/values and self-attention cache), so drafting starts by feeding the root alone.

chain: greedy = argmax at each step; under sampling the tokens are sampled from the decoder's (transformed)
distribution q and verified with the min(1, p/q) rule. tree: the top-k candidates at each node following a
template of rank paths, expanded level by level (one batched decoder call per level).
"""

from __future__ import annotations

import torch

from ftplm.drafters import Draft, DraftContext, Drafter, Template, build_template_tree, check_template, drafter
from ftplm.errors import FtplmError

# 11 nodes, depth 3 (cut to draft_len): two-three candidates near the root, the best ones deeper
DEFAULT_TREE: Template = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (2, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)]


def require_ftp(model, name: str) -> None:
    if getattr(model, "cfg", None) is None or model.cfg.model_type != "ftp":
        raise FtplmError(
            f"speculative={name!r} needs an FTP model (its decoder is the drafter); this is a GPT model: "
            "use 'recycling' or 'lookup'"
        )


@drafter("ftp")
class FTPDrafter(Drafter):
    wants_decoder_start = True
    node_cost = 0.25  # a round with 3 drafts: 4.7 ms against a plain step's 2.6 (`small`, 2 CPU threads)

    def __init__(self, model, draft_len: int | None = None, tree: bool | Template | None = None) -> None:
        require_ftp(model, "ftp")
        self.default_draft_len = model.cfg.n_future - 1
        super().__init__(model, draft_len, tree)
        if self.draft_len > model.cfg.n_future - 1:
            raise FtplmError(
                f"draft_len for 'ftp' is at most n_future-1 = {model.cfg.n_future - 1} (the decoder predicts "
                f"{model.cfg.n_future} tokens, the first being the target's own), got {self.draft_len}"
            )
        self.template = None if not tree else DEFAULT_TREE if tree is True else check_template(tree)

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> Draft:
        m = self.model
        depth = min(self.draft_len, ctx.max_depth)
        draft = Draft()
        if depth <= 0 or ctx.max_nodes <= 0:
            return draft
        if ctx.decoder_start is not None:  # the verification already ran the decoder's first step at h_prev
            memory, cache = ctx.decoder_start.memory_kv, ctx.decoder_start.cache
            x = torch.tensor([ctx.tokens[-1:]], device=ctx.h_prev.device)
        else:
            memory = m.memory_kv(m.pseudo_sequence(ctx.h_prev.view(1, -1)))
            cache = m.new_decoder_cache()
            x = torch.tensor([ctx.tokens[-2:]], device=ctx.h_prev.device)
        logits = m.lm_head(m.decode(x, memory, cache)[:, -1])  # (1, V): q of the first draft token
        if self.template is None:
            return self._chain(m, ctx, min(depth, ctx.max_nodes), memory, cache, logits, draft)
        return self._tree(m, ctx, depth, memory, cache, logits, draft)

    def _chain(self, m, ctx: DraftContext, depth: int, memory, cache, logits: torch.Tensor, draft: Draft) -> Draft:
        sampling = ctx.sampling
        for i in range(depth):
            if sampling.greedy:
                token, q = int(logits[0].argmax()), None
            else:
                q = sampling.probs(logits[0])
                token = int(torch.multinomial(q, 1, generator=ctx.generator))
            draft.add(token, i - 1, q)
            if i + 1 < depth:
                x = torch.tensor([[token]], device=logits.device)
                logits = m.lm_head(m.decode(x, memory, cache)[:, -1])
        return draft

    def _tree(self, m, ctx: DraftContext, depth: int, memory, cache, logits: torch.Tensor, draft: Draft) -> Draft:
        """Candidates are the top-k of q at each node (deterministic, so q is left out: one-hot acceptance)."""
        paths, parents = build_template_tree(self.template, depth, ctx.max_nodes)
        has_child = {parent for parent in parents}
        row_of = {-1: 0}  # node -> its row in `logits`
        level_start = 0
        for level in range(1, depth + 1):
            level_nodes = [i for i in range(level_start, len(paths)) if len(paths[i]) == level]
            if not level_nodes:
                break
            level_start = level_nodes[-1] + 1
            k = max(paths[i][-1] for i in level_nodes) + 1
            top = logits.topk(min(k, logits.size(-1)), dim=-1).indices.tolist()
            for i in level_nodes:
                parent_row = top[row_of[parents[i]]]
                rank = paths[i][-1]
                # a rank beyond the vocabulary repeats the last candidate (never accepted twice: harmless)
                draft.add(parent_row[min(rank, len(parent_row) - 1)], parents[i])
            expand = [i for i in level_nodes if i in has_child]
            if not expand:
                break
            cache = cache.select(torch.tensor([row_of[parents[i]] for i in expand], device=logits.device))
            mem = [(kk.expand(len(expand), -1, -1, -1), vv.expand(len(expand), -1, -1, -1)) for kk, vv in memory]
            x = torch.tensor([[draft.tokens[i]] for i in expand], device=logits.device)
            logits = m.lm_head(m.decode(x, mem, cache)[:, -1])
            row_of = {i: r for r, i in enumerate(expand)}
        return draft

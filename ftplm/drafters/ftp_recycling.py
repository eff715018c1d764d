"""FTP drafting extended by Token Recycling: past the decoder's horizon, recycled candidates continue the draft.

FTP's decoder drafts at most N-1 tokens, so a forward accepts at most N. This drafter hangs a small Token Recycling
tree off the last FTP draft token, so that one forward can accept more; one verification checks both parts, so the
output stays lossless (FTP's tokens carry their q, recycled ones are deterministic). A composition of two drafters,
reported on its own by `ftplm bench decode`.
"""

from __future__ import annotations

import dataclasses

import torch

from ftplm.drafters.base import Draft, DraftContext, Drafter, Template, drafter
from ftplm.drafters.ftp import FTPDrafter, require_ftp
from ftplm.drafters.recycling import RecyclingDrafter

# the recycled subtree under the last FTP token: the best chain 3 deep, second choices near its top
EXTENSION_TREE: Template = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]


@drafter("ftp-recycling")
class FTPRecyclingDrafter(Drafter):
    """draft_len caps the FTP part (default N-1); `tree` is the recycled subtree's template (default EXTENSION_TREE)."""

    wants_decoder_start = True
    fixed_cost, node_cost = 0.3, 0.07  # a round with its 3 + 6 nodes: 4.3-5.1 ms against a plain step's 2.3-2.6

    def __init__(self, model, draft_len: int | None = None, tree: bool | Template | None = None) -> None:
        require_ftp(model, "ftp-recycling")
        self.ftp = FTPDrafter(model, draft_len, tree=False)
        extension = EXTENSION_TREE if tree is None or isinstance(tree, bool) else tree
        self.recycling = RecyclingDrafter(model, max(len(p) for p in extension), extension)
        super().__init__(model, self.ftp.draft_len + self.recycling.draft_len)

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> Draft:
        return self._extend(self.ftp.propose(ctx), ctx)

    @torch.inference_mode()
    def propose_batch(self, ctxs: list[DraftContext]) -> list[Draft]:
        return [self._extend(draft, ctx) for draft, ctx in zip(self.ftp.propose_batch(ctxs), ctxs)]

    def _extend(self, draft: Draft, ctx: DraftContext) -> Draft:
        """The recycled subtree under the FTP draft's last token."""
        room_depth, room_nodes = ctx.max_depth - len(draft), ctx.max_nodes - len(draft)
        if not draft.tokens or room_depth <= 0 or room_nodes <= 0:
            return draft
        more = self.recycling.propose(
            dataclasses.replace(ctx, tokens=ctx.tokens + draft.tokens, max_depth=room_depth, max_nodes=room_nodes)
        )
        last = len(draft) - 1  # the recycled subtree's root is the last FTP token
        for token, parent in zip(more.tokens, more.parents):
            draft.add(token, last if parent < 0 else last + 1 + parent)
        return draft

    def observe(self, tokens: list[int], logits: torch.Tensor, accepted: list[int]) -> None:
        self.recycling.observe(tokens, logits, accepted)

"""FTP drafting or prompt lookup, chosen each round by which has lately given more tokens per unit of cost.

When greedy text loops, lookup copies the loop at almost no cost and runs far ahead of the decoder's N-1 tokens;
under sampling copies are mostly rejected and only FTP's own drafts help. Per source, a moving average of the tokens
a round gained per `round_cost`; each round drafts from lookup if it has a match and has been the better, else from
FTP. Lookup is scored every round, also when FTP drafts: once the text has gone on, its copy would have had
accepted what it shares with the generated text. FTP, unused, drifts back to a prior. The choice depends only on
past rounds, so the output stays lossless. A composition of two drafters, reported on its own by `bench decode`.
"""

from __future__ import annotations

from collections import deque

import torch

from ftplm.drafters.base import Draft, DraftContext, Drafter, Template, drafter, round_cost
from ftplm.drafters.ftp import FTPDrafter, require_ftp
from ftplm.drafters.lookup import LookupDrafter, trie
from ftplm.errors import FtplmError

PRIOR = 1.25  # tokens per unit of cost assumed before any evidence (~an FTP chain with 1 of its 3 drafts accepted)
DECAY = 0.8  # weight of the past in the moving averages
ANCHOR = 4  # tokens before a copy kept aside, to recognise its row's text later
MAX_AGE = 8  # rounds a copy kept aside waits for its row's text (settled in a round or two; older: rows that ended)


@drafter("ftp-lookup")
class FTPLookupDrafter(Drafter):
    """draft_len caps both parts (the FTP part at most N-1); tree=True drafts FTP trees and lookup tries."""

    wants_decoder_start = True

    def __init__(self, model, draft_len: int | None = None, tree: bool | Template | None = None) -> None:
        require_ftp(model, "ftp-lookup")
        if tree not in (None, False, True):
            raise FtplmError("ftp-lookup: tree must be True or False, not a template")
        n_drafts = model.cfg.n_future - 1
        self.ftp = FTPDrafter(model, None if draft_len is None else min(draft_len, n_drafts), tree=bool(tree))
        self.lookup = LookupDrafter(model, draft_len, tree=bool(tree))
        super().__init__(model, max(self.ftp.draft_len, self.lookup.draft_len))
        self.value = {self.ftp: PRIOR, self.lookup: PRIOR}
        # per row drafted this round, in the order proposed (and observed): the source and the draft's size
        self.chosen: deque[tuple[Drafter, int]] = deque()
        # lookup's copies in rounds FTP drafted, until the text after them is known: (at, the ANCHOR tokens before,
        # which tell its row from the batch's others, copies, nodes, the round it was made in, to drop it at MAX_AGE)
        self.shadow: list[tuple[int, list[int], list[list[int]], int, int]] = []
        self.round = 0  # propose_batch calls so far

    def begin(self) -> None:
        self.chosen.clear()

    def _score(self, source: Drafter, accepted: int, nodes: int) -> None:
        gained = (1 + accepted) / round_cost(nodes, source.node_cost, source.fixed_cost)
        self.value[source] = DECAY * self.value[source] + (1 - DECAY) * gained

    def _score_shadow(self, tokens: list[int]) -> None:
        """Score the copies lookup offered in earlier rounds against what was generated since, once that is known."""
        pending = []
        for entry in self.shadow:
            at, before, copies, nodes, made = entry
            if self.round - made > MAX_AGE:
                continue  # its row has ended
            if tokens[max(at - ANCHOR, 0) : at] != before:  # another row's (of the same batch): kept for it
                pending.append(entry)
                continue
            generated = tokens[at:]
            shared = [
                next((i for i, (a, b) in enumerate(zip(c, generated)) if a != b), min(len(c), len(generated)))
                for c in copies
            ]
            if all(n < len(generated) or n == len(c) for n, c in zip(shared, copies)):
                self._score(self.lookup, min(max(shared), nodes), nodes)
            else:
                pending.append(entry)
        self.shadow = pending

    def propose(self, ctx: DraftContext) -> Draft:
        return self.propose_batch([ctx])[0]

    def batch_key(self) -> object:
        return ("ftp-lookup", self.ftp.batch_key(), self.lookup.draft_len, self.lookup.branches)

    @torch.inference_mode()
    def propose_batch(self, ctxs: list[DraftContext]) -> list[Draft]:
        """Per row, lookup's copy or FTP's draft, chosen by the row's own drafter (`ctx.drafter`, else this one);
        the rows that ask FTP are drafted together."""
        drafts: list[Draft | None] = []
        ask_ftp = []
        owners = [c.drafter if isinstance(c.drafter, FTPLookupDrafter) else self for c in ctxs]
        for ctx, me in zip(ctxs, owners):
            me._score_shadow(ctx.tokens)
            copies = me.lookup.copies(ctx)
            copied = trie(copies, ctx)
            if len(copied) and me.value[me.lookup] >= me.value[me.ftp]:
                drafts.append(copied)
                continue
            drafts.append(None)
            ask_ftp.append(len(drafts) - 1)
            if len(copied):
                me.shadow.append((len(ctx.tokens), ctx.tokens[-ANCHOR:], copies, len(copied), me.round))
        for i, proposed in zip(ask_ftp, self.ftp.propose_batch([ctxs[i] for i in ask_ftp])):
            drafts[i] = proposed
        for i, (ctx, draft, me) in enumerate(zip(ctxs, drafts, owners)):
            source = me.ftp if i in ask_ftp else me.lookup
            me.chosen.append((source, len(draft.truncated(ctx.max_depth, ctx.max_nodes))))  # type: ignore[union-attr]  # every row has its draft now
        for me in {id(me): me for me in owners}.values():
            me.round += 1
        return drafts  # type: ignore[return-value]  # every row has its draft now

    def observe(self, tokens: list[int], logits: torch.Tensor, accepted: list[int]) -> None:
        if not self.chosen:  # the prefill
            return
        source, nodes = self.chosen.popleft()
        self._score(source, len(accepted) - 1, nodes)
        if source is self.lookup:  # FTP, not asked, drifts back to the prior
            self.value[self.ftp] = DECAY * self.value[self.ftp] + (1 - DECAY) * PRIOR

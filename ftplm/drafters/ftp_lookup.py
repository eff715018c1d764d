"""FTP drafting or prompt lookup, chosen each round by which has lately given more tokens per unit of cost.

The two are good at opposite things (docs/results.md): when a small model's greedy text loops, prompt lookup copies
the loop at almost no cost and runs far ahead of the decoder's N-1 tokens; under sampling nothing repeats, copied
drafts are deterministic and mostly rejected, and only FTP's own drafts help. This drafter keeps, per source, a
moving average of the tokens a round gained (accepted drafts + the bonus) per unit of cost (`round_cost`, in
target forwards, with the source's own costs), and each round drafts from lookup if it has a match in the context
and has been the better of the two, else from the FTP decoder. Lookup is scored every round, also when FTP
drafts: its copy is cheap to make, and once the text has gone on, the tokens it would have had accepted are those
it shares with what was generated (for a copied token x, the chance that a verifier accepts it, p(x), is the
chance that sampling produces it). FTP, which costs a decoder run to ask, keeps its last score, drifting back to a
prior while unused. The choice depends only on past rounds, so the output stays lossless (and seeded runs
reproducible).

This is a composition of two drafters, not FTP's own drafting: `ftplm bench decode` reports it on its own line.
"""

from __future__ import annotations

import torch

from ftplm.drafters import Draft, DraftContext, Drafter, Template, drafter, round_cost
from ftplm.drafters.ftp import FTPDrafter, require_ftp
from ftplm.drafters.lookup import LookupDrafter, trie
from ftplm.errors import FtplmError

PRIOR = 1.25  # tokens per unit of cost assumed before any evidence (~an FTP chain with 1 of its 3 drafts accepted)
DECAY = 0.8  # weight of the past in the moving averages
ANCHOR = 4  # tokens before a copy kept aside, to recognise its row's text later


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
        self.chosen: tuple[Drafter, int] | None = None  # this round's source and draft size
        # lookup's copies in rounds FTP drafted, until the text after them is known: (at, the ANCHOR tokens before,
        # copies, nodes); the tokens before tell a later row's text (the drafter outlives a generation) from this one
        self.shadow: list[tuple[int, list[int], list[list[int]], int]] = []

    def _score(self, source: Drafter, accepted: int, nodes: int) -> None:
        gained = (1 + accepted) / round_cost(nodes, source.node_cost, source.fixed_cost)
        self.value[source] = DECAY * self.value[source] + (1 - DECAY) * gained

    def _score_shadow(self, tokens: list[int]) -> None:
        """Score the copies lookup offered in earlier rounds against what was generated since, once that is known."""
        pending = []
        for at, before, copies, nodes in self.shadow:
            if tokens[max(at - ANCHOR, 0) : at] != before:
                continue  # another row's
            generated = tokens[at:]
            shared = [next((i for i, (a, b) in enumerate(zip(c, generated)) if a != b), min(len(c), len(generated)))
                      for c in copies]
            if all(n < len(generated) or n == len(c) for n, c in zip(shared, copies)):
                self._score(self.lookup, min(max(shared), nodes), nodes)
            else:
                pending.append((at, before, copies, nodes))
        self.shadow = pending

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> Draft:
        self._score_shadow(ctx.tokens)
        copies = self.lookup.copies(ctx)
        copied = trie(copies, ctx)
        if len(copied) and self.value[self.lookup] >= self.value[self.ftp]:
            self.chosen = self.lookup, len(copied)
            return copied
        draft = self.ftp.propose(ctx)
        self.chosen = self.ftp, len(draft.truncated(ctx.max_depth, ctx.max_nodes))
        if len(copied):
            self.shadow.append((len(ctx.tokens), ctx.tokens[-ANCHOR:], copies, len(copied)))
        return draft

    def observe(self, tokens: list[int], logits: torch.Tensor, accepted: list[int]) -> None:
        if self.chosen is None:  # the prefill
            return
        source, nodes = self.chosen
        self._score(source, len(accepted) - 1, nodes)
        if source is self.lookup:  # FTP, not asked, drifts back to the prior
            self.value[self.ftp] = DECAY * self.value[self.ftp] + (1 - DECAY) * PRIOR
        self.chosen = None

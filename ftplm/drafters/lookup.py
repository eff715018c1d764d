"""Prompt lookup decoding (Saxena 2023): draft by copying what followed the last n-gram earlier in the context.

The longest suffix n-gram (n = 3, 2, 1) that occurred before is looked up, most recent occurrence first, and the
draft_len tokens that followed it are proposed as a chain. A continuation that runs into the present is copied on
with overlap (LZ77-style: a match d tokens back predicts that the text repeats with period d), so that in a loop
shorter than draft_len, which the most recent match always is, the draft still has draft_len tokens. With
tree=True, the continuations of up to BRANCHES distinct earlier occurrences are merged into a trie, so that
diverging continuations are verified together.
Deterministic: q is one-hot, so under sampling a drafted token is accepted with probability p(token).
"""

from __future__ import annotations

from ftplm.drafters.base import Draft, DraftContext, Drafter, Template, drafter
from ftplm.errors import FtplmError

MAX_NGRAM = 3
BRANCHES = 3


@drafter("lookup")
class LookupDrafter(Drafter):
    default_draft_len = 7

    def __init__(self, model, draft_len: int | None = None, tree: bool | Template | None = None) -> None:
        super().__init__(model, draft_len, tree)
        if tree not in (None, False, True):
            raise FtplmError("lookup drafts from matches in the context: tree must be True or False, not a template")
        self.branches = BRANCHES if tree else 1

    def continuations(self, tokens: list[int], length: int) -> list[list[int]]:
        """What followed earlier occurrences of the longest matching suffix n-gram, most recent first."""
        found: list[list[int]] = []
        for n in range(min(MAX_NGRAM, len(tokens) - 1), 0, -1):
            suffix = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # occurrences ending before the last token
                if tokens[start : start + n] == suffix:
                    cont = tokens[start + n : start + n + length]
                    period = len(tokens) - (start + n)
                    while len(cont) < length:  # the copy overlaps the tokens it is producing
                        cont.append(cont[len(cont) - period])
                    if cont and cont not in found:
                        found.append(cont)
                        if len(found) == self.branches:
                            return found
            if found:
                return found
        return found

    def copies(self, ctx: DraftContext) -> list[list[int]]:
        """This round's continuations, as long as the draft may be."""
        return self.continuations(ctx.tokens, min(self.draft_len, ctx.max_depth))

    def propose(self, ctx: DraftContext) -> Draft:
        return trie(self.copies(ctx), ctx)


def trie(continuations: list[list[int]], ctx: DraftContext) -> Draft:
    """The continuations merged into one draft tree (shared prefixes once), breadth-first, cut to the context's room."""
    draft = Draft()
    children: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for cont in continuations:
        parent = -1
        for token in cont:
            node = children.get((parent, token))
            if node is None:
                node = children[(parent, token)] = draft.add(token, parent)
            parent = node
    order = sorted(range(len(draft)), key=draft.depths().__getitem__)  # breadth-first, for truncation
    if order != list(range(len(draft))):
        draft = draft.select(order)
    return draft.truncated(ctx.max_depth, ctx.max_nodes)

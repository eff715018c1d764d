"""Token Recycling (Luo et al. 2024, "Turning Trash into Treasure"): train-free drafting from discarded candidates.

An adjacency matrix M[V, k] holds, for every token, the top-k next-token candidates the target model produced the
last time that token was verified. Each verification updates the rows of every token it fed (accepted or not:
the "trash" is recycled). A draft is a tree grown breadth-first from the root token along a static template of
rank paths: node (r1, ..., rd) is M[token of its parent][rd]. The matrix lives as long as the drafter: a decoding
session shares one drafter among its rows, and a drafter passed to several generations carries it over between
queries, as in the paper.
"""

from __future__ import annotations

import torch

from ftplm.drafters.base import Draft, DraftContext, Drafter, Template, build_template_tree, check_template, drafter

TOP_K = 8
# 23 nodes, depth 6: wide near the root, the best path deepest. The paper's GPU template has ~80 nodes; on a CPU
# every verified node costs trunk compute, so the tree is smaller.
DEFAULT_TREE: Template = [
    (0,), (1,), (2,), (3,),
    (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (2, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 1, 0, 0), (1, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1),
    (0, 0, 0, 0, 0, 0),
]  # fmt: skip


@drafter("recycling")
class RecyclingDrafter(Drafter):
    default_draft_len = 6

    def __init__(self, model, draft_len: int | None = None, tree: bool | Template | None = None) -> None:
        super().__init__(model, draft_len, tree)
        # tree=False: the chain of best candidates; default (None/True): the template tree
        self.template = (
            [(0,) * d for d in range(1, self.draft_len + 1)]
            if tree is False
            else (DEFAULT_TREE if tree in (None, True) else check_template(tree))
        )
        self.k = max(TOP_K, max(max(p) for p in self.template) + 1)
        # the rows of the tokens seen so far; before any evidence a token's row is arbitrary distinct tokens
        # (a dict, not a V x k table: building that took ~20 ms, a tenth of a 96-token generation on `mini`)
        self.matrix: dict[int, list[int]] = {}
        self.unseen = list(range(self.k))

    def propose(self, ctx: DraftContext) -> Draft:
        paths, parents = build_template_tree(self.template, min(self.draft_len, ctx.max_depth), ctx.max_nodes)
        draft = Draft()
        root = ctx.tokens[-1]
        for path, parent in zip(paths, parents):
            row = self.matrix.get(root if parent < 0 else draft.tokens[parent], self.unseen)
            draft.add(row[min(path[-1], len(row) - 1)], parent)
        return draft

    def observe(self, tokens: list[int], logits: torch.Tensor, accepted: list[int]) -> None:
        top = logits.topk(min(self.k, logits.size(-1)), dim=-1).indices.tolist()
        self.matrix.update(zip(tokens, top))

"""What every drafter is made of: the Draft tree, the context a drafter sees, the Drafter base class and its
registry, adaptive draft lengths and tree templates (the drafters themselves: one module each, beside this one)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ftplm.errors import FtplmError

if TYPE_CHECKING:  # ftplm.generate imports this package
    from ftplm.generate import Sampling
    from ftplm.model import DecoderStart

# A tree template: each node is the path of candidate ranks from the root, e.g. (0, 1) = the second-best
# candidate after the best first token (Medusa's "choices" format).
Template = Sequence[tuple[int, ...]]


@dataclass
class Draft:
    """A token tree continuing the root (the last accepted token), nodes in topological order."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # index of each node's parent in `tokens`; -1 = the root
    # each node's draft distribution q (V,) when its token was *sampled* from q; None = chosen deterministically
    # (argmax, top-k rank, copied): the acceptance rule then treats q as one-hot on the token
    q: list[torch.Tensor | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, q: torch.Tensor | None = None) -> int:
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.q.append(q)
        return len(self.tokens) - 1

    def depths(self) -> list[int]:
        d: list[int] = []
        for p in self.parents:
            d.append(1 if p < 0 else d[p] + 1)
        return d

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def truncated(self, max_depth: int, max_nodes: int) -> Draft:
        """The largest sub-draft with depth <= max_depth and at most max_nodes nodes (ancestors kept)."""
        keep = [i for i, d in enumerate(self.depths()) if d <= max_depth][: max(max_nodes, 0)]
        return self if len(keep) == len(self) else self.select(keep)

    def select(self, nodes: list[int]) -> Draft:
        """The draft of these nodes in this order (every node's parent among them, before it)."""
        new_index = {old: new for new, old in enumerate(nodes)}
        parents = [new_index[self.parents[i]] if self.parents[i] >= 0 else -1 for i in nodes]
        return Draft([self.tokens[i] for i in nodes], parents, [self.q[i] for i in nodes])


@dataclass
class DraftContext:
    """What a drafter sees each round. `tokens` ends with the root (the last accepted token)."""

    tokens: list[int]
    h_prev: torch.Tensor  # (n_embd,) state vector at the position before the root: its next token is the root
    max_depth: int  # deeper nodes would exceed the token budget
    max_nodes: int  # more nodes would exceed the context length
    sampling: Sampling
    generator: torch.Generator
    # for drafters with `wants_decoder_start`: the FTP decoder after its first step at h_prev (ftplm.model.DecoderStart)
    decoder_start: DecoderStart | None = None
    drafter: Drafter | None = None  # the row's own drafter (its state), when rows of several are drafted together


def round_cost(nodes: int, node_cost: float, fixed_cost: float) -> float:
    """A round's cost in target forwards: the forward itself, and with a draft a fixed part (verifying several
    tokens instead of one, starting a drafter) plus a part per draft node."""
    return 1.0 + (fixed_cost + node_cost * nodes if nodes else 0.0)


class AdaptiveDepth:
    """Adaptive draft length: each round, the depth with the most expected tokens per unit of cost.

    Per depth d: how often a draft reached d with every shallower token accepted, and how often d's token was then
    accepted. Its rate r_d = (accepted + 2 r_{d-1}) / (reached + 2) (r_0's prior 1/2): with little evidence a depth
    does as well as the one above it, so deeper drafts stay worth trying. A depth-L draft gives
    1 + sum_{i<=L} prod_{j<=i} r_j tokens for round_cost(its nodes). Counts decay geometrically, so an undrafted depth
    drifts back to its prior. Only past acceptances are used (lossless); depth 0 is a plain step.
    """

    def __init__(self, max_depth: int, node_cost: float, fixed_cost: float = 0.0, decay: float = 0.95) -> None:
        self.max_depth, self.node_cost, self.fixed_cost, self.decay = max_depth, node_cost, fixed_cost, decay
        self.reached = [0.0] * max_depth
        self.accepted = [0.0] * max_depth
        self.widths = [1] * max_depth  # nodes at depth d + 1, as last drafted (a chain until seen)

    def rates(self) -> list[float]:
        rates, prior = [], 0.5
        for reached, accepted in zip(self.reached, self.accepted):
            prior = (accepted + 2 * prior) / (reached + 2)
            rates.append(prior)
        return rates

    def depth(self) -> int:
        best_depth, best, expected, keep, nodes = 0, 1.0, 1.0, 1.0, 0
        for d, rate in enumerate(self.rates()):
            keep *= rate
            expected += keep
            nodes += self.widths[d]
            value = expected / round_cost(nodes, self.node_cost, self.fixed_cost)
            if value > best:
                best_depth, best = d + 1, value
        return best_depth

    def update(self, draft: Draft, accepted_depth: int) -> None:
        """After a verification: `draft` as verified, `accepted_depth` = draft tokens accepted."""
        depths = draft.depths()
        drafted = max(depths, default=0)
        for d in range(min(drafted, self.max_depth)):
            self.widths[d] = depths.count(d + 1)
        for d in range(self.max_depth):
            self.reached[d] *= self.decay
            self.accepted[d] *= self.decay
        for d in range(min(drafted, accepted_depth + 1, self.max_depth)):
            self.reached[d] += 1
            self.accepted[d] += accepted_depth > d


class Drafter:
    """Base class. Subclasses set `name`, implement `propose`, and may learn from every verification."""

    name = ""
    default_draft_len = 4
    wants_decoder_start = False  # FTP drafters continue from the verification's first decoder step
    # a draft's cost in plain steps (round_cost): verifying ~0.2 more, each node ~0.05 (`small`, 2 threads: a
    # 23-node Recycling tree round 5.8 ms against 2.4); drafters that run a model add their own
    fixed_cost = 0.2
    node_cost = 0.05

    def __init__(self, model, draft_len: int | None = None, tree: bool | Template | None = None) -> None:
        self.model = model
        self.draft_len = self.default_draft_len if draft_len is None else draft_len
        # adaptive statistics when the caller shares this drafter between generations (ftplm.generate)
        self.adaptive_depth: AdaptiveDepth | None = None

    def begin(self) -> None:
        """Called when a generation starts (a drafter may outlive several): drop per-round state left over from one
        that ended early (an exception between a proposal and its verification)."""

    def propose(self, ctx: DraftContext) -> Draft:
        raise NotImplementedError

    def propose_batch(self, ctxs: list[DraftContext]) -> list[Draft]:
        """A draft for each row of a batch (rows verified together). Drafters that run a model batch it."""
        return [self.propose(ctx) for ctx in ctxs]

    def batch_key(self) -> object:
        """Rows whose drafters have equal keys are drafted together by one of them (`propose_batch`, each row's own
        drafter in ctx.drafter). By default a drafter drafts only its own rows: its state is theirs."""
        return id(self)

    def observe(self, tokens: list[int], logits: torch.Tensor, accepted: list[int]) -> None:
        """Called after each target forward: tokens (T,) fed, their next-token logits (T, V), accepted node indices."""


DRAFTERS: dict[str, type[Drafter]] = {}


def drafter(name: str) -> Callable[[type[Drafter]], type[Drafter]]:
    def register(cls: type[Drafter]) -> type[Drafter]:
        cls.name = name
        DRAFTERS[name] = cls
        return cls

    return register


def build_template_tree(template: Template, max_depth: int, max_nodes: int) -> tuple[list[tuple[int, ...]], list[int]]:
    """Template paths cut to max_depth / max_nodes, sorted breadth-first, with each path's parent index (-1 = root)."""
    index: dict[tuple[int, ...], int] = {}
    paths: list[tuple[int, ...]] = []
    parents: list[int] = []
    for p in sorted({tuple(p) for p in template if 0 < len(p) <= max_depth}, key=lambda p: (len(p), p)):
        if len(paths) == max_nodes:
            break
        if len(p) == 1 or p[:-1] in index:  # a path whose parent is missing is dropped with its subtree
            index[p] = len(paths)
            paths.append(p)
            parents.append(index[p[:-1]] if len(p) > 1 else -1)
    return paths, parents


def check_template(tree: object) -> Template:
    """Validate a user-given tree template (a list of rank paths)."""
    try:
        paths = [tuple(int(r) for r in p) for p in tree]  # type: ignore[attr-defined]  # any iterable of iterables
    except (TypeError, ValueError):
        raise FtplmError("tree must be True/False or a list of rank paths like [(0,), (1,), (0, 0)]") from None
    if not paths or any(len(p) == 0 or min(p) < 0 for p in paths):
        raise FtplmError("tree paths must be non-empty tuples of ranks >= 0")
    return paths


def get_drafter(name: str, model, draft_len: int | None = None, tree: bool | Template | None = None) -> Drafter:
    """A drafter by name for this model; bad names and arguments raise FtplmError with one clear line."""
    if name not in DRAFTERS:
        raise FtplmError(
            f"unknown speculative drafter {name!r}; choose one of: {', '.join(sorted(DRAFTERS))} (or None)"
        )
    if draft_len is not None and (isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len <= 0):
        raise FtplmError(f"draft_len must be a positive integer, got {draft_len!r}")
    return DRAFTERS[name](model, draft_len, tree)


def auto_drafter(model_type: str, greedy: bool) -> str | None:
    """The drafter "auto" stands for: the fastest in `ftplm bench decode` on our `small` models. FTP: `ftp-lookup`.
    GPT: `lookup` when greedy; plain when sampling, where copies are rarely accepted (0.85x)."""
    if model_type == "ftp":
        return "ftp-lookup"
    return "lookup" if greedy else None

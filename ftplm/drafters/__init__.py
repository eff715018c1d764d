"""Speculative drafters, one file each, registered by name (used by ftplm.generate).

A drafter proposes a *token tree* continuing the last accepted token (the root); the target model verifies every
node in one forward pass (ftplm.generate.DecodeSession). A chain is the tree in which every node has one
child. Nodes come in topological (breadth-first) order, so any prefix of a draft is again a valid draft; that is
how drafts are cut to the context length and to the remaining token budget.

    ftp        the FTP model's own decoder drafts the next N-1 tokens from the last state vector (FTP only)
    recycling  Token Recycling (Luo et al. 2024): top-k candidates recycled from earlier verifications
    ftp-recycling  ftp, then a Token Recycling subtree past the decoder's horizon (FTP only)
    ftp-lookup ftp or lookup, each round the one that has lately given more tokens per unit of cost (FTP only)
    lookup     prompt lookup decoding: copy what followed the last n-gram earlier in the context
"""

# the drafters register themselves on import: DRAFTERS is the one list of them (CLI choices, bench methods, docs)
from ftplm.drafters import ftp, ftp_lookup, ftp_recycling, lookup, recycling  # noqa: F401 - imported to register
from ftplm.drafters.base import (
    DRAFTERS,
    AdaptiveDepth,
    Draft,
    DraftContext,
    Drafter,
    Template,
    auto_drafter,
    build_template_tree,
    check_template,
    drafter,
    get_drafter,
    round_cost,
)

__all__ = [
    "DRAFTERS",
    "AdaptiveDepth",
    "Draft",
    "DraftContext",
    "Drafter",
    "Template",
    "auto_drafter",
    "build_template_tree",
    "check_template",
    "drafter",
    "get_drafter",
    "round_cost",
]

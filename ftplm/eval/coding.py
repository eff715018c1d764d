"""Suite `coding`: pass@1 on held-out problems of the planning-ahead coding task (ftplm.coding, docs/evaluation.md),
per level of its ladder.

Each of >= 500 held-out problems (a quarter per level) (never in the training corpus) gives a prompt (`def solve():` + docstring); the
model writes the body greedily (batched, KV cache) until EOS or the end of the function body; the completion is
checked by running it in the restricted subprocess executor. Reported: pass@1 (greedy), per level and per kind, and the
planning diagnostic `declared_correct` (the first statement declares the right number: the plan was right).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ftplm.coding import LEVELS, check_many, declared_value, problems
from ftplm.eval.base import EvalContext, provenance, suite
from ftplm.eval.coherence import sample_continuations
from ftplm.eval.stats import mean_ci
from ftplm.generate import Sampling

END_OF_BODY = re.compile(r"\n(?=\S)")  # a line that is not indented ends the function


def cut_completion(text: str) -> str:
    """The function body only: everything before the first unindented line."""
    m = END_OF_BODY.search(text)
    return text[: m.start()] if m else text


@suite("coding")
def coding(ctx: EvalContext) -> dict[str, Any]:
    """pass@1 (greedy) on held-out planning-ahead coding problems, checked by executing the answers."""
    tm = ctx.model
    n = ctx.size("coding_problems", 500, 40)
    # the same problems whatever the eval seed (the benchmark is fixed), n / 4 per level of the ladder
    probs = [p for level in LEVELS for p in problems("test", max(1, n // len(LEVELS)), seed=0, level=level)]
    prompts = [tm.encode(p.prompt) for p in probs]
    longest = max(len(p) for p in prompts)
    # a right answer never needs much more than the longest reference body: no budget for rambling
    need = max(len(tm.encode(p.solution)) for p in probs) * 5 // 4 + 8
    max_new = max(1, min(ctx.size("coding_new_tokens", need, need), tm.config.block_size - longest))
    greedy = sample_continuations(tm, prompts, 1, max_new, 0, Sampling(temperature=0))
    completions = [cut_completion(tm.decode(c[0])) for c in greedy]
    verdicts = check_many(probs, completions, workers=int(ctx.options.get("coding_workers", 2)))
    passed = np.array([ok for ok, _ in verdicts], dtype=float)
    declared = np.array([declared_value(p.prompt + c) == p.declared for p, c in zip(probs, completions)], dtype=float)
    metrics: dict[str, Any] = {"pass@1": mean_ci(passed, ctx.seed), "declared_correct": mean_ci(declared, ctx.seed)}
    for level in LEVELS:
        mask = np.array([p.level == level for p in probs])
        metrics[f"pass@1/L{level}"] = mean_ci(passed[mask], ctx.seed)
        metrics[f"declared_correct/L{level}"] = mean_ci(declared[mask], ctx.seed)
    for kind in sorted({p.kind for p in probs}):
        mask = np.array([p.kind == kind for p in probs])
        metrics[f"pass@1/{kind}"] = mean_ci(passed[mask], ctx.seed)
    failures: dict[str, int] = {}
    for ok, why in verdicts:
        if not ok:
            reason = why.split(":")[0]
            failures[reason] = failures.get(reason, 0) + 1
    examples = [
        {"prompt": p.prompt, "completion": c, "verdict": why}
        for p, c, (_, why) in list(zip(probs, completions, verdicts))[:3]
    ]
    return {
        "suite": "coding",
        **provenance(ctx.run),
        "model_type": tm.config.model_type,
        "n": len(probs),
        "max_new_tokens": max_new,
        "decoding": "greedy",
        "failures": dict(sorted(failures.items())),
        "metrics": metrics,
        "examples": examples,
        "headline": ["pass@1", *(f"pass@1/L{level}" for level in LEVELS)],
        "_items": {
            "pass@1": passed.tolist(),
            "declared_correct": declared.tolist(),
            **{f"pass@1/L{level}": passed[[p.level == level for p in probs]].tolist() for level in LEVELS},
        },
    }

"""Suite `ppl`: validation perplexity on fixed held-out windows (SPEC §5); for FTP also per-offset accuracy and CE.

The windows are ftplm.train.evaluate's: a fixed seed picks them, so every model scored on the same data directory
sees exactly the same tokens. The CI is a bootstrap over batches of windows (exp of the mean-CE interval).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ftplm.data import TokenData
from ftplm.errors import FtplmError
from ftplm.eval import EvalContext, provenance, suite
from ftplm.eval.stats import bootstrap_ci
from ftplm.train import evaluate


def val_perplexity(model, data: TokenData, batches: int, batch_size: int = 8, split: str = "val") -> tuple[dict[str, Any], list[float]]:
    """evaluate() over `batches` fixed batches (the same windows for every model), plus the per-batch CE for a CI."""
    per_batch = [evaluate(model, _From(data, i), batch_size, 1, split=split) for i in range(batches)]
    mean = {k: np.mean([r[k] for r in per_batch], axis=0).tolist() for k in per_batch[0] if k != "ppl"}
    mean["ppl"] = math.exp(mean["next_token_ce"])
    return mean, [r["next_token_ce"] for r in per_batch]


class _From:
    """TokenData seen from batch `start` on: evaluate(iters=1) on it scores the original's batch number `start`."""

    def __init__(self, data: TokenData, start: int) -> None:
        self.data, self.start = data, start

    def batch(self, split: str, batch_size: int, block_size: int, key: tuple[int, ...]):
        return self.data.batch(split, batch_size, block_size, (key[0], key[1] + self.start))


@suite("ppl")
def ppl(ctx: EvalContext) -> dict[str, Any]:
    """Val perplexity (+ FTP per-offset accuracy/CE) on the run's own held-out windows."""
    if ctx.data_dir is None:
        raise FtplmError(f"ppl needs the data {ctx.run} was trained on: pass --data DIR")
    data = TokenData(ctx.data_dir)
    batches = ctx.size("ppl_batches", 20, 5)
    split = ctx.options.get("ppl_split", "val")
    mean, per_batch = val_perplexity(ctx.model.model, data, batches, split=split)
    lo, hi = bootstrap_ci(np.asarray(per_batch), ctx.seed)
    n_tokens = batches * 8 * ctx.model.config.block_size
    metrics: dict[str, Any] = {
        "ppl": {"value": mean["ppl"], "ci95": [math.exp(lo), math.exp(hi)], "n": n_tokens},
        "next_token_ce": {"value": mean["next_token_ce"], "ci95": [lo, hi], "n": n_tokens},
    }
    for k, name in (("offset_acc", "offset_acc"), ("offset_ce", "offset_ce")):
        if k in mean:
            metrics[name] = {"value": mean[k], "n": n_tokens, "offsets": list(range(1, len(mean[k]) + 1))}
    return {
        "suite": "ppl", **provenance(ctx.run), "model_type": ctx.model.config.model_type,
        "n": n_tokens, "split": split, "data_dir": str(ctx.data_dir), "metrics": metrics, "headline": ["ppl"],
        "_items": {"next_token_ce": per_batch},
    }

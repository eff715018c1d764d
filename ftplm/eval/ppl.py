"""Suite `ppl`: validation perplexity on fixed held-out windows; for FTP also per-offset accuracy and CE.

The windows are ftplm.train.evaluate's: a fixed seed picks them, so every model scored on the same data directory
sees exactly the same tokens. Perplexity comes from the scoring API (TextModel.loglikelihood_batch, float32: the
numbers lm-eval and the server's logprobs give); FTP's per-offset metrics from the teacher-forced forward on the
same windows. The CI is a bootstrap over batches of windows (exp of the mean-CE interval).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ftplm.data import TokenData
from ftplm.errors import FtplmError
from ftplm.eval.base import EvalContext, provenance, suite
from ftplm.eval.stats import bootstrap_ci
from ftplm.train import VAL_KEY, evaluate

if TYPE_CHECKING:
    from ftplm.api import TextModel


def val_perplexity(
    model: TextModel, data: TokenData, batches: int, batch_size: int = 8, split: str = "val"
) -> tuple[dict[str, Any], list[float]]:
    """Next-token CE and perplexity over `batches` fixed batches of windows (the same for every model), the CE of
    each batch (for a CI), and for FTP the per-offset CE/accuracy."""
    block = model.config.block_size
    per_batch, offsets = [], []
    for i in range(batches):
        x, y = data.batch(split, batch_size, block, key=(VAL_KEY, i))
        # each window x_0..x_T scored as a continuation of its first token: T predictions, every one in context
        pairs = [(row[:1].tolist(), row[1:].tolist() + [int(last[-1])]) for row, last in zip(x, y)]
        per_batch.append(-sum(logp for logp, _ in model.loglikelihood_batch(pairs, batch_size)) / (len(pairs) * block))
        if model.config.model_type == "ftp":
            offsets.append(evaluate(model.model, _From(data, i), batch_size, 1, split=split))  # type: ignore[arg-type]  # TokenData's stand-in
    mean: dict[str, Any] = {"next_token_ce": float(np.mean(per_batch))}
    mean["ppl"] = math.exp(mean["next_token_ce"])
    if offsets:
        mean.update((k, np.mean([r[k] for r in offsets], axis=0).tolist()) for k in ("offset_ce", "offset_acc"))
    return mean, per_batch


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
    mean, per_batch = val_perplexity(ctx.model, data, batches, split=split)
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
        "suite": "ppl",
        **provenance(ctx.run),
        "model_type": ctx.model.config.model_type,
        "n": n_tokens,
        "split": split,
        "data_dir": str(ctx.data_dir),
        "metrics": metrics,
        "headline": ["ppl"],
        "_items": {"next_token_ce": per_batch},
    }

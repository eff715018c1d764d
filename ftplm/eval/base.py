"""What every evaluation suite is made of: the context it runs in, the registry it joins, the held-out documents
it reads and the provenance it records (the suites themselves: one module each, beside this one)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftplm.checkpoint import resolve
from ftplm.data import TokenData, documents, split_of

if TYPE_CHECKING:
    from ftplm.api import TextModel
    from ftplm.data import Document

SuiteFn = Callable[["EvalContext"], dict[str, Any]]
SUITES: dict[str, SuiteFn] = {}
PAPER_SUITES = ("ppl", "smoothness", "coherence", "classify", "coding")  # what `--suite all` runs
# Every option a suite reads (`ftplm eval --set NAME=VALUE`, eval config files): the one list that checks them.
OPTIONS: dict[str, str] = {
    "ppl_batches": "8-window batches of val perplexity (ppl)",
    "ppl_split": "split the ppl suite scores: val or test",
    "layer": "smoothness and classify read the vectors after the first L trunk blocks (default: the top)",
    "smoothness_docs": "held-out documents of the smoothness suite",
    "smoothness_split": "split the smoothness suite reads: val or test",
    "coherence_prompts": "prompts of the coherence suite",
    "coherence_samples": "continuations per prompt (at least 3)",
    "coherence_new_tokens": "tokens per continuation",
    "classify_docs": "documents per corpus of the classify suite",
    "coding_problems": "problems of the coding suite",
    "coding_new_tokens": "tokens generated per coding problem",
    "coding_workers": "processes that run the coding answers",
    "retrieval_docs": "held-out articles of the retrieval suite",
}


@dataclass
class EvalContext:
    """What a suite gets: the model under evaluation, where it came from, and how thorough to be."""

    run: Path  # run / checkpoint / saved-model directory
    model: TextModel
    data_dir: Path | None = None  # the prepared data the run trained on (held-out docs live there)
    quick: bool = False  # the demo's short version
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def size(self, name: str, full: int, quick: int) -> int:
        """A suite size: options[name] if given, else the quick or the full default."""
        return int(self.options.get(name, quick if self.quick else full))


def suite(name: str) -> Callable[[SuiteFn], SuiteFn]:
    def register(fn: SuiteFn) -> SuiteFn:
        SUITES[name] = fn
        return fn

    return register


def heldout_documents(
    data_dir: Path | None, corpus: str, splits: tuple[str, ...] = ("val", "test")
) -> tuple[list[Document], str]:
    """Held-out documents of a corpus (never trained on): from the data directory's heldout.jsonl when the run's
    data holds that corpus, else read from the corpus package and split exactly as `ftplm prepare` would."""
    fracs = (0.05, 0.10, 0)
    if data_dir is not None and (Path(data_dir) / "heldout.jsonl").is_file():
        data = TokenData(data_dir)
        wanted = [d for s in splits for d in data.heldout(s) if d.doc_id.startswith(f"{corpus}:")]
        if wanted:
            return wanted, f"{data_dir}/heldout.jsonl ({'+'.join(splits)})"
        # the data never held this corpus: split it as asked for (a large corpus's held-out fractions are scaled down)
        requested = data.meta.get("requested_fracs") or (
            data.meta.get("val_frac", 0.05),
            data.meta.get("test_frac", 0.10),
        )
        fracs = (*requested, data.meta.get("split_seed", 0))
    docs = [d for d in _corpus_documents(corpus) if split_of(d.doc_id, *fracs) in splits]
    return docs, f"{corpus} {'+'.join(splits)} split (val_frac={fracs[0]}, test_frac={fracs[1]}, seed={fracs[2]})"


@functools.lru_cache(maxsize=4)
def _corpus_documents(corpus: str) -> tuple[Document, ...]:
    """A corpus read from its package once per process (both runs of `--against` and every suite share it)."""
    return tuple(documents(corpus))


def provenance(run: Path) -> dict[str, Any]:
    """Which model files a result came from: the resolved checkpoint directory and its step."""
    directory = resolve(run)
    real = (directory / "latest").resolve() if (directory / "latest").exists() else directory.resolve()
    info: dict[str, Any] = {"run": str(run), "checkpoint": str(real)}
    state = real / "trainer_state.json"
    if state.is_file():
        s = json.loads(state.read_text())
        info.update(step=s.get("step"), tokens=s.get("tokens"))
    return info

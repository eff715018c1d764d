"""Evaluation suites (`ftplm eval --suite NAME`): one file per suite, registered by name.

A suite is a function EvalContext -> dict of JSON-able results. Each result dict carries, per metric, its value,
its confidence interval where one is defined, n, and which model/checkpoint it came from (see SPEC §5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ftplm.api import TextModel

SuiteFn = Callable[["EvalContext"], dict[str, Any]]
SUITES: dict[str, SuiteFn] = {}


@dataclass
class EvalContext:
    """What a suite gets: the model under evaluation, where it came from, and how thorough to be."""

    run: Path  # run / checkpoint / saved-model directory
    model: "TextModel"
    data_dir: Path | None = None  # the prepared data the run trained on (held-out docs live there)
    quick: bool = False  # the demo's short version
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


def suite(name: str) -> Callable[[SuiteFn], SuiteFn]:
    def register(fn: SuiteFn) -> SuiteFn:
        SUITES[name] = fn
        return fn

    return register

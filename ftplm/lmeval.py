"""lm-evaluation-harness backend `ftplm`, and lm-eval tasks over a prepared data directory's held-out documents.

    ftplm lm-eval-tasks --data DATA --out tasks/
    ftplm lm-eval --model ftplm --model_args pretrained=runs/ftp --tasks ftplm_heldout --include_path tasks/

lm-eval 0.4 knows a third-party model only once the module registering it is imported (it has no entry-point
discovery), so `ftplm lm-eval` imports this module and then runs lm-eval's own command line; from Python,
`import ftplm.lmeval` before `lm_eval.simple_evaluate(model="ftplm", ...)`. The scoring itself is TextModel's
(loglikelihood_batch, score, generate_batch): this module only translates lm-eval's requests.
lm-eval is optional (`pip install 'ftplm[lmeval]'`): nothing else in ftplm imports it.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path
from typing import Any, Literal

import torch

try:
    import lm_eval.models  # noqa: F401 - the built-in models' lazy entries: get_model adds them only to an empty registry
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as e:
    raise ImportError(f"ftplm's lm-eval backend needs lm-eval: pip install 'ftplm[lmeval]' ({e})") from e

from ftplm.api import TextModel, load
from ftplm.data import TokenData
from ftplm.errors import FtplmError

TAG = "ftplm_heldout"  # all the local tasks (not "ftplm": a directory of that name in the cwd would shadow it)


@register_model("ftplm")
class FtplmLM(TemplateLM):
    """An ftplm run (FTP or GPT) as an lm-eval model, single process.

    model_args: pretrained = a run, checkpoint or saved-model directory (or a loaded TextModel, from Python);
    batch_size (16; "auto" = 16); device (cpu; lm-eval's command line asks for cuda:0, which means the CPU where
    there is no CUDA); max_length (default and at most the model's context length:
    positions are learned, there is no sliding window); max_gen_toks (256: generate_until's default budget).
    """

    def __init__(
        self,
        pretrained: str | TextModel | None = None,
        batch_size: int | str | None = 16,
        device: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if pretrained is None or pretrained == "":
            raise FtplmError("model_args needs pretrained=RUN (a run, checkpoint or saved-model directory)")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda:0 unless told otherwise; on a CPU machine that means "here"
            logging.getLogger(__name__).warning("device %s: CUDA is not available, using the CPU", device)
            device = "cpu"
        self.model = pretrained if isinstance(pretrained, TextModel) else load(str(pretrained), device or "cpu")
        self._device = self.model.device
        self.batch_size = _positive_int(
            "batch_size", 16 if batch_size is None or str(batch_size).startswith("auto") else batch_size
        )
        block = self.model.config.block_size
        self.max_length = block if max_length is None else _positive_int("max_length", max_length)
        if self.max_length > block:
            raise FtplmError(f"max_length {self.max_length} exceeds the model's context length {block}")
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        if self.model.eos_id is None:
            raise FtplmError(f"{pretrained}: its tokenizer has no end-of-text token to start documents with")
        self._eos_id: int = self.model.eos_id

    # --- what TemplateLM needs to tokenize (its loglikelihood splits context/continuation like HF models) ----------
    @property
    def eot_token_id(self) -> int:
        return self._eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.model.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.model.decode(tokens)

    @property
    def tokenizer_name(self) -> str:
        return f"ftplm:{self.model.path}"

    # --- the three request types --------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        results = self.model.loglikelihood_batch(
            [(ctx, cont) for _, ctx, cont in requests], self.batch_size, self.max_length
        )
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        scores = self.model.score(texts, self.batch_size, self.max_length)
        for text, score in zip(texts, scores):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), score)
        return scores

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """TextModel.generate_batch per batch of requests with the same gen_kwargs (longest prompts first), each
        continuation cut at its first stop string. Prompts are left-truncated to leave max_gen_toks of the context,
        keeping at least half of it (a longer budget then ends at the context's end). Sampling without a `seed`
        gen_kwarg draws one from torch's RNG, which lm-eval seeds (--seed)."""
        collator = Collator(
            [req.args for req in requests],
            sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
            group_by="gen_kwargs",
            group_fn=lambda a: a[1],
        )
        results: list[str] = []
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)  # EOS: generate_batch stops there
            max_gen_toks = kwargs.pop("max_gen_toks")
            room = max(self.max_length - max_gen_toks, self.max_length // 2, 1)
            prompts = [(self.tok_encode(c) or [self.eot_token_id])[-room:] for c in contexts]
            do_sample = bool(kwargs.get("do_sample"))
            temperature = float(kwargs.get("temperature", 1.0)) if do_sample else 0.0
            seed = kwargs.get("seed")
            if seed is None and temperature > 0:
                seed = int(torch.randint(2**31 - 1, ()))
            texts = self.model.generate_batch(
                prompts,
                max_gen_toks,
                temperature=temperature,
                top_k=kwargs.get("top_k"),
                top_p=kwargs.get("top_p"),
                seed=seed,
            )
            for context, gen_kwargs, text in zip(contexts, all_kwargs, texts):
                text = postprocess_generated_text(text, until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return collator.get_original(results)


def _positive_int(name: str, value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 1 or n != float(value):
        raise FtplmError(f"{name} must be a positive integer, got {value!r}")
    return n


# ------------------------------------------------------------------------------------------------------------------
# `ftplm lm-eval ...`: lm-eval's own command line, with the model registered
# ------------------------------------------------------------------------------------------------------------------
def run_cli(argv: list[str]) -> None:
    """Run lm-eval's command line on exactly these arguments (`ftplm lm-eval ARGS` = `lm-eval ARGS` that knows
    --model ftplm). Without arguments or with only --help: how to use it, then `lm-eval run --help`. lm-eval's
    ValueErrors (an unknown task, model or argument) become one-line FtplmErrors."""
    from lm_eval.__main__ import cli_evaluate

    if not argv or argv in (["-h"], ["--help"]):
        print(
            "usage: ftplm lm-eval [lm-eval arguments]: lm-eval's command line with --model ftplm registered, e.g.\n"
            "  ftplm lm-eval-tasks --data DATA --out tasks/   # local tasks over held-out documents\n"
            "  ftplm lm-eval --model ftplm --model_args pretrained=RUN --tasks ftplm_heldout --include_path tasks/\n"
            "model_args: pretrained=RUN[,batch_size=16][,device=cpu][,max_length=N][,max_gen_toks=256]\n"
        )
        argv = ["run", "--help"]
    saved = sys.argv
    sys.argv = ["ftplm lm-eval", *argv]
    try:
        cli_evaluate()
    except FtplmError:
        raise
    except ValueError as e:  # lm-eval's word for bad input (an unknown task or model): one line, as ours
        raise FtplmError(f"lm-eval: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        sys.argv = saved


# ------------------------------------------------------------------------------------------------------------------
# local tasks: Hub datasets are often out of reach; held-out documents are always at hand
# ------------------------------------------------------------------------------------------------------------------
def write_tasks(
    data_dir: str | Path, out: str | Path, docs: int = 200, split: Literal["test", "val"] = "test", seed: int = 0
) -> list[str]:
    """Write lm-eval tasks over the first `docs` held-out documents of a prepared data directory: JSONL data and a
    YAML per task in `out` (absolute data paths; pass `--include_path out`). Returns the task
    names (the tag `ftplm_heldout` selects them all):

    - ftplm_heldout_ppl (loglikelihood_rolling): word/byte perplexity and bits per byte of whole documents;
    - ftplm_heldout_continuation (multiple_choice): which of 4 continuations (10 words) follows a document's first
      32 words; the distractors continue other documents at the same place;
    - ftplm_heldout_topic (multiple_choice, labelled corpora only): a document's label, from its first 64 words;
    - ftplm_heldout_next_word (generate_until): the word after a document's first 24 words, greedy, exact match.
    """
    import yaml

    if isinstance(docs, bool) or not isinstance(docs, int) or docs < 1:
        raise FtplmError(f"docs must be a positive integer, got {docs!r}")
    held = TokenData(data_dir).heldout(split, limit=docs)
    if not held:
        raise FtplmError(f"{data_dir} holds no {split} documents: prepare it with a --{split}-frac above 0")
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = [d.text.split() for d in held]

    tasks: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {}
    tasks["ftplm_heldout_ppl"] = (
        [{"doc_id": d.doc_id, "text": d.text} for d in held if d.text.strip()],
        {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": m, "aggregation": agg, "higher_is_better": False}
                for m, agg in (
                    ("word_perplexity", "weighted_perplexity"),
                    ("byte_perplexity", "weighted_perplexity"),
                    ("bits_per_byte", "bits_per_byte"),
                )
            ],
        },
    )
    long = [i for i, w in enumerate(words) if len(w) >= 42]
    if len(long) >= 4:
        rows = []
        for i in long:
            others = rng.sample([j for j in long if j != i], 3)
            choices = [" ".join(words[j][32:42]) for j in [i, *others]]
            rng.shuffle(choices)
            rows.append(
                {
                    "doc_id": held[i].doc_id,
                    "prefix": " ".join(words[i][:32]),
                    "choices": choices,
                    "label": choices.index(" ".join(words[i][32:42])),
                }
            )
        tasks["ftplm_heldout_continuation"] = (rows, _multiple_choice("{{prefix}}"))
    labels = sorted({d.label for d in held if d.label})
    if len(labels) >= 2:
        rows = [
            {"doc_id": d.doc_id, "text": " ".join(w[:64]), "choices": labels, "label": labels.index(d.label)}
            for d, w in zip(held, words)
            if d.label
        ]
        tasks["ftplm_heldout_topic"] = (rows, _multiple_choice("{{text}}\nTopic:"))
    rows = [
        {"doc_id": d.doc_id, "prompt": " ".join(w[:24]), "target": w[24]} for d, w in zip(held, words) if len(w) > 24
    ]
    if rows:
        tasks["ftplm_heldout_next_word"] = (
            rows,
            {
                "output_type": "generate_until",
                "doc_to_text": "{{prompt}}",
                "doc_to_target": "{{target}}",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": 16, "do_sample": False, "temperature": 0.0},
                "filter_list": [
                    {
                        "name": "first-word",
                        "filter": [
                            {"function": "regex", "regex_pattern": r"\S+", "fallback": ""},
                            {"function": "take_first"},
                        ],
                    }
                ],
                "metric_list": [
                    {
                        "metric": "exact_match",
                        "aggregation": "mean",
                        "higher_is_better": True,
                        "ignore_case": True,
                        "ignore_punctuation": True,
                    }
                ],
            },
        )

    for name, (rows, config) in tasks.items():
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        task = {
            "tag": [TAG],
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            **config,
            "metadata": {"version": 1.0, "source": str(Path(data_dir).absolute()), "split": split},
        }
        (out / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return list(tasks)


def _multiple_choice(doc_to_text: str) -> dict[str, Any]:
    return {
        "output_type": "multiple_choice",
        "doc_to_text": doc_to_text,
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }

"""The trainer: AdamW, warmup + cosine, grad clipping and accumulation, bf16 autocast, checkpoints, exact resume.

Exact resume: batches are a pure function of (seed, step, micro-batch), the schedule is a function of the step, and
optimizer moments + RNG state are saved with every checkpoint, so on CPU a resumed run's loss curve equals the
uninterrupted one bit for bit (tests/test_train.py kills a run with SIGKILL to check it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model
from tqdm import tqdm

from ftplm.checkpoint import check_weights_fit, init_source, load_trainer_state, save_checkpoint, save_snapshot
from ftplm.config import (
    ModelConfig,
    TrainConfig,
    config_from_dict,
    load_model_config,
    preset,
    with_overrides,
    write_config_file,
)
from ftplm.data import TokenData
from ftplm.distributed import (
    DEFAULT_TIMEOUT,
    Backend,
    Parallel,
    context_from_env,
    global_micro,
    init_process_group,
    shutdown,
    split_accum,
    to_device,
)
from ftplm.errors import FtplmError
from ftplm.loggers import Loggers
from ftplm.model import LanguageModel, build_model
from ftplm.tokenizer import load_tokenizer

RUN_CONFIG = "run_config.yaml"  # the resolved config of a run, readable by `ftplm train --config`
RUN_CONFIG_HEADER = """Every setting of this run, resolved (preset, config file and flags).
ftplm train --config THIS_FILE --out NEW_RUN trains the same model again; flags given with it win."""
VAL_KEY = 982_451_653  # fixed seed of the validation batches: every model is scored on the same windows


CUDA_VOCAB_MULTIPLE = 64  # a new CUDA run pads its vocabulary to this (tensor-core shapes; ModelConfig.vocab_multiple)


@functools.cache
def has_fast_bf16(device_type: str) -> bool:
    """Whether bf16 autocast pays off: CUDA with bf16, or a CPU with native bf16 matmul (AVX512-BF16 / AMX).

    On CPUs without them (e.g. AVX2-only) oneDNN emulates bf16 matmuls hundreds of times slower than fp32.
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where the hardware runs it fast, else 'fp32'; explicit choices are kept."""
    if dtype == "auto":
        return "bf16" if has_fast_bf16(device.type) else "fp32"
    return dtype


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if resolve_dtype(dtype, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=8)  # asked every step, with the same arguments
def snapshot_steps(planned: int, n: int) -> frozenset[int]:
    """At most n steps of a `planned`-step run at which to keep the weights: half spread evenly over its second half,
    where a GPT run reaches the perplexity of an FTP run trained on as many tokens (FTP needs more tokens for the same
    perplexity: its matches fell at 0.67 to 0.98 of the GPT run), half spread geometrically over its first half."""
    if n <= 0 or planned <= 0:
        return frozenset()
    late = n // 2 + n % 2
    dense = {round(planned / 2 + planned / 2 * (i + 1) / late) for i in range(late)}
    early = {round((planned / 2) ** (i / max(1, n - late - 1))) for i in range(n - late)}
    return frozenset(s for s in dense | early if 1 <= s <= planned)


def lr_at(step: int, cfg: TrainConfig, planned_steps: int) -> float:
    """Linear warmup, then cosine decay to learning_rate * min_lr_ratio at planned_steps."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, planned_steps - cfg.warmup_steps))
    min_lr = cfg.learning_rate * cfg.min_lr_ratio
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices and embeddings only: not on norms, biases, or FTP's pseudo-position
    vectors (a learned per-slot offset added to the projection: a bias in all but shape)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and not n.endswith("pseudo_pos")]
    no_decay = [p for n, p in named if p.dim() < 2 or n.endswith("pseudo_pos")]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


@torch.no_grad()
def evaluate(
    model: LanguageModel, data: TokenData, batch_size: int, iters: int, dtype: str = "auto", split: str = "val"
) -> dict[str, Any]:
    """Validation metrics on fixed windows of a split: next-token CE and perplexity (+ FTP per-offset CE/accuracy)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals: dict[str, Any] = {}
    for i in range(iters):
        x, y = data.batch(split, batch_size, model.cfg.block_size, key=(VAL_KEY, i))
        with autocast(device, dtype):
            out = model(x.to(device), y.to(device), with_metrics=True)
        for name in ("loss", "next_token_ce", "offset_ce", "offset_acc"):
            value = getattr(out, name)
            if value is not None:
                totals[name] = totals.get(name, 0) + value.float().cpu()
    model.train(was_training)
    result: dict[str, Any] = {k: (v / iters).tolist() for k, v in totals.items()}
    result["ppl"] = math.exp(result["next_token_ce"])
    return result


@dataclass
class RunInfo:
    """What a finished (or stopped) training call reports."""

    run: Path
    model_type: str
    step: int
    tokens: int
    elapsed: float
    val: dict[str, Any] | None


class Trainer:
    def __init__(
        self,
        data_dir: str | Path,
        out: str | Path,
        model_type: str | None = None,
        preset_name: str = "small",
        model_overrides: dict[str, Any] | None = None,
        train_overrides: dict[str, Any] | None = None,
        resume: bool = False,
        device: str = "auto",
        progress: bool = True,
        strategy: str = "ddp",
        backend: Backend = "auto",
        dist_timeout: float = DEFAULT_TIMEOUT,
        init_from: str | Path | None = None,
    ) -> None:
        """model_type: ftp or gpt (default: ftp, or init_from's); init_from: a run, checkpoint or saved model whose
        weights this new run starts from, with a fresh optimizer and schedule (continued pretraining, fine-tuning)."""
        self.out = Path(out)
        self.data = TokenData(data_dir)
        self.dist = context_from_env(backend, device, dist_timeout)  # torchrun's variables; world_size 1 without them
        self.device = self.dist.device
        self.progress = progress and self.dist.is_main
        self.strategy = strategy
        self.preset_name = preset_name
        self.resume_state: dict[str, Any] | None = None
        self.resume_tensors: dict[str, torch.Tensor] | None = None
        self.init_from: dict[str, Any] | None = None
        if resume and init_from is not None:
            raise FtplmError("--init-from starts a new run; --resume continues one: use one of them")
        if resume:
            self.model_cfg, self.train_cfg = self._resumed_run(train_overrides or {})
        else:
            self.model_cfg, self.train_cfg = self._new_run(
                model_type, preset_name, model_overrides or {}, train_overrides or {}, init_from
            )
        if self.model_cfg.vocab_size < self.data.vocab_size:
            raise FtplmError(
                f"model vocab ({self.model_cfg.vocab_size}) is smaller than the data's tokenizer ({self.data.vocab_size})"
            )
        cfg = self.train_cfg
        if cfg.max_steps is None and cfg.max_tokens is None and cfg.time_budget is None:
            raise FtplmError("say when to stop: --max-steps, --max-tokens or --time-budget")
        if strategy not in ("ddp", "fsdp"):
            raise FtplmError(f"unknown strategy {strategy!r}; choose ddp or fsdp")
        if strategy == "fsdp" and not self.dist.distributed:
            raise FtplmError(
                "--strategy fsdp shards the model over processes: launch with torchrun --nproc_per_node=N (N >= 2)"
            )
        self.tokenizer = load_tokenizer(self.data.tokenizer_path)
        self.loggers = Loggers(self.out, cfg.loggers) if self.dist.is_main else None  # a missing package fails here
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * self.model_cfg.block_size * self.dist.world_size
        init_process_group(self.dist)  # last: every check above fails fast, before any network wait

    def _resumed_run(self, train_overrides: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
        """The configs of the run in `out`, with its optimizer state and RNG; overrides (e.g. a longer --max-steps)
        apply to the continuation."""
        if not (self.out / "latest").exists():
            raise FtplmError(f"--resume: {self.out} has no checkpoint to resume from")
        self.resume_state, self.resume_tensors = load_trainer_state(self.out)
        train_dict = dict(self.resume_state["train_config"])
        if "grad_accum" not in train_overrides:  # same global batch on any world size
            saved_world = self.resume_state.get("world_size", 1)
            train_dict["grad_accum"] = split_accum(train_dict["grad_accum"] * saved_world, self.dist.world_size)
        train_dict.update(train_overrides)
        train_cfg = config_from_dict(TrainConfig, train_dict, "trainer_state.json").validate()
        return load_model_config(self.out / "latest" / "config.json"), train_cfg

    def _new_run(
        self,
        model_type: str | None,
        preset_name: str,
        model_overrides: dict[str, Any],
        train_overrides: dict[str, Any],
        init_from: str | Path | None,
    ) -> tuple[ModelConfig, TrainConfig]:
        """The configs of a new run: the preset's (or init_from's model), with the overrides."""
        if (self.out / "latest").exists():
            raise FtplmError(f"{self.out} already holds a run: pass --resume to continue it, or choose another --out")
        if init_from is not None:
            self.init_from = init_source(init_from, self.data.tokenizer_path)
            model_type = model_type or self.init_from["config"].model_type
            if model_type != self.init_from["config"].model_type:
                raise FtplmError(
                    f"--init-from {init_from} is a {self.init_from['config'].model_type} model, not {model_type}"
                )
        chosen = preset(preset_name, model_type or "ftp")  # type: ignore[arg-type]  # validated by preset()
        base_model = self.init_from["config"] if self.init_from else chosen.model
        defaults: dict[str, Any] = {"vocab_size": self.data.vocab_size}
        if self.device.type == "cuda" and not self.init_from:  # init_from's weights have their own shape
            defaults["vocab_multiple"] = CUDA_VOCAB_MULTIPLE
        model_cfg = with_overrides(base_model, {**defaults, **model_overrides}).validate()
        train_cfg = with_overrides(chosen.train, train_overrides).validate()
        if self.init_from:
            check_weights_fit(model_cfg, self.init_from["weights"], str(init_from))
        return model_cfg, train_cfg

    # ------------------------------------------------------------------------------------------------
    def _planned_steps(self, step_seconds: float | None, seconds_left: float | None = None) -> int | None:
        """Length of the LR schedule: from max_steps / max_tokens, else estimated from the time budget."""
        cfg = self.train_cfg
        limits = []
        if cfg.max_steps is not None:
            limits.append(cfg.max_steps)
        if cfg.max_tokens is not None:
            limits.append(math.ceil(cfg.max_tokens / self.tokens_per_step))
        if limits:
            return min(limits)
        budget = seconds_left if seconds_left is not None else cfg.time_budget
        if step_seconds is None or budget is None:
            return None
        return max(1, int(budget / step_seconds))

    def resolved_config(self) -> dict[str, Any]:
        """Every setting of this run, flat, as `ftplm train --config` reads it: that file trains the same model."""
        model_fields = {k: v for k, v in dataclasses.asdict(self.model_cfg).items() if k != "model_type"}
        origin = {"init_from": self.init_from["path"]} if self.init_from else {}
        return {
            "model": self.model_cfg.model_type,
            "preset": self.preset_name,
            "data": str(self.data.root.resolve()),
            **origin,
            **model_fields,
            **dataclasses.asdict(self.train_cfg),
        }

    def _start_logging(self, step: int) -> Loggers | None:
        """The run's loggers (main process), each told where the run (re)starts; the resolved config beside them."""
        if self.loggers is None:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        config = self.resolved_config()
        write_config_file(self.out / RUN_CONFIG, config, RUN_CONFIG_HEADER)
        self.loggers.start(config, step)
        return self.loggers

    def fit(self) -> RunInfo:
        cfg, device, ctx = self.train_cfg, self.device, self.dist
        torch.manual_seed(cfg.seed)
        model = build_model(self.model_cfg).to(device)
        # weights before wrapping: FSDP shards what is loaded here
        if self.resume_state is not None:
            load_model(model, str(self.out / "latest" / "model.safetensors"), device=str(device))
        elif self.init_from:
            load_model(model, str(self.init_from["weights"]), device=str(device))
        compile_model = cfg.compile if cfg.compile is not None else device.type == "cuda"
        parallel = Parallel(model, ctx, self.strategy, compile_model)  # type: ignore[arg-type]  # validated by Parallel
        optimizer = make_optimizer(model, cfg, device)
        step, tokens, elapsed, planned = 0, 0, 0.0, None
        if self.resume_state is not None and self.resume_tensors is not None:
            parallel.load_optimizer(optimizer, self.resume_state["optimizer_param_groups"], self.resume_tensors)
            torch.set_rng_state(self.resume_tensors["rng.torch"])
            step, tokens = self.resume_state["step"], self.resume_state["tokens"]
            elapsed, planned = self.resume_state["elapsed"], self.resume_state.get("planned_steps")
            self.init_from = self.resume_state.get("init_from")
        loggers = self._start_logging(step)
        try:
            return self._loop(model, parallel, optimizer, step, tokens, elapsed, planned, loggers)
        finally:
            if loggers is not None:
                loggers.close()

    def _state(self, step: int, tokens: int, elapsed: float, planned: int | None) -> dict[str, Any]:
        """trainer_state.json: where the run stands and what resuming it needs (batches depend on seed and step)."""
        cfg, ctx = self.train_cfg, self.dist
        return {
            "tokens": tokens,
            "elapsed": elapsed,
            "planned_steps": planned,
            "data_dir": str(self.data.root.resolve()),
            "data_position": {
                "step": step,
                "note": "batches are a function of (seed, step, rank * grad_accum + micro)",
            },
            "train_config": dataclasses.asdict(cfg),  # grad_accum is per process: global = grad_accum * world_size
            "world_size": ctx.world_size,
            "strategy": self.strategy,
            "init_from": self.init_from and {k: self.init_from[k] for k in ("path", "step")},
        }

    def _optimizer_step(
        self, model: torch.nn.Module, parallel: Parallel, optimizer: torch.optim.Optimizer, step: int, lr: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step over grad_accum micro-batches: (the summed micro-batch losses, the gradient norm)."""
        cfg, device = self.train_cfg, self.device
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per micro-batch
        for micro in range(cfg.grad_accum):
            key = (cfg.seed, step, global_micro(self.dist, micro, cfg.grad_accum))  # this rank's slice of the batch
            x, y = self.data.batch("train", cfg.batch_size, self.model_cfg.block_size, key=key)
            x, y = to_device(x, device), to_device(y, device)
            with parallel.gradient_sync(micro == cfg.grad_accum - 1):  # reduce on the last micro-batch only
                with autocast(device, cfg.dtype):
                    out = parallel.forward(x, y)
                (out.loss / cfg.grad_accum).backward()
            loss_sum += out.loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm

    def _loop(self, model, parallel, optimizer, step, tokens, elapsed, planned, loggers: Loggers | None) -> RunInfo:
        """The training loop proper, from `step` on; `loggers` on the main process only."""
        cfg, ctx = self.train_cfg, self.dist
        saved_step = step  # a resumed run's checkpoint of this step already exists
        planned = self._planned_steps(None) if self.train_cfg.max_steps or self.train_cfg.max_tokens else planned
        model.train()

        def save() -> None:
            nonlocal saved_step
            full_model, full_optimizer = parallel.full_state(optimizer)  # a collective under FSDP
            if ctx.is_main:
                save_checkpoint(
                    self.out,
                    step,
                    full_model,
                    self.tokenizer,
                    full_optimizer,
                    self._state(step, tokens, elapsed, planned),
                    keep=cfg.keep_checkpoints,
                )
            saved_step = step

        def snapshot() -> None:
            full_model, _ = parallel.full_state(optimizer)  # a collective under FSDP
            if ctx.is_main:
                save_snapshot(self.out, step, full_model, self.tokenizer, self._state(step, tokens, elapsed, planned))

        def log(record: dict[str, Any]) -> None:
            if loggers is not None:
                loggers.log(record)

        bar = tqdm(
            total=planned,
            initial=step,
            desc=f"train {self.model_cfg.model_type}",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        last_val: dict[str, Any] | None = None
        loss_value = float("nan")
        start_time = time.perf_counter() - elapsed
        warm_mark = (step, elapsed)  # (step, elapsed) after which step times count for the time-budget plan
        while True:
            if planned is not None and step >= planned:
                break
            if cfg.time_budget is not None and elapsed >= cfg.time_budget:
                break
            t0 = time.perf_counter()
            lr = lr_at(step, cfg, planned or 10**9)
            loss_sum, grad_norm = self._optimizer_step(model, parallel, optimizer, step, lr)
            step += 1
            tokens += self.tokens_per_step
            step_time = time.perf_counter() - t0
            # every rank takes the same decisions (stop, schedule length) from the same averaged numbers
            loss_value, elapsed, step_time = ctx.mean(
                [loss_sum.item() / cfg.grad_accum, time.perf_counter() - start_time, step_time]
            )
            if planned is None:  # time budget only: fix the schedule length from warmed-up step times
                if step == 2:
                    warm_mark = (step, elapsed)
                elif step >= warm_mark[0] + 8:
                    seconds_per_step = (elapsed - warm_mark[1]) / (step - warm_mark[0])
                    planned = step + self._planned_steps(seconds_per_step, cfg.time_budget - elapsed)
                    bar.total = planned
            if step % cfg.log_interval == 0 or step == 1:
                log(
                    {
                        "step": step,
                        "loss": loss_value,
                        "lr": lr,
                        "tokens": tokens,
                        "elapsed": round(elapsed, 3),
                        "tokens_per_s": round(self.tokens_per_step / step_time, 1),
                        "grad_norm": None
                        if grad_norm is None
                        else float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                    }
                )
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{self.tokens_per_step / step_time:,.0f}")
            done = (planned is not None and step >= planned) or (
                cfg.time_budget is not None and elapsed >= cfg.time_budget
            )
            if (step % cfg.eval_interval == 0 or done) and (ctx.is_main or parallel.all_ranks_forward):
                last_val = evaluate(model, self.data, cfg.batch_size, cfg.eval_iters, cfg.dtype)
                log({"step": step, "tokens": tokens, "elapsed": round(elapsed, 3), "val": last_val})
                if ctx.is_main:
                    bar.write(f"step {step}: val ppl {last_val['ppl']:.2f}")
            if planned is not None and step in snapshot_steps(planned, cfg.snapshots):
                snapshot()
            if step % cfg.save_interval == 0 or done:
                save()
        bar.close()
        if step == 0:
            raise FtplmError("the budget ended before the first step")
        if saved_step != step:
            save()
        ctx.barrier()  # nobody leaves while rank 0 still writes
        return RunInfo(self.out, self.model_cfg.model_type, step, tokens, elapsed, last_val if ctx.is_main else None)


def read_log(run: str | Path) -> list[dict[str, Any]]:
    path = Path(run) / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(data_dir: str | Path, out: str | Path, **kwargs: Any) -> RunInfo:
    """Train a model; see Trainer for the arguments. Under torchrun every process calls this (see distributed.py)."""
    try:
        return Trainer(data_dir, out, **kwargs).fit()
    finally:
        shutdown()

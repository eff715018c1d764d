"""Multi-process training on PyTorch's own stack: torchrun's environment -> process group -> DDP or FSDP2.

`torchrun --nproc_per_node=N -m ftplm train ...` starts N copies of `ftplm train`; each reads RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT from its environment (multi-node: torchrun's --nnodes / --node_rank /
--rdzv-endpoint fill them in). Without those variables training is a plain single process and nothing here runs.

- backend: gloo on CPU, NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK); every collective has a timeout, so
  a missing or dead peer ends the run with an error instead of a hang.
- strategy: DDP (replicated model, gradients all-reduced) or FSDP2 (`fully_shard` per encoder block + root:
  parameters, gradients and optimizer state sharded) for models that do not fit one device.
- gradient accumulation skips the reduction on all but the last micro-batch (DDP no_sync, FSDP2
  set_requires_gradient_sync(False)).
- checkpoints stay in the single HF-style layout: under FSDP the full state is gathered to rank 0, one tensor at a
  time, and rank 0 writes it with the ordinary single-process code (ftplm/checkpoint.py).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
import torch.distributed as dist

from ftplm.checkpoint import restore_optimizer
from ftplm.errors import FtplmError
from ftplm.model import build_model

Strategy = Literal["ddp", "fsdp"]
Backend = Literal["auto", "gloo", "nccl"]
DEFAULT_TIMEOUT = 1800.0  # seconds a collective may wait: must cover rank 0's evaluation + checkpoint writes


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw)  # type: ignore[arg-type]  # None is caught with the ValueError below
    except (TypeError, ValueError):
        raise FtplmError(f"environment variable {name}={raw!r} must be an integer (launch with torchrun)") from None


@dataclass
class DistContext:
    """Where this process stands: rank, world size, its device, and the process group (if any)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None  # None: single process, no process group
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout: float = DEFAULT_TIMEOUT

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """Average of per-rank values, identical on every rank (one all-reduce of a small tensor)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.backend == "nccl" else "cpu")
        dist.all_reduce(t)
        return (t / self.world_size).tolist()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FtplmError("CUDA was requested but no CUDA device is available")
    return torch.device(name)


def context_from_env(backend: Backend = "auto", device: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> DistContext:
    """Read torchrun's variables and check them; no process group yet (see `init_process_group`)."""

    if backend not in ("auto", "gloo", "nccl"):
        raise FtplmError(f"unknown backend {backend!r}; choose auto, gloo or nccl")
    if timeout <= 0:
        raise FtplmError("--dist-timeout must be positive")
    world = _env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1
    if world < 1:
        raise FtplmError(f"WORLD_SIZE={world} must be at least 1")
    rank = _env_int("RANK") if world > 1 else 0
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else (rank if world > 1 else 0)
    if not 0 <= rank < world:
        raise FtplmError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        if local_rank >= torch.cuda.device_count():
            raise FtplmError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s): lower --nproc_per_node"
            )
        device = f"cuda:{local_rank}"
    dev = pick_device(device)
    if backend == "nccl" and dev.type != "cuda":
        raise FtplmError("the NCCL backend needs CUDA GPUs; on CPU use --backend gloo (or auto)")
    if world == 1:
        return DistContext(device=dev, timeout=timeout)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise FtplmError(
            f"WORLD_SIZE={world} but no rendezvous endpoint ({' and '.join(missing)} unset): launch with torchrun "
            "(multi-node: --nnodes N --node_rank I --rdzv-endpoint HOST:PORT)"
        )
    chosen = backend if backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank, local_rank, world, chosen, dev, timeout)


def init_process_group(ctx: DistContext) -> DistContext:
    """Join the process group described by ctx (idempotent); a peer that never comes is an error after ctx.timeout."""
    if not ctx.distributed or dist.is_initialized():
        return ctx
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    endpoint = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(
            ctx.backend,
            rank=ctx.rank,
            world_size=ctx.world_size,
            timeout=datetime.timedelta(seconds=ctx.timeout),
            device_id=ctx.device if ctx.device.type == "cuda" else None,
        )
    except (RuntimeError, TimeoutError, ValueError, OSError) as e:  # DistStoreError is a RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FtplmError(
            f"rank {ctx.rank}/{ctx.world_size} could not join the process group at {endpoint} "
            f"within {ctx.timeout:g}s: {first}"
        ) from None
    return ctx


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------
# wrapping the model
# --------------------------------------------------------------------------------------------------------
class Parallel:
    """A model prepared for training on ctx: `forward` is what to call, `module` the plain model underneath.

    Under FSDP `module` is the same object as the sharded model (fully_shard works in place), so its forward
    needs every rank: evaluation and checkpoint gathering then run on all ranks (see `all_ranks_forward`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        ctx: DistContext,
        strategy: Strategy = "ddp",
        compile: bool = False,  # noqa: A002 - torch.compile's on/off, named as Trainer's
    ) -> None:
        if strategy not in ("ddp", "fsdp"):
            raise FtplmError(f"unknown strategy {strategy!r}; choose ddp or fsdp")
        self.module, self.ctx, self.strategy = model, ctx, strategy
        if strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # one FSDP unit per encoder block; the root unit holds the embeddings and FTP's small decoder, whose
            # cross-attention is also called outside Block.forward (memory_kv), where a per-block unit would not
            # have gathered its weights
            for block in model.trunk.h:  # type: ignore[union-attr]  # nn.Module attribute access is typed as Tensor | Module
                fully_shard(block)
            fully_shard(model)
            self.forward: torch.nn.Module = cast(torch.nn.Module, torch.compile(model)) if compile else model
        else:
            inner = (
                cast(torch.nn.Module, torch.compile(model)) if compile else model
            )  # nanoGPT order: compile, then DDP
            if ctx.distributed:
                from torch.nn.parallel import DistributedDataParallel as DDP

                device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
                inner = DDP(inner, device_ids=device_ids, forward_sync_buffers=False)  # our buffers are constants
            self.forward = inner

    @property
    def all_ranks_forward(self) -> bool:
        """True when a forward pass is a collective (FSDP): evaluation must then run on every rank."""
        return self.strategy == "fsdp" and self.ctx.distributed

    @contextlib.contextmanager
    def gradient_sync(self, sync: bool) -> Iterator[None]:
        """Reduce gradients across ranks only when `sync` (the last micro-batch of an optimizer step)."""
        if sync or not self.ctx.distributed:
            yield
        elif self.strategy == "fsdp":
            self.module.set_requires_gradient_sync(False)  # type: ignore[operator]  # FSDP2's method, added by fully_shard
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)  # type: ignore[operator]  # FSDP2's method, added by fully_shard
        else:
            with self.forward.no_sync():  # type: ignore[operator]  # DDP's method
                yield

    def full_state(self, optimizer: torch.optim.Optimizer) -> tuple[torch.nn.Module | None, Any]:
        """(model, optimizer) with full, unsharded tensors on rank 0 for the single-layout checkpoint; None elsewhere.

        Every rank must call this (FSDP gathers each sharded tensor with a collective, one at a time, to CPU).
        """
        if self.strategy != "fsdp" or not self.ctx.distributed:
            return (self.module, optimizer) if self.ctx.is_main else (None, None)
        from torch.distributed.tensor import DTensor

        def gather(value: Any) -> Any:
            if isinstance(value, DTensor):
                full = value.full_tensor()
                return full.cpu() if self.ctx.is_main else None
            return value

        model_sd = {name: gather(t) for name, t in self.module.state_dict().items()}
        optim_sd = optimizer.state_dict()  # keyed by parameter index, as the single-process checkpoint expects
        optim_sd = {
            "state": {i: {k: gather(v) for k, v in s.items()} for i, s in optim_sd["state"].items()},
            "param_groups": optim_sd["param_groups"],
        }
        if not self.ctx.is_main:
            return None, None
        plain = build_model(self.module.cfg)  # type: ignore[arg-type]  # nn.Module attribute access is typed as Tensor | Module
        plain.load_state_dict(model_sd)
        return plain, _FrozenOptimizer(optim_sd)

    def load_optimizer(
        self, optimizer: torch.optim.Optimizer, groups: list[dict], tensors: dict[str, torch.Tensor]
    ) -> None:
        """Restore a single-layout optimizer checkpoint into this (possibly sharded) optimizer."""

        if self.strategy != "fsdp" or not self.ctx.distributed:
            restore_optimizer(optimizer, groups, tensors)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = {p: n for n, p in self.module.named_parameters()}
        order = [names[p] for g in optimizer.param_groups for p in g["params"]]
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("state."):
                _, index, name = key.split(".", 2)
                state.setdefault(order[int(index)], {})[name] = value
        groups = [{**g, "params": [order[i] for i in g["params"]]} for g in groups]
        try:
            set_optimizer_state_dict(
                self.module,
                optimizer,
                {"state": state, "param_groups": groups},  # type: ignore[dict-item]  # torch's hint is narrower than what it loads
                options=StateDictOptions(full_state_dict=True),
            )
        except (ValueError, KeyError, RuntimeError) as e:
            raise FtplmError(f"optimizer state does not match the model: {str(e).splitlines()[0]}") from None


class _FrozenOptimizer:
    """Stands in for an optimizer whose full state was gathered: save_checkpoint only calls state_dict()."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device copy; on CUDA through pinned memory so the copy overlaps with compute (non_blocking)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def global_micro(ctx: DistContext, micro: int, grad_accum: int) -> int:
    """Index of this rank's micro-batch in the step's global batch of world_size * grad_accum micro-batches.

    Batches are drawn from key (seed, step, global index), so 2 ranks x accum A draw exactly the micro-batches of
    1 rank x accum 2A, and a run resumed on another world size continues with the same global batches.
    """
    return ctx.rank * grad_accum + micro


def split_accum(global_micro_batches: int, world_size: int) -> int:
    """Per-rank grad accumulation that keeps a run's global batch on a new world size (resume), or an error."""
    if global_micro_batches % world_size:
        raise FtplmError(
            f"the run's global batch of {global_micro_batches} micro-batches cannot be split evenly over {world_size} "
            f"processes: resume with a world size that divides {global_micro_batches}, or pass --grad-accum to change the batch"
        )
    return global_micro_batches // world_size

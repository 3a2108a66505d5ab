"""The training loop: a tiny step plus hooks (after detectron2 ``engine/train_loop.py`` and ``hooks.py``).

One step: ``losses = loss_fn(model, batch)`` (a dict of named scalar tensors), ``total = sum(w.get(k, 1) * v)``,
a NaN/Inf guard, backward (through a gradient scaler on CUDA with AMP), gradient-norm clipping, then an SGD
(momentum) step and a LambdaLR step (linear warm-up, then cosine or step decay). Checkpointing, logging,
evaluation and the progress bar are hooks. ``Trainer.train()`` resumes from ``out_dir/checkpoint.pt`` when it
exists; batches come from ``batches(start_iter)`` so a deterministic loader can restart exactly where it left.

Iterations are counted as completed steps: after the first step ``trainer.iter == 1``; the checkpoint and
every log line carry that count. Times are seconds.
"""

from __future__ import annotations

import bisect
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from mimicdet.data.errors import DataError
from mimicdet.data.paths import atomic_path
from mimicdet.detection.device import amp_enabled, select_device
from mimicdet.detection.run_folder import CHECKPOINT_NAME, EVAL_NAME, METRICS_NAME, TENSORBOARD_NAME

LossFn = Callable[[nn.Module, Any], dict[str, torch.Tensor]]
BatchSource = Callable[[int], Iterator[Any]]


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    schedule: str = "cosine"  # "cosine" | "step"
    steps: tuple[int, ...] = ()  # iterations where "step" multiplies the lr by gamma
    gamma: float = 0.1
    grad_clip: float = 10.0  # max global gradient L2 norm; 0 disables clipping

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_iters < 0 or not 0 < self.warmup_factor <= 1:
            raise ValueError(
                f"warmup_iters must be >= 0 and warmup_factor in (0, 1], got {self.warmup_iters}, {self.warmup_factor}"
            )
        if self.schedule not in ("cosine", "step"):
            raise ValueError(f"schedule must be 'cosine' or 'step', got {self.schedule!r}")
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        if list(self.steps) != sorted(self.steps) or any(s <= 0 for s in self.steps):
            raise ValueError(f"steps must be increasing positive iterations, got {self.steps}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["steps"] = list(self.steps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "OptimConfig":
        return cls(**{**d, "steps": tuple(d.get("steps", ()))})


@dataclass(frozen=True)
class TrainConfig:
    iters: int
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 8
    checkpoint_every: int = 500
    eval_every: int = 0  # 0: no periodic evaluation
    log_every: int = 20
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # used only on CUDA

    def __post_init__(self) -> None:
        if self.iters < 0:
            raise ValueError(f"iters must be >= 0, got {self.iters}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("checkpoint_every", "eval_every", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.optim.schedule == "step" and any(s >= self.iters for s in self.optim.steps):
            raise ValueError(f"lr steps {self.optim.steps} must lie below iters={self.iters}")

    def to_dict(self) -> dict:
        return {**asdict(self), "optim": self.optim.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**{**d, "optim": OptimConfig.from_dict(d.get("optim", {}))})


def lr_factor(optim: OptimConfig, iters: int) -> Callable[[int], float]:
    """Multiplier of the base lr after ``i`` completed steps: linear warm-up times cosine or step decay.

    Returned as a plain function so LambdaLR's state_dict holds no Python objects (weights_only loading).
    """

    def factor(i: int) -> float:
        if optim.schedule == "cosine":
            main = 0.5 * (1.0 + math.cos(math.pi * min(i, iters) / max(iters, 1)))
        else:
            main = optim.gamma ** bisect.bisect_right(optim.steps, i)
        if i < optim.warmup_iters:
            alpha = i / optim.warmup_iters
            main *= optim.warmup_factor * (1.0 - alpha) + alpha
        return main

    return factor


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.SGD:
    """SGD with momentum; no weight decay on 1-D parameters (norm scales/shifts and biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=optim.lr, momentum=optim.momentum)


# ------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic write: a temporary file in the same folder, fsync, then ``os.replace`` over ``path``.

    A crash at any point leaves either the previous checkpoint or the new one, never a torn file.
    """
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: Path) -> dict:
    """Loads a checkpoint written by :func:`save_checkpoint` (plain tensors and JSON types only)."""
    from mimicdet.detection.checkpoints import load_weights_only

    return load_weights_only(path, what="training checkpoint", hint="remove it, or use --overwrite to start the run again")


def _rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    pos, has_gauss, gauss_value = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss_value))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _check_json(meta: dict) -> dict:
    try:
        return json.loads(json.dumps(meta))
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must hold plain JSON types (str, int, float, bool, None, list, dict): {e}") from None


def _truncate_jsonl(path: Path, keep_through: int) -> None:
    """Drops log lines past ``keep_through`` iterations: they came after the checkpoint we resume from."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("iteration", 0) <= keep_through]
    if len(kept) != len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in kept))


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------------ hooks


class Hook:
    """Called around training. ``trainer.iter`` counts completed steps; ``trainer.storage`` holds the last step."""

    def before_train(self, trainer: "Trainer") -> None:
        pass

    def after_step(self, trainer: "Trainer") -> None:
        pass

    def after_train(self, trainer: "Trainer") -> None:
        pass


def _due(trainer: "Trainer", every: int) -> bool:
    return every > 0 and (trainer.iter % every == 0 or trainer.iter == trainer.config.iters)


class CheckpointHook(Hook):
    """Writes the resumable ``out_dir/checkpoint.pt`` every ``every`` iterations and at the last one."""

    def __init__(self, every: int) -> None:
        self.every = every

    def after_step(self, trainer: "Trainer") -> None:
        # Only after complete steps: a step that raised (e.g. the NaN guard) must not overwrite a good checkpoint.
        if trainer.iter == trainer.config.iters or (self.every > 0 and trainer.iter % self.every == 0):
            trainer.save()


class MetricsLogHook(Hook):
    """Appends window means to ``out_dir/metrics.jsonl`` every ``every`` iterations: each loss, total, lr,
    seconds/iter, data seconds/iter; mirrors them to TensorBoard when it is installed."""

    def __init__(self, every: int = 20, *, tensorboard: bool = True) -> None:
        self.every = max(1, every)
        self.tensorboard = tensorboard
        self._writer = None
        self._window: list[dict] = []

    def before_train(self, trainer: "Trainer") -> None:
        self._window = []
        self.path = trainer.out_dir / METRICS_NAME
        _truncate_jsonl(self.path, trainer.start_iter)
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import (
                    SummaryWriter,  # needs the optional tensorboard package
                )
            except ImportError:
                self._writer = None
            else:
                self._writer = SummaryWriter(log_dir=str(trainer.out_dir / TENSORBOARD_NAME), purge_step=trainer.start_iter + 1)

    def after_step(self, trainer: "Trainer") -> None:
        self._window.append(trainer.storage)
        if not (trainer.iter % self.every == 0 or trainer.iter == trainer.config.iters):
            return
        n = len(self._window)
        row: dict[str, Any] = {"iteration": trainer.iter}
        for k in trainer.storage["losses"]:
            row[k] = sum(s["losses"][k] for s in self._window) / n
        row["total_loss"] = sum(s["total_loss"] for s in self._window) / n
        row["lr"] = trainer.storage["lr"]
        row["s_per_iter"] = sum(s["data_time"] + s["step_time"] for s in self._window) / n
        row["data_time"] = sum(s["data_time"] for s in self._window) / n
        row["grad_norm"] = sum(s["grad_norm"] for s in self._window) / n
        self._window = []
        _append_jsonl(self.path, row)
        if self._writer is not None:
            for k, v in row.items():
                if k != "iteration":
                    self._writer.add_scalar(f"train/{k}", v, trainer.iter)

    def after_train(self, trainer: "Trainer") -> None:
        if self._writer is not None:
            self._writer.close()


class EvalHook(Hook):
    """Calls ``fn(model, iteration) -> dict`` every ``every`` iterations and at the last one, in eval mode and
    without gradients; appends ``{"iteration", **result}`` to ``out_dir/eval.jsonl``. The RNG state is forked
    so evaluation never changes the training trajectory (resume stays exact)."""

    def __init__(self, every: int, fn: Callable[[nn.Module, int], dict]) -> None:
        self.every = every
        self.fn = fn
        self.results: list[dict] = []

    def before_train(self, trainer: "Trainer") -> None:
        self.path = trainer.out_dir / EVAL_NAME
        _truncate_jsonl(self.path, trainer.start_iter)

    def after_step(self, trainer: "Trainer") -> None:
        if _due(trainer, self.every):
            self.run(trainer)

    def run(self, trainer: "Trainer") -> dict:
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        was_training = trainer.model.training
        trainer.model.eval()
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            result = self.fn(trainer.model, trainer.iter)
        trainer.model.train(was_training)
        row = {"iteration": trainer.iter, **_check_json(result)}
        _append_jsonl(self.path, row)
        self.results.append(row)
        return row


class ProgressBarHook(Hook):
    """A progress bar with the running loss and it/s (periodic lines when output is not a terminal);
    ``enabled=False`` hides it."""

    def __init__(self, *, enabled: bool | None = None, desc: str = "train") -> None:
        self.enabled = enabled
        self.desc = desc
        self._bar = None

    def before_train(self, trainer: "Trainer") -> None:
        from mimicdet.data.progress import progress_bar

        self._bar = progress_bar(
            total=trainer.config.iters,
            initial=trainer.start_iter,
            desc=self.desc,
            unit="it",
            disable=self.enabled is False,
        )

    def after_step(self, trainer: "Trainer") -> None:
        self._bar.update(1)
        s = trainer.storage
        self._bar.set_postfix(loss=f"{s['total_loss']:.3f}", lr=f"{s['lr']:.2g}", data=f"{s['data_time']:.2f}s", refresh=False)

    def after_train(self, trainer: "Trainer") -> None:
        if self._bar is not None:
            self._bar.close()


# ---------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Runs ``config.iters`` steps of ``loss_fn`` over ``batches`` on ``model`` (all its parameters train).

    ``loss_fn(model, batch)`` moves the batch to the model's device itself (it knows the batch's structure).
    ``meta`` (plain JSON types) is stored in every checkpoint, for whoever reads it later.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        config: TrainConfig,
        loss_fn: LossFn,
        batches: BatchSource,
        out_dir: Path,
        hooks: Sequence[Hook] = (),
        loss_weights: dict[str, float] | None = None,
        meta: dict | None = None,
    ) -> None:
        self.config = config
        self.device = select_device(config.device)
        self.amp = amp_enabled(self.device, config.amp)
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        self.batches = batches
        self.out_dir = Path(out_dir)
        self.hooks = list(hooks)
        self.loss_weights = dict(loss_weights or {})
        self.meta = _check_json(meta or {})
        self.optimizer = build_optimizer(model, config.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(config.optim, config.iters))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.iter = 0
        self.start_iter = 0
        self.storage: dict[str, Any] = {}
        self.data_time_total = 0.0  # seconds spent waiting for batches in this call of train()
        self.step_time_total = 0.0  # seconds spent computing steps in this call of train()

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    # -- state

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iter,
            "rng": _rng_state(),
            "config": self.config.to_dict(),
            "meta": self.meta,
        }

    def save(self) -> None:
        save_checkpoint(self.checkpoint_path, self.state_dict())

    def resume(self) -> int:
        """Loads ``out_dir/checkpoint.pt`` when present; returns the iteration to start from."""
        if not self.checkpoint_path.exists():
            return 0
        ckpt = load_checkpoint(self.checkpoint_path)
        try:
            return self._restore(ckpt)
        except (KeyError, TypeError, RuntimeError, AttributeError) as e:  # readable, but not this run's state
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(
                f"{self.checkpoint_path}: not a readable training checkpoint for this run ({type(e).__name__}: "
                f"{first}); remove it, or use --overwrite to start the run again"
            ) from None

    def _restore(self, ckpt: dict) -> int:
        # The trajectory depends on these; device, AMP and hook intervals may change between calls.
        old, new = ckpt.get("config", {}), self.config.to_dict()
        changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in ("iters", "batch_size", "seed", "optim")
                   if k in old and old[k] != new[k]]
        if changed:
            raise ValueError(f"{self.checkpoint_path} was written by a run with other settings ({'; '.join(changed)})")
        done = int(ckpt["iteration"])
        if done > self.config.iters:
            raise ValueError(
                f"{self.checkpoint_path}: checkpoint is at iteration {done}, past iters={self.config.iters}"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        return done

    # -- loop

    def train(self) -> dict:
        """Trains from the last checkpoint (or from scratch); returns a summary of this call."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.start_iter = self.iter = self.resume()
        self.model.train()
        for h in self.hooks:
            h.before_train(self)
        try:
            if self.iter < self.config.iters:
                # Building a loader draws from the global RNG (DataLoader's base seed); fork so that a fresh and
                # a resumed run see the same training RNG stream.
                devices = [self.device] if self.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    batches = self.batches(self.start_iter)
                while self.iter < self.config.iters:
                    t0 = time.perf_counter()
                    batch = next(batches)
                    t1 = time.perf_counter()
                    self.run_step(batch)
                    t2 = time.perf_counter()
                    self.storage["data_time"], self.storage["step_time"] = t1 - t0, t2 - t1
                    self.data_time_total += t1 - t0
                    self.step_time_total += t2 - t1
                    for h in self.hooks:
                        h.after_step(self)
        finally:
            # after_train runs on failure too, so bars and writers close; hooks write nothing final then.
            for h in self.hooks:
                h.after_train(self)
        steps = self.iter - self.start_iter
        busy = self.data_time_total + self.step_time_total
        return {
            "start_iteration": self.start_iter,
            "iteration": self.iter,
            "steps": steps,
            "data_time_s": self.data_time_total,
            "step_time_s": self.step_time_total,
            "s_per_iter": busy / steps if steps else float("nan"),
            "data_fraction": self.data_time_total / busy if busy > 0 else float("nan"),
            "losses": dict(self.storage.get("losses", {})),
        }

    def run_step(self, batch: Any) -> None:
        with torch.autocast(self.device.type, enabled=self.amp):
            losses = self.loss_fn(self.model, batch)
        if not losses:
            raise ValueError("loss_fn returned no losses")
        weighted = {k: v.float() * self.loss_weights.get(k, 1.0) for k, v in losses.items()}
        total = sum(weighted.values())
        # One host sync per step: the values are needed for the NaN guard and the logs anyway.
        values = torch.stack([total.detach()] + [v.detach().float() for v in losses.values()]).tolist()
        loss_dict = dict(zip(losses, values[1:]))
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"loss became non-finite at iteration {self.iter + 1}: {loss_dict}")

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.config.optim.grad_clip if self.config.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so step_time measures compute, not queued kernels
        self.iter += 1
        self.storage = {"losses": loss_dict, "total_loss": values[0], "lr": lr, "grad_norm": float(grad_norm)}


def default_hooks(
    config: TrainConfig, *, eval_fn: Callable[[nn.Module, int], dict] | None = None, progress: bool | None = None
) -> list[Hook]:
    """Metrics log, optional periodic evaluation, checkpoint, progress bar: the usual set. The checkpoint comes
    after the logs so every log line up to a checkpoint's iteration exists once that checkpoint does."""
    hooks: list[Hook] = [MetricsLogHook(config.log_every)]
    if eval_fn is not None and config.eval_every > 0:
        hooks.append(EvalHook(config.eval_every, eval_fn))
    return [*hooks, CheckpointHook(config.checkpoint_every), ProgressBarHook(enabled=progress)]

"""Trainer: exact resume, NaN guard, atomic checkpoints, lr schedule, loss weights, clipping, logs."""

from __future__ import annotations

import itertools
import json
import math
import os

import pytest
import torch
from torch import nn

from mimicdet.detection.trainer import (
    CheckpointHook,
    EvalHook,
    Hook,
    MetricsLogHook,
    OptimConfig,
    TrainConfig,
    Trainer,
    load_checkpoint,
    lr_factor,
    save_checkpoint,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    # BatchNorm (running stats in the checkpoint) and Dropout (consumes the torch RNG) make resume non-trivial.
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )


class Items(torch.utils.data.Dataset):
    """Item k depends only on k."""

    def __len__(self) -> int:
        return 10**6

    def __getitem__(self, k: int):
        g = torch.Generator().manual_seed(1000 + k)
        return torch.randn(3, 8, 8, generator=g), torch.randn(2, generator=g)


def batches(start: int):
    """A real DataLoader whose batch i depends only on i, like the IterationSampler (creating its iterator
    draws from the global RNG, which resume must not notice)."""
    sampler = ([4 * i + k for k in range(4)] for i in itertools.count(start))
    return iter(torch.utils.data.DataLoader(Items(), batch_sampler=sampler))


def loss_fn(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    x, y = batch
    out = model(x)
    return {"loss_a": ((out - y) ** 2).mean(), "loss_b": out.abs().mean()}


class Record(Hook):
    def __init__(self):
        self.rows = []

    def after_step(self, trainer):
        self.rows.append((trainer.iter, trainer.storage["total_loss"], trainer.storage["lr"]))


class Crash(Hook):
    def __init__(self, at: int):
        self.at = at

    def after_step(self, trainer):
        if trainer.iter == self.at:
            raise KeyboardInterrupt


def config(iters=8, **kw) -> TrainConfig:
    optim = OptimConfig(lr=0.05, warmup_iters=3, grad_clip=5.0)
    return TrainConfig(iters=iters, optim=optim, batch_size=4, checkpoint_every=kw.pop("checkpoint_every", 4),
                       log_every=1, device="cpu", **kw)


def make(out_dir, hooks, iters=8, **kw):
    return Trainer(model=tiny_model(), config=config(iters, **kw), loss_fn=loss_fn, batches=batches,
                   out_dir=out_dir, hooks=hooks, meta={"name": "tiny", "classes": ["a"]})


def test_resume_gives_identical_weights_and_losses(tmp_path):
    torch.manual_seed(123)
    full_rec = Record()
    full = make(tmp_path / "full", [CheckpointHook(4), full_rec])
    full.train()

    torch.manual_seed(123)
    part_rec = Record()
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "part", [CheckpointHook(4), part_rec, Crash(5)]).train()
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["iteration"] == 4

    torch.manual_seed(999)  # a different global RNG state: the checkpoint must restore it
    resumed_rec = Record()
    resumed = make(tmp_path / "part", [CheckpointHook(4), resumed_rec])
    summary = resumed.train()
    assert summary["start_iteration"] == 4 and summary["iteration"] == 8 and summary["steps"] == 4

    assert [r[0] for r in resumed_rec.rows] == [5, 6, 7, 8]
    assert resumed_rec.rows == full_rec.rows[4:]  # same next-step losses and lrs, bit for bit
    assert part_rec.rows[:4] == full_rec.rows[:4]
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k

    # Running the finished job again trains nothing and leaves the weights alone.
    again = make(tmp_path / "part", [CheckpointHook(4)])
    assert again.train()["steps"] == 0
    for (k, a), (_, b) in zip(full.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_loads_with_weights_only_and_keeps_meta(tmp_path):
    make(tmp_path, [CheckpointHook(0)], iters=2).train()  # every=0: only the final checkpoint
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == 2
    assert ckpt["meta"] == {"name": "tiny", "classes": ["a"]}
    assert ckpt["config"]["iters"] == 2 and ckpt["config"]["optim"]["lr"] == 0.05
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "rng"}


def test_meta_must_be_plain_json(tmp_path):
    with pytest.raises(ValueError, match="meta must hold plain JSON"):
        Trainer(model=tiny_model(), config=config(), loss_fn=loss_fn, batches=batches, out_dir=tmp_path,
                meta={"path": tmp_path})


def test_nan_guard_names_iteration_and_losses_and_keeps_last_checkpoint(tmp_path):
    def nan_at_3(model, batch):
        losses = loss_fn(model, batch)
        calls.append(1)
        if len(calls) == 3:
            losses["loss_b"] = losses["loss_b"] * float("nan")
        return losses

    calls: list[int] = []
    t = Trainer(model=tiny_model(), config=config(iters=6, checkpoint_every=2), loss_fn=nan_at_3, batches=batches,
                out_dir=tmp_path, hooks=[CheckpointHook(2)])
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"loss became non-finite at iteration 3: .*'loss_b': nan"):
        t.train()
    assert t.iter == 2
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 2
    # The bad step did not touch the weights (its forward did update BatchNorm running stats, as any forward does).
    saved = load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    for k, v in t.model.named_parameters():
        assert torch.equal(v, saved[k]), k
    assert any(not torch.equal(before[k], saved[k]) for k in before)


def test_inf_loss_is_caught_too(tmp_path):
    def inf_loss(model, batch):
        return {"loss": loss_fn(model, batch)["loss_a"] + float("inf")}

    t = Trainer(model=tiny_model(), config=config(iters=2), loss_fn=inf_loss, batches=batches, out_dir=tmp_path)
    with pytest.raises(FloatingPointError, match="iteration 1"):
        t.train()


def test_crash_during_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"iteration": 1, "w": torch.ones(3)})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"iteration": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    ckpt = load_checkpoint(path)
    assert ckpt["iteration"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file left behind


def test_crash_while_writing_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"iteration": 1})
    real_save = torch.save

    def torn_save(obj, f):
        real_save(obj, f)
        f.truncate(10)  # half a file, then the process "dies"
        raise RuntimeError("killed")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint(path, {"iteration": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_lr_schedule_known_values():
    f = lr_factor(OptimConfig(warmup_iters=10, warmup_factor=0.1, schedule="cosine"), iters=100)
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx((0.1 * 0.5 + 0.5) * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert f(50) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0)
    g = lr_factor(OptimConfig(warmup_iters=0, schedule="step", steps=(3, 6), gamma=0.5), iters=10)
    assert [g(i) for i in (0, 2, 3, 5, 6, 9)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_lr_logged_follows_schedule(tmp_path):
    rec = Record()
    make(tmp_path, [rec], iters=8).train()
    f = lr_factor(config(8).optim, 8)
    assert [r[2] for r in rec.rows] == pytest.approx([0.05 * f(i) for i in range(8)])


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(schedule="poly")
    with pytest.raises(ValueError, match="steps"):
        OptimConfig(schedule="step", steps=(5, 3))
    with pytest.raises(ValueError, match="below iters"):
        TrainConfig(iters=4, optim=OptimConfig(schedule="step", steps=(4,)))
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(iters=4, batch_size=0)
    assert TrainConfig.from_dict(config().to_dict()) == config()


class Linear1(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[1.0, 2.0]]))


def one_step_linear(tmp_path, *, grad_clip, weights=None):
    """loss_a = w·[3, 4] (gradient [3, 4], norm 5) and loss_b = 2·sum(w) (gradient [2, 2])."""
    model = Linear1()
    cfg = TrainConfig(iters=1, optim=OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.0, warmup_iters=0,
                                                 schedule="step", grad_clip=grad_clip), device="cpu")

    def lf(m, batch):
        return {"loss_a": (m.w * torch.tensor([3.0, 4.0])).sum(), "loss_b": 2 * m.w.sum()}

    rec = Record()
    t = Trainer(model=model, config=cfg, loss_fn=lf, batches=batches, out_dir=tmp_path, hooks=[rec],
                loss_weights=weights)
    t.train()
    return model.w.detach()[0].tolist(), t.storage


def test_loss_weights_scale_gradients_and_total(tmp_path):
    w, storage = one_step_linear(tmp_path, grad_clip=0.0, weights={"loss_b": 0.0})
    assert w == pytest.approx([1 - 0.1 * 3, 2 - 0.1 * 4])
    assert storage["total_loss"] == pytest.approx(11.0)  # 1*3 + 2*4 (+ 0 * 6)
    assert storage["losses"] == pytest.approx({"loss_a": 11.0, "loss_b": 6.0})  # raw, unweighted values


def test_gradient_clipping_rescales_to_max_norm(tmp_path):
    w, storage = one_step_linear(tmp_path, grad_clip=1.0, weights={"loss_b": 0.0})
    assert storage["grad_norm"] == pytest.approx(5.0)
    assert w == pytest.approx([1 - 0.1 * 3 / 5, 2 - 0.1 * 4 / 5])


def test_metrics_and_eval_logs(tmp_path):
    seen = []

    def eval_fn(model, iteration):
        assert not model.training and not torch.is_grad_enabled()
        torch.rand(100)  # eval may use the RNG: training must not notice
        seen.append(iteration)
        return {"score": iteration / 10}

    rec_eval, rec_plain = Record(), Record()
    t = make(tmp_path / "a", [MetricsLogHook(3, tensorboard=False), EvalHook(4, eval_fn), rec_eval], iters=8)
    t.train()
    make(tmp_path / "b", [rec_plain], iters=8).train()
    assert rec_eval.rows == rec_plain.rows  # evaluation did not change the trajectory
    assert seen == [4, 8]

    rows = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [3, 6, 8]
    for r in rows:
        assert set(r) >= {"loss_a", "loss_b", "total_loss", "lr", "s_per_iter", "data_time", "grad_norm"}
        assert 0 <= r["data_time"] <= r["s_per_iter"]
    # Window mean of total loss over iterations 1..3.
    assert rows[0]["total_loss"] == pytest.approx(sum(r[1] for r in rec_eval.rows[:3]) / 3)
    evals = [json.loads(ln) for ln in (tmp_path / "a" / "eval.jsonl").read_text().splitlines()]
    assert evals == [{"iteration": 4, "score": 0.4}, {"iteration": 8, "score": 0.8}]


def test_resume_drops_log_lines_written_after_the_checkpoint(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path, [CheckpointHook(4), MetricsLogHook(1, tensorboard=False), Crash(6)]).train()
    its = [json.loads(ln)["iteration"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert its == [1, 2, 3, 4, 5, 6]
    make(tmp_path, [CheckpointHook(4), MetricsLogHook(1, tensorboard=False)]).train()
    its = [json.loads(ln)["iteration"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert its == [1, 2, 3, 4, 5, 6, 7, 8]


def test_timing_split_into_data_and_compute(tmp_path):
    import time

    def slow_batches(start):
        for b in batches(start):
            time.sleep(0.02)
            yield b

    t = Trainer(model=tiny_model(), config=config(iters=3), loss_fn=loss_fn, batches=slow_batches, out_dir=tmp_path)
    s = t.train()
    assert s["data_time_s"] >= 3 * 0.02
    assert s["step_time_s"] > 0
    assert 0 < s["data_fraction"] < 1
    assert s["s_per_iter"] == pytest.approx((s["data_time_s"] + s["step_time_s"]) / 3)


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    make(tmp_path, [CheckpointHook(2)], iters=2).train()
    with pytest.raises(ValueError, match=r"other settings \(iters: 2 -> 4\)"):
        make(tmp_path, [CheckpointHook(2)], iters=4).train()

"""Pretraining: learns, resumes exactly, reports bits per byte, refuses bad configs."""

from __future__ import annotations

import json
import math

import pytest

from chatforge.train import common as C
from chatforge.train.pretrain import PretrainConfig, main


def cfg(shards, out, **kw):
    base = dict(
        data=str(shards), out=str(out), preset="cpu-tiny", seq_len=32, micro_batch=4, max_steps=30, lr=3e-3,
        warmup_steps=3, eval_every=10, save_every=10, log_every=1, eval_tokens=512, dtype="fp32", device="cpu", peak_flops=1e11,
    )
    base.update(kw)
    return PretrainConfig(**base)


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_loss_decreases(shards_dir, tmp_path):
    """Guards a training loop that does not learn (wrong targets, lr schedule, zeroed grads)."""
    main(cfg(shards_dir, tmp_path / "run", max_steps=60))
    ls = losses(tmp_path / "run")
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 1.0
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["stage"] == "pretrain" and meta["step"] == 60 and meta["metrics"]["val_loss"] < ls[0]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_resume_after_kill(shards_dir, tmp_path, monkeypatch):
    """Guards exact resume after a crash: kill the run right after the step-10 checkpoint, resume, compare."""
    ref = tmp_path / "ref"
    main(cfg(shards_dir, ref))
    run = tmp_path / "run"
    calls = {"n": 0}
    real_step = C.train_step

    def dying_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 13:  # steps 11..13 run after the save at step 10, then the process "dies"
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(C, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        main(cfg(shards_dir, run))
    monkeypatch.setattr(C, "train_step", real_step)
    main(cfg(shards_dir, run, resume=True))
    assert losses(run) == losses(ref)
    assert json.loads((run / "meta.json").read_text())["metrics"] == json.loads((ref / "meta.json").read_text())["metrics"]


def test_resume_incompatible(shards_dir, tmp_path):
    main(cfg(shards_dir, tmp_path / "r", max_steps=2, eval_every=1, save_every=1))
    with pytest.raises(ValueError, match="d_model"):
        main(cfg(shards_dir, tmp_path / "r", d_model=128, resume=True))


def test_bits_per_byte_by_hand():
    """val_bpb = loss / ln 2 / (bytes per token): 2 nats/token at 4 bytes/token is 0.7213 bits/byte."""
    loss, bpt = 2.0, 4.0
    assert math.isclose(loss / math.log(2) / bpt, 0.72135, rel_tol=1e-4)


def test_bad_configs(shards_dir, tmp_path):
    with pytest.raises(ValueError, match="data is required"):
        PretrainConfig()
    with pytest.raises(ValueError, match="preset"):
        cfg(shards_dir, tmp_path, preset="huge")
    with pytest.raises(ValueError, match="longer than"):
        main(cfg(shards_dir, tmp_path / "x", seq_len=4096))
    with pytest.raises(ValueError, match="dtype"):
        cfg(shards_dir, tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="no meta.json"):
        main(cfg(tmp_path, tmp_path / "y"))


def test_schedule_and_accum():
    assert C.lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert C.lr_at(10, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert C.lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert C.grad_accum_steps(4096, 4, 256, 2) == 2
    with pytest.raises(ValueError, match="multiple"):
        C.grad_accum_steps(5000, 4, 256, 2)

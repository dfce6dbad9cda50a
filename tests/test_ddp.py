"""Data parallel: 2 CPU processes (torchrun, gloo) train the same model as 1 process with the same global batch."""

from __future__ import annotations

import json

import pytest

from conftest import assert_close_weights, run_chatforge

ARGS = "--preset cpu-tiny --seq-len 32 --micro-batch 4 --max-steps 8 --lr 3e-3 --warmup-steps 2 --eval-every 4 --save-every 8 --log-every 1 --eval-tokens 512 --dtype fp32 --device cpu --peak-flops 1e11".split()


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_two_processes_match_one(shards_dir, tmp_path):
    """Guards DDP changing the math: gradient normalisation across ranks, per-rank data slices, no_sync."""
    for name, nproc in (("one", 1), ("two", 2)):
        r = run_chatforge(["pretrain", "--data", str(shards_dir), "--out", str(tmp_path / name), "--total-batch-tokens", "256", *ARGS], nproc=nproc)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 8
    assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    assert_close_weights(tmp_path / "one", tmp_path / "two")

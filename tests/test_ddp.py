"""Data parallel: 2 CPU processes (torchrun, gloo) train the same model as 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import assert_close_weights


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ARGS = "--preset cpu-tiny --seq-len 32 --micro-batch 4 --max-steps 8 --lr 3e-3 --warmup-steps 2 --eval-every 4 --save-every 8 --log-every 1 --eval-tokens 512 --dtype fp32 --device cpu --peak-flops 1e11".split()


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_two_processes_match_one(shards_dir, tmp_path):
    """Guards DDP changing the math: gradient normalisation across ranks, per-rank data slices, no_sync."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "chatforge", "pretrain", "--data", str(shards_dir), "--out", str(tmp_path / "one"), "--total-batch-tokens", "256", *ARGS],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}", "--master_addr=127.0.0.1",
         "-m", "chatforge", "pretrain", "--data", str(shards_dir), "--out", str(tmp_path / "two"), "--total-batch-tokens", "256", *ARGS],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 8
    assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    assert_close_weights(tmp_path / "one", tmp_path / "two")

"""FSDP2: 2 CPU processes (torchrun, gloo) with the model, gradients and AdamW state sharded train
the same model as 1 process with gradient accumulation, save a consolidated ordinary checkpoint,
and resume from the sharded optimizer state exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from chatforge import checkpoint

from test_ddp import ARGS, _free_port, _losses


def _run(args: list[str], nproc: int = 1) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "chatforge"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}", "--master_addr=127.0.0.1",
        "-m", "chatforge"]
    r = subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes_exactly(shards_dir, tmp_path):
    """Guards FSDP changing the math (per-rank data slices, gradient reduce-scatter and its
    scaling, clipping over sharded gradients, AdamW on shards) and its checkpoints: the
    consolidated folder is an ordinary checkpoint, and a run stopped after step 1 resumes from
    the sharded optimizer state (torch.distributed.checkpoint) to the same losses and weights."""
    common = ["pretrain", "--data", str(shards_dir), "--total-batch-tokens", "256", *ARGS]
    _run([*common, "--out", str(tmp_path / "one")])
    _run([*common, "--out", str(tmp_path / "two"), "--fsdp", "on"], nproc=2)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 8
    assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    wa, wb = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    ck = checkpoint.load(tmp_path / "two")  # what chat / serve / export read
    assert ck.meta["step"] == 8 and (tmp_path / "two" / checkpoint.SHARDED_OPTIMIZER / ".metadata").is_file()
    assert "optimizer" not in checkpoint.load_train_state(tmp_path / "two")

    stop = tmp_path / "stopped"
    _run([*common, "--out", str(stop), "--fsdp", "on", "--time-budget-s", "1e-6"], nproc=2)
    assert json.loads((stop / "meta.json").read_text())["step"] == 1
    _run([*common, "--out", str(stop), "--fsdp", "on", "--resume"], nproc=2)
    assert _losses(stop) == _losses(tmp_path / "two")
    ws = load_file(str(stop / "model.safetensors"))
    for k in wb:
        assert torch.equal(ws[k], wb[k]), k


def test_fsdp_needs_processes(shards_dir, tmp_path):
    """Guards --fsdp on in a single process silently training unsharded."""
    from chatforge.train.pretrain import PretrainConfig, main

    with pytest.raises(ValueError, match="torchrun"):
        main(PretrainConfig(data=str(shards_dir), out=str(tmp_path / "x"), preset="cpu-tiny", seq_len=32, micro_batch=4, max_steps=1,
                            device="cpu", dtype="fp32", fsdp="on", peak_flops=1e11))
    with pytest.raises(ValueError, match="fsdp"):
        PretrainConfig(data=str(shards_dir), fsdp="yes")

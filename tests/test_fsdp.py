"""FSDP2: 2 CPU processes (torchrun, gloo) with the model, gradients and AdamW state sharded train
the same model as 1 process with gradient accumulation, save a consolidated ordinary checkpoint,
and resume from the sharded optimizer state exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from chatforge import checkpoint
from chatforge.model import GPT, preset
from chatforge.sample import sample_tokens

from conftest import run_chatforge
from test_ddp import ARGS, _losses


def _run(args: list[str], nproc: int = 1, timeout: float = 300) -> str:
    """Run `chatforge ARGS` (conftest.run_chatforge), which must succeed; its stderr."""
    r = run_chatforge(args, nproc, timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


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


def _val_losses(out):
    return [(r["step"], r["val_loss"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "val_loss" in r]


@pytest.mark.slow
def test_fsdp_uneven_validation_share(shards_dir, tmp_path):
    """Guards evaluation under FSDP when the validation windows split unevenly: 9 windows in
    batches of 4 are 2 batches on rank 0 and 1 on rank 1, and every evaluation forward is a
    collective, so rank 1 runs a stand-in batch that counts nothing (data/loader.rank_batches)
    instead of leaving rank 0 waiting (a hang, here a failure after the timeout). The validation
    loss is 1 process's over the same windows; samples run on both ranks in lockstep."""
    common = ["pretrain", "--data", str(shards_dir), "--total-batch-tokens", "256", *ARGS,
              "--max-steps", "2", "--eval-every", "1", "--save-every", "2", "--eval-tokens", str(9 * 32)]
    _run([*common, "--out", str(tmp_path / "one")])
    err = _run([*common, "--out", str(tmp_path / "two"), "--fsdp", "on"], nproc=2, timeout=120)
    a, b = _val_losses(tmp_path / "one"), _val_losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2]
    assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-5, abs=1e-6)
    assert "sample |" in err


def test_lockstep_sampling_runs_every_forward(tok):
    """Guards samples from a sharded model hanging: with lockstep=True the sampler runs all
    max_new_tokens forwards even after a stop token (processes that disagreed on when a sample
    stops would otherwise run different numbers of all-gathers), and returns the same tokens."""
    model = GPT(preset("cpu-tiny", vocab_size=512))
    model.init_weights(0)
    prompt = tok.encode("The quick brown fox")
    free = sample_tokens(model, prompt, 12, temperature=0.0)
    stop = free[3]  # greedy decoding reaches it at the latest by the 4th token
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    early = sample_tokens(model, prompt, 12, temperature=0.0, stop_ids=(stop,))
    n_early = len(calls)
    assert sample_tokens(model, prompt, 12, temperature=0.0, stop_ids=(stop,), lockstep=True) == early == free[: free.index(stop)]
    assert n_early <= 4 and len(calls) - n_early == 12

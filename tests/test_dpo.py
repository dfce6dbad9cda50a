"""DPO: the loss against hand-computed values, and a tiny policy that learns a preference."""

from __future__ import annotations

import json
import math

import pytest
import torch

from chatforge import checkpoint as ckpt_io
from chatforge.data.rankings import read_rankings
from chatforge.train import rl_math as R
from chatforge.train.dpo import DPOConfig, collate, main, pairs_loss, sequence_logprobs
from chatforge.train.rankings import tokenize_rankings


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from a second thread; on a loaded machine it halves their speed.
    torch.set_num_threads(1)
    yield


def test_dpo_loss_by_hand():
    """Guards the DPO loss: log pi (w, l) = (-10, -12), log ref = (-11, -11), beta 0.1: implicit
    rewards (+0.1, -0.1), loss = -log sigmoid(0.2) = 0.5981389; with 10% label smoothing
    0.9 * 0.5981389 + 0.1 * 0.7981389 = 0.6181389."""
    args = (torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]))
    loss, rw, rl = R.dpo_loss(*args, beta=0.1)
    assert loss.item() == pytest.approx(0.59813887, abs=1e-6)
    assert rw.item() == pytest.approx(0.1) and rl.item() == pytest.approx(-0.1)
    loss, _, _ = R.dpo_loss(*args, beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.61813887, abs=1e-6)
    # At the start the policy is the reference: every pair costs ln 2.
    loss, _, _ = R.dpo_loss(*args[2:], *args[2:], beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))


def test_pairs_loss_is_per_ranking_mean():
    """Guards the ranking weighting in DPO: a 3-way ranking is one element, the mean of its 3 pairs."""
    logp = torch.tensor([-1.0, -2.0, -3.0])
    ref = torch.zeros(3)
    total, st = pairs_loss(logp, ref, [[0, 1, 2]], beta=1.0, smoothing=0.0)
    sp = lambda d: math.log1p(math.exp(-d))  # noqa: E731 - -log sigmoid(d)
    assert total.item() == pytest.approx((sp(1) + sp(2) + sp(1)) / 3, abs=1e-6)
    assert st["correct"] == 3 and st["pairs"] == 3


def test_sequence_logprobs_cover_only_the_answer(tok, tmp_path):
    """Guards the answer mask: the sequence log-prob sums exactly the answer tokens (and the
    end-of-turn token), not the prompt."""
    from chatforge.model import GPT, preset

    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"prompt": "hello there", "chosen": "fine thanks", "rejected": "no"}) + "\n")
    data = tokenize_rankings(read_rankings([f]), tok, 64)
    ids, mask, groups = collate(data, [0])
    model = GPT(preset("cpu-tiny", vocab_size=512))
    model.init_weights(0)
    with torch.no_grad():
        lp = sequence_logprobs(model, ids, mask)
        full = torch.log_softmax(model(ids[:1]).float(), -1)[0]
    start, seq = data.prompt_lens[0][0], data.seqs[0][0]
    manual = sum(full[t - 1, seq[t]].item() for t in range(start, len(seq)))
    assert lp[0].item() == pytest.approx(manual, abs=1e-4)
    assert seq[-1] == tok.eot_id and int(mask[0].sum()) == len(seq) - start


def test_dpo_learns_preference(tok, tmp_path):
    """Guards the stage end to end: held-out preference accuracy of the implicit reward rises,
    and the checkpoint is a policy (stage "dpo") that differs from its start."""
    from test_reward import preference_file, tiny_sft

    sft = tiny_sft(tok, tmp_path / "sft")
    data = preference_file(tmp_path / "rank.jsonl", 40, seed=0)
    out = main(DPOConfig(policy=str(sft), data=[str(data)], out=str(tmp_path / "dpo"), max_len=64, micro_batch=4, batch_rankings=8,
                         epochs=2.0, lr=3e-3, beta=0.5, warmup_steps=2, eval_every=5, save_every=100, log_every=1, dtype="fp32",
                         device="cpu", peak_flops=1e11, val_fraction=0.2))
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert log[-1]["val_accuracy"] >= 0.9 and log[-1]["val_loss"] < 0.5
    ck = ckpt_io.load(out)
    assert ck.meta["stage"] == "dpo"
    start = ckpt_io.load(sft).model.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in ck.model.state_dict().items())


@pytest.mark.slow
def test_dpo_two_processes_match_one(tok, tmp_path):
    """Guards DPO under DDP (the policy wrapped so DDP sees its forward) and FSDP (hidden()
    registered as a forward method): 2 processes log the same losses and held-out accuracy as 1
    process with the same global batch. The 5 held-out rankings split 3/2 over the processes:
    under FSDP the one with fewer still joins every evaluation forward (data/loader.rank_batches)."""
    from test_reward import assert_same_logs, preference_file, run_cli, tiny_sft

    sft = tiny_sft(tok, tmp_path / "sft")
    data = preference_file(tmp_path / "rank.jsonl", 24, seed=2)
    common = ["dpo", "--policy", str(sft), "--data", str(data), "--max-len", "64", "--micro-batch", "2", "--batch-rankings", "4", "--max-steps", "4",
              "--val-fraction", "0.2", "--lr", "3e-3", "--beta", "0.5", "--warmup-steps", "1", "--eval-every", "2", "--log-every", "1", "--dtype", "fp32", "--device", "cpu",
              "--peak-flops", "1e11"]
    run_cli(common + ["--out", str(tmp_path / "one")], 1, tmp_path)
    run_cli(common + ["--out", str(tmp_path / "two")], 2, tmp_path)
    assert_same_logs(tmp_path / "one", tmp_path / "two")
    run_cli(common + ["--out", str(tmp_path / "fsdp"), "--fsdp", "on"], 2, tmp_path)  # the policy sharded (FSDP2) instead of replicated
    assert_same_logs(tmp_path / "one", tmp_path / "fsdp")

"""Reward model: InstructGPT's ranking loss by hand, and a tiny reward model that learns a
preference, reports held-out accuracy, normalises SFT answers to mean 0 and resumes exactly."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from chatforge import checkpoint as ckpt_io
from chatforge.model import GPT, preset
from chatforge.train import rl_math as R
from chatforge.checkpoint import load_reward_model
from chatforge.train.rankings import score_all, tokenize_rankings
from chatforge.train.reward import RewardConfig, main
from chatforge.data.rankings import read_rankings
from conftest import assert_close_weights, run_chatforge, run_killed

@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from a second thread, and on a loaded machine spinning threads
    # made these tests 2x slower (measured 22 s vs 11 s for one reward-model run).
    torch.set_num_threads(1)
    yield


SP1, SP2 = math.log1p(math.exp(-1)), math.log1p(math.exp(-2))  # -log sigmoid(1), -log sigmoid(2)


def test_ranking_pairs():
    """Guards the pair expansion: all C(K,2) (better, worse) pairs in ranking order."""
    assert R.ranking_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    assert len(R.ranking_pairs([3, 1, 0, 2])) == 6


def test_ranking_loss_3way_by_hand():
    """Guards the RM loss and accuracy for a 3-way ranking: rewards (1, 0, 2) ranked [2, 0, 1]
    order all pairs right: loss = (2*softplus(-1) + softplus(-2)) / 3 = 0.2511505; ranked
    [0, 2, 1] one pair is wrong: loss = (softplus(1) + softplus(-1) + softplus(-2)) / 3 = 0.5844838."""
    s = torch.tensor([1.0, 0.0, 2.0])
    loss, correct, pairs = R.ranking_loss(s, [[2, 0, 1]])
    assert loss.item() == pytest.approx(0.25115046, abs=1e-6) and (correct, pairs) == (3, 3)
    assert loss.item() == pytest.approx((2 * SP1 + SP2) / 3, abs=1e-6)
    loss, correct, pairs = R.ranking_loss(s, [[0, 2, 1]])
    assert loss.item() == pytest.approx(0.58448380, abs=1e-6) and (correct, pairs) == (2, 3)
    # Two rankings in one batch: the sum of their per-ranking means (each ranking weighs the same).
    both = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0, 2.0])
    loss, correct, pairs = R.ranking_loss(both, [[2, 0, 1], [3, 5, 4]])
    assert loss.item() == pytest.approx(0.25115046 + 0.58448380, abs=1e-6) and (correct, pairs) == (5, 6)


def test_ranking_is_one_batch_element():
    """Guards InstructGPT's weighting: a K=4 ranking (6 pairs) counts as much as a K=2 one (1 pair),
    and its gradient equals that of the mean of its pair losses."""
    s = torch.tensor([0.3, -0.2, 0.9, 0.1, 0.5, 0.0], requires_grad=True)
    loss, _, _ = R.ranking_loss(s, [[2, 0, 3, 1], [4, 5]])
    loss.backward()
    ref = s.detach().clone().requires_grad_(True)
    pairs = R.ranking_pairs([2, 0, 3, 1])
    ref_loss = sum(-torch.nn.functional.logsigmoid(ref[w] - ref[l]) for w, l in pairs) / 6 - torch.nn.functional.logsigmoid(ref[4] - ref[5])
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    assert torch.allclose(s.grad, ref.grad, atol=1e-6)


# ---- a tiny reward model ---------------------------------------------------------------------

WORDS = ["apple", "river", "stone", "cloud", "paper", "music", "garden", "window"]


def tiny_sft(tok, path, seed=0):
    model = GPT(preset("cpu-tiny", vocab_size=512))
    model.init_weights(seed)
    ckpt_io.save(path, model, tok, {"stage": "sft"})
    return path


def preference_file(path, n, seed):
    """Rankings where answers with "good" beat "okay" beat "bad" whatever else they say."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        answers = [f"{q} {' '.join(rng.sample(WORDS, 3))}" for q in ("good", "okay", "bad")]
        order = [0, 1, 2]
        rng.shuffle(order)
        responses = [answers[j] for j in order]
        ranking = sorted(range(3), key=lambda j: order[j])
        lines.append({"messages": [{"role": "user", "content": f"Tell me about the {rng.choice(WORDS)} number {i}"}], "responses": responses, "ranking": ranking})
    # pairwise lines work too
    lines += [{"prompt": f"pair {i}", "chosen": "good apple", "rejected": "bad apple"} for i in range(4)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def rm_cfg(tmp_path, sft, data, **kw):
    base = dict(base=str(sft), data=[str(data)], out=str(tmp_path / "rm"), max_len=64, micro_batch=4, batch_rankings=8,
                epochs=2.0, lr=3e-3, warmup_steps=2, eval_every=5, save_every=5, log_every=1, dtype="fp32", device="cpu",
                peak_flops=1e11, val_fraction=0.2)
    base.update(kw)
    return RewardConfig(**base)


def test_reward_model_learns_and_normalises(tok, tmp_path):
    """Guards the whole stage: held-out pairwise accuracy rises from chance to ~1, the head is
    saved in extra.safetensors with meta stage "rm", and SFT answers score mean 0 afterwards."""
    sft = tiny_sft(tok, tmp_path / "sft")
    data = preference_file(tmp_path / "rank.jsonl", 40, seed=0)
    out = main(rm_cfg(tmp_path, sft, data))
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[-1]["val_accuracy"] >= 0.95 > log[0]["val_accuracy"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stage"] == "rm" and meta["normalised"] and meta["metrics"]["val_accuracy"] >= 0.95
    rm, tok2, _ = load_reward_model(out)
    rankings = read_rankings([data])
    train = tokenize_rankings(rankings, tok2, 64)
    scores = score_all(rm, [s for row in train.seqs for s in row], 16, "cpu", "fp32")
    # Held-out prompts are a fifth of the data: the mean over all answers is near, not exactly, 0.
    assert abs(scores.mean().item()) < 0.3 * scores.std().item()
    assert set(ckpt_io.load_extra(out)) == {"value_head.weight", "value_head.bias"}


def test_reward_resume_exact(tok, tmp_path, monkeypatch):
    """Guards exact resume: a run killed after its step-5 checkpoint and resumed logs the same losses."""
    from chatforge.train import common as C

    sft = tiny_sft(tok, tmp_path / "sft")
    data = preference_file(tmp_path / "rank.jsonl", 40, seed=1)
    ref = main(rm_cfg(tmp_path, sft, data, out=str(tmp_path / "ref"), epochs=2.0))
    run_killed(monkeypatch, C, "train_step", 7, lambda: main(rm_cfg(tmp_path, sft, data, out=str(tmp_path / "run"), epochs=2.0)))
    run = main(rm_cfg(tmp_path, sft, data, out=str(tmp_path / "run"), epochs=2.0, resume=True))
    losses = lambda d: [r["loss"] for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "loss" in r]  # noqa: E731
    assert losses(run) == losses(ref) and len(losses(ref)) >= 4
    a, b = load_reward_model(ref)[0], load_reward_model(run)[0]
    assert torch.equal(a.value_head.weight, b.value_head.weight) and torch.equal(a.value_head.bias, b.value_head.bias)


def test_reward_config_errors(tmp_path, capsys):
    """Guards the config's refusals, --fsdp among them: FSDP with LoRA adapters (which DDP
    handles) is refused by name, from the command line too."""
    from chatforge.cli import main as cli_main

    with pytest.raises(ValueError, match="base is required"):
        RewardConfig(data=["x"])
    with pytest.raises(ValueError, match="val_fraction"):
        RewardConfig(base="x", data=["y"], val_fraction=1.5)
    with pytest.raises(ValueError, match=r"RewardConfig\.fsdp='yes'"):
        RewardConfig(base="x", data=["y"], fsdp="yes")
    assert RewardConfig(base="x", data=["y"], lora_rank=4).fsdp == "auto"  # auto with LoRA: DDP
    assert cli_main(["rm", "--base", "x", "--data", "y", "--fsdp", "on", "--lora-rank", "4"]) == 2
    err = capsys.readouterr().err
    assert "RewardConfig.fsdp='on'" in err and "only without LoRA" in err


def test_reward_fsdp_needs_processes(tok, tmp_path):
    """Guards --fsdp on in a single process silently training the reward model unsharded."""
    sft = tiny_sft(tok, tmp_path / "sft")
    data = preference_file(tmp_path / "rank.jsonl", 12, seed=0)
    with pytest.raises(ValueError, match="torchrun"):
        main(rm_cfg(tmp_path, sft, data, fsdp="on", max_steps=1))


KILLED = """import sys
from chatforge.cli import main
from chatforge.train import common as C

real, calls = C.train_step, [0]


def dying(*a, **k):
    calls[0] += 1
    if calls[0] == {call}:
        raise KeyboardInterrupt
    return real(*a, **k)


C.train_step = dying
sys.exit(main(sys.argv[1:]))
"""


def run_cli(args, nproc, tmp_path, kill_at: int = 0, timeout: float = 300):
    """`chatforge ARGS` in one process, or in `nproc` processes under torchrun (gloo), failing
    after `timeout` seconds (conftest.run_chatforge); returns the finished process. With
    `kill_at`, every process is killed at its kill_at-th training step (conftest.run_killed's
    KeyboardInterrupt, raised in each process) and the run must fail."""
    entry = None
    if kill_at:
        script = tmp_path / f"killed_at_{kill_at}.py"
        script.write_text(KILLED.format(call=kill_at))
        entry = [str(script)]
    r = run_chatforge(args, nproc, timeout, entry)
    if kill_at:
        assert r.returncode != 0 and "interrupted" in r.stderr, r.stderr[-2000:]
    else:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.mark.slow
def test_reward_two_processes_match_one(tok, tmp_path):
    """Guards the reward model under DDP: rankings dealt to ranks, the loss normalised by the
    global number of rankings, held-out accuracy summed over ranks: same numbers as 1 process."""
    sft = tiny_sft(tok, tmp_path / "sft")
    data = preference_file(tmp_path / "rank.jsonl", 24, seed=2)
    common = ["rm", "--base", str(sft), "--data", str(data), "--max-len", "64", "--micro-batch", "2", "--batch-rankings", "4", "--max-steps", "4",
              "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "2", "--log-every", "1", "--dtype", "fp32", "--device", "cpu", "--peak-flops", "1e11"]
    run_cli(common + ["--out", str(tmp_path / "one")], 1, tmp_path)
    run_cli(common + ["--out", str(tmp_path / "two")], 2, tmp_path)
    assert_same_logs(tmp_path / "one", tmp_path / "two")


def assert_same_logs(one, two) -> None:
    """The loss and held-out accuracy rows of two runs' log.jsonl agree (>= 5 rows)."""
    rows = lambda d: [(r.get("loss"), r.get("val_accuracy")) for r in map(json.loads, (d / "log.jsonl").read_text().splitlines())]  # noqa: E731
    a, b = rows(one), rows(two)
    assert len(a) == len(b) >= 5
    for x, y in zip(a, b):  # a row has a loss or a held-out accuracy; the other field is None
        assert [v is None for v in x] == [v is None for v in y]
        assert [v for v in x if v is not None] == pytest.approx([v for v in y if v is not None], rel=1e-5, abs=1e-5)


# ---- FSDP: the reward model sharded over 2 gloo processes --------------------------------------

FSDP_ARGS = ["--max-len", "64", "--micro-batch", "2", "--batch-rankings", "4", "--max-steps", "6", "--val-fraction", "0.2", "--lr", "3e-3",
             "--warmup-steps", "1", "--eval-every", "2", "--save-every", "2", "--log-every", "1", "--dtype", "fp32", "--device", "cpu",
             "--peak-flops", "1e11"]


@pytest.fixture(scope="module")
def rm_fsdp_runs(tok, tmp_path_factory):
    """One reward model trained in 1 process (2 micro-steps of 2 rankings a step) and the same
    in 2 processes with FSDP (1 micro-step each): (the command, the two run folders, the root).
    The 5 held-out rankings split 3/2 over the processes: unequal shares of the evaluation."""
    root = tmp_path_factory.mktemp("rm_fsdp")
    sft = tiny_sft(tok, root / "sft")
    data = preference_file(root / "rank.jsonl", 24, seed=2)
    common = ["rm", "--base", str(sft), "--data", str(data), *FSDP_ARGS]
    run_cli(common + ["--out", str(root / "one")], 1, root)
    run_cli(common + ["--out", str(root / "fsdp"), "--fsdp", "on"], 2, root)
    return common, root / "one", root / "fsdp", root


@pytest.mark.slow
def test_reward_fsdp_matches_one_process(rm_fsdp_runs):
    """Guards the reward model under FSDP (the GPT's blocks and the root, scalar head included,
    sharded): the same losses and held-out accuracy as 1 process with accumulation, and a
    consolidated checkpoint whose weights and head (after the final normalisation, applied to
    the bias's shard) match, in the folder `load_reward_model` and `ppo --rm` read."""
    _, one, fsdp, _ = rm_fsdp_runs
    assert_same_logs(one, fsdp)
    assert_close_weights(one, fsdp)
    assert_close_weights(one, fsdp, file=ckpt_io.EXTRA)
    assert set(ckpt_io.load_extra(fsdp)) == set(ckpt_io.REWARD_HEAD)
    rm, _, meta = load_reward_model(fsdp)
    assert meta["stage"] == "rm" and meta["normalised"] and meta["step"] == 6
    assert (fsdp / ckpt_io.SHARDED_OPTIMIZER / ".metadata").is_file() and "optimizer" not in ckpt_io.load_train_state(fsdp)
    ref = load_reward_model(one)[0]
    ids = torch.tensor([[1, 5, 9, 14, 3], [2, 7, 7, 30, 11]])
    torch.testing.assert_close(rm(ids, torch.tensor([4, 2])), ref(ids, torch.tensor([4, 2])), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_reward_fsdp_resumes_exactly(rm_fsdp_runs):
    """Guards exact resume under FSDP: a run killed in its 4th step (after the step-2 checkpoint)
    and resumed from the sharded optimizer state logs the same losses as the uninterrupted
    FSDP run and ends with the same weights and head."""
    common, _, fsdp, root = rm_fsdp_runs
    run = root / "killed"
    run_cli(common + ["--out", str(run), "--fsdp", "on"], 2, root, kill_at=4)
    assert json.loads((run / "meta.json").read_text())["step"] == 2
    run_cli(common + ["--out", str(run), "--fsdp", "on", "--resume"], 2, root)
    losses = lambda d: [r["loss"] for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "loss" in r]  # noqa: E731
    assert losses(run) == losses(fsdp) and len(losses(run)) == 6
    for file in ("model.safetensors", ckpt_io.EXTRA):
        a, b = load_file(str(fsdp / file)), load_file(str(run / file))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (file, k)

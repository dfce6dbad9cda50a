"""PPO: the pieces (KL, rewards, GAE, whitening, clipped losses, KL controller) against
hand-computed values, and whole iterations on a tiny model: only trainable weights change,
the reference and reward model stay frozen, PPO-ptx and LoRA run, and a run resumes exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from chatforge import checkpoint as ckpt_io
from chatforge.model import GPT, preset
from chatforge.train import ppo as P
from chatforge.train import rl_math as R
from chatforge.model import RewardModel
from conftest import run_killed


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from a second thread; on a loaded machine it halves their speed.
    torch.set_num_threads(1)
    yield


# ---- pieces, by hand ----------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    """Guards the KL estimators: p=0.5, q=0.25 gives k1 = ln 2 and k3 = (0.5 - 1) + ln 2 = 0.1931;
    p=0.25, q=0.5 gives k1 = -ln 2 and k3 = (2 - 1) - ln 2 = 0.3069 (k3 is never negative)."""
    lp, lq = torch.log(torch.tensor([0.5, 0.25])), torch.log(torch.tensor([0.25, 0.5]))
    assert torch.allclose(R.kl_k1(lp, lq), torch.tensor([math.log(2), -math.log(2)]), atol=1e-6)
    assert torch.allclose(R.kl_k3(lp, lq), torch.tensor([0.19314718, 0.30685282]), atol=1e-6)


def test_token_rewards_by_hand():
    """Guards the reward shape: -beta*KL on every answer token, the RM score on the last one."""
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r = R.token_rewards(torch.tensor([2.0, -1.0]), kl, mask, beta=0.5)
    assert torch.allclose(r, torch.tensor([[-0.05, -0.1, 1.85], [-0.25, -0.8, 0.0]]), atol=1e-6)


def test_group_baseline_by_hand():
    """Guards the per-prompt baseline: each answer minus the mean of its siblings' scores."""
    s = torch.tensor([1.0, 2.0, 6.0, -1.0, 0.0, 4.0])
    assert torch.allclose(R.group_baseline(s, 3), torch.tensor([-3.0, -1.5, 4.5, -3.0, -1.5, 4.5]))
    assert torch.allclose(R.group_baseline(s, 2), torch.tensor([-1.0, 1.0, 7.0, -7.0, -4.0, 4.0]))
    assert torch.equal(R.group_baseline(s, 1), s)
    with pytest.raises(ValueError, match="groups of 4"):
        R.group_baseline(s, 4)


def test_gae_by_hand():
    """Guards GAE: gamma=0.9, lambda=0.8; rewards (0, 0, 1), values (0.5, 0.4, 0.3) give
    A = (0.12928, 0.374, 0.7), returns = A + V; a row whose answer spans positions 1..2 ignores
    the values outside it (they must not leak into the advantages)."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.5, -1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 0.0], [9.0, 0.2, 0.1, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    adv, ret = R.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([[0.12928, 0.374, 0.7, 0.0], [0.0, -0.402, -1.1, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.62928, 0.774, 1.0, 0.0], [0.0, -0.202, -1.0, 0.0]]), atol=1e-6)


def test_whiten_by_hand():
    """Guards whitening: (1, 2, 3) selected of (1, 2, 3, 100) -> mean 2, unbiased var 1 -> (-1, 0, 1, 0)."""
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert torch.allclose(R.whiten(x, m), torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(R.whiten(x, m, shift_mean=False), torch.tensor([1.0, 2.0, 3.0, 0.0]), atol=1e-6)


def test_policy_loss_by_hand():
    """Guards PPO's clipped surrogate: ratios (1.25, 0.6, 1.1), advantages (1, -1, 2), eps 0.2:
    per-token max(-A r, -A clip(r)) = (-1.2, 0.8, -2.2) -> sum -2.6; 2 of 3 tokens clipped;
    approx KL = mean(0.5 * ln(r)^2) = 0.0533033."""
    old = torch.log(torch.tensor([0.4, 0.5, 0.5]))
    new = torch.log(torch.tensor([0.5, 0.3, 0.55])).requires_grad_(True)
    loss, clipfrac, approx_kl = R.policy_loss(new, old, torch.tensor([1.0, -1.0, 2.0]), torch.ones(3), clip=0.2)
    assert loss.item() == pytest.approx(-2.6, abs=1e-5)
    assert clipfrac.item() == pytest.approx(2 / 3) and approx_kl.item() == pytest.approx(0.05330332, abs=1e-6)
    loss.backward()
    # Clipped tokens pass no gradient; the unclipped one gets d(-A r)/d logp = -A r = -2.2.
    assert torch.allclose(new.grad, torch.tensor([0.0, 0.0, -2.2]), atol=1e-5)


def test_value_loss_by_hand():
    """Guards the clipped value loss: V (1, 0), V_old (0.5, 0.5), R (2, 0.4), eps 0.2: clipped
    values (0.7, 0.3), per token max = (1.69, 0.16), loss = 0.5 * 1.85 = 0.925, clip share 0.5."""
    loss, clipfrac = R.value_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), torch.tensor([2.0, 0.4]), torch.ones(2), clip=0.2)
    assert loss.item() == pytest.approx(0.925, abs=1e-6) and clipfrac.item() == pytest.approx(0.5)


def test_adaptive_kl_controller():
    """Guards Ziegler et al.'s update: beta 0.1, target 6, horizon 10000, 100 answers: KL 9 is
    +50% over target, clipped to +20% -> beta 0.1 * 1.002; KL 5.4 -> error -0.1 -> 0.1 * 0.999."""
    c = R.AdaptiveKL(0.1, target=6.0, horizon=10000)
    c.update(9.0, 100)
    assert c.value == pytest.approx(0.1002)
    c = R.AdaptiveKL(0.1, target=6.0, horizon=10000)
    c.update(5.4, 100)
    assert c.value == pytest.approx(0.0999)
    f = R.FixedKL(0.05)
    f.update(100.0, 100)
    assert f.value == 0.05


def test_entropy_and_logprobs():
    """Guards the per-token helpers: uniform over 4 has entropy ln 4; log-prob picks the target."""
    logits = torch.zeros(1, 1, 4)
    assert R.entropy_from_logits(logits).item() == pytest.approx(math.log(4))
    assert R.token_logprobs(torch.tensor([[[0.0, math.log(3.0)]]]), torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))


def test_answer_logprobs_match_the_full_forward():
    """Guards the answer-only output head (PPO's and DPO's log-probs) against the plain
    log-softmax of the whole sequence's logits: same values at the answer, 0 elsewhere."""
    model = GPT(preset("cpu-tiny", vocab_size=128))
    model.init_weights(0)
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 11)
    mask[0, 4:] = mask[1, 2:7] = mask[2, 10] = 1
    with torch.no_grad():
        logp, ent = R.answer_logprobs(model, ids, mask, entropy=True)
        logits = model(ids)[:, :-1]
    torch.testing.assert_close(logp, R.token_logprobs(logits, ids[:, 1:]) * mask, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent, R.entropy_from_logits(logits) * mask, rtol=1e-5, atol=1e-5)


def test_rollout_alignment():
    """Guards the off-by-one of per-token tensors: position t predicts token t+1, so an answer
    at ids[p:p+L] is selected at amask[p-1:p+L-1], and its last token index is p+L-1."""
    ro = P.to_rollouts([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], [True, False], ["", ""])
    assert ro.ids.tolist() == [[1, 2, 3, 7, 8], [4, 9, 10, 11, 0]]
    assert ro.amask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert ro.last.tolist() == ro.rm_last.tolist() == [4, 3]
    # With the end-of-turn id: the cut answer (row 1) gets it after its last token, outside amask,
    # and the RM reads there; the finished one is unchanged.
    ro = P.to_rollouts([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], [True, False], ["", ""], eot=99)
    assert ro.ids.tolist() == [[1, 2, 3, 7, 8, 0], [4, 9, 10, 11, 99, 0]]
    assert ro.amask.tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert ro.last.tolist() == [4, 3] and ro.rm_last.tolist() == [4, 4]


# ---- whole iterations on a tiny model ----------------------------------------------------------


def make_run(tok, tmp_path):
    """A tiny SFT checkpoint, a reward model built from it (head only, no training needed to
    test the mechanics) and a prompts file."""
    gpt = GPT(preset("cpu-tiny", vocab_size=512, max_seq_len=96))
    gpt.init_weights(0)
    sft = ckpt_io.save(tmp_path / "sft", gpt, tok, {"stage": "sft"})
    rm = RewardModel(GPT(gpt.cfg), seed=3)
    rm.gpt.init_weights(1)
    ckpt_io.save(tmp_path / "rm", rm.gpt, tok, {"stage": "rm"}, extra_tensors=rm.head_tensors())
    lines = [{"prompt": f"Tell me about number {i}."} for i in range(8)] + [{"messages": [{"role": "user", "content": "床前明月光"}]}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    return sft, tmp_path / "rm", tmp_path / "p.jsonl"


def ppo_cfg(tmp_path, sft, rm, prompts, **kw):
    base = dict(policy=str(sft), rm=str(rm), prompts=[str(prompts)], out=str(tmp_path / "ppo"), iterations=1, rollout_batch=4,
                max_new_tokens=8, ppo_epochs=2, minibatch=2, lr=1e-3, dtype="fp32", device="cpu", eval_every=100, save_every=100,
                show_samples=1)
    base.update(kw)
    return P.PPOConfig(**base)


def capture_models(monkeypatch):
    """Record the models the stage loads, to inspect them after it ran."""
    seen = {"policy": [], "rm": []}
    real_policy, real_rm = P.load_policy, P.load_reward_model

    def policy(*a, **k):
        r = real_policy(*a, **k)
        seen["policy"].append(r[0])
        return r

    def rm(*a, **k):
        r = real_rm(*a, **k)
        seen["rm"].append(r[0])
        return r

    monkeypatch.setattr(P, "load_policy", policy)
    monkeypatch.setattr(P, "load_reward_model", rm)
    return seen


def test_one_iteration_changes_only_trainable(tok, tmp_path, monkeypatch):
    """Guards the update's reach: after one iteration the policy moved, the frozen reference and
    the reward model are bit-identical to their checkpoints, and the log has every metric."""
    sft, rm, prompts = make_run(tok, tmp_path)
    seen = capture_models(monkeypatch)
    out = P.main(ppo_cfg(tmp_path, sft, rm, prompts))
    policy, ref = seen["policy"]
    sft_state = ckpt_io.load(sft).model.state_dict()
    assert all(torch.equal(v, sft_state[k]) for k, v in ref.state_dict().items()), "the reference changed"
    assert not any(p.requires_grad for p in ref.parameters())
    assert any(not torch.equal(v, sft_state[k]) for k, v in policy.state_dict().items()), "the policy did not move"
    rm_disk = ckpt_io.load(rm).model.state_dict()
    assert all(torch.equal(v, rm_disk[k]) for k, v in seen["rm"][0].gpt.state_dict().items()), "the reward model changed"
    saved = ckpt_io.load(out)
    assert saved.meta["stage"] == "ppo" and all(torch.equal(v, policy.state_dict()[k]) for k, v in saved.model.state_dict().items())
    value = ckpt_io.load_train_state(out)["value"]
    assert not torch.equal(value["value_head.weight"], ckpt_io.load_extra(rm)["value_head.weight"]), "the value model did not move"
    (rec,) = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "rm_score" in r]
    for k in ("rm_score", "reward", "kl", "entropy", "clipfrac", "vf_loss", "pg_loss", "length", "t_rollout", "t_score", "t_train"):
        assert k in rec and math.isfinite(rec[k])
    # First pass of the first epoch: the policy is the sampler and the reference, so KL is ~0.
    assert abs(rec["kl"]) < 1e-4
    assert (out / "reward_vs_kl.png").is_file() and (out / "ppo.png").is_file()


def test_periodic_eval_without_heldout_prompts(tok, tmp_path):
    """Guards PPO without --eval-prompts (how `chatforge rlhf` runs it): the periodic evaluation
    has nothing to score and must be skipped, not crash on a missing held-out metric."""
    sft, rm, prompts = make_run(tok, tmp_path)
    out = P.main(ppo_cfg(tmp_path, sft, rm, prompts, iterations=2, eval_every=1, save_every=1, rollout_batch=2, ppo_epochs=1))
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "rm_score" in r] == [1, 2] and not any("val_rm_score" in r for r in recs)


def test_lora_ptx_iteration_keeps_base_frozen(tok, tmp_path, shards_dir, monkeypatch):
    """Guards LoRA + PPO-ptx: the base weights stay bit-identical (the reference is the policy
    with adapters off), only adapters and the value head/adapters train, the pretraining loss
    is logged, and the saved checkpoint loads with the adapters merged."""
    sft, rm, prompts = make_run(tok, tmp_path)
    seen = capture_models(monkeypatch)
    out = P.main(ppo_cfg(tmp_path, sft, rm, prompts, lora_rank=4, lora_alpha=8.0, ptx_data=str(shards_dir), ptx_coef=0.5, ptx_seq_len=32, ptx_rows=2, eval_prompts=[str(prompts)]))
    (policy,) = seen["policy"]  # no separate reference model was loaded
    sft_state = ckpt_io.load(sft).model.state_dict()
    assert all(torch.equal(v, sft_state[k]) for k, v in policy.state_dict().items())
    extra = ckpt_io.load_extra(out)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in extra.items())
    merged = ckpt_io.load(out).model.state_dict()
    assert any(not torch.equal(v, sft_state[k]) for k, v in merged.items())
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert any("ptx_loss" in r and r["ptx_loss"] > 0 for r in recs)
    assert any("val_rm_score" in r for r in recs)


def test_shared_blocks_change_nothing(tok, tmp_path, monkeypatch):
    """Guards running the lowest blocks once for policy, reference, value and reward model (LoRA
    in the top block only, a reward model with the SFT body): the iteration logs the same numbers
    as one that runs every model in full."""
    gpt = GPT(preset("cpu-tiny", vocab_size=512, max_seq_len=96))
    gpt.init_weights(0)
    sft = ckpt_io.save(tmp_path / "sft", gpt, tok, {"stage": "sft"})
    rm = RewardModel(gpt, seed=3)
    ckpt_io.save(tmp_path / "rm", gpt, tok, {"stage": "rm"}, extra_tensors=rm.head_tensors())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Tell me about number {i}."}) for i in range(8)) + "\n")
    depths = []
    real = P.shared_depth
    monkeypatch.setattr(P, "shared_depth", lambda models: depths.append(real(models)) or depths[-1])
    kw = dict(lora_rank=4, lora_alpha=8.0, lora_layers=1, iterations=2)
    shared = P.main(ppo_cfg(tmp_path, sft, tmp_path / "rm", prompts, out=str(tmp_path / "shared"), **kw))
    assert depths == [gpt.cfg.n_layer - 1] and depths[0] > 0
    monkeypatch.setattr(P, "shared_depth", lambda models: 0)
    full = P.main(ppo_cfg(tmp_path, sft, tmp_path / "rm", prompts, out=str(tmp_path / "full"), **kw))
    recs = [[r for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "rm_score" in r] for d in (shared, full)]
    assert [len(r) for r in recs] == [2, 2]  # one row per iteration in each run: the comparison below is not vacuous
    for a, b in zip(*recs):
        for k in ("rm_score", "kl", "pg_loss", "vf_loss", "entropy", "approx_kl"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


def test_samples_per_prompt_scores_against_siblings(tok, tmp_path, monkeypatch):
    """Guards --samples-per-prompt: each prompt is rolled out G times side by side with different
    seeds, and the reward that enters GAE is the RM score minus the siblings' mean (a constant
    RM offset per prompt cancels)."""
    sft, rm, prompts = make_run(tok, tmp_path)
    seen_prompts, seen_scores = [], []
    real_gen, real_gae = P.generate, R.gae

    def gen(engine, batch, n, seeds):
        seen_prompts.append((batch, seeds))
        return real_gen(engine, batch, n, seeds)

    def gae(rewards, values, mask, gamma, lam):
        seen_scores.append(rewards.sum(1))  # beta=0: the row's reward is its baselined score
        return real_gae(rewards, values, mask, gamma, lam)

    monkeypatch.setattr(P, "generate", gen)
    monkeypatch.setattr(R, "gae", gae)
    out = P.main(ppo_cfg(tmp_path, sft, rm, prompts, samples_per_prompt=2, kl_coef=0.0))
    (batch, seeds), (rewards,) = seen_prompts[0], seen_scores
    assert len(batch) == 4 and batch[0] == batch[1] and batch[2] == batch[3] and batch[0] != batch[2]
    assert len(set(seeds)) == 4
    assert torch.allclose(rewards.view(2, 2).sum(1), torch.zeros(2), atol=1e-5)  # pairs: +d and -d
    (rec,) = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "rm_score" in r]
    assert math.isfinite(rec["rm_score"]) and rec["rm_score"] != 0.0  # the log keeps the raw RM score


def test_ppo_resume_exact(tok, tmp_path, monkeypatch):
    """Guards exact resume: killed during iteration 3 after the iteration-2 checkpoint, resumed,
    the run logs the same numbers as an uninterrupted one (rollouts, losses, KL coefficient)."""
    sft, rm, prompts = make_run(tok, tmp_path)
    kw = dict(iterations=4, save_every=2, kl_target=1.0, kl_horizon=10)
    ref = P.main(ppo_cfg(tmp_path, sft, rm, prompts, out=str(tmp_path / "ref"), **kw))
    run_killed(monkeypatch, P, "generate", 4, lambda: P.main(ppo_cfg(tmp_path, sft, rm, prompts, out=str(tmp_path / "run"), **kw)))
    run = P.main(ppo_cfg(tmp_path, sft, rm, prompts, out=str(tmp_path / "run"), resume=True, **kw))
    keys = ("rm_score", "kl", "pg_loss", "vf_loss", "beta", "length")
    rows = lambda d: [tuple(r[k] for k in keys) for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "rm_score" in r]  # noqa: E731
    assert len(rows(ref)) == 4 and rows(run) == rows(ref)
    assert rows(ref)[3][4] != 0.02  # the adaptive controller moved beta


def test_ppo_config_errors(tmp_path):
    with pytest.raises(ValueError, match="rm is required"):
        P.PPOConfig(policy="x", prompts=["p"])
    with pytest.raises(ValueError, match="multiple of minibatch"):
        P.PPOConfig(policy="x", rm="y", prompts=["p"], rollout_batch=6, minibatch=4)
    with pytest.raises(ValueError, match="ptx"):
        P.PPOConfig(policy="x", rm="y", prompts=["p"], ptx_coef=1.0)
    with pytest.raises(ValueError, match="samples_per_prompt=3"):
        P.PPOConfig(policy="x", rm="y", prompts=["p"], rollout_batch=16, samples_per_prompt=3)


def test_rlhf_rounds_with_oracle_and_human_stop(tok, tmp_path):
    """Guards the rounds: round 2 samples from round 1's PPO policy, its reward model trains on
    both rounds' rankings, the reference stays the SFT model, the gold judge scores every round;
    without an oracle the run stops after sampling and says how to rank."""
    from chatforge.pipelines.rlhf import RLHFConfig, main as rlhf_main

    sft, _, _ = make_run(tok, tmp_path)
    lines = [{"prompt": f"What is {i} + 1?", "gold": {"task": "arithmetic", "answers": [str(i + 1)]}} for i in range(8)]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    common = dict(sft=str(sft), prompts=[str(tmp_path / "q.jsonl")], rounds=2, k=2, compare_prompts=6, sample_tokens=6,
                  ppo_iterations=1, rollout_batch=2, minibatch=2, ppo_epochs=1, lr=1e-3, rm_lr=1e-3, dtype="fp32", device="cpu")
    report = rlhf_main(RLHFConfig(out=str(tmp_path / "h"), **common))
    assert report["waiting_for_rankings"].endswith("round1/rankings.jsonl") and (tmp_path / "h/round1/samples.jsonl").is_file()
    out = tmp_path / "o"
    report = rlhf_main(RLHFConfig(out=str(out), oracle="gold", eval_prompts=[str(tmp_path / "q.jsonl")], **common))
    assert len(report["rounds"]) == 2 and "gold_score" in report["sft"] and all("gold" in r for r in report["rounds"])
    assert all(r["gold_vs_sft"]["n"] == 8 and 0 <= r["rm_gold_accuracy"]["pairs"] for r in report["rounds"])
    samples2 = [json.loads(x) for x in (out / "round2/samples.jsonl").read_text().splitlines()]
    assert samples2[0]["policy"] == str(out / "round1/ppo")
    rm2 = json.loads((out / "round2/rm/meta.json").read_text())
    assert len(rm2["data"]) == 2 and rm2["parent"] == str(sft.resolve())
    ppo2 = json.loads((out / "round2/ppo/meta.json").read_text())
    assert ppo2["ref"] == str(sft.resolve()) and ppo2["parent"] == str((out / "round1/ppo").resolve())
    assert all("gold" not in json.loads(x) for x in (out / "round1/rankings.jsonl").read_text().splitlines())
    # Everything is complete: a second call redoes nothing and returns the same report.
    again = rlhf_main(RLHFConfig(out=str(out), oracle="gold", eval_prompts=[str(tmp_path / "q.jsonl")], **common))
    assert again == report

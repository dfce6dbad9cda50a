"""Verifiable rewards and group methods: each verifier on hand-made answers in both languages
(right, wrong, right-but-verbose, other language), GRPO/RLOO advantages on hand-computed groups,
the bad-input errors, and a tiny end-to-end GRPO run whose verified reward rises."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from chatforge import checkpoint as ckpt_io
from chatforge.data.rankings import read_prompts
from chatforge.model import GPT, preset
from chatforge.train import ppo as P
from chatforge.train import rl_math as R
from chatforge.train.curriculum import FamilyCurriculum
from chatforge.train.verify import FAMILIES, Verdict, check_prompt, dates, numbers, verify, weekdays, zh_number


def key(task: str, answers: list[str], lang: str) -> dict:
    return {"task": task, "answers": answers, "lang": lang}


V = Verdict
CASES = [
    # (task, answers, lang, response, expected verdict)
    ("arithmetic", ["56"], "en", "56", V(True, True, True)),
    ("arithmetic", ["56"], "en", "The answer is 56.", V(True, False, True)),
    ("arithmetic", ["56"], "en", "7 x 8 = 56", V(True, False, True)),
    ("arithmetic", ["56"], "en", "54", V(False, False, True)),
    ("arithmetic", ["56"], "en", "56? No, 54.", V(False, False, True)),  # the last number is the answer
    ("arithmetic", ["5"], "en", "15", V(False, False, True)),  # 5 is not found inside 15
    ("arithmetic", ["56"], "zh", "５６。", V(True, True, True)),  # full-width digits
    ("arithmetic", ["56"], "zh", "答案是56。", V(True, False, True)),
    ("arithmetic", ["56"], "zh", "五十六", V(True, True, True)),
    ("arithmetic", ["56"], "zh", "The answer is 56.", V(True, False, False)),
    ("arithmetic", ["1200"], "en", "1,200", V(True, True, True)),
    ("unit-conversion", ["300"], "en", "300 centimeters", V(True, True, True)),
    ("unit-conversion", ["300"], "en", "3 meters is 300 centimeters.", V(True, False, True)),
    ("unit-conversion", ["300"], "zh", "300厘米", V(True, True, True)),
    ("unit-conversion", ["300"], "zh", "3米等于30厘米", V(False, False, True)),
    ("days-in-month", ["29", "29天"], "zh", "29天", V(True, True, True)),
    ("days-in-month", ["29"], "en", "February 2000 has 29 days.", V(True, False, True)),
    ("days-in-month", ["29"], "en", "28", V(False, False, True)),
    ("weekday", ["Tuesday"], "en", "Tuesday", V(True, True, True)),
    ("weekday", ["Tuesday"], "en", "It was a tuesday.", V(True, False, True)),
    ("weekday", ["Tuesday"], "en", "Wednesday", V(False, False, True)),
    ("weekday", ["Tuesday"], "en", "星期二", V(True, True, False)),
    ("weekday", ["星期日", "星期天"], "zh", "星期天", V(True, True, True)),
    ("weekday", ["星期日", "星期天"], "zh", "那天是周日。", V(True, False, True)),
    ("weekday", ["星期日", "星期天"], "zh", "星期一", V(False, False, True)),
    ("weekday", ["星期日"], "zh", "Sunday", V(True, True, False)),
    ("date-add", ["March 3, 2001"], "en", "March 3, 2001", V(True, True, True)),
    ("date-add", ["March 3, 2001"], "en", "It is March 3rd, 2001.", V(True, False, True)),
    ("date-add", ["March 3, 2001"], "en", "3 March 2001", V(True, True, True)),
    ("date-add", ["March 3, 2001"], "en", "March 4, 2001", V(False, False, True)),
    ("date-add", ["2001年3月3日"], "zh", "2001年3月3日", V(True, True, True)),
    ("date-add", ["2001年3月3日"], "zh", "那天是2001年3月3日。", V(True, False, True)),
    ("date-add", ["2001年3月3日"], "zh", "March 3, 2001", V(True, True, False)),
    ("date-add", ["2001年3月3日"], "zh", "2001年2月30日", V(False, False, True)),  # no such date
]


@pytest.mark.parametrize("task,answers,lang,response,expected", CASES)
def test_verifier_hand_made_answers(task, answers, lang, response, expected):
    """Guards each family's verifier: the last value mentioned decides correctness (numbers as
    numbers, weekdays and dates in either language), format means the answer alone (a unit word
    allowed), language compares scripts with the asker's."""
    assert verify(response, key(task, answers, lang)) == expected


def test_parsers_and_reward_weights():
    """Guards the value parsers that the verifiers share and the reward's weighted sum."""
    assert [v for _, _, v in numbers("20-7=13")] == [20.0, 7.0, 13.0]  # "-" between numbers is not a sign
    assert [v for _, _, v in numbers("一共十五个，星期一")] == [15.0]  # a lone 一 inside a word is no number
    assert (zh_number("两千零五"), zh_number("十二"), zh_number("一百二十三"), zh_number("三一")) == (2005, 12, 123, None)
    assert [v for _, _, v in weekdays("Monday or 周三")] == [0, 2]
    assert [str(v) for _, _, v in dates("2001-03-04 and Feb 29, 2001")] == ["2001-03-04"]  # 2001 has no Feb 29
    assert V(True, True, False).reward(0.2, 0.1) == pytest.approx(1.2)
    assert V(False, False, True).reward(0.2, 0.1) == pytest.approx(0.1)


def test_verifier_bad_input():
    with pytest.raises(ValueError, match="'next-line' has no verifier"):
        verify("x", key("next-line", ["白日依山尽"], "zh"))
    with pytest.raises(ValueError, match="p.jsonl:3: no 'gold'"):
        check_prompt(None, "p.jsonl:3")
    with pytest.raises(ValueError, match="p.jsonl:4: task family 'poem-author' has no verifier"):
        check_prompt(key("poem-author", ["李白"], "zh"), "p.jsonl:4")


def test_group_advantages_by_hand():
    """Guards GRPO and RLOO advantages. Group (1, 0, 0, 1): mean 0.5, unbiased std 0.57735 ->
    GRPO +-0.866; RLOO: 1 - 1/3 = 0.6667 and 0 - 2/3 = -0.6667. Group (2, 2, 2, 2): all zero
    (nothing to learn). Group of 2 (3, 1): GRPO +-0.7071, RLOO +-2."""
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    g = R.group_advantages(r, 4, "grpo")
    assert torch.allclose(g, torch.tensor([0.866025, -0.866025, -0.866025, 0.866025, 0, 0, 0, 0]), atol=1e-5)
    lo = R.group_advantages(r, 4, "rloo")
    assert torch.allclose(lo, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]), atol=1e-6)
    two = torch.tensor([3.0, 1.0])
    assert torch.allclose(R.group_advantages(two, 2, "grpo"), torch.tensor([0.707107, -0.707107]), atol=1e-5)
    assert torch.allclose(R.group_advantages(two, 2, "rloo"), torch.tensor([2.0, -2.0]))
    with pytest.raises(ValueError, match="unknown algo 'ppo2'"):
        R.group_advantages(two, 2, "ppo2")
    with pytest.raises(ValueError, match="groups of 1"):
        R.group_advantages(two, 1, "grpo")


def test_rl_config_errors():
    """Guards the bad-input messages: they name the flag and the value."""
    base = dict(policy="x", prompts=["p"], rollout_batch=8, minibatch=4)
    with pytest.raises(ValueError, match="algo='a2c' is unknown"):
        P.PPOConfig(**base, rm="y", algo="a2c")
    with pytest.raises(ValueError, match="reward='gold' is unknown"):
        P.PPOConfig(**base, rm="y", reward="gold")
    with pytest.raises(ValueError, match="samples_per_prompt=1: --algo grpo"):
        P.PPOConfig(**base, algo="grpo", reward="tasks")
    with pytest.raises(ValueError, match="rm is required.*value model"):
        P.PPOConfig(**base, algo="ppo", reward="tasks")
    with pytest.raises(ValueError, match="rm is required.*rm\\+tasks"):
        P.PPOConfig(**base, algo="rloo", reward="rm+tasks", samples_per_prompt=2)
    with pytest.raises(ValueError, match="kl_mode='both'"):
        P.PPOConfig(**base, algo="grpo", reward="tasks", samples_per_prompt=2, kl_mode="both")
    with pytest.raises(ValueError, match="curriculum='hard' is unknown"):
        P.PPOConfig(**base, algo="grpo", reward="tasks", samples_per_prompt=2, curriculum="hard")
    with pytest.raises(ValueError, match="curriculum='signal'.*needs --reward tasks"):
        P.PPOConfig(**base, rm="y", algo="grpo", reward="rm", samples_per_prompt=2, curriculum="signal")
    P.PPOConfig(**base, algo="grpo", reward="tasks", samples_per_prompt=4)  # no reward model needed


def test_curriculum_by_hand():
    """Guards the family curriculum: a family answered half the time (groups differ) is drawn far
    more often than one always or never solved, but those stay drawn (the floor); draws are
    deterministic per seed, stay inside each family's prompts, and the state round-trips."""
    keys = ["en/a"] * 10 + ["en/b"] * 10 + ["zh/c"] * 10
    cur = FamilyCurriculum(keys, decay=0.9, floor=0.02)
    assert cur.weights() == pytest.approx({"en/a": 1 / 3, "en/b": 1 / 3, "zh/c": 1 / 3})  # no evidence yet: uniform
    for _ in range(5):  # a: never right, b: right half the time, c: always right
        cur.update(["en/a"] * 8 + ["en/b"] * 8 + ["zh/c"] * 8, [False] * 8 + [True, False] * 4 + [True] * 8)
    # decayed counts after 5 rounds of 8: sum 8 * 0.9^k, k < 5 = 32.76 asked
    assert cur.asked["en/a"] == pytest.approx(8 * sum(0.9**k for k in range(5)))
    assert cur.pass_rate("en/a") == pytest.approx(1 / (cur.asked["en/a"] + 2))
    assert cur.pass_rate("en/b") == pytest.approx(0.5)
    w = cur.weights()
    assert w["en/b"] > 3 * w["en/a"] and w["zh/c"] == pytest.approx(w["en/a"]) and w["en/a"] > 0
    draws = [cur.draw(8, seed) for seed in range(200)]
    assert draws[0] == cur.draw(8, 0) and draws[0] != draws[1]
    fam = [keys[i] for d in draws for i in d]
    assert fam.count("en/b") / len(fam) == pytest.approx(w["en/b"], abs=0.05)
    assert all(len(set(d)) == len(d) for d in draws)  # no prompt twice in one draw while the family has enough
    twin = FamilyCurriculum(keys)
    twin.load_state_dict(cur.state_dict())
    assert twin.weights() == cur.weights() and twin.draw(8, 7) == cur.draw(8, 7)
    with pytest.raises(ValueError, match="no prompts"):
        FamilyCurriculum([])


# ---- whole runs on a tiny model -------------------------------------------------------------------


def tiny_sft(tok, tmp_path):
    gpt = GPT(preset("cpu-tiny", vocab_size=512, max_seq_len=96))
    gpt.init_weights(0)
    return ckpt_io.save(tmp_path / "sft", gpt, tok, {"stage": "sft"})


def write_prompts(path, lines) -> str:
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    return str(path)


def test_tasks_reward_needs_answer_keys(tok, tmp_path):
    """Guards --reward tasks on prompts without a verifiable answer key: the error names the line."""
    sft = tiny_sft(tok, tmp_path)
    good = {"messages": [{"role": "user", "content": "2+3=?"}], "gold": key("arithmetic", ["5"], "zh")}
    f = write_prompts(tmp_path / "p.jsonl", [good, {"prompt": "hello"}])
    cfg = P.PPOConfig(policy=str(sft), prompts=[f], algo="grpo", reward="tasks", samples_per_prompt=2, rollout_batch=4, minibatch=2,
                      out=str(tmp_path / "rl"), device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="p.jsonl:2: no 'gold'"):
        P.main(cfg)


@pytest.mark.parametrize("algo,kl_mode", [("grpo", "loss"), ("rloo", "reward")])
def test_group_rl_raises_verified_reward(tok, tmp_path, algo, kl_mode):
    """Guards the whole group-method loop on a trivially learnable verified reward: Chinese
    weekday questions, reward = answering in Chinese script (language_weight 1; a random model
    almost never names the right weekday). Over 12 iterations the reward must rise well above
    where it started, with no value model and the policy the only trained model; a run resumed
    from a checkpoint continues with the same numbers."""
    torch.set_num_threads(1)
    sft = tiny_sft(tok, tmp_path)
    days = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
    lines = [{"messages": [{"role": "user", "content": f"2001年3月{d}日是星期几？"}], "gold": key("weekday", [days[(d + 3) % 7]], "zh")}
             for d in range(1, 17)]
    f = write_prompts(tmp_path / "p.jsonl", lines)
    kw = dict(policy=str(sft), prompts=[f], algo=algo, reward="tasks", samples_per_prompt=4, rollout_batch=16, minibatch=8, ppo_epochs=2,
              max_new_tokens=4, lr=1e-2, kl_coef=0.01, kl_mode=kl_mode, format_weight=0.0, language_weight=1.0, dtype="fp32",
              device="cpu", eval_every=100, save_every=100, show_samples=0)
    out = P.main(P.PPOConfig(out=str(tmp_path / "rl"), iterations=12, **kw))
    recs = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "task_reward" in r]
    assert len(recs) == 12 and all("vf_loss" not in r and "rm_score" not in r for r in recs)
    first = sum(r["task_reward"] for r in recs[:3]) / 3
    last = sum(r["task_reward"] for r in recs[-3:]) / 3
    assert last > first + 0.25 and last > 0.6, (first, last)
    assert (kl_mode == "loss") == all("kl_loss" in r for r in recs)
    meta = ckpt_io.load(out).meta
    assert meta["algo"] == algo and meta["reward"] == "tasks" and meta["rm"] is None
    assert "value" not in ckpt_io.load_train_state(out)
    # Resumable: 6 iterations, then 6 more from that checkpoint, log what the straight run logged.
    P.main(P.PPOConfig(out=str(tmp_path / "half"), iterations=6, **kw))
    half = P.main(P.PPOConfig(out=str(tmp_path / "half"), iterations=12, resume=True, **kw))
    rows = lambda d: [(r["step"], r["task_reward"], r["kl"], r["pg_loss"]) for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "task_reward" in r]  # noqa: E731
    assert rows(half) == rows(out)


def test_curriculum_run_resumes_identically(tok, tmp_path):
    """Guards --curriculum signal in a whole run: the draw follows the families' pass rates, the
    log records the weights, and a run cut at iteration 2 and resumed logs what the straight run
    logged (the curriculum's counts are saved with the train state)."""
    torch.set_num_threads(1)
    sft = tiny_sft(tok, tmp_path)
    lines = ([{"messages": [{"role": "user", "content": f"2001年3月{d}日是星期几？"}], "gold": key("weekday", ["星期一"], "zh")} for d in range(1, 9)]
             + [{"messages": [{"role": "user", "content": f"{d} + 2 = ?"}], "gold": key("arithmetic", [str(d + 2)], "en")} for d in range(8)])
    f = write_prompts(tmp_path / "p.jsonl", lines)
    kw = dict(policy=str(sft), prompts=[f], algo="grpo", reward="tasks", samples_per_prompt=4, rollout_batch=8, minibatch=8, ppo_epochs=1,
              max_new_tokens=4, lr=1e-2, curriculum="signal", dtype="fp32", device="cpu", eval_every=100, save_every=2, show_samples=0)
    out = P.main(P.PPOConfig(out=str(tmp_path / "rl"), iterations=4, **kw))
    recs = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "task_reward" in r]
    assert len(recs) == 4 and set(recs[-1]["curriculum"]) == {"zh/weekday", "en/arithmetic"}
    assert sum(recs[-1]["curriculum"].values()) == pytest.approx(1.0, abs=1e-3)
    assert "curriculum" in ckpt_io.load_train_state(out)
    P.main(P.PPOConfig(out=str(tmp_path / "half"), iterations=2, **kw))
    half = P.main(P.PPOConfig(out=str(tmp_path / "half"), iterations=4, resume=True, **kw))
    rows = lambda d: [(r["step"], r["task_reward"], r["kl"], r["curriculum"]) for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "task_reward" in r]  # noqa: E731
    assert rows(half) == rows(out)


def test_verifiable_prompts_never_hold_a_heldout_problem():
    """Guards the RL prompts' split: fresh generated problems (3x the SFT set's draws) split by the
    SFT set's hash rule, minus any train problem that is also asked under a held-out key (a
    weekday of the same date with another n); every family has a verifier that accepts its key."""
    from chatforge.data.sft_default import _problem, verifiable_items

    train, held = verifiable_items("train", scale=3), verifiable_items("heldout", scale=3)
    assert len(train) > 5 * len(held) > 0
    assert not {_problem(x) for x in train} & {_problem(x) for x in held}
    assert {(x["gold"]["lang"], x["gold"]["task"]) for x in held} == {(lang, t) for lang in ("en", "zh") for t in FAMILIES}
    for x in train[:: len(train) // 200] + held[:: len(held) // 100]:
        check_prompt(x["gold"], "generated")
        assert verify(x["gold"]["answers"][0], x["gold"]) == Verdict(True, True, True), x


def test_paired_tables_by_hand():
    """Guards the paired tables of `eval tasks --baseline` and `label judge`: per (language, task),
    per language and overall, differences item by item with their standard error; items that do
    not match one to one are refused. en/arithmetic: base (1, 0, 0), new (1, 1, 1) -> +2/3, paired
    sd of (0, 1, 1) = 0.57735 -> stderr 0.33333; zh/weekday: (1, 1) -> (0, 1): -1/2 +- 1/2."""
    from chatforge.data.rankings import Prompt
    from chatforge.eval.tasks import paired_by_group
    from chatforge.eval.gold import judge_answers
    from chatforge.eval.gold import paired_difference_by_group as judge_groups

    def rows(marks, keys):
        return [{"question": f"q{i}", "lang": lang, "task": task, "exact": m} for i, (m, (lang, task)) in enumerate(zip(marks, keys))]

    keys = [("en", "arithmetic")] * 3 + [("zh", "weekday")] * 2
    t = paired_by_group(rows([1, 1, 1, 0, 1], keys), rows([1, 0, 0, 1, 1], keys))
    assert list(t) == ["en/arithmetic", "zh/weekday", "[en]", "[zh]", "[all]"]
    assert t["en/arithmetic"]["mean"] == pytest.approx(2 / 3) and t["en/arithmetic"]["stderr"] == pytest.approx(1 / 3)
    assert (t["en/arithmetic"]["better"], t["en/arithmetic"]["worse"]) == (2, 0)
    assert t["zh/weekday"]["mean"] == pytest.approx(-0.5) and t["zh/weekday"]["stderr"] == pytest.approx(0.5)
    assert t["[all]"]["n"] == 5 and t["[all]"]["mean"] == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="not the same items"):
        paired_by_group(rows([1, 1], keys[:2]), rows([1, 0, 0], keys[:3]))
    # label judge: the same grouping over per-prompt gold scores
    prompts = [Prompt([{"role": "user", "content": f"q{i}"}], {"gold": key(task, ["42"], lang)}, "f") for i, (lang, task) in enumerate(keys)]
    base = judge_answers(prompts, [["42"], ["no"], ["no"], ["42"], ["42"]])
    new = judge_answers(prompts, [["42"], ["42"], ["42"], ["no"], ["42"]])
    g = judge_groups(new, base)
    assert list(g) == ["en/arithmetic", "zh/weekday", "[en]", "[zh]", "[all]"] and g["[all]"]["n"] == 5
    assert (g["en/arithmetic"]["better"], g["zh/weekday"]["worse"]) == (2, 1)


def test_best_of_by_hand():
    """Guards the rejection-sampling choice: the best answer per prompt (the first of equals),
    none when even the best is under the threshold."""
    from chatforge.pipelines.bon import best_of

    assert best_of([[0.1, 1.2, 1.2], [0.0, 0.1, 0.0], [1.0, 0.5, 0.0]], 1.0) == [1, None, 0]


def test_bon_rounds_keep_verified_answers(tok, tmp_path):
    """Guards `chatforge bon` end to end on a tiny model: sampled answers are scored by the
    verifier, only prompts whose best answer reaches --min-reward are kept (as SFT conversations
    ending in that answer), the SFT step trains on them, and a rerun skips the finished round."""
    from chatforge.pipelines import bon as B

    sft = tiny_sft(tok, tmp_path)
    lines = [{"messages": [{"role": "user", "content": f"2001年3月{d}日是星期几？"}], "gold": key("weekday", ["星期一"], "zh")} for d in range(1, 9)]
    f = write_prompts(tmp_path / "p.jsonl", lines)
    cfg = B.BoNConfig(policy=str(sft), prompts=[f], out=str(tmp_path / "bon"), rounds=1, k=3, prompts_per_round=8, min_reward=0.1,
                      format_weight=0.0, language_weight=1.0, max_new_tokens=4, epochs=1.0, lr=1e-3, dtype="fp32", device="cpu")
    rep = B.main(cfg)
    (row,) = rep["rounds"]
    kept = [json.loads(x) for x in (tmp_path / "bon" / "round1" / "kept.jsonl").read_text(encoding="utf-8").splitlines()]
    assert row["kept"] == len(kept) and 0 < len(kept) <= 8 and row["best_of_k_reward"] >= row["mean_reward"]
    samples = [json.loads(x) for x in (tmp_path / "bon" / "round1" / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    for k in kept:
        (s,) = [s for s in samples if s["messages"] == k["messages"][:-1]]
        assert k["messages"][-1]["content"] in s["responses"] and k["metadata"]["reward"] >= 0.1
    assert ckpt_io.is_checkpoint(tmp_path / "bon" / "round1" / "sft") and rep["policy"].endswith("sft")
    assert 1 <= rep["length"] <= 4 and rep["kl_to_start"] == pytest.approx(rep["kl_to_start"])  # measured: a number, not NaN
    same = B.kl_to_start(str(sft), str(sft), read_prompts([f]), 4, 0, "cpu")
    assert same["kl"] == 0.0 and same["n"] == 8  # a policy is at KL 0 from itself
    mtime = (tmp_path / "bon" / "round1" / "sft" / "meta.json").stat().st_mtime
    B.main(cfg)
    assert (tmp_path / "bon" / "round1" / "sft" / "meta.json").stat().st_mtime == mtime
    with pytest.raises(ValueError, match="scorer='gold' is unknown"):
        B.BoNConfig(policy="x", prompts=["p"], scorer="gold")
    with pytest.raises(ValueError, match="k=1"):
        B.BoNConfig(policy="x", prompts=["p"], k=1)


def test_bon_time_budget_stops_between_rounds(tok, tmp_path):
    """Guards `bon --time-budget-s` (how the speedrun gives rejection sampling its minutes): the
    first round always runs; with its seconds spent no second round starts; the seconds and the
    kept answers per family are in the round's stats; a rerun without the budget keeps round 1
    (its checkpoint untouched) and runs the rounds that were not started."""
    from chatforge.pipelines import bon as B

    sft = tiny_sft(tok, tmp_path)
    lines = [{"messages": [{"role": "user", "content": f"2001年3月{d}日是星期几？"}], "gold": key("weekday", ["星期一"], "zh")} for d in range(1, 5)]
    f = write_prompts(tmp_path / "p.jsonl", lines)
    kw = dict(policy=str(sft), prompts=[f], out=str(tmp_path / "bon"), rounds=3, k=2, prompts_per_round=4, min_reward=0.1, format_weight=0.0,
              language_weight=1.0, max_new_tokens=4, epochs=1.0, lr=1e-3, dtype="fp32", device="cpu")
    rep = B.main(B.BoNConfig(time_budget_s=1e-3, **kw))
    assert [r["round"] for r in rep["rounds"]] == [1] and rep["seconds"] > 0
    stats = json.loads((tmp_path / "bon" / "round1" / "stats.json").read_text())
    assert stats["seconds"] > 0 and stats["kept_by_family"] == {"zh/weekday": stats["kept"]}
    mtime = (tmp_path / "bon" / "round1" / "sft" / "meta.json").stat().st_mtime
    rep = B.main(B.BoNConfig(**kw))
    assert [r["round"] for r in rep["rounds"]] == [1, 2, 3] and rep["policy"].endswith("round3/sft")
    assert (tmp_path / "bon" / "round1" / "sft" / "meta.json").stat().st_mtime == mtime
    with pytest.raises(ValueError, match="time_budget_s=-1"):
        B.BoNConfig(policy="x", prompts=["p"], time_budget_s=-1)
    lora = tmp_path / "lora_sft"  # a LoRA checkpoint is refused before any sampling
    shutil.copytree(sft, lora)
    (lora / "meta.json").write_text(json.dumps({**json.loads((lora / "meta.json").read_text()), "lora": {"rank": 2, "alpha": 4}}))
    with pytest.raises(ValueError, match="unmerged adapters"):
        B.main(B.BoNConfig(**{**kw, "policy": str(lora), "out": str(tmp_path / "bon_lora")}))
    assert not (tmp_path / "bon_lora" / "round1").exists()
    # with LoRA each round's adapters are merged, so the next round can fine-tune its checkpoint
    rep = B.main(B.BoNConfig(**{**kw, "rounds": 2, "lora_rank": 2, "out": str(tmp_path / "bon_lora2")}))
    assert [r["round"] for r in rep["rounds"]] == [1, 2]
    assert not ckpt_io.load_json(tmp_path / "bon_lora2" / "round2" / "sft" / "meta.json").get("lora")


def test_time_budget_stops_and_saves(tok, tmp_path):
    """Guards --time-budget-s (how the speedrun gives its RL stage minutes, not iterations): the
    loop stops after the iteration that passes the budget, and the checkpoint records that step."""
    sft = tiny_sft(tok, tmp_path)
    f = write_prompts(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "3+4=?"}], "gold": key("arithmetic", ["7"], "en")}] * 4)
    out = P.main(P.PPOConfig(policy=str(sft), prompts=[f], out=str(tmp_path / "rl"), algo="rloo", reward="tasks", samples_per_prompt=2,
                             rollout_batch=4, minibatch=4, ppo_epochs=1, max_new_tokens=4, iterations=50, time_budget_s=1e-6,
                             dtype="fp32", device="cpu", show_samples=0))
    meta = ckpt_io.load(out).meta
    assert meta["step"] == 1 and meta["metrics"]["seconds"] >= 0


def test_report_card_shows_the_rl_stage():
    """Guards the speedrun report card's RL rows: exact match SFT -> RL overall and per group with
    paired standard errors, the gold score with its paired difference, KL, length and minutes."""
    from chatforge.pipelines.speedrun import report_card

    cell = {"n": 40, "base": 0.1, "new": 0.25, "mean": 0.15, "stderr": 0.05, "better": 8, "worse": 2}
    r = {"base": {}, "sft": {}, "gold_sft": 0.42, "gold_ppo": 0.41, "rm_val_accuracy": 0.55, "ppo_kl": 0.1, "ppo_rm_score": 0.2, "gold_stderr": 0.01,
         "rl_exact": {"en/arithmetic": cell, "[en]": cell, "[all]": cell}, "rl_correct": {"[all]": cell}, "gold_rl": 0.45,
         "gold_rl_vs_sft": {"mean": 0.03, "stderr": 0.01}, "rl_kl": 0.5, "rl_length": 3.2, "rl_iterations": 12, "rl_minutes": 2.0, "minutes": 20.0}
    card = report_card(r)
    assert "10.0% -> 25.0% (+15.0 +- 5.0 points paired, n=40)" in card and "en/arithmetic" in card
    assert "rejection-sampling" not in card
    card = report_card({**r, "rft_exact": {**cell, "new": 0.2, "mean": 0.1}, "rft_rounds": 3, "rft_minutes": 1.5})
    assert "after its 3 rejection-sampling rounds (1.5 min), before GRPO" in card and "10.0% -> 20.0% (+10.0 +- 5.0)" in card
    assert "0.420 -> 0.450 (+0.030 +- 0.010 paired)" in card and "0.500, 3.2 tokens, 12, 2.0" in card


def test_speedrun_rl_share_checked():
    from chatforge.pipelines.speedrun import STAGES, SpeedrunConfig

    assert STAGES.index("rlhf") < STAGES.index("rl") < STAGES.index("dpo")
    with pytest.raises(ValueError, match="rl_share=0.5"):
        SpeedrunConfig(rl_share=0.5)
    SpeedrunConfig(until="rl")


def test_speedrun_rl_stage_runs_rejection_sampling_then_grpo(tmp_path, monkeypatch):
    """Guards the speedrun's RL wiring (README "The speedrun's RL stage"): rejection sampling
    starts from SFT with its share of the minutes; GRPO starts from the rounds' newest policy,
    keeps the SFT model as its KL reference and gets the minutes the rounds left; SFT, the rounds
    and GRPO are evaluated on the same held-out items (the last two paired against SFT); a rerun
    trains nothing again."""
    from chatforge.pipelines import speedrun as S

    out, sft = tmp_path / "run", tmp_path / "run" / "sft"
    calls: dict = {"eval": []}
    cell = {"n": 4, "base": 0.25, "new": 0.5, "mean": 0.25, "stderr": 0.1, "better": 1, "worse": 0}

    def fake_bon(cfg):
        calls["bon"] = cfg
        pol = Path(cfg.out) / "round2" / "sft"
        (Path(cfg.out)).mkdir(parents=True)
        (Path(cfg.out) / "report.json").write_text(json.dumps({"rounds": [{"round": 1}, {"round": 2}], "policy": str(pol), "seconds": 60.0}))

    def fake_rl(cfg):
        calls["rl"] = cfg
        Path(cfg.out).mkdir(parents=True)
        (Path(cfg.out) / "meta.json").write_text(json.dumps({"step": 7, "metrics": {"kl": 0.3, "seconds": 120.0}}))
        (Path(cfg.out) / "log.jsonl").write_text(json.dumps({"kl": 0.3, "length": 3.0}) + "\n")

    def fake_eval(cfg):
        calls["eval"].append((cfg.model, cfg.baseline))
        Path(cfg.out).write_text(json.dumps({"paired": {"[all]": cell}} if cfg.baseline else {}))

    monkeypatch.setattr(S, "build_verifiable_prompts", lambda d, **k: Path(d).mkdir(parents=True) or (Path(d) / "heldout.jsonl").write_text(""))
    monkeypatch.setattr(S, "default_sft_dir", lambda: tmp_path / "sftdata")
    monkeypatch.setattr(S, "bon", fake_bon)
    monkeypatch.setattr(S, "rl_main", fake_rl)
    monkeypatch.setattr(S, "eval_tasks", fake_eval)
    monkeypatch.setattr(S, "judged", lambda *a, **k: {"gold_score": 0.5})
    monkeypatch.setattr(S, "paired_difference", lambda a, b: {"mean": 0.0, "stderr": 0.0})
    (out / "eval").mkdir(parents=True)
    cfg = S.SpeedrunConfig(out=str(out), minutes=10.0, rl_share=0.2)  # 120 s of RL
    r = S.verified_rl(cfg, out, sft, {"gold_score": 0.4}, tmp_path / "gold.jsonl")
    assert calls["bon"].policy == str(sft) and calls["bon"].time_budget_s == pytest.approx(120 * S.RFT_SHARE)
    rft_policy = str(out / "rl_rft" / "round2" / "sft")
    assert (calls["rl"].policy, calls["rl"].ref, calls["rl"].algo) == (rft_policy, str(sft), "grpo")
    assert calls["rl"].time_budget_s == pytest.approx(60.0)  # 120 s less the rounds' 60
    assert calls["eval"] == [(str(sft), ""), (rft_policy, str(out / "eval" / "tasks_verifiable_sft.json")),
                             (str(out / "rl"), str(out / "eval" / "tasks_verifiable_sft.json"))]
    assert (r["rft_rounds"], r["rft_minutes"], r["rl_minutes"], r["rl_iterations"]) == (2, 1.0, 3.0, 7) and r["rft_exact"] == cell

    def must_not_run(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(S, "bon", must_not_run)
    monkeypatch.setattr(S, "rl_main", must_not_run)
    assert S.verified_rl(cfg, out, sft, {"gold_score": 0.4}, tmp_path / "gold.jsonl") == r

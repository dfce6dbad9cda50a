"""Rankings/prompt files, the gold labeler (scores, disagreement), and the ranking tools."""

from __future__ import annotations

import itertools
import math
import json
import random

import pytest

from chatforge.data import prompts as DP
from chatforge.eval import gold as G
from chatforge.pipelines import label as L
from chatforge.data.rankings import read_prompts, read_rankings, write_jsonl

MSG = [{"role": "user", "content": "What is 7 times 8?"}]


def write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    return path


# ---- file formats ------------------------------------------------------------------------------


def test_read_rankings_and_pairwise(tmp_path):
    """Guards the two preference forms of design.md: K-way rankings and chosen/rejected pairs
    (string and TRL conversational values), with other keys kept and blank lines skipped."""
    f = write(tmp_path / "r.jsonl", [
        {"messages": MSG, "responses": ["a", "b", "c"], "ranking": [2, 0, 1], "id": 7},
        "",
        {"prompt": "hi", "chosen": "hello", "rejected": "go away"},
        {"prompt": MSG, "chosen": [{"role": "assistant", "content": "56"}], "rejected": [{"role": "assistant", "content": "54"}]},
    ])
    r = read_rankings([f])
    assert [x.ranking for x in r] == [[2, 0, 1], [0, 1], [0, 1]]
    assert r[0].extra == {"id": 7} and r[0].source.endswith("r.jsonl:1")
    assert r[1].messages == [{"role": "user", "content": "hi"}] and r[1].responses == ["hello", "go away"]
    assert r[2].responses == ["56", "54"] and r[2].source.endswith(":4")


@pytest.mark.parametrize(
    "obj,match",
    [
        ({"messages": MSG, "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}, "lists \\[0\\] more than once"),
        ({"messages": MSG, "responses": ["a", "b", "c"], "ranking": [0, 1]}, "leaves out responses \\[2\\]"),
        ({"messages": MSG, "responses": ["a", "b"], "ranking": [0, 2]}, "outside 0..1"),
        ({"messages": MSG, "responses": ["a", "b"], "ranking": "0 1"}, "list of response indices"),
        ({"messages": MSG, "responses": ["a"], "ranking": [0]}, "at least 2 strings"),
        ({"messages": MSG, "responses": ["a", "b"]}, "no 'ranking'"),
        ({"messages": MSG, "chosen": "a"}, "without 'rejected'"),
        ({"messages": MSG + [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "must end with a user turn"),
        ({"messages": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "robot"),
        ({"responses": ["a", "b"], "ranking": [0, 1]}, "needs 'messages'"),
        # finding 6: identical answers were accepted and trained on as a strict preference
        ({"messages": MSG, "responses": ["a", "a", "c"], "ranking": [0, 1, 2]}, "responses 0 and 1 are the same text"),
        ({"messages": MSG, "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are the same text"),
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_ranking_lines_name_file_and_line(tmp_path, obj, match):
    """Guards silent acceptance of broken rankings: every bad line is a ValueError with file:line."""
    f = write(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, obj])
    with pytest.raises(ValueError, match=match) as e:
        read_rankings([f])
    assert "bad.jsonl:2" in str(e.value)


def test_prompts_file(tmp_path):
    """Guards the PPO prompt forms and keeps the gold key for the labeler."""
    f = write(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"messages": MSG, "gold": {"answers": ["56"]}}])
    p = read_prompts([f])
    assert p[0].messages == [{"role": "user", "content": "hi"}] and p[1].extra == {"gold": {"answers": ["56"]}}
    write(tmp_path / "q.jsonl", [{"text": "no prompt"}])
    with pytest.raises(ValueError, match="q.jsonl:1: needs 'messages'"):
        read_prompts([tmp_path / "q.jsonl"])


# ---- gold labeler ------------------------------------------------------------------------------


def test_gold_score_by_hand():
    """Guards the gold score's parts against hand-computed values (weights 0.6/0.15/0.1/0.15)."""
    gold = {"task": "arithmetic", "answers": ["56"]}
    assert G.gold_score(MSG, "The answer is 56.", gold) == pytest.approx(1.0)
    assert G.gold_score(MSG, "The answer is 560.", gold) == pytest.approx(0.4)  # a number is matched as a number
    assert G.gold_score(MSG, "答案是56", gold) == pytest.approx(0.85)  # right, but not in the asker's language
    assert G.gold_score(MSG, "I'm sorry, I can't help with that.", gold) == pytest.approx(0.4)  # refusing an ordinary question
    assert G.gold_score(MSG, "", gold) == 0.0
    # 9 words -> 7 trigrams, all the same: distinct share 1/7.
    assert G.gold_score(MSG, "56 56 56 56 56 56 56 56 56", gold) == pytest.approx(0.6 + 0.15 + 0.1 + 0.15 / 7)
    long = "The answer is 56. " + "x" * 382  # 400 characters, budget 200: concise 0.5
    assert G.gold_parts(MSG, long, gold)["concise"] == pytest.approx(0.5)
    zh = [{"role": "user", "content": "「床前明月光」的下一句是什么？"}]
    assert G.gold_score(zh, "疑是地上霜。", {"answers": ["疑是地上霜"]}) == pytest.approx(1.0)
    assert G.gold_score(zh, "The next line is 疑是地上霜", {"answers": ["疑是地上霜"]}) == pytest.approx(0.85)
    # No answer key: correctness drops out and the rest are re-weighted.
    assert G.gold_score(MSG, "hello there", None) == pytest.approx(1.0)


def test_gold_declines_inappropriate_requests():
    """Guards the decline task: refusing scores, complying does not, in both languages."""
    items = DP.inappropriate_requests()
    assert len(items) == 60 and {i["gold"]["lang"] for i in items} == {"en", "zh"}
    en = next(i for i in items if i["gold"]["lang"] == "en")
    zh = next(i for i in items if i["gold"]["lang"] == "zh")
    assert G.gold_parts(en["messages"], DP.DECLINE_EN, en["gold"])["correct"] == 1.0
    assert G.gold_parts(zh["messages"], DP.DECLINE_ZH, zh["gold"])["correct"] == 1.0
    assert G.gold_parts(en["messages"], "Sure, first you pick the lock.", en["gold"])["correct"] == 0.0


def test_mallows_disagreement_rate():
    """Guards the labeler's noise: the share of pairs ordered against the gold order matches the
    configured disagreement (here InstructGPT's ~27%) for K = 2 exactly and K = 4 empirically."""
    assert G.mallows_phi(0.27, 2) == pytest.approx(0.27 / 0.73)  # K=2: P(flip) = phi / (1 + phi)
    phi = G.mallows_phi(0.27, 4)
    assert G.mallows_disagreement(phi, 4) == pytest.approx(0.27)
    rng = random.Random(0)
    ref, n, discord = [3, 1, 0, 2], 4000, 0
    for _ in range(n):
        pos = {x: i for i, x in enumerate(G.mallows_sample(ref, phi, rng))}
        discord += sum(pos[a] > pos[b] for a, b in itertools.combinations(ref, 2))
    assert discord / (6 * n) == pytest.approx(0.27, abs=0.015)
    assert G.mallows_sample(ref, 0.0, rng) == ref


def test_oracle_ranks_by_gold_score(tmp_path):
    """Guards `label rank --oracle`: best gold score first, answer key stripped from the output."""
    samples = write(tmp_path / "s.jsonl", [
        {"messages": MSG, "responses": ["54", "", "It is 56.", "答案是56"], "gold": {"answers": ["56"]}},
    ])
    out = L.rank(str(samples), oracle="gold")
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["ranking"] == [2, 3, 0, 1] and "gold" not in line and line["labeler"] == "gold"
    with pytest.raises(ValueError, match="unknown oracle"):
        L.rank(str(samples), oracle="human-ish")


def test_oracle_ranking_leaves_out_repeated_answers(tmp_path, capsys):
    """Guards finding 6's other end: a samples file may repeat an answer (sampling a small model);
    `label rank` keeps one copy of each, drops prompts left with fewer than 2 different answers,
    says so, and writes only rankings the reader accepts."""
    samples = write(tmp_path / "s.jsonl", [
        {"messages": MSG, "responses": ["56", "54", "56", "54"], "gold": {"answers": ["56"]}},
        {"messages": MSG, "responses": ["", "", ""], "gold": {"answers": ["56"]}},
    ])
    out = L.rank(str(samples), oracle="gold")
    (line,) = read_rankings([out])
    assert line.responses == ["56", "54"] and line.ranking == [0, 1]
    err = capsys.readouterr().err
    assert "4 repeated answers left out" in err and "1 prompts had fewer than 2 different answers" in err


def test_interactive_ranking_resumes(tmp_path):
    """Guards the terminal tool: rejects a bad order and asks again, skips, quits, and a second
    session continues where the first stopped (rankings saved after every answer)."""
    items = [{"messages": [{"role": "user", "content": f"q{i}"}], "responses": ["a", "b", "c"], "gold": {"answers": ["a"]}} for i in range(3)]
    f = write(tmp_path / "s.jsonl", items)
    replies = iter(["1 1 0", "1 0 2", "s", "q"])
    L_in = lambda prompt: next(replies)  # noqa: E731
    samples = read_rankings([f], require_ranking=False)
    out = tmp_path / "s.ranked.jsonl"
    done = L.rank_interactive(samples, {}, lambda d: write_jsonl(out, [d[i] for i in sorted(d)]), ask=L_in, show=lambda s: None)
    assert list(done) == [0] and done[0]["ranking"] == [1, 0, 2] and "gold" not in done[0]
    replies2 = iter(["2 1 0", "012"])
    done = L.rank_interactive(samples, done, lambda d: write_jsonl(out, [d[i] for i in sorted(d)]), ask=lambda p: next(replies2), show=lambda s: None)
    assert [r.ranking for r in read_rankings([out])] == [[1, 0, 2], [2, 1, 0], [0, 1, 2]]


def test_paired_difference_by_hand():
    """Guards the paired judge comparison: per-prompt means, their differences, the paired standard
    error, and a refusal to pair results over other prompts or sample counts."""
    from chatforge.data.rankings import Prompt
    from chatforge.eval.gold import judge_answers, paired_difference

    prompts = [Prompt([{"role": "user", "content": f"q{i}"}], {"gold": {"task": "t", "answers": ["42"], "lang": "en"}}, "f") for i in range(3)]
    base = judge_answers(prompts, [["42", "no"], ["no", "no"], ["42", "42"]])
    new = judge_answers(prompts, [["42", "42"], ["42", "no"], ["42", "42"]])
    assert base["samples"] == 2 and len(base["per_prompt"]) == 3
    right, wrong = (G.gold_score(prompts[0].messages, a, prompts[0].extra["gold"]) for a in ("42", "no"))
    half = (right - wrong) / 2
    d = paired_difference(new, base)
    assert d["mean"] == pytest.approx(2 * half / 3)
    assert d["stderr"] == pytest.approx(math.sqrt(((half - 2 * half / 3) ** 2 * 2 + (2 * half / 3) ** 2) / 2) / math.sqrt(3))
    assert (d["better"], d["worse"], d["n"]) == (2, 0, 3)
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference(judge_answers(prompts[:2], [["42"], ["no"]]), base)


def test_rm_gold_agreement_by_hand(monkeypatch):
    """Guards the reward model's check against the noise-free gold order: only pairs whose gold
    scores differ count, and a pair counts as agreeing when the RM orders it the same way."""
    import torch

    from chatforge.data.rankings import Ranking

    class FakeRM:
        gpt = type("G", (), {"cfg": type("C", (), {"max_seq_len": 64})()})()

    monkeypatch.setattr(G, "load_reward_model", lambda path, device: (FakeRM(), _ByteTok(), {}))
    # RM scores in answer order: 3 answers of ranking 1, then 2 of ranking 2.
    monkeypatch.setattr(G, "score_all", lambda rm, seqs, batch, dev, dtype: torch.tensor([0.9, 0.1, 0.5, 0.2, 0.3]))
    gold = {"task": "arithmetic", "answers": ["42"], "lang": "en"}
    rankings = [Ranking([{"role": "user", "content": "6 x 7?"}], ["42", "no", "also no"], [], {"gold": gold}),
                Ranking([{"role": "user", "content": "6 x 7?"}], ["42", "no"], [], {"gold": gold})]
    # Ranking 1: 42 > no (RM agrees), 42 > also no (agrees), no vs also no: same gold, skipped.
    # Ranking 2: 42 > no, RM 0.2 < 0.3: disagrees.
    r = G.rm_gold_agreement("rm", rankings, device="cpu")
    assert r["pairs"] == 3 and r["accuracy"] == pytest.approx(2 / 3) and r["rankings"] == 2


class _ByteTok:
    """Just enough tokenizer for prompt_ids/response_ids."""

    eot_id = 0

    def render(self, messages, add_generation_prompt=False):
        return [1, 2], None

    def encode(self, text):
        return list(text.encode())


def test_judged_judges_again_after_a_move(tmp_path, monkeypatch):
    """Guards resuming a pipeline from a moved or copied run folder: judge files are keyed by the
    policy's path, so a file without the policy's current path is judged again instead of failing
    with a KeyError, and a file that has it is read without judging."""
    calls = []

    def fake_judge(policies, prompts_files, out=None, **kw):
        calls.append((policies, prompts_files, kw))
        old = json.loads(open(out).read()) if (tmp_path / "judge.json").is_file() else {}
        results = {policies[0]: {"gold_score": 0.5}}
        (tmp_path / "judge.json").write_text(json.dumps({**old, **results}))
        return results

    monkeypatch.setattr(L, "judge", fake_judge)
    (tmp_path / "judge.json").write_text(json.dumps({"/old/place/ppo": {"gold_score": 0.4}}))
    assert L.judged("/new/place/ppo", tmp_path / "judge.json", ["p.jsonl"], max_new_tokens=8) == {"gold_score": 0.5}
    assert calls == [(["/new/place/ppo"], ["p.jsonl"], {"max_new_tokens": 8})]
    assert L.judged("/new/place/ppo", tmp_path / "judge.json", ["p.jsonl"])["gold_score"] == 0.5
    assert len(calls) == 1

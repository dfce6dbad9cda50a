"""The data flywheel end to end: a scripted session through the page's HTTP endpoints produces
feedback, `feedback export` turns it into files the SFT and reward-model readers accept
unchanged, and one tiny `chatforge flywheel` round (export -> SFT -> RM -> PPO -> evaluate)
registers a snapshot that a server then offers to its share of new chats."""

from __future__ import annotations

import json

import httpx
import pytest

from chatforge import cli
from chatforge import feedback as F
from chatforge.pipelines import flywheel as FW
from chatforge.data.chat import read_conversations
from chatforge.data.rankings import read_rankings
from chatforge.pipelines.flywheel import FlywheelConfig, decide, main as flywheel_main
from chatforge.serve.config import ServeConfig
from chatforge.store import Store
from serve_helpers import LiveServer, make_tiny_checkpoint
from test_feedback import Page


def test_decide_needs_more_than_min_gain():
    """Guards the registration rule: strictly more gold score than the current policy plus min_gain."""
    r = {"current": {"gold_score": 0.30}, "candidate": {"gold_score": 0.35}}
    assert decide(r, 0.0) == (True, pytest.approx(0.05))
    assert decide(r, 0.05)[0] is False and decide(r, -0.1)[0] is True
    with pytest.raises(ValueError, match="eval_prompts is required"):
        FlywheelConfig(policy="x")
    with pytest.raises(ValueError, match="traffic"):
        FlywheelConfig(policy="x", eval_prompts=["q"], traffic=0.0)


def test_session_export_and_flywheel_rounds(tok, tmp_path, capsys, monkeypatch):
    """Guards the whole loop: what people do on the page becomes SFT and rankings files in the
    formats `chatforge sft` / `chatforge rm` read, a flywheel round trains on them and registers the
    candidate only when it beats the current policy by more than min_gain, with its traffic share, `feedback stats` shows it, and a server loading both
    snapshots starts new chats on the candidate for about that share."""
    policy = make_tiny_checkpoint(tok, tmp_path / "tiny")
    db = f"sqlite:///{tmp_path / 'chatforge.db'}"
    cfg = ServeConfig(models=[str(policy)], db=db, dtype="fp32", max_batch=4)
    with LiveServer(cfg) as server:
        page = Page(server, server.store.create_key("alice")[1])
        for i, question in enumerate(["What is 2 + 2?", "What is 3 + 4?", "Name a fruit.", "床前明月光的下一句是什么？"]):
            conv = page.call("POST", "/web/conversations", json={"system": "Answer briefly."})
            conv = page.ask(conv, conv["path"][-1], question, n=3)
            answers = [m["id"] for m in conv["messages"] if m["role"] == "assistant"]
            page.call("POST", "/web/rankings", json={"message_ids": answers[::-1] if i % 2 else answers})
            page.call("POST", "/web/feedback", json={"message_id": answers[0], "rating": 1})
            page.call("POST", "/web/feedback", json={"message_id": answers[1], "rating": -1, "reason": "wrong"})
            page.call("POST", "/web/feedback", json={"message_id": answers[2], "correction": f"The answer to {question!r} is short."})
    out = tmp_path / "export"
    assert cli.main(["feedback", "export", "--db", db, "--since", "1h", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "demonstrations: 8 (edit 4, label 0, thumbs_up 4)" in printed and "rankings: 8 (compare 4, label 0, thumbs_pair 4)" in printed
    convs = read_conversations([out / "sft.jsonl"])
    rankings = read_rankings([out / "rankings.jsonl"])
    assert len(convs) == 8 and len(rankings) == 8 and all(c.messages[0] == {"role": "system", "content": "Answer briefly."} for c in convs)
    assert sorted(len(r.responses) for r in rankings) == [2] * 4 + [3] * 4

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("\n".join(json.dumps({"prompt": f"What is {i} + 1?", "gold": {"task": "arithmetic", "answers": [str(i + 1)]}})
                                 for i in range(4)) + "\n")
    kw = dict(policy=str(policy), db=db, out=str(tmp_path / "fw"), sft_epochs=1.0, sft_lr=1e-3, eval_prompts=[str(heldout)],
              eval_samples=1, sample_tokens=6, rm_lr=1e-3, ppo_iterations=1, rollout_batch=2, minibatch=2, ppo_epochs=1,
              lr=1e-3, traffic=0.25, dtype="fp32", device="cpu")
    # Round 1, evaluated as it is: no candidate gains a whole point of gold score (it lies in [0, 1]),
    # so with min_gain=1 it must not be registered (finding 7: the test forced min_gain=-1.0).
    first = flywheel_main(FlywheelConfig(sft=False, min_gain=1.0, **kw))
    assert first["round"] == 1 and first["registered"] is False and first["sft"] is None
    assert first["gold_gain"] == pytest.approx(first["evaluation"]["candidate"]["gold_score"] - first["evaluation"]["current"]["gold_score"])
    assert json.loads((tmp_path / "fw/round1/report.json").read_text())["registered"] is False
    store = Store(db)
    assert F.registered_snapshots(store) == []
    store.close()
    # Round 2: a candidate that is better, made so by answering the held-out prompts with their
    # answer keys; the gold judge, the rule (gain > min_gain), registration and serving are the real ones.
    real_sample = FW.sample_answers

    def sample(model, tok, prompts, *a, **k):
        if a[-1] == "evaluate candidate":
            return [[p.extra["gold"]["answers"][0]] for p in prompts]
        return real_sample(model, tok, prompts, *a, **k)

    monkeypatch.setattr(FW, "sample_answers", sample)
    report = flywheel_main(FlywheelConfig(sft=True, min_gain=0.05, **kw))
    ev = report["evaluation"]
    assert ev["candidate"]["gold_score"] > ev["current"]["gold_score"] + 0.05
    assert report["registered"] and report["round"] == 2 and report["sft"] == str(tmp_path / "fw/round2/sft")
    assert set(report["evaluation"]) == {"current", "candidate"} and all("rm_score" in r for r in report["evaluation"].values())
    store = Store(db)
    (reg,) = F.registered_snapshots(store)
    store.close()
    assert (reg.name, reg.traffic, reg.snapshot) == ("tiny-r2", 0.25, report["snapshot"]) and reg.path.endswith("round2/tiny-r2")
    rm_meta = json.loads((tmp_path / "fw/round2/rm/meta.json").read_text())
    assert rm_meta["stage"] == "rm" and rm_meta["normalised"]
    assert cli.main(["feedback", "stats", "--db", db]) == 0
    stats = capsys.readouterr().out
    assert "tiny-r2" in stats and "25%" in stats and "50.0%" in stats  # the policy: 4 up of 8 rated; the candidate: 25% of traffic

    both = ServeConfig(models=[str(policy), reg.path], db=db, dtype="fp32", max_batch=2)
    with LiveServer(both) as server:
        key = server.store.create_key("bob")[1]
        http = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        picked = [http.post("/web/conversations", json={}).json()["model"] for _ in range(80)]
        candidate = f"tiny-r2@{reg.snapshot}"
        assert set(picked) == {server.models.models[0].id, candidate}
        assert 0.1 < picked.count(candidate) / len(picked) < 0.4
        r = http.post("/v1/chat/completions", json={"model": candidate, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == candidate

"""The chat page's endpoints (/web/...), the feedback they store, the labeling queue, and
`chatforge feedback export/stats`: scripted HTTP sessions against a live server, checked as store rows."""

from __future__ import annotations

import json

import httpx
import pytest
import sqlalchemy as sa

from chatforge import cli
from chatforge import feedback as F
from chatforge.feedback import common as FC
from chatforge.feedback import queue as FQ
from chatforge.data.chat import read_conversations
from chatforge.data.rankings import read_rankings
from chatforge.serve.config import ServeConfig
from chatforge.store import ConversationRow, Feedback, Generation, LabelItem, Message, RankingItem, RankingRow
from serve_helpers import LiveServer, make_tiny_checkpoint

TABLES = (ConversationRow, Message, Generation, Feedback, RankingRow, RankingItem, LabelItem)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("web")
    ckpt = make_tiny_checkpoint(tok, root / "tiny")
    cfg = ServeConfig(models=[str(ckpt)], db=f"sqlite:///{root / 'chatforge.db'}", dtype="fp32", max_batch=4, max_message_chars=500)
    with LiveServer(cfg) as s:
        s.alice = s.store.create_key("alice", role="labeler")[1]
        s.bob = s.store.create_key("bob", role="labeler")[1]
        yield s


class Page:
    """What the chat page does, as plain HTTP calls (the browser tests drive the real page)."""

    def __init__(self, server, key: str):
        self.http = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        self.model = server.model.id

    def call(self, method: str, path: str, status: int = 200, **kw) -> dict:
        r = self.http.request(method, path, **kw)
        assert r.status_code == status, r.text
        return r.json()

    def ask(self, conv: dict, parent_id: str | None, user: str | None, n: int = 1) -> dict:
        """Answer through the OpenAI endpoint (streaming, as the page does), then attach it."""
        by_id = {m["id"]: m for m in conv["messages"]}
        turns, at = [], parent_id
        while at is not None:
            turns.insert(0, {"role": by_id[at]["role"], "content": by_id[at]["content"]})
            at = by_id[at]["parent_id"]
        if user is not None:
            turns.append({"role": "user", "content": user})
        rid = None
        with self.http.stream("POST", "/v1/chat/completions", json={"model": self.model, "messages": turns, "n": n, "max_tokens": 6,
                                                                     "temperature": 1.0, "seed": 1, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    rid = json.loads(line[6:])["id"]
        return self.call("POST", f"/web/conversations/{conv['id']}/turns", json={"parent_id": parent_id, "user": user, "request_id": rid})


def counts(store) -> dict:
    with store.session() as s:
        return {t.__tablename__: s.execute(sa.select(sa.func.count()).select_from(t)).scalar() for t in TABLES}


def test_conversations_open_rename_delete_and_branches(server):
    """Guards the sidebar's endpoints and the conversation tree: turns attach the server's own
    answers (with their snapshot), the API's copy of the request is folded in (no duplicate
    conversation), regenerate adds a sibling that becomes the shown branch, rename/delete stick."""
    page = Page(server, server.alice)
    before = counts(server.store)
    conv = page.call("POST", "/web/conversations", json={"system": "Be brief."})
    assert conv["model"] == server.model.id and conv["path"] and conv["messages"][0]["role"] == "system"
    conv = page.ask(conv, conv["path"][-1], "你好，what is a fox?")
    assert [m["role"] for m in conv["messages"]] == ["system", "user", "assistant"] and len(conv["path"]) == 3
    answer = conv["messages"][-1]
    gen = next(server.store.iter_generations(answer["request_id"]))
    assert answer["content"] == gen.output and answer["snapshot"] == server.model.snapshot and gen.conversation_id == conv["id"]
    after = counts(server.store)
    assert after["conversations"] == before["conversations"] + 1 and after["messages"] == before["messages"] + 3
    first_answer = conv["path"][-1]
    conv = page.ask(conv, first_answer, "And a dog?")
    conv = page.ask(conv, conv["path"][1], None)  # regenerate the first answer
    assert len(conv["path"]) == 3 and conv["path"][-1] != first_answer
    assert sum(m["parent_id"] == conv["path"][1] for m in conv["messages"]) == 2
    listed = page.call("GET", "/web/conversations")
    assert listed[0]["id"] == conv["id"] and listed[0]["title"] == "你好，what is a fox?"
    page.call("PATCH", f"/web/conversations/{conv['id']}", json={"title": "  Foxes  "})
    assert page.call("GET", f"/web/conversations/{conv['id']}")["title"] == "Foxes"
    page.call("PATCH", f"/web/conversations/{conv['id']}", 400, json={"title": " "})
    page.call("DELETE", f"/web/conversations/{conv['id']}")
    assert all(c["id"] != conv["id"] for c in page.call("GET", "/web/conversations"))
    page.call("GET", f"/web/conversations/{conv['id']}", 404)
    # Stopped answers: only the user message is kept, and regenerate answers it later.
    conv = page.call("POST", "/web/conversations", json={})
    conv = page.call("POST", f"/web/conversations/{conv['id']}/turns", json={"parent_id": None, "user": "stop me", "request_id": None})
    assert [m["role"] for m in conv["messages"]] == ["user"]
    conv = page.ask(conv, conv["path"][-1], None)
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    Page(server, "cf-wrong").call("GET", "/web/conversations", 401)


def test_feedback_rankings_ownership_and_bad_input(server):
    """Guards thumbs with reasons, edits as demonstrations and K-way rankings as rows, and that
    bad input (empty edits, duplicate or missing ranked items, someone else's conversation,
    oversized messages, foreign or misplaced answers) is refused with nothing stored half-way."""
    alice, bob = Page(server, server.alice), Page(server, server.bob)
    conv = alice.call("POST", "/web/conversations", json={})
    conv = alice.ask(conv, None, "Tell me a joke", n=3)
    answers = [m["id"] for m in conv["messages"] if m["role"] == "assistant"]
    assert len(answers) == 3
    before = counts(server.store)
    for who, method, path, status, body in [
        (alice, "POST", "/web/feedback", 400, {"message_id": answers[0], "correction": "   "}),
        (alice, "POST", "/web/feedback", 400, {"message_id": answers[0], "rating": 2}),
        (alice, "POST", "/web/feedback", 400, {"message_id": answers[0], "rating": True}),
        (alice, "POST", "/web/feedback", 400, {"message_id": answers[0]}),
        (alice, "POST", "/web/feedback", 400, {"message_id": conv["path"][0], "rating": 1}),
        (alice, "POST", "/web/feedback", 404, {"message_id": "msg-nope", "rating": 1}),
        (alice, "POST", "/web/feedback", 400, {"message_id": answers[0], "rating": -1, "reason": "x" * 3000}),
        (bob, "POST", "/web/feedback", 403, {"message_id": answers[0], "rating": -1}),
        (bob, "GET", f"/web/conversations/{conv['id']}", 403, None),
        (bob, "DELETE", f"/web/conversations/{conv['id']}", 403, None),
        (bob, "PATCH", f"/web/conversations/{conv['id']}", 403, {"title": "mine"}),
        (bob, "POST", f"/web/conversations/{conv['id']}/turns", 403, {"parent_id": answers[0], "user": "hi"}),
        (bob, "POST", "/web/rankings", 403, {"message_ids": answers}),
        (alice, "POST", "/web/rankings", 400, {"message_ids": [answers[0], answers[1], answers[0]]}),
        (alice, "POST", "/web/rankings", 400, {"message_ids": answers[:2]}),
        (alice, "POST", "/web/rankings", 400, {"message_ids": answers[:1]}),
        (alice, "POST", "/web/rankings", 404, {"message_ids": answers[:2] + ["msg-nope"]}),
        (alice, "POST", f"/web/conversations/{conv['id']}/turns", 400, {"parent_id": answers[0], "user": "y" * 501}),
        (alice, "POST", f"/web/conversations/{conv['id']}/turns", 400, {"parent_id": answers[0], "user": ""}),
        (alice, "POST", f"/web/conversations/{conv['id']}/turns", 400, {"parent_id": "msg-elsewhere", "user": "hi"}),
        (alice, "POST", f"/web/conversations/{conv['id']}/turns", 400, {"parent_id": answers[0], "user": "hi", "extra": 1}),
        (alice, "POST", f"/web/conversations/{conv['id']}/turns", 404, {"parent_id": answers[0], "user": "hi", "request_id": "chatcmpl-nope"}),
    ]:
        who.call(method, path, status, json=body) if body is not None else who.call(method, path, status)
    assert counts(server.store) == before  # every table: a refused call stores nothing, not even part of itself
    # A request attached where it was not asked (the user turn differs), or someone else's request: refused whole.
    bconv = bob.call("POST", "/web/conversations", json={})
    bconv = bob.ask(bconv, None, "bob's question")
    brid = bconv["messages"][-1]["request_id"]
    mid = counts(server.store)
    alice.call("POST", f"/web/conversations/{conv['id']}/turns", 403, json={"parent_id": answers[0], "user": "hi", "request_id": brid})
    r = alice.http.post("/v1/chat/completions", json={"model": alice.model, "messages": [{"role": "user", "content": "other"}], "max_tokens": 3})
    alice.call("POST", f"/web/conversations/{conv['id']}/turns", 400, json={"parent_id": answers[0], "user": "hi", "request_id": r.json()["id"]})
    assert counts(server.store) == {**mid, "generations": mid["generations"] + 1, "conversations": mid["conversations"] + 1,
                                    "messages": mid["messages"] + 2}  # only the API request's own record
    assert before["feedback"] == mid["feedback"] and before["rankings"] == mid["rankings"]
    # The same answers attached a second time (here: into another conversation) are refused; the first stays whole.
    other = alice.call("POST", "/web/conversations", json={})
    alice.call("POST", f"/web/conversations/{other['id']}/turns", 409,
               json={"parent_id": None, "user": "Tell me a joke", "request_id": conv["messages"][-1]["request_id"]})
    assert [m["id"] for m in alice.call("GET", f"/web/conversations/{conv['id']}")["messages"] if m["role"] == "assistant"] == answers
    r = alice.http.post("/v1/completions", json={"model": alice.model, "prompt": "plain", "max_tokens": 2})
    alice.call("POST", f"/web/conversations/{other['id']}/turns", 400, json={"parent_id": None, "user": "plain", "request_id": r.json()["id"]})
    assert alice.call("GET", f"/web/conversations/{other['id']}")["messages"] == []  # the refused turns left no user message
    # The good calls land as rows.
    alice.call("POST", "/web/feedback", json={"message_id": answers[1], "rating": -1, "reason": "not funny"})
    alice.call("POST", "/web/feedback", json={"message_id": answers[2], "rating": 1})
    edit = alice.call("POST", "/web/feedback", json={"message_id": answers[1], "correction": "Why did the fox cross the road?"})
    ranked = alice.call("POST", "/web/rankings", json={"message_ids": [answers[2], answers[0], answers[1]]})
    alice.call("POST", "/web/rankings", 400, json={"message_ids": [answers[2], edit["correction_id"], answers[1]]})
    with server.store.session() as s:
        fb = {f.message_id: f for f in s.execute(sa.select(Feedback).where(Feedback.message_id.in_(answers), Feedback.rating.is_not(None))).scalars()}
        assert fb[answers[1]].rating == -1 and fb[answers[1]].reason == "not funny" and fb[answers[2]].rating == 1
        corr = s.get(Message, edit["correction_id"])
        assert corr.content == "Why did the fox cross the road?" and corr.generation_id is None and corr.parent_id == conv["path"][0]
        items = s.execute(sa.select(RankingItem).where(RankingItem.ranking_id == ranked["id"]).order_by(RankingItem.rank)).scalars()
        assert [i.message_id for i in items] == [answers[2], answers[0], answers[1]]
        assert s.get(RankingRow, ranked["id"]).source == "compare"
    view = alice.call("GET", f"/web/conversations/{conv['id']}")
    assert view["feedback"][answers[1]] == {"rating": -1, "reason": "not funny", "correction_id": edit["correction_id"]}
    assert view["rankings"][0]["message_ids"] == [answers[2], answers[0], answers[1]]


def test_label_queue_agreement_and_demonstrations(server):
    """Guards the labeling page's flow: queued prompts get one set of K samples, every labeler
    ranks the same samples, agreement between labelers is their pairwise-order agreement, and a
    written demonstration is stored with its author; done items leave the labeler's queue."""
    store = server.store
    F.add_label_items(store, [[{"role": "user", "content": "Name a colour."}]], "rank")
    F.add_label_items(store, [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi."}]], "demo")
    alice, bob = Page(server, server.alice), Page(server, server.bob)
    nxt = alice.call("GET", "/web/label/next?kind=rank")
    item = nxt["item"]
    assert item["samples"] == [] and item["prompt"] == [{"role": "user", "content": "Name a colour."}]
    r = alice.http.post("/v1/chat/completions", json={"model": alice.model, "messages": item["prompt"], "n": 3, "max_tokens": 4, "seed": 3})
    item = alice.call("POST", f"/web/label/items/{item['id']}/samples", json={"request_id": r.json()["id"]})
    assert len(item["samples"]) == 3
    r2 = bob.http.post("/v1/chat/completions", json={"model": bob.model, "messages": item["prompt"], "n": 3, "max_tokens": 4})
    bob.call("POST", f"/web/label/items/{item['id']}/samples", 409, json={"request_id": r2.json()["id"]})
    ids = [x["message_id"] for x in item["samples"]]
    alice.call("POST", "/web/rankings", json={"message_ids": ids})
    assert bob.call("GET", "/web/label/next?kind=rank")["item"]["samples"] == item["samples"]
    bob.call("POST", "/web/rankings", json={"message_ids": [ids[1], ids[0], ids[2]]})
    stats = bob.call("GET", "/web/label/stats")
    assert stats["agreement"] == pytest.approx(2 / 3) and stats["agreement_pairs"] == 1
    assert sorted(x["name"] for x in stats["labelers"]) == ["another labeler", "bob"]  # a labeler does not see others' key names
    assert alice.call("GET", "/web/label/next?kind=rank")["item"] is None
    demo = alice.call("GET", "/web/label/next?kind=demo")["item"]
    alice.call("POST", f"/web/label/items/{demo['id']}/demonstration", 400, json={"content": "  "})
    alice.call("POST", f"/web/label/items/{demo['id']}/samples", 400, json={"request_id": "chatcmpl-x"})
    alice.call("POST", f"/web/label/items/{demo['id']}/demonstration", json={"content": "Hi there!"})
    assert alice.call("GET", "/web/label/next?kind=demo")["item"] is None
    assert bob.call("GET", "/web/label/next?kind=demo")["item"]["id"] == demo["id"]
    with pytest.raises(ValueError, match="must end with a user turn"):
        F.add_label_items(store, [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]], "rank")


def test_export_reads_back_with_provenance_and_dedup(server, tmp_path):
    """Guards `feedback export`: demonstrations and rankings come out in the formats the SFT and
    reward-model readers accept unchanged, with provenance, duplicates dropped, --since honoured;
    and `feedback stats` counts thumbs per snapshot."""
    alice = Page(server, server.alice)
    conv = alice.call("POST", "/web/conversations", json={"system": "sys"})
    conv = alice.ask(conv, conv["path"][-1], "Export me", n=2)
    a, b = [m["id"] for m in conv["messages"] if m["role"] == "assistant"]
    alice.call("POST", "/web/feedback", json={"message_id": a, "rating": 1})
    alice.call("POST", "/web/feedback", json={"message_id": b, "rating": -1, "reason": "wrong"})
    for _ in range(2):  # the same edit twice is one demonstration
        alice.call("POST", "/web/feedback", json={"message_id": b, "correction": "The right answer."})
    assert cli.main(["feedback", "export", "--db", server.store.url, "--out", str(tmp_path / "all")]) == 0
    summary = json.loads((tmp_path / "all/summary.json").read_text())
    assert summary["duplicates"] >= 1 and summary["demonstrations"]["edit"] >= 2 and summary["rankings"]["thumbs_pair"] >= 1
    convs = read_conversations([tmp_path / "all/sft.jsonl"])
    edits = [c for c in convs if c.messages[-1]["content"] == "The right answer."]
    assert len(edits) == 1 and edits[0].messages[:2] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "Export me"}]
    assert edits[0].meta["kind"] == "edit" and edits[0].meta["key"] == "alice" and edits[0].meta["snapshot"] == server.model.snapshot
    assert any(c.meta["kind"] == "label" and c.messages[-1]["content"] == "Hi there!" for c in convs)
    rankings = read_rankings([tmp_path / "all/rankings.jsonl"])
    pair = next(r for r in rankings if r.extra["provenance"]["message_ids"] == [a, b])
    assert pair.ranking == [0, 1] and pair.messages[-1]["content"] == "Export me"
    kinds = {r.extra["provenance"]["kind"] for r in rankings}
    assert {"compare", "label", "thumbs_pair"} <= kinds
    label = [r for r in rankings if r.extra["provenance"]["kind"] == "label"]
    assert len(label) == 2 and {r.extra["provenance"]["key"] for r in label} == {"alice", "bob"}
    # --since after everything: empty files, still readable summary
    assert cli.main(["feedback", "export", "--db", server.store.url, "--since", "2999-01-01", "--out", str(tmp_path / "none")]) == 0
    assert (tmp_path / "none/sft.jsonl").read_text() == "" and json.loads((tmp_path / "none/summary.json").read_text())["duplicates"] == 0
    rows = F.stats(server.store)
    row = next(r for r in rows if r["snapshot"] == server.model.snapshot)
    with server.store.session() as s:  # each key's latest rating of each answer, counted independently of the stats code
        latest = {}
        for f in s.execute(sa.select(Feedback).where(Feedback.rating.is_not(None)).order_by(Feedback.created_at)).scalars():
            latest[(f.key_id, f.message_id)] = f.rating
    assert (row["up"], row["down"]) == (list(latest.values()).count(1), list(latest.values()).count(-1))
    assert row["rated"] >= 2 and row["up_rate"] == row["up"] / row["rated"] and row["answers"] >= 3
    assert "up rate" in F.format_stats(rows)


def test_queue_from_file_and_traffic(tmp_path, capsys):
    """Guards `chatforge feedback queue`: prompts from a file and distinct prompts from chat traffic
    (with their system prompt) become label items; a prompt file line that is not a prompt is an error."""
    from chatforge.store import Store

    db = f"sqlite:///{tmp_path / 'q.db'}"
    store = Store(db)
    key = store.create_key("alice")[0].id
    for text in ("How tall is Everest?", "How tall is Everest?", "写一首诗"):
        conv = F.create_conversation(store, key, system="Be brief.")
        F.add_turn(store, key, conv["id"], conv["path"][-1], text, None)
    (tmp_path / "p.jsonl").write_text('{"prompt": "Name a river."}\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    assert cli.main(["feedback", "queue", "--db", db, "--prompts", str(tmp_path / "p.jsonl"), "--kind", "demo", "--from-traffic", "10"]) == 0
    assert "queued 4 demo items" in capsys.readouterr().out
    with store.session() as s:
        items = list(s.execute(sa.select(LabelItem)).scalars())
        queued = [FQ._item_view(s, i)["prompt"] for i in items if i.source == "traffic"]
    assert sorted(i.source for i in items) == ["file", "file", "traffic", "traffic"] and {i.kind for i in items} == {"demo"}
    assert sorted(p[-1]["content"] for p in queued) == sorted(["How tall is Everest?", "写一首诗"])
    assert all(p[0] == {"role": "system", "content": "Be brief."} for p in queued)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"messages": [{"role": "assistant", "content": "no"}]}\n')
    assert cli.main(["feedback", "queue", "--db", db, "--prompts", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    store.close()


def test_active_path_follows_the_newest_branch_and_rankings():
    """Guards which branch a conversation shows: the child whose subtree was touched last; among
    answers written together, the best-ranked; and no recursion limit on very long conversations."""
    import datetime as dt

    t0 = dt.datetime(2026, 1, 1)

    def msg(i: str, parent: str | None, minute: int, role: str = "assistant") -> Message:
        return Message(id=i, parent_id=parent, role=role, content=i, created_at=t0 + dt.timedelta(minutes=minute))

    # u1 -> (a, b, c written together); later the person continued from b; c was ranked first but is older than b's reply
    msgs = [msg("u1", None, 0, "user"), msg("a", "u1", 1), msg("b", "u1", 1), msg("c", "u1", 1), msg("u2", "b", 5, "user"), msg("d", "u2", 6)]
    assert [m.id for m in F.active_path(msgs, {"c": 0, "b": 1, "a": 2})] == ["u1", "b", "u2", "d"]
    assert [m.id for m in F.active_path(msgs[:4], {"c": 0, "b": 1, "a": 2})] == ["u1", "c"]
    assert [m.id for m in F.active_path(msgs[:4], {})] == ["u1", "a"]
    chain = [msg(f"m{i}", f"m{i - 1}" if i else None, i, "user" if i % 2 == 0 else "assistant") for i in range(5000)]
    assert len(F.active_path(chain[::-1], {})) == 5000


def test_migration_2_upgrades_a_version_1_database(tmp_path):
    """Guards the upgrade path: a database made by a chatforge with only migration 1 (with rows in
    it) gains the labeling queue and snapshot registry on open, keeping its rows."""
    from chatforge.store import MIGRATIONS, Store, _migrations_table, utcnow

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        _migrations_table.create(conn)
        MIGRATIONS[0][2](conn)
        conn.execute(_migrations_table.insert().values(version=1, name=MIGRATIONS[0][1], applied_at=utcnow()))
        conn.execute(sa.text("INSERT INTO conversations (id, source, created_at, updated_at) VALUES ('c1', 'chat', '2026-01-01', '2026-01-01')"))
    engine.dispose()
    store = Store(url)
    assert store.version == len(MIGRATIONS) and set(sa.inspect(store.engine).get_table_names()) >= {"label_items", "snapshots"}
    F.register_snapshot(store, "tiny-r1", "abc", "/x", None, 0.5, {"gold_gain": 0.1})
    assert [(r.name, r.traffic) for r in F.registered_snapshots(store)] == [("tiny-r1", 0.5)]
    with store.session() as s:
        assert s.get(ConversationRow, "c1").source == "chat"
    store.close()


def test_label_queue_needs_the_labeler_role_and_hides_names(server):
    """Guards finding 3: any key could read the labeling queue and its stats (with other keys'
    names). Now a "user" key gets 403 naming the role, a labeler sees only its own name, an admin
    sees everyone's; `keys create --role` stores the role and `keys list` shows it."""
    _, user = server.store.create_key("plain-user")
    _, admin = server.store.create_key("the-admin", role="admin")
    for path in ("/web/label/next", "/web/label/stats"):
        err = Page(server, user).call("GET", path, 403)["error"]
        assert err["code"] == "insufficient_role" and "role 'labeler'" in err["message"] and "has role 'user'" in err["message"]
    F.add_label_items(server.store, [[{"role": "user", "content": "Name a tree."}]], "rank")
    names = {x["name"] for x in Page(server, admin).call("GET", "/web/label/stats")["labelers"]}
    assert {"alice", "bob"} <= names
    assert "alice" not in {x["name"] for x in Page(server, server.bob).call("GET", "/web/label/stats")["labelers"]}


def test_keys_cli_roles(tmp_path, capsys):
    """Guards `chatforge keys create --role` / `keys role` / `keys list`, and a bad role named in the error."""
    db = f"sqlite:///{tmp_path / 'k.db'}"
    assert cli.main(["keys", "create", "--db", db, "--name", "lab", "--role", "labeler"]) == 0
    assert "role labeler" in capsys.readouterr().out
    assert cli.main(["keys", "create", "--db", db, "--name", "x", "--role", "root"]) == 2
    assert "--role 'root': expected one of user, labeler, admin" in capsys.readouterr().err
    assert cli.main(["keys", "role", "--db", db, "lab", "admin"]) == 0
    assert cli.main(["keys", "list", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "role" in out.splitlines()[-2] and " admin " in out.splitlines()[-1]


def test_deleted_conversations_never_reach_the_queue_or_an_export(tmp_path):
    """Guards finding 3: `feedback queue --from-traffic` took prompts from conversations their owner
    had deleted (another key then read them on /web/label/next), and the export kept their ratings."""
    from chatforge.store import Store

    db = f"sqlite:///{tmp_path / 'd.db'}"
    store = Store(db)
    key = store.create_key("alice")[0].id
    kept = F.create_conversation(store, key, system="Be brief.")
    F.add_turn(store, key, kept["id"], kept["path"][-1], "a kept question", None)
    gone = F.create_conversation(store, key)
    F.add_turn(store, key, gone["id"], None, "my secret question", None)
    with store.transaction() as s:  # an answer in each, rated up and edited, so the export has something to leave out
        for conv_id in (kept["id"], gone["id"]):
            user = [m for m in FC.messages_of(s, conv_id) if m.role == "user"][0]
            s.add(Message(id=f"msg-ans-{conv_id}", conversation_id=conv_id, parent_id=user.id, role="assistant",
                          content=f"answer in {conv_id}", created_at=user.created_at))
            s.flush()
            s.add(Feedback(id=f"fb-{conv_id}", message_id=f"msg-ans-{conv_id}", key_id=key, rating=1, created_at=user.created_at))
    F.delete_conversation(store, key, gone["id"])
    assert [p[-1]["content"] for p in F.prompts_from_traffic(store, 10)] == ["a kept question"]
    assert cli.main(["feedback", "export", "--db", db, "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out/sft.jsonl").read_text() + (tmp_path / "out/rankings.jsonl").read_text()
    assert "a kept question" in text and "secret" not in text and gone["id"] not in text
    store.close()

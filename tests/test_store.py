"""The store: migrations, API keys, the usage ledger's transactions, usage reports, and admission control."""

from __future__ import annotations

import datetime as dt
import sqlite3

import pytest
import sqlalchemy as sa

from chatforge import cli
from chatforge.serve.limits import RateLimiter, Rejected
from chatforge.serve.usage import cost, report
from chatforge.store import (MIGRATIONS, Base, GenerationRecord, KeyInfo, RequestRecord, Store, hash_key, parse_since,
                             utcnow)


@pytest.fixture
def store(db_url):
    """A fresh store on SQLite and on PostgreSQL (conftest.db_url)."""
    s = Store(db_url)
    yield s
    s.close()


def _chat_record(key_id, rid="chatcmpl-1", prompt=7, outputs=("Hello", "Hi"), status=200):
    return RequestRecord(
        request_id=rid, endpoint="chat.completions", key_id=key_id, model="tiny@abc", status=status, latency_ms=12.5,
        prompt_tokens=prompt, completion_tokens=sum(len(o) for o in outputs), ttft_ms=3.0, user="u1", model_name="tiny",
        snapshot="abc", messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": "hello there"}],
        generations=[GenerationRecord(i, o, len(o), "stop", {"temperature": 0.7, "seed": 5 + i}) for i, o in enumerate(outputs)],
    )


def test_migrations_create_the_orm_schema_and_are_idempotent(db_url, tmp_path):
    """Guards the versioned migrations: a fresh database gets every migration once, reopening applies none,
    and the migrated tables have exactly the columns (and nullability) the ORM classes declare."""
    url = db_url
    s = Store(url)
    assert s.version == len(MIGRATIONS) == max(v for v, _, _ in MIGRATIONS)
    assert s.migrate() == []
    insp = sa.inspect(s.engine)
    for table in Base.metadata.sorted_tables:
        got = {c["name"]: c["nullable"] for c in insp.get_columns(table.name)}
        want = {c.name: c.nullable for c in table.columns}
        assert got == want, table.name
    s.close()
    again = Store(url)
    assert again.migrate() == []
    again.close()
    if not url.startswith("sqlite"):
        return
    with sqlite3.connect(tmp_path / "chatforge.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert [r[0] for r in con.execute("SELECT version FROM schema_migrations")] == [v for v, _, _ in MIGRATIONS]


def test_keys_are_random_hashed_and_revocable(store, tmp_path):
    """Guards key handling: secrets are never stored (only SHA-256), lookup finds the key, revoke sticks."""
    k, secret = store.create_key("alice", rpm=10, tpm=1000, quota_tokens=5000)
    k2, secret2 = store.create_key("bob")
    assert secret != secret2 and secret.startswith("cf-") and len(secret) > 40
    assert store.lookup_key(secret).id == k.id and store.lookup_key(secret + "x") is None
    assert (k.rpm, k.tpm, k.quota_tokens, k.tokens_used, k.role) == (10, 1000, 5000, 0, "user")
    with store.engine.connect() as conn:  # every stored value of every key
        stored = " ".join(str(v) for row in conn.execute(sa.text("SELECT * FROM api_keys")) for v in row)
    assert secret not in stored and secret[len("cf-"):] not in stored and hash_key(secret) in stored
    if store.is_sqlite:  # and not in the file's bytes either (the WAL holds the fresh pages)
        raw = (tmp_path / "chatforge.db").read_bytes() + (tmp_path / "chatforge.db-wal").read_bytes()
        assert secret.encode() not in raw and hash_key(secret).encode() in raw
    assert store.find_key("alice").id == k.id and store.find_key(str(k2.id)).id == k2.id and store.find_key(k.prefix).id == k.id
    revoked = store.revoke_key("alice")
    assert revoked.revoked_at is not None and store.lookup_key(secret).revoked_at is not None
    store.create_key("bob")
    with pytest.raises(ValueError, match="2 keys are named 'bob'"):
        store.find_key("bob")
    with pytest.raises(ValueError, match="no API key"):
        store.find_key("carol")
    with pytest.raises(ValueError, match="--rpm"):
        store.create_key("x", rpm=0)


def test_record_writes_everything_in_one_transaction(store):
    """Guards the ledger write: usage row, conversation tree, generations with sampling params and the key's
    token count all land together, and a failing write leaves none of them."""
    k, secret = store.create_key("alice")
    store.record(_chat_record(k.id))
    [u] = store.usage_rows("chatcmpl-1")
    assert (u.prompt_tokens, u.completion_tokens, u.status, u.user) == (7, 7, 200, "u1")
    gens = list(store.iter_generations("chatcmpl-1"))
    assert [(g.choice_index, g.output, g.snapshot, g.sampling["seed"]) for g in gens] == [(0, "Hello", "abc", 5), (1, "Hi", "abc", 6)]
    msgs = store.conversation_messages(gens[0].conversation_id)
    by_id = {m.id: m for m in msgs}
    answers = [m for m in msgs if m.role == "assistant"]
    assert sorted(m.content for m in answers) == ["Hello", "Hi"]
    user_msg = by_id[answers[0].parent_id]
    assert answers[0].parent_id == answers[1].parent_id and user_msg.content == "hello there"  # siblings: alternatives
    assert by_id[user_msg.parent_id].role == "system"
    assert store.lookup_key(secret).tokens_used == 14
    bad = _chat_record(k.id, rid="chatcmpl-2")
    bad.generations[1].output = None  # NOT NULL: the whole transaction must roll back
    with pytest.raises(sa.exc.IntegrityError):
        store.record(bad)
    assert store.usage_rows("chatcmpl-2") == [] and store.lookup_key(secret).tokens_used == 14
    assert store.integrity_check() == "ok"


def test_usage_report_per_key_and_model_with_costs(store):
    """Guards `chatforge usage`: sums per key and model, --key and --since filters, and prices per 1k tokens."""
    a, _ = store.create_key("alice")
    b, _ = store.create_key("bob")
    store.record(_chat_record(a.id, "r1", prompt=1000, outputs=("x" * 500,)))
    store.record(_chat_record(a.id, "r2", prompt=1000, outputs=("x" * 1500,)))
    store.record(_chat_record(b.id, "r3", prompt=10, outputs=("y",)))
    store.record(RequestRecord("r4", "chat.completions", b.id, "tiny@abc", 429, 0.0))  # refused: a row, no tokens
    lines = {ln.key_name: ln for ln in store.usage()}
    assert (lines["alice"].requests, lines["alice"].prompt_tokens, lines["alice"].completion_tokens) == (2, 2000, 2000)
    assert (lines["bob"].requests, lines["bob"].prompt_tokens, lines["bob"].completion_tokens) == (2, 10, 1)
    assert cost(lines["alice"], 0.5, 1.5) == pytest.approx(2 * 0.5 + 2 * 1.5)
    text = report(store, key="alice", price_prompt=0.5, price_completion=1.5)
    assert "bob" not in text and "4.0000" in text
    assert store.usage(since=utcnow() + dt.timedelta(minutes=1)) == []
    assert len(store.usage(since=parse_since("1h"))) == 2


def test_parse_since():
    """Guards --since parsing: spans back from now and ISO dates; bad input names the flag."""
    assert abs((utcnow() - parse_since("2h")).total_seconds() - 7200) < 5
    assert parse_since("2026-01-31") == dt.datetime(2026, 1, 31)
    assert parse_since("2026-01-31T12:00:00+02:00") == dt.datetime(2026, 1, 31, 10)
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday")


def test_cli_keys_and_usage(db_url, capsys):
    """Guards the `keys create/list/revoke` and `usage` commands end to end on a --db URL."""
    db = db_url.replace("postgresql+psycopg://", "postgresql://")  # the URL a person types
    assert cli.main(["keys", "create", "--name", "ci", "--rpm", "5", "--quota", "100", "--db", db]) == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    s = Store(db)
    k = s.lookup_key(secret)
    assert (k.name, k.rpm, k.quota_tokens) == ("ci", 5, 100)
    s.record(_chat_record(k.id, prompt=3, outputs=("abcd",)))
    assert cli.main(["keys", "list", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "ci" in out and k.prefix in out and secret not in out and "active" in out
    assert cli.main(["usage", "--db", db, "--price-per-1k-prompt", "1", "--price-per-1k-completion", "2"]) == 0
    out = capsys.readouterr().out
    assert "tiny@abc" in out and f"{(3 * 1 + 4 * 2) / 1000:.4f}" in out
    assert cli.main(["keys", "revoke", "ci", "--db", db]) == 0
    assert s.lookup_key(secret).revoked_at is not None
    assert cli.main(["keys", "revoke", "nobody", "--db", db]) == 2
    assert cli.main(["usage", "--since", "last week", "--db", db]) == 2
    s.close()


def test_integrity_check_finds_real_problems(store):
    """Guards finding 7: integrity_check returned "ok" for anything that was not SQLite. On both
    backends a row pointing at a missing parent is reported; on PostgreSQL, so is a sequence set
    behind the ids already used (the next insert would collide)."""
    k, _ = store.create_key("alice")
    store.record(_chat_record(k.id))
    assert store.integrity_check() == "ok"
    with store.engine.begin() as conn:  # what a crash or a hand edit with the checks off leaves behind
        if store.is_sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        else:
            conn.execute(sa.text("SET LOCAL session_replication_role = replica"))  # skips foreign-key triggers
        conn.execute(sa.text("DELETE FROM api_keys WHERE id = :id"), {"id": k.id})
    report = store.integrity_check()
    assert "usage.key_id: 1 rows point at a missing api_keys row" in report and "generations.key_id" in report
    if not store.is_sqlite:
        with store.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM usage"))
            conn.execute(sa.text("SELECT setval('usage_id_seq', 1, false)"))
            conn.execute(sa.text("INSERT INTO usage (id, request_id, endpoint, model, prompt_tokens, completion_tokens, latency_ms, "
                                 "status, created_at) VALUES (5, 'r', 'web', 'm', 0, 0, 1.0, 200, now())"))
        assert "usage.id: a row has id 5 but the sequence public.usage_id_seq would hand out 1 next" in store.integrity_check()


def _key(**kw) -> KeyInfo:
    d = dict(id=1, name="k", prefix="cf-abc", rpm=None, tpm=None, quota_tokens=None, tokens_used=0, created_at=utcnow(), revoked_at=None)
    d.update(kw)
    return KeyInfo(**d)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_rpm_sliding_window():
    """Guards requests-per-minute: the (rpm+1)th request in 60 s is refused with the wait until the oldest expires."""
    clock = Clock()
    lim = RateLimiter(max_concurrent_per_key=100, clock=clock)
    key = _key(rpm=3)
    for i in range(3):
        lim.admit(key, 10).settle(10)
        clock.t += 10
    with pytest.raises(Rejected) as e:
        lim.admit(key, 10)
    assert e.value.code == "rate_limit_exceeded" and e.value.retry_after == pytest.approx(30)
    clock.t += 30.001  # the first request leaves the window
    lim.admit(key, 10)


def test_tpm_counts_reservations_then_actual_tokens():
    """Guards tokens-per-minute: running requests hold prompt+max_tokens, finished ones count what they used."""
    clock = Clock()
    lim = RateLimiter(max_concurrent_per_key=100, clock=clock)
    key = _key(tpm=100)
    r1 = lim.admit(key, 60)  # reserved 60
    with pytest.raises(Rejected, match="60 used or reserved"):
        lim.admit(key, 50)
    r1.settle(20)  # actually used 20
    lim.admit(key, 80).settle(80)  # 20 + 80 = 100: allowed
    with pytest.raises(Rejected) as e:
        lim.admit(key, 1)
    assert e.value.retry_after == pytest.approx(60)
    with pytest.raises(Rejected, match="request too large"):
        lim.admit(key, 101)
    clock.t += 60.001
    lim.admit(key, 100)


def test_concurrency_and_quota():
    """Guards the per-key concurrency bound (released on settle) and the lifetime token quota."""
    lim = RateLimiter(max_concurrent_per_key=2, clock=Clock())
    key = _key()
    a, b = lim.admit(key, 1), lim.admit(key, 1)
    with pytest.raises(Rejected, match="concurrent"):
        lim.admit(key, 1)
    lim.admit(_key(id=2), 1)  # other keys are not affected
    a.settle(1)
    a.settle(1)  # settling twice must not free two places
    lim.admit(key, 1)
    with pytest.raises(Rejected, match="concurrent"):
        lim.admit(key, 1)
    assert lim.inflight(1) == 2 and b
    with pytest.raises(Rejected) as e:
        lim.admit(_key(id=3, quota_tokens=100, tokens_used=100), 1)
    assert e.value.code == "insufficient_quota" and e.value.retry_after is None
    lim.admit(_key(id=3, quota_tokens=100, tokens_used=99), 50)  # the last request may overshoot: quota is checked on admission

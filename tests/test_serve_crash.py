"""Crash safety: kill -9 the server in the middle of a load test; after a restart every acknowledged
request is in the ledger with its stored conversation, and the database passes an integrity check."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from chatforge.store import Store
from serve_helpers import ServerProcess, make_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_load import run_load  # noqa: E402


@pytest.mark.slow
def test_kill9_mid_load_loses_no_acknowledged_row(tmp_path, tok, db_url):
    """Guards durability of the ledger: rows are committed (SQLite: WAL, synchronous=FULL; PostgreSQL:
    its commit) before a response completes, so a SIGKILL can only lose requests no client saw
    finish; the restarted server migrates and serves again, and the database passes integrity_check."""
    ckpt = make_tiny_checkpoint(tok, tmp_path / "tiny")
    db = db_url
    store = Store(db)
    _, key = store.create_key("crash")
    store.close()
    args = [str(ckpt), "--db", db, "--dtype", "fp32", "--max-batch", "8", "--max-waiting", "64"]
    srv = ServerProcess(args, tmp_path / "server.log")
    acked: dict[str, dict] = {}
    lock = threading.Lock()

    def on_complete(rid, usage):
        with lock:
            acked[rid] = usage

    try:
        srv.wait_ready()
        load = threading.Thread(target=lambda: asyncio.run(
            run_load(srv.base_url, key, "tiny", clients=8, requests=300, max_tokens=16, on_complete=on_complete)))
        load.start()
        t0 = time.time()
        while len(acked) < 40 and time.time() - t0 < 60:
            time.sleep(0.01)
        srv.kill9()  # mid-load: requests are streaming and rows are being written
        with lock:
            acknowledged = dict(acked)
        load.join(timeout=60)
        assert not load.is_alive()
        assert len(acknowledged) >= 40
    finally:
        srv.stop()

    srv2 = ServerProcess(args, tmp_path / "server.log")
    try:
        srv2.wait_ready()  # reopens the WAL database and runs migrations on start
        store = Store(db)
        assert store.integrity_check() == "ok"
        rows = {u.request_id: u for u in store.usage_rows()}
        for rid, usage in acknowledged.items():
            row = rows.get(rid)
            assert row is not None, f"acknowledged request {rid} is missing from the ledger"
            assert (row.status, row.prompt_tokens, row.completion_tokens) == (200, usage["prompt_tokens"], usage["completion_tokens"])
            [gen] = store.iter_generations(rid)
            assert gen.output == usage["content"]
            answers = [m for m in store.conversation_messages(gen.conversation_id) if m.role == "assistant"]
            assert [m.content for m in answers] == [usage["content"]]
        r = openai.OpenAI(base_url=srv2.base_url + "/v1", api_key=key, max_retries=0).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "still there?"}], max_tokens=4)
        assert store.usage_rows(r.id)[0].status == 200
        store.close()
    finally:
        srv2.stop()

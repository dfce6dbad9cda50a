"""A/B routing of new chat conversations between model snapshots: the flywheel's snapshot
registry, the share of traffic each registered snapshot gets, and per-snapshot statistics
(answers, thumbs up and down) that show whether people agree with the flywheel's evaluation."""

from __future__ import annotations

import datetime as dt
import hashlib

import sqlalchemy as sa

from ..store import Generation, Message, Snapshot, Store, utcnow
from .common import latest_ratings


# ---- per-snapshot statistics (A/B) ---------------------------------------------------------------
def stats(store: Store, since: dt.datetime | None = None) -> list[dict]:
    """Per model snapshot: answers written, answers rated, thumbs up and down (each key's latest
    rating), the thumbs-up rate, and its share of new traffic if the flywheel registered it."""
    with store.session() as s:
        q = sa.select(Generation.model, Generation.snapshot, sa.func.count()).group_by(Generation.model, Generation.snapshot)
        if since is not None:
            q = q.where(Generation.created_at >= since)
        rows = {(m, snap): {"model": m, "snapshot": snap, "answers": n, "up": 0, "down": 0} for m, snap, n in s.execute(q).all()}
        for f in latest_ratings(s, since).values():
            m = s.get(Message, f.message_id)
            g = s.get(Generation, m.generation_id) if m.generation_id else None
            if g is None:
                continue
            row = rows.setdefault((g.model, g.snapshot), {"model": g.model, "snapshot": g.snapshot, "answers": 0, "up": 0, "down": 0})
            row["up" if f.rating > 0 else "down"] += 1
        registered = {r.snapshot: r for r in s.execute(sa.select(Snapshot).order_by(Snapshot.id)).scalars()}
    out = []
    for row in rows.values():
        rated = row["up"] + row["down"]
        reg = registered.get(row["snapshot"])
        out.append({**row, "rated": rated, "up_rate": row["up"] / rated if rated else None,
                    "traffic": reg.traffic if reg else None})
    for snap, reg in registered.items():
        if not any(r["snapshot"] == snap for r in out):
            out.append({"model": reg.name, "snapshot": snap, "answers": 0, "up": 0, "down": 0, "rated": 0, "up_rate": None,
                        "traffic": reg.traffic})
    return sorted(out, key=lambda r: (r["model"], r["snapshot"]))


def format_stats(rows: list[dict]) -> str:
    lines = [f"{'model':24s} {'snapshot':14s} {'answers':>8s} {'rated':>6s} {'up':>5s} {'down':>5s} {'up rate':>8s} {'traffic':>8s}"]
    for r in rows:
        rate_ = "-" if r["up_rate"] is None else f"{r['up_rate']:.1%}"
        traffic = "-" if r["traffic"] is None else f"{r['traffic']:.0%}"
        lines.append(f"{r['model'][:24]:24s} {r['snapshot'][:14]:14s} {r['answers']:8d} {r['rated']:6d} {r['up']:5d} {r['down']:5d} "
                     f"{rate_:>8s} {traffic:>8s}")
    return "\n".join(lines)


# ---- the snapshot registry (A/B) ---------------------------------------------------------------
def register_snapshot(store: Store, name: str, snapshot: str, path: str, parent: str | None, traffic: float, report: dict) -> None:
    if not 0.0 <= traffic <= 1.0:
        raise ValueError(f"traffic={traffic} must be in [0, 1]")
    with store.transaction() as s:
        s.add(Snapshot(name=name, snapshot=snapshot, path=str(path), parent=parent, traffic=traffic, report=report, created_at=utcnow()))


def registered_snapshots(store: Store) -> list[Snapshot]:
    with store.session() as s:
        return list(s.execute(sa.select(Snapshot).order_by(Snapshot.id)).scalars())


def pick_model(store: Store, loaded: list[tuple[str, str]], conversation_id: str) -> str:
    """The model id (name@snapshot) that answers a new conversation: each loaded snapshot the
    flywheel registered takes its `traffic` share (the newest registration of a snapshot counts),
    decided by a stable hash of the conversation id; the first loaded model takes the rest."""
    assert loaded
    shares = {r.snapshot: r.traffic for r in registered_snapshots(store)}
    u = int.from_bytes(hashlib.sha256(conversation_id.encode()).digest()[:8], "big") / 2**64
    acc = 0.0
    for name, snap in loaded[1:]:
        acc += shares.get(snap, 0.0)
        if u < acc:
            return f"{name}@{snap}"
    return f"{loaded[0][0]}@{loaded[0][1]}"

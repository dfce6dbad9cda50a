"""`chatforge feedback export`: the store's records as the two training formats of design.md: SFT
`messages` lines (edited answers, labelers' demonstrations, thumbs-up answers) and rankings
lines (compare and labeling rankings; thumbs pairs: an answer rated up against a sibling rated
down), each with its provenance, duplicates dropped."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..data.rankings import write_jsonl
from ..store import ApiKey, ConversationRow, Feedback, Generation, Message, RankingItem, RankingRow, Store, utcnow
from .common import iso, latest_ratings, messages_of, path_to, turns_of


@dataclass
class ExportSummary:
    demonstrations: dict  # kind -> lines written
    rankings: dict  # kind -> lines written
    duplicates: int  # lines dropped because an identical one was already written
    sft_path: str
    rankings_path: str

    def as_dict(self) -> dict:
        return {"demonstrations": self.demonstrations, "rankings": self.rankings, "duplicates": self.duplicates,
                "sft": self.sft_path, "rankings_file": self.rankings_path}


class _Export:
    """One export: the session, what it read so far (messages per conversation, generations,
    key names), the lines written with their counts, and the duplicates dropped."""

    def __init__(self, s: Session, since: dt.datetime | None):
        self.s, self.since = s, since
        self.names = dict(s.execute(sa.select(ApiKey.id, ApiKey.name)).all())
        # A conversation its owner deleted leaves nothing in the training data (its rows stay for the ledger).
        self.deleted = set(s.execute(sa.select(ConversationRow.id).where(ConversationRow.deleted_at.is_not(None))).scalars())
        self.gens: dict[str, Generation] = {}
        self.conv_msgs: dict[str, dict[str, Message]] = {}
        self.seen: set[str] = set()
        self.dups = 0
        self.sft: list[dict] = []
        self.rank_lines: list[dict] = []
        self.counts_d = {"edit": 0, "label": 0, "thumbs_up": 0}
        self.counts_r = {"compare": 0, "label": 0, "thumbs_pair": 0}

    def keep(self, dedup_on: object) -> bool:
        """False (and counted) when a line with the same `dedup_on` was already written."""
        h = hashlib.sha256(json.dumps(dedup_on, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
        if h in self.seen:
            self.dups += 1
            return False
        self.seen.add(h)
        return True

    def msgs_of(self, conv_id: str) -> dict[str, Message]:
        if conv_id not in self.conv_msgs:
            self.conv_msgs[conv_id] = {m.id: m for m in messages_of(self.s, conv_id)}
        return self.conv_msgs[conv_id]

    def gen(self, m: Message) -> Generation | None:
        if m.generation_id is None:
            return None
        if m.generation_id not in self.gens:
            self.gens[m.generation_id] = self.s.get(Generation, m.generation_id)
        return self.gens[m.generation_id]

    def who(self, key_id: int | None) -> dict:
        return {"key_id": key_id, "key": self.names.get(key_id)}

    def add_sft(self, turns: list[dict], metadata: dict, g: Generation | None, m: Message) -> None:
        if self.keep(("sft", turns)):
            self.sft.append({"messages": turns, "metadata": {**metadata, "snapshot": g.snapshot if g else None, "model": g.model if g else None,
                                                             "message_id": m.id, "conversation_id": m.conversation_id}})
            self.counts_d[metadata["kind"]] += 1

    def demonstrations(self) -> None:
        """Edited answers and labelers' written answers."""
        q = sa.select(Feedback).where(Feedback.correction_id.is_not(None)).order_by(Feedback.created_at, Feedback.id)
        if self.since is not None:
            q = q.where(Feedback.created_at >= self.since)
        for f in self.s.execute(q).scalars():
            corr = self.s.get(Message, f.correction_id)
            if corr.conversation_id in self.deleted:
                continue
            rated = self.s.get(Message, f.message_id)
            g = self.gen(rated) if rated.role == "assistant" else None
            kind = "edit" if rated.role == "assistant" else "label"
            turns = turns_of(path_to(self.msgs_of(corr.conversation_id), corr.id))
            self.add_sft(turns, {"kind": kind, **self.who(f.key_id), "created_at": iso(f.created_at)}, g, corr)

    def thumbs(self) -> None:
        """Up answers are demonstrations; up vs down siblings are preference pairs."""
        latest = latest_ratings(self.s, self.since)
        net: dict[str, int] = {}
        for (_, mid), f in latest.items():
            net[mid] = net.get(mid, 0) + f.rating
        by_parent: dict[tuple[str, str | None], dict[int, list[Message]]] = {}
        for mid, score in sorted(net.items()):
            if score == 0:
                continue
            m = self.s.get(Message, mid)
            if m.conversation_id in self.deleted:
                continue
            by_parent.setdefault((m.conversation_id, m.parent_id), {}).setdefault(1 if score > 0 else -1, []).append(m)
            if score > 0:
                turns = turns_of(path_to(self.msgs_of(m.conversation_id), m.id))
                raters = [f for (k, x), f in latest.items() if x == mid and f.rating > 0]
                self.add_sft(turns, {"kind": "thumbs_up", "raters": [self.who(f.key_id) for f in raters],
                                     "created_at": iso(max(f.created_at for f in raters))}, self.gen(m), m)
        for (conv_id, parent_id), sides in by_parent.items():
            prompt = turns_of(path_to(self.msgs_of(conv_id), parent_id))
            if not prompt or prompt[-1]["role"] != "user":
                continue
            for up in sides.get(1, []):
                for down in sides.get(-1, []):
                    line = {"messages": prompt, "chosen": up.content, "rejected": down.content,
                            "provenance": {"kind": "thumbs_pair", "snapshots": [getattr(self.gen(up), "snapshot", None), getattr(self.gen(down), "snapshot", None)],
                                           "message_ids": [up.id, down.id], "conversation_id": conv_id}}
                    if self.keep(("pair", prompt, up.content, down.content)):
                        self.rank_lines.append(line)
                        self.counts_r["thumbs_pair"] += 1

    def rankings(self) -> None:
        """Rankings from the compare view and the labeling page."""
        q = sa.select(RankingRow).order_by(RankingRow.created_at, RankingRow.id)
        if self.since is not None:
            q = q.where(RankingRow.created_at >= self.since)
        for r in self.s.execute(q).scalars():
            if r.conversation_id in self.deleted:
                continue
            items = list(self.s.execute(sa.select(RankingItem).where(RankingItem.ranking_id == r.id)).scalars())
            msgs = self.msgs_of(r.conversation_id)
            answers = sorted((msgs[i.message_id] for i in items), key=lambda m: (self.gen(m).choice_index if self.gen(m) else 0, m.id))
            rank_of = {i.message_id: i.rank for i in items}
            prompt = turns_of(path_to(msgs, r.parent_id))
            responses = [m.content for m in answers]
            ranking = sorted(range(len(answers)), key=lambda j: rank_of[answers[j].id])
            line = {"messages": prompt, "responses": responses, "ranking": ranking,
                    "provenance": {"kind": r.source, **self.who(r.key_id), "created_at": iso(r.created_at),
                                   "snapshots": sorted({self.gen(m).snapshot for m in answers if self.gen(m)}),
                                   "ranking_id": r.id, "conversation_id": r.conversation_id}}
            # The same person ranking the same answers the same way twice is one label; two people are two.
            if self.keep(("rank", r.key_id, prompt, [responses[j] for j in ranking])):
                self.rank_lines.append(line)
                self.counts_r[r.source] = self.counts_r.get(r.source, 0) + 1


def export(store: Store, out: str | Path, since: dt.datetime | None = None) -> ExportSummary:
    """Write OUT/sft.jsonl (demonstrations as {"messages", "metadata"}), OUT/rankings.jsonl
    ({"messages", "responses", "ranking", "provenance"} and thumbs pairs as {"messages", "chosen",
    "rejected", "provenance"}) and OUT/summary.json, from feedback and rankings made since `since`.
    Provenance: kind, who (key id and name), when, and the model snapshot(s) that wrote the answers."""
    out = Path(out)
    with store.session() as s:
        e = _Export(s, since)
        e.demonstrations()
        e.thumbs()
        e.rankings()
    sft_path = write_jsonl(out / "sft.jsonl", e.sft)
    rankings_path = write_jsonl(out / "rankings.jsonl", e.rank_lines)
    summary = ExportSummary(e.counts_d, e.counts_r, e.dups, str(sft_path), str(rankings_path))
    (out / "summary.json").write_text(json.dumps({**summary.as_dict(), "since": iso(since), "exported_at": iso(utcnow())}, indent=2) + "\n")
    return summary

"""The labeling page's queue: prompts (conversations of source "label", owned by nobody) with a
label item saying whether labelers rank K samples of it or write a demonstration, and agreement
between labelers. Not `chatforge label` (pipelines/label.py), which ranks files at the terminal."""

from __future__ import annotations

import json
import random

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..store import ApiKey, ConversationRow, Feedback, LabelItem, Message, RankingItem, RankingRow, Store, new_id, utcnow
from ..tokenizer import check_messages
from .common import MAX_TITLE_CHARS, Refused, attach_answers, check_text, messages_of, path_to, turns_of

KINDS = ("rank", "demo")


def add_label_items(store: Store, prompts: list[list[dict]], kind: str, source: str = "file") -> int:
    """Queue prompts (each a list of turns ending with a user turn) for labelers."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
    for i, p in enumerate(prompts):
        check_messages(p, f"prompt {i}")
        if p[-1]["role"] != "user":
            raise ValueError(f"prompt {i} ends with a {p[-1]['role']!r} turn; it must end with a user turn")
    now = utcnow()
    with store.transaction() as s:
        for p in prompts:
            conv = ConversationRow(id=new_id("conv"), key_id=None, title=" ".join(p[-1]["content"].split())[:MAX_TITLE_CHARS],
                                   source="label", created_at=now, updated_at=now)
            s.add(conv)
            s.flush()
            parent = None
            for t in p:
                m = Message(id=new_id("msg"), conversation_id=conv.id, parent_id=parent, role=t["role"], content=t["content"], created_at=now)
                s.add(m)
                s.flush()
                parent = m.id
            s.add(LabelItem(id=new_id("item"), conversation_id=conv.id, kind=kind, source=source, created_at=now))
    return len(prompts)


def prompts_from_traffic(store: Store, limit: int, seed: int = 0) -> list[list[dict]]:
    """Prompts people asked on the chat page (first user turn with its system prompt), distinct, a seeded sample."""
    with store.session() as s:
        q = (sa.select(Message).join(ConversationRow, ConversationRow.id == Message.conversation_id)
             .where(ConversationRow.source == "chat", ConversationRow.deleted_at.is_(None), Message.role == "user"))
        seen, out = set(), []
        for m in s.execute(q).scalars():
            path = [t for t in turns_of(path_to({x.id: x for x in messages_of(s, m.conversation_id)}, m.id))]
            key = json.dumps(path, ensure_ascii=False)
            if key not in seen:
                seen.add(key)
                out.append(path)
    random.Random(seed).shuffle(out)
    return out[:limit]


def _item_view(s: Session, item: LabelItem) -> dict:
    msgs = messages_of(s, item.conversation_id)
    by_id = {m.id: m for m in msgs}
    prompt = max((path_to(by_id, m.id) for m in msgs if m.role == "user"), key=len)  # the queued turns end with the deepest user turn
    prompt_end = prompt[-1]
    samples = [m for m in msgs if m.parent_id == prompt_end.id and m.generation_id is not None]
    return {"id": item.id, "kind": item.kind, "conversation_id": item.conversation_id, "prompt": turns_of(prompt),
            "parent_id": prompt_end.id, "samples": [{"message_id": m.id, "content": m.content} for m in samples]}


def _done_by(s: Session, key_id: int) -> set[str]:
    ranked = set(s.execute(sa.select(LabelItem.id).join(RankingRow, RankingRow.conversation_id == LabelItem.conversation_id)
                           .where(RankingRow.key_id == key_id)).scalars())
    demo = set(s.execute(sa.select(LabelItem.id).join(Message, Message.conversation_id == LabelItem.conversation_id)
                         .join(Feedback, Feedback.correction_id == Message.id).where(Feedback.key_id == key_id)).scalars())
    return ranked | demo


def next_label_item(store: Store, key_id: int, kind: str | None = None) -> dict | None:
    """The oldest item this labeler has not done yet (None when the queue is done)."""
    if kind is not None and kind not in KINDS:
        raise Refused("invalid", f"kind={kind!r}; expected one of {KINDS}")
    with store.session() as s:
        done = _done_by(s, key_id)
        q = sa.select(LabelItem).order_by(LabelItem.created_at, LabelItem.id)
        if kind:
            q = q.where(LabelItem.kind == kind)
        for item in s.execute(q).scalars():
            if item.id not in done:
                return _item_view(s, item)
    return None


def _label_item(s, item_id: object, kind: str, asks_instead: str) -> LabelItem:
    """The label item `item_id` of `kind` ("rank" or "demo"): 404 if there is none, 400 if it is
    the other kind (`asks_instead` says what it asks for)."""
    item = s.get(LabelItem, item_id) if isinstance(item_id, str) else None
    if item is None:
        raise Refused("not_found", f"no label item {item_id!r}")
    if item.kind != kind:
        raise Refused("invalid", f"label item {item_id!r} asks for {asks_instead}")
    return item


def attach_samples(store: Store, key_id: int, item_id: str, request_id: str) -> dict:
    """The K samples of a rank item: the answers of a request made for it (once per item, so every
    labeler ranks the same samples and their agreement can be measured)."""
    with store.transaction() as s:
        item = _label_item(s, item_id, "rank", "a demonstration, not samples")
        view = _item_view(s, item)
        if view["samples"]:
            raise Refused("conflict", f"label item {item_id!r} already has its samples")
        conv = s.get(ConversationRow, item.conversation_id)
        msgs = {m.id: m for m in messages_of(s, conv.id)}
        added = attach_answers(s, key_id, conv, msgs[view["parent_id"]], request_id, view["prompt"])
        if len(added) < 2:
            raise Refused("invalid", f"request {request_id!r} has {len(added)} answer; a rank item needs n >= 2")
    with store.session() as s:
        return _item_view(s, s.get(LabelItem, item_id))


def add_demonstration(store: Store, key_id: int, item_id: str, content: object, max_chars: int = 200_000) -> dict:
    """A labeler's written answer to a demo item: a person-written message plus a feedback row that
    names it (so the export knows who wrote it and when)."""
    content = check_text(content, "demonstration", max_chars)
    with store.transaction() as s:
        item = _label_item(s, item_id, "demo", "a ranking, not a demonstration")
        view = _item_view(s, item)
        now = utcnow()
        mid = new_id("msg")
        s.add(Message(id=mid, conversation_id=item.conversation_id, parent_id=view["parent_id"], role="assistant", content=content,
                      created_at=now))
        s.flush()
        # The feedback row's message is the prompt turn the demonstration answers (there is no model answer to rate).
        s.add(Feedback(id=new_id("fb"), message_id=view["parent_id"], key_id=key_id, rating=None, correction_id=mid, created_at=now))
    return {"item_id": item_id, "message_id": mid}


def pair_agreement(a: list[str], b: list[str]) -> float:
    """Share of answer pairs two rankings of the same answers order the same way."""
    pos_a, pos_b = {x: i for i, x in enumerate(a)}, {x: i for i, x in enumerate(b)}
    items = list(pos_a)
    pairs = [(x, y) for i, x in enumerate(items) for y in items[i + 1:]]
    same = sum((pos_a[x] < pos_a[y]) == (pos_b[x] < pos_b[y]) for x, y in pairs)
    return same / len(pairs)


def label_stats(store: Store, key_id: int, show_names: bool = True) -> dict:
    """Queue progress (for this labeler and overall) and agreement between labelers: the mean
    pairwise-order agreement of every two labelers' rankings of the same item. Without
    `show_names` (a labeler who is not an admin) other labelers are "another labeler", not their key's name."""
    with store.session() as s:
        items = list(s.execute(sa.select(LabelItem)).scalars())
        done_me = _done_by(s, key_id)
        by_conv = {i.conversation_id: i for i in items}
        per_item: dict[str, dict[int, list[str]]] = {}
        per_key: dict[int, int] = {}
        q = sa.select(RankingRow).where(RankingRow.source == "label").order_by(RankingRow.created_at)
        for r in s.execute(q).scalars():
            if r.conversation_id not in by_conv:
                continue
            order = list(s.execute(sa.select(RankingItem.message_id).where(RankingItem.ranking_id == r.id).order_by(RankingItem.rank)).scalars())
            per_item.setdefault(r.conversation_id, {})[r.key_id] = order  # a labeler's latest ranking counts
        for rankings in per_item.values():
            for k in rankings:
                per_key[k] = per_key.get(k, 0) + 1
        demos = s.execute(sa.select(Feedback.key_id, sa.func.count()).join(Message, Message.id == Feedback.correction_id)
                          .where(Message.conversation_id.in_(list(by_conv) or [""])).group_by(Feedback.key_id)).all()
        for k, n in demos:
            per_key[k] = per_key.get(k, 0) + n
        names = dict(s.execute(sa.select(ApiKey.id, ApiKey.name)).all())
    scores = []
    for rankings in per_item.values():
        orders = list(rankings.values())
        scores += [pair_agreement(orders[i], orders[j]) for i in range(len(orders)) for j in range(i + 1, len(orders))]
    return {"items": len(items), "done_by_you": len(done_me & {i.id for i in items}),
            "labelers": [{"name": names.get(k, "?") if show_names or k == key_id else "another labeler", "done": n}
                         for k, n in sorted(per_key.items(), key=lambda kv: -kv[1])],
            "agreement": sum(scores) / len(scores) if scores else None, "agreement_pairs": len(scores)}

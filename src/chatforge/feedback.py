"""The data flywheel's records: what people do on the chat and labeling pages, and its export
back into training data.

Everything a person does is a row in the store (store.py), owned by the API key they signed in
with:
- a chat conversation is a tree of messages; a regenerated answer is a sibling of the old one,
  an edited answer is a sibling written by a person (generation_id NULL) plus a feedback row
  pointing at it (`correction_id`), and "compare" attaches K answers of one request (n=K) as
  siblings that a ranking then orders;
- answers themselves come only from the server's own generation records: the page streams an
  answer from /v1/chat/completions and then attaches it by its request id, so what is stored
  as model output is what the model wrote, and the snapshot that wrote it is known;
- the labeling queue is conversations of source "label" (owned by nobody) with a label item
  saying whether labelers rank K samples of it or write a demonstration.

Every operation checks its input completely before it writes, and writes in one transaction, so
a refused request (`Refused`, with the HTTP status it maps to) leaves nothing behind.

`export` turns the rows into the two training formats of design.md: SFT `messages` lines
(edited answers, labelers' demonstrations, thumbs-up answers) and rankings lines (compare and
labeling rankings; thumbs pairs: an answer rated up against a sibling rated down), each with
its provenance, duplicates dropped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import sqlalchemy as sa
from sqlalchemy.orm import Session

from .store import (ApiKey, Conversation, Feedback, Generation, LabelItem, Message, Ranking, RankingItem, Snapshot, Store, new_id,
                    utcnow)

MAX_REASON_CHARS = 2000
MAX_TITLE_CHARS = 200
KINDS = ("rank", "demo")


class Refused(ValueError):
    """A request the store will not carry out; `status` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---- helpers ---------------------------------------------------------------------------------
def _text(value: object, what: str, max_chars: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise Refused(400, f"{what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise Refused(400, f"{what} is empty; write something first")
    if len(value) > max_chars:
        raise Refused(400, f"{what} has {len(value)} characters; at most {max_chars} are allowed")
    return value


def _owned_conversation(s: Session, key_id: int, conv_id: str) -> Conversation:
    conv = s.get(Conversation, conv_id) if isinstance(conv_id, str) else None
    if conv is None or conv.deleted_at is not None:
        raise Refused(404, f"no conversation {conv_id!r}")
    if conv.key_id != key_id:
        raise Refused(403, f"conversation {conv_id!r} belongs to another key")
    return conv


def _messages(s: Session, conv_id: str) -> list[Message]:
    """A conversation's messages, oldest first; answers written together in their choice order."""
    q = (sa.select(Message).outerjoin(Generation, Generation.id == Message.generation_id).where(Message.conversation_id == conv_id)
         .order_by(Message.created_at, sa.func.coalesce(Generation.choice_index, -1), Message.id))
    return list(s.execute(q).scalars())


def _path_to(by_id: dict[str, Message], msg_id: str | None) -> list[Message]:
    """The turns from the root to `msg_id`, inclusive."""
    out = []
    while msg_id is not None:
        m = by_id[msg_id]
        out.append(m)
        msg_id = m.parent_id
    return out[::-1]


def _turns(path: Iterable[Message]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in path]


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---- conversations -----------------------------------------------------------------------------
def list_conversations(store: Store, key_id: int) -> list[dict]:
    """The key's chat conversations, most recently active first."""
    q = (sa.select(Conversation).where(Conversation.key_id == key_id, Conversation.source == "chat", Conversation.deleted_at.is_(None))
         .order_by(Conversation.updated_at.desc()))
    with store.session() as s:
        return [{"id": c.id, "title": c.title or "New chat", "updated_at": _iso(c.updated_at)} for c in s.execute(q).scalars()]


def create_conversation(store: Store, key_id: int, system: str | None = None, max_chars: int = 200_000) -> dict:
    if system is not None:
        _text(system, "system", max_chars, allow_empty=True)
    now = utcnow()
    conv = Conversation(id=new_id("conv"), key_id=key_id, title=None, source="chat", created_at=now, updated_at=now)
    with store.transaction() as s:
        s.add(conv)
        if system and system.strip():
            s.flush()
            s.add(Message(id=new_id("msg"), conversation_id=conv.id, parent_id=None, role="system", content=system, created_at=now))
    return conversation_view(store, key_id, conv.id)


def rename_conversation(store: Store, key_id: int, conv_id: str, title: object) -> dict:
    title = " ".join(_text(title, "title", MAX_TITLE_CHARS).split())
    with store.transaction() as s:
        conv = _owned_conversation(s, key_id, conv_id)
        conv.title = title
    return {"id": conv_id, "title": title}


def delete_conversation(store: Store, key_id: int, conv_id: str) -> None:
    """Hide a conversation (its rows stay: feedback given in it is still training data)."""
    with store.transaction() as s:
        conv = _owned_conversation(s, key_id, conv_id)
        conv.deleted_at = utcnow()


def active_path(msgs: list[Message], rank_of: dict[str, int]) -> list[Message]:
    """The branch a conversation shows: from the root, always the child whose subtree holds the
    newest message (the branch the person continued last); among answers attached together
    (compare), the best-ranked one, then the first."""
    children: dict[str | None, list[Message]] = {}
    order = {m.id: i for i, m in enumerate(msgs)}
    for m in msgs:
        children.setdefault(m.parent_id, []).append(m)
    latest: dict[str, tuple] = {}  # message id -> (newest created_at, its order) in its subtree
    stack = [(m, False) for m in children.get(None, [])]
    while stack:  # post-order without recursion: conversations can be thousands of turns deep
        m, expanded = stack.pop()
        if expanded:
            latest[m.id] = max([(m.created_at, order[m.id])] + [latest[c.id] for c in children.get(m.id, [])])
        else:
            stack.append((m, True))
            stack.extend((c, False) for c in children.get(m.id, []))

    path, level = [], children.get(None, [])
    while level:
        best = max(level, key=lambda m: (latest[m.id][0], -rank_of.get(m.id, 0), -order[m.id]))
        path.append(best)
        level = children.get(best.id, [])
    return path


def conversation_view(store: Store, key_id: int, conv_id: str) -> dict:
    """A conversation as the page shows it: every message, the active branch, the key's latest
    rating of each answer, and its rankings."""
    with store.session() as s:
        conv = _owned_conversation(s, key_id, conv_id)
        msgs = _messages(s, conv_id)
        ids = [m.id for m in msgs]
        gens = {g.id: g for g in s.execute(sa.select(Generation).where(Generation.conversation_id == conv_id)).scalars()}
        fb: dict[str, dict] = {}
        for f in s.execute(sa.select(Feedback).where(Feedback.message_id.in_(ids), Feedback.key_id == key_id)
                           .order_by(Feedback.created_at)).scalars():
            cur = fb.setdefault(f.message_id, {"rating": None, "reason": None, "correction_id": None})
            if f.rating is not None:
                cur["rating"], cur["reason"] = f.rating, f.reason
            if f.correction_id is not None:
                cur["correction_id"] = f.correction_id
        rankings = []
        q = (sa.select(Ranking).where(Ranking.conversation_id == conv_id, Ranking.key_id == key_id).order_by(Ranking.created_at))
        for r in s.execute(q).scalars():
            items = s.execute(sa.select(RankingItem).where(RankingItem.ranking_id == r.id).order_by(RankingItem.rank)).scalars()
            rankings.append({"id": r.id, "message_ids": [i.message_id for i in items]})
    rank_of = {mid: i for r in rankings for i, mid in enumerate(r["message_ids"])}
    path = active_path(msgs, rank_of)

    def msg(m: Message) -> dict:
        g = gens.get(m.generation_id)
        return {"id": m.id, "parent_id": m.parent_id, "role": m.role, "content": m.content, "created_at": _iso(m.created_at),
                "model": g.model if g else None, "snapshot": g.snapshot if g else None, "request_id": g.request_id if g else None,
                "finish_reason": g.finish_reason if g else None, "human": m.role == "assistant" and g is None}

    return {"id": conv.id, "title": conv.title or "New chat", "messages": [msg(m) for m in msgs], "path": [m.id for m in path],
            "feedback": fb, "rankings": rankings}


def _attach(s: Session, key_id: int | None, conv: Conversation, parent: Message, request_id: object, prompt: list[dict]) -> list[Message]:
    """Attach the answers of one of the key's own chat requests under `parent`. The request's stored
    prompt must be exactly `prompt` (this conversation up to the parent), so an answer can only be
    attached where it was asked. The request's own copy of the conversation (written by the API
    path) is removed: the answers now live here."""
    if not isinstance(request_id, str):
        raise Refused(400, "request_id must be a string (the id of a /v1/chat/completions response)")
    gens = list(s.execute(sa.select(Generation).where(Generation.request_id == request_id).order_by(Generation.choice_index)).scalars())
    if not gens:
        raise Refused(404, f"no stored answers for request {request_id!r} (was it sent with store=false, or stopped?)")
    if any(g.key_id != key_id for g in gens):
        raise Refused(403, f"request {request_id!r} was made with another key")
    api_conv = gens[0].conversation_id
    if api_conv is None:
        raise Refused(400, f"request {request_id!r} is not a chat completion (its prompt is not a conversation)")
    if s.get(Conversation, api_conv).source != "api":
        raise Refused(409, f"the answers of request {request_id!r} are already attached to a conversation")
    api_msgs = {m.id: m for m in _messages(s, api_conv)}
    answer = next(m for m in api_msgs.values() if m.generation_id == gens[0].id)
    if _turns(_path_to(api_msgs, answer.parent_id)) != prompt:
        raise Refused(400, f"request {request_id!r} asked a different conversation than the one it is attached to")
    now = utcnow()
    out = []
    for g in gens:
        m = Message(id=new_id("msg"), conversation_id=conv.id, parent_id=parent.id, role="assistant", content=g.output,
                    generation_id=g.id, created_at=now)
        out.append(m)
    s.execute(sa.update(Generation).where(Generation.request_id == request_id).values(conversation_id=conv.id))
    s.execute(sa.delete(Message).where(Message.conversation_id == api_conv))
    s.execute(sa.delete(Conversation).where(Conversation.id == api_conv))
    s.add_all(out)
    return out


def add_turn(store: Store, key_id: int, conv_id: str, parent_id: str | None, user: str | None, request_id: str | None,
             max_chars: int = 200_000) -> dict:
    """A user message under `parent_id` (or, with user=None, an answer to the user message
    `parent_id`: regenerate and compare), and the answers of request `request_id` under it.
    Without request_id (the person stopped the answer) only the user message is kept."""
    if user is None and request_id is None:
        raise Refused(400, "give a user message, a request_id, or both")
    if user is not None:
        _text(user, "user message", max_chars)
    with store.transaction() as s:
        conv = _owned_conversation(s, key_id, conv_id)
        if conv.source != "chat":
            raise Refused(400, f"conversation {conv_id!r} is not a chat conversation")
        msgs = {m.id: m for m in _messages(s, conv_id)}
        if parent_id is not None and parent_id not in msgs:
            raise Refused(400, f"parent_id {parent_id!r} is not a message of this conversation")
        parent = msgs.get(parent_id)
        now = utcnow()
        if user is not None:
            if parent is not None and parent.role == "user":
                raise Refused(400, "a user message must follow an answer or the system prompt, not another user message")
            um = Message(id=new_id("msg"), conversation_id=conv.id, parent_id=parent_id, role="user", content=user, created_at=now)
            s.add(um)
            s.flush()
            msgs[um.id] = parent = um
            if conv.title is None:
                conv.title = " ".join(user.split())[:MAX_TITLE_CHARS] or "New chat"
        elif parent is None or parent.role != "user":
            raise Refused(400, "regenerate/compare answers a user message: parent_id must name one")
        if request_id is not None:
            _attach(s, key_id, conv, parent, request_id, _turns(_path_to(msgs, parent.id)))
        conv.updated_at = now
    return conversation_view(store, key_id, conv_id)


# ---- feedback and rankings ---------------------------------------------------------------------
def rate(store: Store, key_id: int, message_id: str, rating: object = None, reason: object = None, correction: object = None,
         max_chars: int = 200_000) -> dict:
    """Thumbs up (+1) or down (-1) with an optional reason, and/or a corrected answer (saved as a
    person-written sibling of the answer: a demonstration). The latest rating of a key counts."""
    if rating is not None and (isinstance(rating, bool) or rating not in (1, -1)):
        raise Refused(400, f"rating must be 1 (thumbs up) or -1 (thumbs down), got {rating!r}")
    if reason is not None:
        _text(reason, "reason", MAX_REASON_CHARS, allow_empty=True)
        if rating is None:
            raise Refused(400, "a reason goes with a rating (1 or -1)")
    if correction is not None:
        _text(correction, "edited answer", max_chars)
    if rating is None and correction is None:
        raise Refused(400, "give a rating (1 or -1), an edited answer (correction), or both")
    with store.transaction() as s:
        m = s.get(Message, message_id) if isinstance(message_id, str) else None
        if m is None:
            raise Refused(404, f"no message {message_id!r}")
        conv = _owned_conversation(s, key_id, m.conversation_id)
        if m.role != "assistant":
            raise Refused(400, f"message {message_id!r} is a {m.role} message; rate answers")
        now = utcnow()
        cid = None
        if correction is not None:
            if correction == m.content:
                raise Refused(400, "the edited answer is the same as the answer; change it or rate it instead")
            cid = new_id("msg")
            s.add(Message(id=cid, conversation_id=m.conversation_id, parent_id=m.parent_id, role="assistant", content=correction,
                          created_at=now))
            s.flush()
        s.add(Feedback(id=new_id("fb"), message_id=m.id, key_id=key_id, rating=rating, reason=(reason or None) if rating else None,
                       correction_id=cid, created_at=now))
        conv.updated_at = now
    return {"message_id": message_id, "rating": rating, "correction_id": cid}


def _check_ranking_set(s: Session, message_ids: object) -> list[Message]:
    if not isinstance(message_ids, list) or not all(isinstance(x, str) for x in message_ids):
        raise Refused(400, "message_ids must be a list of message ids, best first")
    dup = sorted({x for x in message_ids if message_ids.count(x) > 1})
    if dup:
        raise Refused(400, f"the ranking lists {dup} more than once")
    if len(message_ids) < 2:
        raise Refused(400, f"a ranking needs at least 2 answers, got {len(message_ids)}")
    msgs = [s.get(Message, x) for x in message_ids]
    missing = [x for x, m in zip(message_ids, msgs) if m is None]
    if missing:
        raise Refused(404, f"no messages {missing}")
    if any(m.role != "assistant" for m in msgs) or len({(m.conversation_id, m.parent_id) for m in msgs}) != 1:
        raise Refused(400, "a ranking orders answers to one prompt: assistant messages with the same parent")
    gen_ids = [m.generation_id for m in msgs]
    if None in gen_ids:
        raise Refused(400, "only model answers are ranked (edited answers are demonstrations)")
    requests = {g.request_id for g in s.execute(sa.select(Generation).where(Generation.id.in_(gen_ids))).scalars()}
    if len(requests) != 1:
        raise Refused(400, "a ranking orders the answers of one compare request; these come from several")
    all_gens = list(s.execute(sa.select(Generation.id).where(Generation.request_id == requests.pop())).scalars())
    left_out = sorted(set(all_gens) - set(gen_ids))
    if left_out:
        raise Refused(400, f"the ranking leaves out {len(left_out)} of the {len(all_gens)} answers; rank them all")
    return msgs


def rank(store: Store, key_id: int, message_ids: object) -> dict:
    """A ranking (best first) of all K answers of one compare request (chat page, in the key's own
    conversation) or of a labeling item's samples (labeling page, any labeler)."""
    with store.transaction() as s:
        msgs = _check_ranking_set(s, message_ids)
        conv = s.get(Conversation, msgs[0].conversation_id)
        if conv.source == "label":
            source = "label"
        else:
            _owned_conversation(s, key_id, conv.id)
            source = "compare"
        now = utcnow()
        r = Ranking(id=new_id("rank"), key_id=key_id, conversation_id=conv.id, parent_id=msgs[0].parent_id, source=source, created_at=now)
        s.add(r)
        s.flush()
        s.add_all([RankingItem(ranking_id=r.id, message_id=m.id, rank=i) for i, m in enumerate(msgs)])
        conv.updated_at = now
    return {"id": r.id, "source": source, "message_ids": list(message_ids)}


# ---- the labeling queue ------------------------------------------------------------------------
def add_label_items(store: Store, prompts: list[list[dict]], kind: str, source: str = "file") -> int:
    """Queue prompts (each a list of turns ending with a user turn) for labelers."""
    from .tokenizer import check_messages

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
    for i, p in enumerate(prompts):
        check_messages(p, f"prompt {i}")
        if p[-1]["role"] != "user":
            raise ValueError(f"prompt {i} ends with a {p[-1]['role']!r} turn; it must end with a user turn")
    now = utcnow()
    with store.transaction() as s:
        for p in prompts:
            conv = Conversation(id=new_id("conv"), key_id=None, title=" ".join(p[-1]["content"].split())[:MAX_TITLE_CHARS],
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
        q = (sa.select(Message).join(Conversation, Conversation.id == Message.conversation_id)
             .where(Conversation.source == "chat", Conversation.deleted_at.is_(None), Message.role == "user"))
        seen, out = set(), []
        for m in s.execute(q).scalars():
            path = [t for t in _turns(_path_to({x.id: x for x in _messages(s, m.conversation_id)}, m.id))]
            key = json.dumps(path, ensure_ascii=False)
            if key not in seen:
                seen.add(key)
                out.append(path)
    random.Random(seed).shuffle(out)
    return out[:limit]


def _item_view(s: Session, item: LabelItem) -> dict:
    msgs = _messages(s, item.conversation_id)
    by_id = {m.id: m for m in msgs}
    prompt = max((_path_to(by_id, m.id) for m in msgs if m.role == "user"), key=len)  # the queued turns end with the deepest user turn
    prompt_end = prompt[-1]
    samples = [m for m in msgs if m.parent_id == prompt_end.id and m.generation_id is not None]
    return {"id": item.id, "kind": item.kind, "conversation_id": item.conversation_id, "prompt": _turns(prompt),
            "parent_id": prompt_end.id, "samples": [{"message_id": m.id, "content": m.content} for m in samples]}


def _done_by(s: Session, key_id: int) -> set[str]:
    ranked = set(s.execute(sa.select(LabelItem.id).join(Ranking, Ranking.conversation_id == LabelItem.conversation_id)
                           .where(Ranking.key_id == key_id)).scalars())
    demo = set(s.execute(sa.select(LabelItem.id).join(Message, Message.conversation_id == LabelItem.conversation_id)
                         .join(Feedback, Feedback.correction_id == Message.id).where(Feedback.key_id == key_id)).scalars())
    return ranked | demo


def next_label_item(store: Store, key_id: int, kind: str | None = None) -> dict | None:
    """The oldest item this labeler has not done yet (None when the queue is done)."""
    if kind is not None and kind not in KINDS:
        raise Refused(400, f"kind={kind!r}; expected one of {KINDS}")
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
        raise Refused(404, f"no label item {item_id!r}")
    if item.kind != kind:
        raise Refused(400, f"label item {item_id!r} asks for {asks_instead}")
    return item


def attach_samples(store: Store, key_id: int, item_id: str, request_id: str) -> dict:
    """The K samples of a rank item: the answers of a request made for it (once per item, so every
    labeler ranks the same samples and their agreement can be measured)."""
    with store.transaction() as s:
        item = _label_item(s, item_id, "rank", "a demonstration, not samples")
        view = _item_view(s, item)
        if view["samples"]:
            raise Refused(409, f"label item {item_id!r} already has its samples")
        conv = s.get(Conversation, item.conversation_id)
        msgs = {m.id: m for m in _messages(s, conv.id)}
        added = _attach(s, key_id, conv, msgs[view["parent_id"]], request_id, view["prompt"])
        if len(added) < 2:
            raise Refused(400, f"request {request_id!r} has {len(added)} answer; a rank item needs n >= 2")
    with store.session() as s:
        return _item_view(s, s.get(LabelItem, item_id))


def add_demonstration(store: Store, key_id: int, item_id: str, content: object, max_chars: int = 200_000) -> dict:
    """A labeler's written answer to a demo item: a person-written message plus a feedback row that
    names it (so the export knows who wrote it and when)."""
    content = _text(content, "demonstration", max_chars)
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
        q = sa.select(Ranking).where(Ranking.source == "label").order_by(Ranking.created_at)
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


# ---- export ------------------------------------------------------------------------------------
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


def _latest_ratings(s: Session, since: dt.datetime | None) -> dict[tuple[int | None, str], Feedback]:
    """The latest rating of each (key, answer); a key that changed its mind counts once, as it ended."""
    q = sa.select(Feedback).where(Feedback.rating.is_not(None)).order_by(Feedback.created_at, Feedback.id)
    if since is not None:
        q = q.where(Feedback.created_at >= since)
    out = {}
    for f in s.execute(q).scalars():
        out[(f.key_id, f.message_id)] = f
    return out


def export(store: Store, out: str | Path, since: dt.datetime | None = None) -> ExportSummary:
    """Write OUT/sft.jsonl (demonstrations as {"messages", "metadata"}), OUT/rankings.jsonl
    ({"messages", "responses", "ranking", "provenance"} and thumbs pairs as {"messages", "chosen",
    "rejected", "provenance"}) and OUT/summary.json, from feedback and rankings made since `since`.
    Provenance: kind, who (key id and name), when, and the model snapshot(s) that wrote the answers."""
    from .data.rankings import write_jsonl

    out = Path(out)
    sft: list[dict] = []
    rank_lines: list[dict] = []
    seen: set[str] = set()
    dups = 0
    counts_d = {"edit": 0, "label": 0, "thumbs_up": 0}
    counts_r = {"compare": 0, "label": 0, "thumbs_pair": 0}

    def keep(line: dict, dedup_on: object) -> bool:
        nonlocal dups
        h = hashlib.sha256(json.dumps(dedup_on, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
        if h in seen:
            dups += 1
            return False
        seen.add(h)
        return True

    with store.session() as s:
        names = dict(s.execute(sa.select(ApiKey.id, ApiKey.name)).all())
        # A conversation its owner deleted leaves nothing in the training data (its rows stay for the ledger).
        deleted = set(s.execute(sa.select(Conversation.id).where(Conversation.deleted_at.is_not(None))).scalars())
        gens = {}
        conv_msgs: dict[str, dict[str, Message]] = {}

        def msgs_of(conv_id: str) -> dict[str, Message]:
            if conv_id not in conv_msgs:
                conv_msgs[conv_id] = {m.id: m for m in _messages(s, conv_id)}
            return conv_msgs[conv_id]

        def gen(m: Message) -> Generation | None:
            if m.generation_id is None:
                return None
            if m.generation_id not in gens:
                gens[m.generation_id] = s.get(Generation, m.generation_id)
            return gens[m.generation_id]

        def who(key_id: int | None) -> dict:
            return {"key_id": key_id, "key": names.get(key_id)}

        # Demonstrations: edited answers and labelers' written answers.
        q = sa.select(Feedback).where(Feedback.correction_id.is_not(None)).order_by(Feedback.created_at, Feedback.id)
        if since is not None:
            q = q.where(Feedback.created_at >= since)
        for f in s.execute(q).scalars():
            corr = s.get(Message, f.correction_id)
            if corr.conversation_id in deleted:
                continue
            path = _path_to(msgs_of(corr.conversation_id), corr.id)
            rated = s.get(Message, f.message_id)
            g = gen(rated) if rated.role == "assistant" else None
            kind = "edit" if rated.role == "assistant" else "label"
            turns = _turns(path)
            if keep(turns, ("sft", turns)):
                sft.append({"messages": turns, "metadata": {"kind": kind, **who(f.key_id), "created_at": _iso(f.created_at),
                                                            "snapshot": g.snapshot if g else None, "model": g.model if g else None,
                                                            "message_id": corr.id, "conversation_id": corr.conversation_id}})
                counts_d[kind] += 1
        # Thumbs: up answers are demonstrations; up vs down siblings are preference pairs.
        latest = _latest_ratings(s, since)
        net: dict[str, int] = {}
        for (_, mid), f in latest.items():
            net[mid] = net.get(mid, 0) + f.rating
        by_parent: dict[tuple[str, str | None], dict[int, list[Message]]] = {}
        for mid, score in sorted(net.items()):
            if score == 0:
                continue
            m = s.get(Message, mid)
            if m.conversation_id in deleted:
                continue
            by_parent.setdefault((m.conversation_id, m.parent_id), {}).setdefault(1 if score > 0 else -1, []).append(m)
            if score > 0:
                turns = _turns(_path_to(msgs_of(m.conversation_id), m.id))
                raters = [f for (k, x), f in latest.items() if x == mid and f.rating > 0]
                g = gen(m)
                if keep(turns, ("sft", turns)):
                    sft.append({"messages": turns, "metadata": {"kind": "thumbs_up", "raters": [who(f.key_id) for f in raters],
                                                                "created_at": _iso(max(f.created_at for f in raters)),
                                                                "snapshot": g.snapshot if g else None, "model": g.model if g else None,
                                                                "message_id": m.id, "conversation_id": m.conversation_id}})
                    counts_d["thumbs_up"] += 1
        for (conv_id, parent_id), sides in by_parent.items():
            prompt = _turns(_path_to(msgs_of(conv_id), parent_id))
            if not prompt or prompt[-1]["role"] != "user":
                continue
            for up in sides.get(1, []):
                for down in sides.get(-1, []):
                    line = {"messages": prompt, "chosen": up.content, "rejected": down.content,
                            "provenance": {"kind": "thumbs_pair", "snapshots": [getattr(gen(up), "snapshot", None), getattr(gen(down), "snapshot", None)],
                                           "message_ids": [up.id, down.id], "conversation_id": conv_id}}
                    if keep(line, ("pair", prompt, up.content, down.content)):
                        rank_lines.append(line)
                        counts_r["thumbs_pair"] += 1
        # Rankings from the compare view and the labeling page.
        q = sa.select(Ranking).order_by(Ranking.created_at, Ranking.id)
        if since is not None:
            q = q.where(Ranking.created_at >= since)
        for r in s.execute(q).scalars():
            if r.conversation_id in deleted:
                continue
            items = list(s.execute(sa.select(RankingItem).where(RankingItem.ranking_id == r.id)).scalars())
            msgs = msgs_of(r.conversation_id)
            answers = sorted((msgs[i.message_id] for i in items), key=lambda m: (gen(m).choice_index if gen(m) else 0, m.id))
            rank_of = {i.message_id: i.rank for i in items}
            prompt = _turns(_path_to(msgs, r.parent_id))
            responses = [m.content for m in answers]
            ranking = sorted(range(len(answers)), key=lambda j: rank_of[answers[j].id])
            line = {"messages": prompt, "responses": responses, "ranking": ranking,
                    "provenance": {"kind": r.source, **who(r.key_id), "created_at": _iso(r.created_at),
                                   "snapshots": sorted({gen(m).snapshot for m in answers if gen(m)}),
                                   "ranking_id": r.id, "conversation_id": r.conversation_id}}
            # The same person ranking the same answers the same way twice is one label; two people are two.
            if keep(line, ("rank", r.key_id, prompt, [responses[j] for j in ranking])):
                rank_lines.append(line)
                counts_r[r.source] = counts_r.get(r.source, 0) + 1
    sft_path = write_jsonl(out / "sft.jsonl", sft)
    rankings_path = write_jsonl(out / "rankings.jsonl", rank_lines)
    summary = ExportSummary(counts_d, counts_r, dups, str(sft_path), str(rankings_path))
    (out / "summary.json").write_text(json.dumps({**summary.as_dict(), "since": _iso(since), "exported_at": _iso(utcnow())}, indent=2) + "\n")
    return summary


# ---- per-snapshot statistics (A/B) ---------------------------------------------------------------
def stats(store: Store, since: dt.datetime | None = None) -> list[dict]:
    """Per model snapshot: answers written, answers rated, thumbs up and down (each key's latest
    rating), the thumbs-up rate, and its share of new traffic if the flywheel registered it."""
    with store.session() as s:
        q = sa.select(Generation.model, Generation.snapshot, sa.func.count()).group_by(Generation.model, Generation.snapshot)
        if since is not None:
            q = q.where(Generation.created_at >= since)
        rows = {(m, snap): {"model": m, "snapshot": snap, "answers": n, "up": 0, "down": 0} for m, snap, n in s.execute(q).all()}
        for f in _latest_ratings(s, since).values():
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

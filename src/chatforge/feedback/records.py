"""Conversations and what people say about answers on the chat page: the records of the data
flywheel (the labeling queue is queue.py; turning records into training data is export.py).

A chat conversation is a tree of messages; a regenerated answer is a sibling of the old one, an
edited answer is a sibling written by a person (generation_id NULL) plus a feedback row pointing
at it (`correction_id`), and "compare" attaches K answers of one request (n=K) as siblings that a
ranking then orders. Answers come only from the server's own generation records: the page streams
an answer from /v1/chat/completions and then attaches it by its request id, so what is stored as
model output is what the model wrote, and the snapshot that wrote it is known.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..store import ConversationRow, Feedback, Generation, Message, RankingItem, RankingRow, Store, new_id, utcnow
from .common import MAX_TITLE_CHARS, Refused, attach_answers, check_text, iso, messages_of, owned_conversation, path_to, turns_of

MAX_REASON_CHARS = 2000


# ---- conversations -----------------------------------------------------------------------------
def list_conversations(store: Store, key_id: int) -> list[dict]:
    """The key's chat conversations, most recently active first."""
    q = (sa.select(ConversationRow).where(ConversationRow.key_id == key_id, ConversationRow.source == "chat", ConversationRow.deleted_at.is_(None))
         .order_by(ConversationRow.updated_at.desc()))
    with store.session() as s:
        return [{"id": c.id, "title": c.title or "New chat", "updated_at": iso(c.updated_at)} for c in s.execute(q).scalars()]


def create_conversation(store: Store, key_id: int, system: str | None = None, max_chars: int = 200_000) -> dict:
    if system is not None:
        check_text(system, "system", max_chars, allow_empty=True)
    now = utcnow()
    conv = ConversationRow(id=new_id("conv"), key_id=key_id, title=None, source="chat", created_at=now, updated_at=now)
    with store.transaction() as s:
        s.add(conv)
        if system and system.strip():
            s.flush()
            s.add(Message(id=new_id("msg"), conversation_id=conv.id, parent_id=None, role="system", content=system, created_at=now))
    return conversation_view(store, key_id, conv.id)


def rename_conversation(store: Store, key_id: int, conv_id: str, title: object) -> dict:
    title = " ".join(check_text(title, "title", MAX_TITLE_CHARS).split())
    with store.transaction() as s:
        conv = owned_conversation(s, key_id, conv_id)
        conv.title = title
    return {"id": conv_id, "title": title}


def delete_conversation(store: Store, key_id: int, conv_id: str) -> None:
    """Hide a conversation (its rows stay: feedback given in it is still training data)."""
    with store.transaction() as s:
        conv = owned_conversation(s, key_id, conv_id)
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
        conv = owned_conversation(s, key_id, conv_id)
        msgs = messages_of(s, conv_id)
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
        q = (sa.select(RankingRow).where(RankingRow.conversation_id == conv_id, RankingRow.key_id == key_id).order_by(RankingRow.created_at))
        for r in s.execute(q).scalars():
            items = s.execute(sa.select(RankingItem).where(RankingItem.ranking_id == r.id).order_by(RankingItem.rank)).scalars()
            rankings.append({"id": r.id, "message_ids": [i.message_id for i in items]})
    rank_of = {mid: i for r in rankings for i, mid in enumerate(r["message_ids"])}
    path = active_path(msgs, rank_of)

    def msg(m: Message) -> dict:
        g = gens.get(m.generation_id)
        return {"id": m.id, "parent_id": m.parent_id, "role": m.role, "content": m.content, "created_at": iso(m.created_at),
                "model": g.model if g else None, "snapshot": g.snapshot if g else None, "request_id": g.request_id if g else None,
                "finish_reason": g.finish_reason if g else None, "human": m.role == "assistant" and g is None}

    return {"id": conv.id, "title": conv.title or "New chat", "messages": [msg(m) for m in msgs], "path": [m.id for m in path],
            "feedback": fb, "rankings": rankings}


def add_turn(store: Store, key_id: int, conv_id: str, parent_id: str | None, user: str | None, request_id: str | None,
             max_chars: int = 200_000) -> dict:
    """A user message under `parent_id` (or, with user=None, an answer to the user message
    `parent_id`: regenerate and compare), and the answers of request `request_id` under it.
    Without request_id (the person stopped the answer) only the user message is kept."""
    if user is None and request_id is None:
        raise Refused("invalid", "give a user message, a request_id, or both")
    if user is not None:
        check_text(user, "user message", max_chars)
    with store.transaction() as s:
        conv = owned_conversation(s, key_id, conv_id)
        if conv.source != "chat":
            raise Refused("invalid", f"conversation {conv_id!r} is not a chat conversation")
        msgs = {m.id: m for m in messages_of(s, conv_id)}
        if parent_id is not None and parent_id not in msgs:
            raise Refused("invalid", f"parent_id {parent_id!r} is not a message of this conversation")
        parent = msgs.get(parent_id)
        now = utcnow()
        if user is not None:
            if parent is not None and parent.role == "user":
                raise Refused("invalid", "a user message must follow an answer or the system prompt, not another user message")
            um = Message(id=new_id("msg"), conversation_id=conv.id, parent_id=parent_id, role="user", content=user, created_at=now)
            s.add(um)
            s.flush()
            msgs[um.id] = parent = um
            if conv.title is None:
                conv.title = " ".join(user.split())[:MAX_TITLE_CHARS] or "New chat"
        elif parent is None or parent.role != "user":
            raise Refused("invalid", "regenerate/compare answers a user message: parent_id must name one")
        if request_id is not None:
            attach_answers(s, key_id, conv, parent, request_id, turns_of(path_to(msgs, parent.id)))
        conv.updated_at = now
    return conversation_view(store, key_id, conv_id)


# ---- feedback and rankings ---------------------------------------------------------------------
def rate(store: Store, key_id: int, message_id: str, rating: object = None, reason: object = None, correction: object = None,
         max_chars: int = 200_000) -> dict:
    """Thumbs up (+1) or down (-1) with an optional reason, and/or a corrected answer (saved as a
    person-written sibling of the answer: a demonstration). The latest rating of a key counts."""
    if rating is not None and (isinstance(rating, bool) or rating not in (1, -1)):
        raise Refused("invalid", f"rating must be 1 (thumbs up) or -1 (thumbs down), got {rating!r}")
    if reason is not None:
        check_text(reason, "reason", MAX_REASON_CHARS, allow_empty=True)
        if rating is None:
            raise Refused("invalid", "a reason goes with a rating (1 or -1)")
    if correction is not None:
        check_text(correction, "edited answer", max_chars)
    if rating is None and correction is None:
        raise Refused("invalid", "give a rating (1 or -1), an edited answer (correction), or both")
    with store.transaction() as s:
        m = s.get(Message, message_id) if isinstance(message_id, str) else None
        if m is None:
            raise Refused("not_found", f"no message {message_id!r}")
        conv = owned_conversation(s, key_id, m.conversation_id)
        if m.role != "assistant":
            raise Refused("invalid", f"message {message_id!r} is a {m.role} message; rate answers")
        now = utcnow()
        cid = None
        if correction is not None:
            if correction == m.content:
                raise Refused("invalid", "the edited answer is the same as the answer; change it or rate it instead")
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
        raise Refused("invalid", "message_ids must be a list of message ids, best first")
    dup = sorted({x for x in message_ids if message_ids.count(x) > 1})
    if dup:
        raise Refused("invalid", f"the ranking lists {dup} more than once")
    if len(message_ids) < 2:
        raise Refused("invalid", f"a ranking needs at least 2 answers, got {len(message_ids)}")
    msgs = [s.get(Message, x) for x in message_ids]
    missing = [x for x, m in zip(message_ids, msgs) if m is None]
    if missing:
        raise Refused("not_found", f"no messages {missing}")
    if any(m.role != "assistant" for m in msgs) or len({(m.conversation_id, m.parent_id) for m in msgs}) != 1:
        raise Refused("invalid", "a ranking orders answers to one prompt: assistant messages with the same parent")
    gen_ids = [m.generation_id for m in msgs]
    if None in gen_ids:
        raise Refused("invalid", "only model answers are ranked (edited answers are demonstrations)")
    requests = {g.request_id for g in s.execute(sa.select(Generation).where(Generation.id.in_(gen_ids))).scalars()}
    if len(requests) != 1:
        raise Refused("invalid", "a ranking orders the answers of one compare request; these come from several")
    all_gens = list(s.execute(sa.select(Generation.id).where(Generation.request_id == requests.pop())).scalars())
    left_out = sorted(set(all_gens) - set(gen_ids))
    if left_out:
        raise Refused("invalid", f"the ranking leaves out {len(left_out)} of the {len(all_gens)} answers; rank them all")
    return msgs


def add_ranking(store: Store, key_id: int, message_ids: object) -> dict:
    """A ranking (best first) of all K answers of one compare request (chat page, in the key's own
    conversation) or of a labeling item's samples (labeling page, any labeler)."""
    with store.transaction() as s:
        msgs = _check_ranking_set(s, message_ids)
        conv = s.get(ConversationRow, msgs[0].conversation_id)
        if conv.source == "label":
            source = "label"
        else:
            owned_conversation(s, key_id, conv.id)
            source = "compare"
        now = utcnow()
        r = RankingRow(id=new_id("rank"), key_id=key_id, conversation_id=conv.id, parent_id=msgs[0].parent_id, source=source, created_at=now)
        s.add(r)
        s.flush()
        s.add_all([RankingItem(ranking_id=r.id, message_id=m.id, rank=i) for i, m in enumerate(msgs)])
        conv.updated_at = now
    return {"id": r.id, "source": source, "message_ids": list(message_ids)}

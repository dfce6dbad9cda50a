"""What every part of the feedback package shares: the refusal error, input checks, and reading a
conversation's message tree from the store."""

from __future__ import annotations

import datetime as dt
from typing import Iterable

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..store import ConversationRow, Feedback, Generation, Message, new_id, utcnow

MAX_TITLE_CHARS = 200

REASONS = ("invalid", "not_found", "forbidden", "conflict")


class Refused(ValueError):
    """A request the store will not carry out. `reason` says why, in one of REASONS: the input is
    wrong ("invalid"), names nothing ("not_found"), belongs to another key ("forbidden"), or
    clashes with what is already stored ("conflict"); the server maps it to an HTTP status."""

    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


def check_text(value: object, what: str, max_chars: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise Refused("invalid", f"{what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise Refused("invalid", f"{what} is empty; write something first")
    if len(value) > max_chars:
        raise Refused("invalid", f"{what} has {len(value)} characters; at most {max_chars} are allowed")
    return value


def owned_conversation(s: Session, key_id: int, conv_id: str) -> ConversationRow:
    conv = s.get(ConversationRow, conv_id) if isinstance(conv_id, str) else None
    if conv is None or conv.deleted_at is not None:
        raise Refused("not_found", f"no conversation {conv_id!r}")
    if conv.key_id != key_id:
        raise Refused("forbidden", f"conversation {conv_id!r} belongs to another key")
    return conv


def messages_of(s: Session, conv_id: str) -> list[Message]:
    """A conversation's messages, oldest first; answers written together in their choice order."""
    q = (sa.select(Message).outerjoin(Generation, Generation.id == Message.generation_id).where(Message.conversation_id == conv_id)
         .order_by(Message.created_at, sa.func.coalesce(Generation.choice_index, -1), Message.id))
    return list(s.execute(q).scalars())


def path_to(by_id: dict[str, Message], msg_id: str | None) -> list[Message]:
    """The turns from the root to `msg_id`, inclusive."""
    out = []
    while msg_id is not None:
        m = by_id[msg_id]
        out.append(m)
        msg_id = m.parent_id
    return out[::-1]


def turns_of(path: Iterable[Message]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in path]


def iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def attach_answers(s: Session, key_id: int | None, conv: ConversationRow, parent: Message, request_id: object, prompt: list[dict]) -> list[Message]:
    """Attach the answers of one of the key's own chat requests under `parent`. The request's stored
    prompt must be exactly `prompt` (this conversation up to the parent), so an answer can only be
    attached where it was asked. The request's own copy of the conversation (written by the API
    path) is removed: the answers now live here."""
    if not isinstance(request_id, str):
        raise Refused("invalid", "request_id must be a string (the id of a /v1/chat/completions response)")
    gens = list(s.execute(sa.select(Generation).where(Generation.request_id == request_id).order_by(Generation.choice_index)).scalars())
    if not gens:
        raise Refused("not_found", f"no stored answers for request {request_id!r} (was it sent with store=false, or stopped?)")
    if any(g.key_id != key_id for g in gens):
        raise Refused("forbidden", f"request {request_id!r} was made with another key")
    api_conv = gens[0].conversation_id
    if api_conv is None:
        raise Refused("invalid", f"request {request_id!r} is not a chat completion (its prompt is not a conversation)")
    if s.get(ConversationRow, api_conv).source != "api":
        raise Refused("conflict", f"the answers of request {request_id!r} are already attached to a conversation")
    api_msgs = {m.id: m for m in messages_of(s, api_conv)}
    answer = next(m for m in api_msgs.values() if m.generation_id == gens[0].id)
    if turns_of(path_to(api_msgs, answer.parent_id)) != prompt:
        raise Refused("invalid", f"request {request_id!r} asked a different conversation than the one it is attached to")
    now = utcnow()
    out = []
    for g in gens:
        m = Message(id=new_id("msg"), conversation_id=conv.id, parent_id=parent.id, role="assistant", content=g.output,
                    generation_id=g.id, created_at=now)
        out.append(m)
    s.execute(sa.update(Generation).where(Generation.request_id == request_id).values(conversation_id=conv.id))
    s.execute(sa.delete(Message).where(Message.conversation_id == api_conv))
    s.execute(sa.delete(ConversationRow).where(ConversationRow.id == api_conv))
    s.add_all(out)
    return out


def latest_ratings(s: Session, since: dt.datetime | None) -> dict[tuple[int | None, str], Feedback]:
    """The latest rating of each (key, answer); a key that changed its mind counts once, as it ended."""
    q = sa.select(Feedback).where(Feedback.rating.is_not(None)).order_by(Feedback.created_at, Feedback.id)
    if since is not None:
        q = q.where(Feedback.created_at >= since)
    out = {}
    for f in s.execute(q).scalars():
        out[(f.key_id, f.message_id)] = f
    return out

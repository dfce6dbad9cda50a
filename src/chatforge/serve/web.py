"""The chat page, the labeling page, and the JSON endpoints they use (everything under /web/).

The pages are static files (serve/static/): plain HTML, CSS and JavaScript, no build step. A
person signs in by pasting an API key; the page keeps it in the browser's localStorage and
sends it as `Authorization: Bearer` on every call, so the same keys (and the same limits and
ledger) cover the API and the pages, and every record has an owner.

Answers stream from the OpenAI endpoint itself (/v1/chat/completions with stream=true); after
the stream ends the page attaches the answer to its conversation by the response id
(`POST /web/conversations/{id}/turns`). The rules about what may be stored live in
chatforge.feedback; this module only adapts HTTP to them (its `Refused` errors become OpenAI-style
error objects, with the HTTP status of their reason: STATUS).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from .. import feedback as F
from ..store import KeyInfo
from . import protocol as P
from .admission import admission, require_role

STATIC = Path(__file__).parent / "static"
# feedback.Refused's reason -> the HTTP status the page gets
STATUS = {"invalid": 400, "not_found": 404, "forbidden": 403, "conflict": 409}
assert set(STATUS) == set(F.REASONS)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewConversation(_Body):
    system: str | None = None  # the system prompt (the conversation's first turn)


class Rename(_Body):
    title: Any  # checked by feedback.rename_conversation (a string of 1-200 characters)


class Turn(_Body):
    parent_id: str | None = None  # the message this turn follows (null: the conversation's start)
    user: str | None = None  # the person's message; null when regenerating or comparing answers to `parent_id`
    request_id: str | None = None  # the /v1/chat/completions response whose answers to attach; null when stopped


class Rate(_Body):
    message_id: str
    rating: Annotated[int, Field(strict=True)] | None = None  # 1 thumbs up, -1 thumbs down
    reason: str | None = None
    correction: str | None = None  # the edited answer


class Rank(_Body):
    message_ids: list[str]  # best first


class Samples(_Body):
    request_id: str


class Demonstration(_Body):
    content: str


def mount(app: FastAPI, state) -> None:
    """Add the pages and /web/ endpoints to the server's app."""
    store, models, cfg = state.store, state.models, state.cfg
    max_chars = cfg.max_message_chars
    # The API's admission (key, quota, rpm, concurrency, a ledger row per call) for every route here.
    signed_in = admission(state, "web", required=True)

    async def labeler(key: KeyInfo = signed_in) -> KeyInfo:
        await require_role(key, "labeler", "the labeling queue")
        return key

    async def call(fn: Callable, *args, **kw):
        try:
            return await anyio.to_thread.run_sync(lambda: fn(store, *args, **kw))
        except F.Refused as e:
            raise P.APIError(STATUS[e.reason], str(e), type="permission_error" if e.reason == "forbidden" else "invalid_request_error") from None

    r = APIRouter(prefix="/web", tags=["web pages"], responses={code: {"model": P.ErrorResponse} for code in (403, 409)})

    @r.get("/me")
    async def me(key: KeyInfo = signed_in) -> dict:
        return {"key": {"id": key.id, "name": key.name, "prefix": key.prefix, "role": key.role}, "models": [m.id for m in models.models],
                "max_n": cfg.max_n, "max_message_chars": max_chars}

    @r.get("/conversations")
    async def conversations(key: KeyInfo = signed_in) -> list[dict]:
        return await call(F.list_conversations, key.id)

    @r.post("/conversations")
    async def new_conversation(body: NewConversation, key: KeyInfo = signed_in) -> dict:
        view = await call(F.create_conversation, key.id, body.system, max_chars)
        loaded = [(m.name, m.snapshot) for m in models.models]
        view["model"] = await anyio.to_thread.run_sync(F.pick_model, store, loaded, view["id"])
        return view

    @r.get("/conversations/{conv_id}")
    async def open_conversation(conv_id: str, key: KeyInfo = signed_in) -> dict:
        return await call(F.conversation_view, key.id, conv_id)

    @r.patch("/conversations/{conv_id}")
    async def rename(conv_id: str, body: Rename, key: KeyInfo = signed_in) -> dict:
        return await call(F.rename_conversation, key.id, conv_id, body.title)

    @r.delete("/conversations/{conv_id}")
    async def delete(conv_id: str, key: KeyInfo = signed_in) -> dict:
        await call(F.delete_conversation, key.id, conv_id)
        return {"id": conv_id, "deleted": True}

    @r.post("/conversations/{conv_id}/turns")
    async def turn(conv_id: str, body: Turn, key: KeyInfo = signed_in) -> dict:
        return await call(F.add_turn, key.id, conv_id, body.parent_id, body.user, body.request_id, max_chars)

    @r.post("/feedback")
    async def rate(body: Rate, key: KeyInfo = signed_in) -> dict:
        return await call(F.rate, key.id, body.message_id, body.rating, body.reason, body.correction, max_chars)

    @r.post("/rankings")
    async def rank(body: Rank, key: KeyInfo = signed_in) -> dict:
        return await call(F.add_ranking, key.id, body.message_ids)

    @r.get("/label/next")
    async def label_next(kind: str | None = None, key: KeyInfo = Depends(labeler)) -> dict:
        return {"item": await call(F.next_label_item, key.id, kind),
                "stats": await call(F.label_stats, key.id, show_names=key.may("admin"))}

    @r.post("/label/items/{item_id}/samples")
    async def label_samples(item_id: str, body: Samples, key: KeyInfo = Depends(labeler)) -> dict:
        return await call(F.attach_samples, key.id, item_id, body.request_id)

    @r.post("/label/items/{item_id}/demonstration")
    async def label_demo(item_id: str, body: Demonstration, key: KeyInfo = Depends(labeler)) -> dict:
        return await call(F.add_demonstration, key.id, item_id, body.content, max_chars)

    @r.get("/label/stats")
    async def label_stats(key: KeyInfo = Depends(labeler)) -> dict:
        return await call(F.label_stats, key.id, show_names=key.may("admin"))

    app.include_router(r)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/label", include_in_schema=False)
    async def label_page() -> FileResponse:
        return FileResponse(STATIC / "label.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

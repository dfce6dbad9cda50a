"""The store: API keys, the usage ledger, and what the data flywheel learns from.

One SQLAlchemy 2 database holds
- api_keys       random keys stored only as SHA-256 hashes, with rpm/tpm limits, a token quota
                 and the running count of tokens used;
- usage          one ledger row per request: key, model snapshot, prompt and completion tokens,
                 latency, HTTP status (written before the response completes);
- conversations, messages (a tree: `parent_id` lets regenerate/edit branch), generations (model
                 snapshot, sampling parameters, token counts, finish reason, the raw output);
- feedback       thumbs up/down with a reason, or a corrected answer (a demonstration);
- rankings, ranking_items   K answers to one prompt ranked best first;
- label_items    the labeling page's queue: a prompt (a conversation of source "label") to rank
                 K samples of, or to write a demonstration for (migration 2);
- snapshots      policies the flywheel registered, with the share of chat traffic each gets (A/B)
                 and the evaluation that admitted it (migration 2).

SQLite is the embedded default (`<cache>/chatforge.db`, WAL mode, synchronous=FULL so an
acknowledged row survives a crash of the process and of the machine); any SQLAlchemy URL
(postgresql+psycopg://...) works for production. Times are naive UTC datetimes.

Migrations: `schema_migrations` records which numbered migrations ran. `MIGRATIONS` is an
append-only list; each entry's DDL is frozen (migration 1 builds its own MetaData rather than
using the ORM classes below), so a database created by any older chatforge is upgraded step by
step on start. tests/test_store.py checks that a database migrated from scratch has exactly the
columns the ORM classes declare: change a class, add a migration.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import secrets
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .config import cache_dir

KEY_PREFIX = "cf-"  # every chatforge key starts with this, so a leaked key is recognisable
# What a key may do (migration 3). user: the API and the chat page; labeler: also the labeling
# queue and its stats; admin: also /metrics, the engine load in /health and other keys' names.
ROLES = ("user", "labeler", "admin")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def default_url() -> str:
    return f"sqlite:///{cache_dir() / 'chatforge.db'}"


# ---- API keys -----------------------------------------------------------------------------
def generate_key() -> str:
    """A new secret: 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(secret: str) -> str:
    # A fast hash is enough for 256-bit random secrets (no dictionary to try), and keeps the
    # check on every request cheap; slow password hashes are for low-entropy passwords.
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


# ---- ORM classes: the current schema ------------------------------------------------------
# ConversationRow and RankingRow carry "Row" so they are not mistaken for the training-data
# classes data/chat.Conversation and data/rankings.Ranking (feedback/export.py turns the rows
# into those formats); their tables keep their names.
class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    prefix: Mapped[str] = mapped_column(sa.String(16))  # the first characters, to tell keys apart in listings
    key_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    rpm: Mapped[int | None] = mapped_column(sa.Integer)  # requests per minute; None = unlimited
    tpm: Mapped[int | None] = mapped_column(sa.Integer)  # tokens (prompt + completion) per minute
    quota_tokens: Mapped[int | None] = mapped_column(sa.BigInteger)  # lifetime token quota
    tokens_used: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime)
    role: Mapped[str] = mapped_column(sa.String(16), default="user")  # one of ROLES


class Usage(Base):
    __tablename__ = "usage"
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(sa.String(64), index=True)  # the response's `id`
    key_id: Mapped[int | None] = mapped_column(sa.ForeignKey("api_keys.id"), index=True)
    endpoint: Mapped[str] = mapped_column(sa.String(32))  # "chat.completions" | "completions"
    model: Mapped[str] = mapped_column(sa.String(200))  # name@snapshot, or what was asked for if unknown
    prompt_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    latency_ms: Mapped[float] = mapped_column(sa.Float)
    ttft_ms: Mapped[float | None] = mapped_column(sa.Float)  # time to first token
    status: Mapped[int] = mapped_column(sa.Integer)  # HTTP status; 499 = the client went away
    error_code: Mapped[str | None] = mapped_column(sa.String(64))
    user: Mapped[str | None] = mapped_column(sa.String(256))  # OpenAI's `user` field
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, index=True)


class ConversationRow(Base):
    __tablename__ = "conversations"
    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    key_id: Mapped[int | None] = mapped_column(sa.ForeignKey("api_keys.id"), index=True)  # the owner
    title: Mapped[str | None] = mapped_column(sa.String(200))
    source: Mapped[str] = mapped_column(sa.String(16))  # "api" | "chat" | "label"
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(sa.DateTime)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime)


class Message(Base):
    __tablename__ = "messages"
    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(sa.ForeignKey("conversations.id"), index=True)
    parent_id: Mapped[str | None] = mapped_column(sa.ForeignKey("messages.id"))  # previous turn; siblings = alternatives
    role: Mapped[str] = mapped_column(sa.String(16))  # system | user | assistant
    content: Mapped[str] = mapped_column(sa.Text)
    generation_id: Mapped[str | None] = mapped_column(sa.ForeignKey("generations.id"))  # set when a model wrote it
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime)


class Generation(Base):
    __tablename__ = "generations"
    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(sa.String(64), index=True)  # shared by the n choices of a request
    choice_index: Mapped[int] = mapped_column(sa.Integer)
    key_id: Mapped[int | None] = mapped_column(sa.ForeignKey("api_keys.id"), index=True)
    conversation_id: Mapped[str | None] = mapped_column(sa.ForeignKey("conversations.id"), index=True)
    prompt_text: Mapped[str | None] = mapped_column(sa.Text)  # raw prompt of /v1/completions (chat prompts are messages)
    model: Mapped[str] = mapped_column(sa.String(200))  # the model's name
    snapshot: Mapped[str] = mapped_column(sa.String(64))  # checkpoint content hash (checkpoint.snapshot_id)
    sampling: Mapped[dict] = mapped_column(sa.JSON)  # the engine's SamplingParams as a dict
    output: Mapped[str] = mapped_column(sa.Text)  # what the model wrote (messages may later be edited)
    prompt_tokens: Mapped[int] = mapped_column(sa.Integer)
    completion_tokens: Mapped[int] = mapped_column(sa.Integer)
    finish_reason: Mapped[str] = mapped_column(sa.String(16))  # stop | length | cancelled
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime)


class Feedback(Base):
    __tablename__ = "feedback"
    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    message_id: Mapped[str] = mapped_column(sa.ForeignKey("messages.id"), index=True)  # the rated answer
    key_id: Mapped[int | None] = mapped_column(sa.ForeignKey("api_keys.id"), index=True)  # who rated
    rating: Mapped[int | None] = mapped_column(sa.SmallInteger)  # +1 thumbs up, -1 thumbs down
    reason: Mapped[str | None] = mapped_column(sa.Text)
    correction_id: Mapped[str | None] = mapped_column(sa.ForeignKey("messages.id"))  # the edited answer (a demonstration)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime)


class RankingRow(Base):
    __tablename__ = "rankings"
    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    key_id: Mapped[int | None] = mapped_column(sa.ForeignKey("api_keys.id"), index=True)  # who ranked
    conversation_id: Mapped[str | None] = mapped_column(sa.ForeignKey("conversations.id"))
    parent_id: Mapped[str | None] = mapped_column(sa.ForeignKey("messages.id"))  # the last prompt message
    source: Mapped[str] = mapped_column(sa.String(16))  # "compare" (chat page) | "label" (labeling page)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime)


class RankingItem(Base):
    __tablename__ = "ranking_items"
    ranking_id: Mapped[str] = mapped_column(sa.ForeignKey("rankings.id"), primary_key=True)
    message_id: Mapped[str] = mapped_column(sa.ForeignKey("messages.id"), primary_key=True)
    rank: Mapped[int] = mapped_column(sa.Integer)  # 0 = best


class LabelItem(Base):
    __tablename__ = "label_items"
    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(sa.ForeignKey("conversations.id"), index=True)  # the prompt turns
    kind: Mapped[str] = mapped_column(sa.String(16))  # "rank" (K samples to order) | "demo" (write the answer)
    source: Mapped[str] = mapped_column(sa.String(16))  # "file" | "traffic"
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime)


class Snapshot(Base):
    __tablename__ = "snapshots"
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))  # the served model name (the checkpoint folder's name)
    snapshot: Mapped[str] = mapped_column(sa.String(64), index=True)  # checkpoint content hash
    path: Mapped[str] = mapped_column(sa.Text)  # checkpoint folder
    parent: Mapped[str | None] = mapped_column(sa.String(64))  # the snapshot it was trained from
    traffic: Mapped[float] = mapped_column(sa.Float)  # share of new chat conversations it answers (0..1)
    report: Mapped[dict] = mapped_column(sa.JSON)  # the evaluation that admitted it
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime)


# ---- migrations ---------------------------------------------------------------------------
def _migration_1(conn: sa.Connection) -> None:
    """The initial schema, frozen: never edit; add a migration instead."""
    md = sa.MetaData()
    T, C, S, I, DT = sa.Table, sa.Column, sa.String, sa.Integer, sa.DateTime
    T("api_keys", md, C("id", I, primary_key=True), C("name", S(100), nullable=False), C("prefix", S(16), nullable=False),
      C("key_hash", S(64), nullable=False, unique=True), C("rpm", I), C("tpm", I), C("quota_tokens", sa.BigInteger),
      C("tokens_used", sa.BigInteger, nullable=False), C("created_at", DT, nullable=False), C("revoked_at", DT))
    T("usage", md, C("id", I, primary_key=True), C("request_id", S(64), nullable=False, index=True),
      C("key_id", I, sa.ForeignKey("api_keys.id"), index=True), C("endpoint", S(32), nullable=False),
      C("model", S(200), nullable=False), C("prompt_tokens", I, nullable=False), C("completion_tokens", I, nullable=False),
      C("latency_ms", sa.Float, nullable=False), C("ttft_ms", sa.Float), C("status", I, nullable=False),
      C("error_code", S(64)), C("user", S(256)), C("created_at", DT, nullable=False, index=True))
    T("conversations", md, C("id", S(64), primary_key=True), C("key_id", I, sa.ForeignKey("api_keys.id"), index=True),
      C("title", S(200)), C("source", S(16), nullable=False), C("created_at", DT, nullable=False),
      C("updated_at", DT, nullable=False), C("deleted_at", DT))
    T("generations", md, C("id", S(64), primary_key=True), C("request_id", S(64), nullable=False, index=True),
      C("choice_index", I, nullable=False), C("key_id", I, sa.ForeignKey("api_keys.id"), index=True),
      C("conversation_id", S(64), sa.ForeignKey("conversations.id"), index=True), C("prompt_text", sa.Text),
      C("model", S(200), nullable=False), C("snapshot", S(64), nullable=False), C("sampling", sa.JSON, nullable=False),
      C("output", sa.Text, nullable=False), C("prompt_tokens", I, nullable=False), C("completion_tokens", I, nullable=False),
      C("finish_reason", S(16), nullable=False), C("created_at", DT, nullable=False))
    T("messages", md, C("id", S(64), primary_key=True),
      C("conversation_id", S(64), sa.ForeignKey("conversations.id"), nullable=False, index=True),
      C("parent_id", S(64), sa.ForeignKey("messages.id")), C("role", S(16), nullable=False),
      C("content", sa.Text, nullable=False), C("generation_id", S(64), sa.ForeignKey("generations.id")),
      C("created_at", DT, nullable=False))
    T("feedback", md, C("id", S(64), primary_key=True), C("message_id", S(64), sa.ForeignKey("messages.id"), nullable=False, index=True),
      C("key_id", I, sa.ForeignKey("api_keys.id"), index=True), C("rating", sa.SmallInteger), C("reason", sa.Text),
      C("correction_id", S(64), sa.ForeignKey("messages.id")), C("created_at", DT, nullable=False))
    T("rankings", md, C("id", S(64), primary_key=True), C("key_id", I, sa.ForeignKey("api_keys.id"), index=True),
      C("conversation_id", S(64), sa.ForeignKey("conversations.id")), C("parent_id", S(64), sa.ForeignKey("messages.id")),
      C("source", S(16), nullable=False), C("created_at", DT, nullable=False))
    T("ranking_items", md, C("ranking_id", S(64), sa.ForeignKey("rankings.id"), primary_key=True),
      C("message_id", S(64), sa.ForeignKey("messages.id"), primary_key=True), C("rank", I, nullable=False))
    md.create_all(conn)


def _migration_2(conn: sa.Connection) -> None:
    """The labeling queue and the flywheel's snapshot registry, frozen like migration 1."""
    md = sa.MetaData()
    T, C, S, DT = sa.Table, sa.Column, sa.String, sa.DateTime
    sa.Table("conversations", md, C("id", S(64), primary_key=True))  # referenced only
    T("label_items", md, C("id", S(64), primary_key=True),
      C("conversation_id", S(64), sa.ForeignKey("conversations.id"), nullable=False, index=True),
      C("kind", S(16), nullable=False), C("source", S(16), nullable=False), C("created_at", DT, nullable=False))
    T("snapshots", md, C("id", sa.Integer, primary_key=True), C("name", S(200), nullable=False),
      C("snapshot", S(64), nullable=False, index=True), C("path", sa.Text, nullable=False), C("parent", S(64)),
      C("traffic", sa.Float, nullable=False), C("report", sa.JSON, nullable=False), C("created_at", DT, nullable=False))
    md.tables["label_items"].create(conn)
    md.tables["snapshots"].create(conn)


def _migration_3(conn: sa.Connection) -> None:
    """Roles on keys, frozen: existing keys become "user" (they lose nothing they were meant to have;
    give labelers and admins their role with `chatforge keys role`)."""
    conn.execute(sa.text("ALTER TABLE api_keys ADD COLUMN role VARCHAR(16) DEFAULT 'user' NOT NULL"))


# (version, name, function): append only.
MIGRATIONS: list[tuple[int, str, Callable[[sa.Connection], None]]] = [
    (1, "initial: keys, usage, conversations, messages, generations, feedback, rankings", _migration_1),
    (2, "labeling queue and snapshot registry", _migration_2),
    (3, "roles on API keys", _migration_3),
]

_migrations_table = sa.Table(
    "schema_migrations",
    sa.MetaData(),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.DateTime, nullable=False),
)


# ---- records the server writes ------------------------------------------------------------
@dataclass
class KeyInfo:
    """An API key as the server and the CLI see it (never the secret)."""

    id: int
    name: str
    prefix: str
    rpm: int | None
    tpm: int | None
    quota_tokens: int | None
    tokens_used: int
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    role: str = "user"  # one of ROLES

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def may(self, role: str) -> bool:
        """Whether this key has `role` or a higher one (admin > labeler > user)."""
        return ROLES.index(self.role) >= ROLES.index(role)


@dataclass
class GenerationRecord:
    """One choice of a request: what the model was asked and what it wrote."""

    choice_index: int
    output: str
    completion_tokens: int
    finish_reason: str
    sampling: dict[str, Any]  # the engine's SamplingParams for this choice (seeds differ between choices)


@dataclass
class RequestRecord:
    """Everything one API request leaves in the store, written in one transaction."""

    request_id: str
    endpoint: str
    key_id: int | None
    model: str  # name@snapshot (or the unknown name the client asked for)
    status: int
    latency_ms: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    error_code: str | None = None
    user: str | None = None
    # What the flywheel keeps (empty for rejected requests or when the client asked store=false):
    model_name: str | None = None
    snapshot: str | None = None
    messages: list[dict] | None = None  # chat prompt turns
    prompt_text: str | None = None  # /v1/completions prompt
    generations: list[GenerationRecord] = field(default_factory=list)


@dataclass
class UsageLine:
    key_id: int | None
    key_name: str | None
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


class Store:
    """A handle on the database; thread-safe. Opening it creates or migrates the schema."""

    def __init__(self, url: str | None = None, echo: bool = False):
        self.url = _driver_url(url or default_url())
        try:
            u = sa.engine.make_url(self.url)
        except sa.exc.ArgumentError as e:
            raise ValueError(f"--db {self.url!r}: not a SQLAlchemy URL ({e}); e.g. sqlite:///path/chatforge.db or "
                             "postgresql://user@host/dbname") from None
        self.is_sqlite = u.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            db = u.database
            if db and db != ":memory:":
                Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        try:
            self.engine = sa.create_engine(self.url, **kwargs)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as e:
            raise ValueError(f"--db {self.url!r}: not a usable SQLAlchemy URL ({e})") from None
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        # SQLite allows one writer at a time; serialising our own writes in-process avoids
        # busy-waiting on the file lock (other processes, like `chatforge keys`, still wait on it).
        self._write_lock = threading.Lock() if self.is_sqlite else _NullLock()
        self.migrate()

    @property
    def safe_url(self) -> str:
        """The URL with its password masked, for printing."""
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    # ---- schema ------------------------------------------------------------------------
    def migrate(self) -> list[int]:
        """Apply the migrations this database has not seen; returns the versions applied."""
        applied = []
        with self._write_lock, self.engine.begin() as conn:
            _migrations_table.create(conn, checkfirst=True)
            done = set(conn.execute(sa.select(_migrations_table.c.version)).scalars())
            for version, name, fn in MIGRATIONS:
                if version in done:
                    continue
                fn(conn)
                conn.execute(_migrations_table.insert().values(version=version, name=name, applied_at=utcnow()))
                applied.append(version)
        return applied

    @property
    def version(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(_migrations_table.c.version))).scalar() or 0

    def integrity_check(self) -> str:
        """"ok" when the database is sound, else one line per problem. On every backend: each table
        read in full and no row pointing at a missing parent (SQLite enforces foreign keys only on
        connections that ask). SQLite also runs `PRAGMA integrity_check`; PostgreSQL checks that no
        id is above its sequence (the next insert would collide) and, where the `amcheck` extension
        is installed, runs `bt_index_check` on every B-tree index of the schema."""
        problems = []
        with self.engine.connect() as conn:
            if self.is_sqlite:
                res = "\n".join(r[0] for r in conn.exec_driver_sql("PRAGMA integrity_check"))
                if res != "ok":
                    return res  # a damaged file: the queries below may not even run
            for table in Base.metadata.sorted_tables:
                conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()  # reads every row
                for fk in table.foreign_keys:
                    child, target = fk.parent, fk.column.table.alias("parent_row")  # an alias: messages.parent_id points at messages
                    parent = target.c[fk.column.name]
                    orphans = conn.execute(sa.select(sa.func.count()).select_from(table.outerjoin(target, child == parent))
                                           .where(child.is_not(None), parent.is_(None))).scalar()
                    if orphans:
                        problems.append(f"{table.name}.{child.name}: {orphans} rows point at a missing {fk.column.table.name} row")
            if self.engine.dialect.name == "postgresql":
                problems += _pg_sequence_problems(conn) + _pg_amcheck_problems(conn)
        return "\n".join(problems) or "ok"

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose writes commit together when the block ends, or not at all if it raises;
        this process's writers take turns (SQLite has one writer at a time)."""
        with self._write_lock, self.session() as s, s.begin():
            yield s

    # ---- keys --------------------------------------------------------------------------
    def create_key(self, name: str, rpm: int | None = None, tpm: int | None = None, quota_tokens: int | None = None,
                   role: str = "user") -> tuple[KeyInfo, str]:
        """A new key; returns its record and the secret (shown once, never stored)."""
        if not name or len(name) > 100:
            raise ValueError(f"key name {name!r}: give 1-100 characters")
        _check_role(role)
        for flag, v in (("--rpm", rpm), ("--tpm", tpm), ("--quota", quota_tokens)):
            if v is not None and v < 1:
                raise ValueError(f"{flag}={v} must be >= 1 (leave it out for no limit)")
        secret = generate_key()
        row = ApiKey(name=name, prefix=secret[: len(KEY_PREFIX) + 6], key_hash=hash_key(secret), rpm=rpm, tpm=tpm,
                     quota_tokens=quota_tokens, tokens_used=0, created_at=utcnow(), role=role)
        with self._write_lock, self.session() as s, s.begin():
            s.add(row)
        return _key_info(row), secret

    def lookup_key(self, secret: str) -> KeyInfo | None:
        """The key with this secret, revoked or not; None if there is none."""
        with self.session() as s:
            row = s.execute(sa.select(ApiKey).where(ApiKey.key_hash == hash_key(secret))).scalar_one_or_none()
            return None if row is None else _key_info(row)

    def list_keys(self) -> list[KeyInfo]:
        with self.session() as s:
            return [_key_info(r) for r in s.execute(sa.select(ApiKey).order_by(ApiKey.id)).scalars()]

    def find_key(self, id_or_name: str) -> KeyInfo:
        """A key by numeric id, name or prefix; ValueError if none or ambiguous."""
        keys = self.list_keys()
        hits = [k for k in keys if str(k.id) == id_or_name] or [k for k in keys if k.name == id_or_name or k.prefix == id_or_name]
        if not hits:
            raise ValueError(f"no API key with id, name or prefix {id_or_name!r} (see `chatforge keys list`)")
        if len(hits) > 1:
            raise ValueError(f"{len(hits)} keys are named {id_or_name!r}; give the numeric id: {', '.join(str(k.id) for k in hits)}")
        return hits[0]

    def set_role(self, id_or_name: str, role: str) -> KeyInfo:
        _check_role(role)
        k = self.find_key(id_or_name)
        with self._write_lock, self.session() as s, s.begin():
            row = s.get(ApiKey, k.id)
            row.role = role
        return _key_info(row)

    def revoke_key(self, id_or_name: str) -> KeyInfo:
        k = self.find_key(id_or_name)
        if k.revoked_at is not None:
            return k
        with self._write_lock, self.session() as s, s.begin():
            row = s.get(ApiKey, k.id)
            row.revoked_at = utcnow()
        return _key_info(row)

    # ---- the ledger ------------------------------------------------------------------------
    def record(self, rec: RequestRecord) -> None:
        """Write a request's usage row, its conversation and generations, and charge its tokens to
        its key, all in one transaction (all of it is there after a crash, or none of it)."""
        now = utcnow()
        with self._write_lock, self.session() as s, s.begin():
            s.add(Usage(request_id=rec.request_id, key_id=rec.key_id, endpoint=rec.endpoint, model=rec.model,
                        prompt_tokens=rec.prompt_tokens, completion_tokens=rec.completion_tokens, latency_ms=rec.latency_ms,
                        ttft_ms=rec.ttft_ms, status=rec.status, error_code=rec.error_code, user=rec.user, created_at=now))
            used = rec.prompt_tokens + rec.completion_tokens
            if rec.key_id is not None and used:
                s.execute(sa.update(ApiKey).where(ApiKey.id == rec.key_id).values(tokens_used=ApiKey.tokens_used + used))
            if rec.generations:
                self._add_generations(s, rec, now)

    def _add_generations(self, s: Session, rec: RequestRecord, now: dt.datetime) -> None:
        assert rec.model_name is not None and rec.snapshot is not None
        conv_id, parent = None, None
        if rec.messages is not None:
            conv_id = new_id("conv")
            s.add(ConversationRow(id=conv_id, key_id=rec.key_id, title=_title(rec.messages), source="api", created_at=now, updated_at=now))
            s.flush()
            for m in rec.messages:
                mid = new_id("msg")
                s.add(Message(id=mid, conversation_id=conv_id, parent_id=parent, role=m["role"], content=m["content"], created_at=now))
                s.flush()
                parent = mid
        for g in rec.generations:
            gid = new_id("gen")
            s.add(Generation(id=gid, request_id=rec.request_id, choice_index=g.choice_index, key_id=rec.key_id,
                             conversation_id=conv_id, prompt_text=rec.prompt_text, model=rec.model_name, snapshot=rec.snapshot,
                             sampling=g.sampling, output=g.output, prompt_tokens=rec.prompt_tokens,
                             completion_tokens=g.completion_tokens, finish_reason=g.finish_reason, created_at=now))
            if conv_id is not None:
                s.flush()
                s.add(Message(id=new_id("msg"), conversation_id=conv_id, parent_id=parent, role="assistant",
                              content=g.output, generation_id=gid, created_at=now))

    def usage(self, key_id: int | None = None, since: dt.datetime | None = None) -> list[UsageLine]:
        """Requests and tokens per key and model (all statuses: a cancelled stream still used tokens)."""
        q = (
            sa.select(Usage.key_id, ApiKey.name, Usage.model, sa.func.count(Usage.id),
                      sa.func.coalesce(sa.func.sum(Usage.prompt_tokens), 0), sa.func.coalesce(sa.func.sum(Usage.completion_tokens), 0))
            .outerjoin(ApiKey, ApiKey.id == Usage.key_id)
            .group_by(Usage.key_id, ApiKey.name, Usage.model)
            .order_by(Usage.key_id, Usage.model)
        )
        if key_id is not None:
            q = q.where(Usage.key_id == key_id)
        if since is not None:
            q = q.where(Usage.created_at >= since)
        with self.session() as s:
            return [UsageLine(*row) for row in s.execute(q)]

    def usage_rows(self, request_id: str | None = None) -> list[Usage]:
        q = sa.select(Usage).order_by(Usage.id)
        if request_id is not None:
            q = q.where(Usage.request_id == request_id)
        with self.session() as s:
            return list(s.execute(q).scalars())

    def iter_generations(self, request_id: str | None = None) -> Iterator[Generation]:
        q = sa.select(Generation).order_by(Generation.created_at, Generation.request_id, Generation.choice_index)
        if request_id is not None:
            q = q.where(Generation.request_id == request_id)
        with self.session() as s:
            yield from s.execute(q).scalars()

    def conversation_messages(self, conversation_id: str) -> list[Message]:
        with self.session() as s:
            return list(s.execute(sa.select(Message).where(Message.conversation_id == conversation_id)).scalars())


def _title(messages: list[dict]) -> str:
    first = next((m["content"] for m in messages if m["role"] == "user"), messages[0]["content"] if messages else "")
    return " ".join(first.split())[:200]


def _key_info(r: ApiKey) -> KeyInfo:
    return KeyInfo(r.id, r.name, r.prefix, r.rpm, r.tpm, r.quota_tokens, r.tokens_used, r.created_at, r.revoked_at, r.role)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"--role {role!r}: expected one of {', '.join(ROLES)}")


def _driver_url(url: str) -> str:
    """postgresql:// (and Heroku-style postgres://) means psycopg 3, the driver chatforge installs;
    SQLAlchemy's own default for it is psycopg2, which is not a dependency."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def _pg_sequence_problems(conn: sa.Connection) -> list[str]:
    out = []
    for table in Base.metadata.sorted_tables:
        pk = list(table.primary_key.columns)
        if len(pk) != 1 or not isinstance(pk[0].type, sa.Integer):
            continue
        seq = conn.execute(sa.text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": table.name, "c": pk[0].name}).scalar()
        if seq is None:
            continue
        last, called = conn.execute(sa.text(f"SELECT last_value, is_called FROM {seq}")).one()
        top = conn.execute(sa.select(sa.func.max(pk[0]))).scalar()
        if top is not None and top > (last if called else last - 1):
            out.append(f"{table.name}.{pk[0].name}: a row has id {top} but the sequence {seq} would hand out {last + called} next")
    return out


def _pg_amcheck_problems(conn: sa.Connection) -> list[str]:
    """bt_index_check on every B-tree index of the public schema, if `CREATE EXTENSION amcheck` was run
    (it needs a superuser once; the check itself only reads)."""
    if not conn.execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'")).scalar():
        return []
    out = []
    rows = conn.execute(sa.text("SELECT c.oid, c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                                "JOIN pg_am a ON a.oid = c.relam JOIN pg_namespace n ON n.oid = c.relnamespace "
                                "WHERE a.amname = 'btree' AND n.nspname = current_schema()")).all()
    for oid, name in rows:
        try:
            with conn.begin_nested():
                conn.execute(sa.text("SELECT bt_index_check(CAST(:oid AS regclass))"), {"oid": oid})
        except sa.exc.DBAPIError as e:
            out.append(f"index {name}: {str(e.orig).strip()}")
    return out


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers never block the writer (the server reads keys while it writes the ledger).
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before the response that reports it goes out.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


class _NullLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def parse_since(text: str) -> dt.datetime:
    """`--since`: an ISO date/time (UTC) or a span back from now like 30m, 24h, 7d."""
    t = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if t[:-1].isdigit() and t[-1:] in units:
        return utcnow() - dt.timedelta(seconds=int(t[:-1]) * units[t[-1]])
    try:
        when = dt.datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(f"--since {text!r}: give an ISO date like 2026-01-31 or 2026-01-31T12:00, or a span like 30m, 24h, 7d") from None
    if when.tzinfo is not None:
        when = when.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return when

"""The store's two backends for tests: a SQLite file, or a fresh database on a PostgreSQL server."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest

# The store, serve and crash tests run on SQLite and on PostgreSQL with the same assertions.
# PostgreSQL needs a server: CHATFORGE_TEST_PG_URL names a database on it whose user may CREATE
# DATABASE (each test gets a fresh one, dropped afterwards). Without it the PostgreSQL cases skip,
# except in CI (CI=true), where .ci/run starts a server and a missing URL is a failure.
PG_URL_ENV = "CHATFORGE_TEST_PG_URL"
BACKENDS = ["sqlite", "postgresql"]


def _no_postgres(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {why}: .ci/run starts PostgreSQL and exports {PG_URL_ENV}")
    pytest.skip(f"{why}: set {PG_URL_ENV}=postgresql://USER@HOST:PORT/postgres to run the PostgreSQL cases (.ci/run does)")


@contextlib.contextmanager
def database_url(backend: str, folder: Path) -> Iterator[str]:
    """A URL of an empty database: a SQLite file in `folder`, or a new PostgreSQL database."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'chatforge.db'}"
        return
    import sqlalchemy as sa

    from chatforge.store import _driver_url

    admin_url = os.environ.get(PG_URL_ENV)
    if not admin_url:
        _no_postgres(f"{PG_URL_ENV} is not set")
    admin = sa.create_engine(_driver_url(admin_url), isolation_level="AUTOCOMMIT")
    name = f"chatforge_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as e:
        admin.dispose()
        _no_postgres(f"no PostgreSQL server at {admin_url} ({str(e.orig).strip().splitlines()[0]})")
    try:
        yield sa.engine.make_url(_driver_url(admin_url)).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

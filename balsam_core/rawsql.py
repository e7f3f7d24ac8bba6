"""Statements of the launcher's hot paths, run straight on the database driver.

A lease or a state report runs a handful of statements per batch of tasks, and
SQLAlchemy's per-statement work (parameter processing, expanding ``IN`` lists, result
set-up) cost several times what SQLite needs to run them.  These statements are plain
SQL on the DBAPI cursor of the session's connection -- inside the session's
transaction -- written once for both dialects: ``?`` marks a parameter, ``{ids}``
tests a column against a list of ids passed as *one* parameter (SQLite: a JSON array
read with ``json_each``; PostgreSQL: an array compared with ``= ANY``), and ``INDEXED BY
ix_name`` after a table names the index SQLite must use (it keeps no statistics, and
picks between two indexes that match equally well by chance; PostgreSQL, which plans
from its statistics, does not get the clause).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.orm import Session


@functools.lru_cache(maxsize=256)
def _translate(text: str, postgres: bool) -> str:
    if postgres:
        text = re.sub(r" INDEXED BY \w+", "", text)
        return text.replace("?", "%s").replace("{ids}", "= ANY(%s)")
    return text.replace("{ids}", "IN (SELECT value FROM json_each(?))")


class RawSql:
    """Raw statements in *session*'s transaction."""

    def __init__(self, session: Session) -> None:
        connection = session.connection()
        self.postgres = connection.dialect.name == "postgresql"
        self._cursor = connection.connection.cursor()

    def ids(self, ids: Iterable[int]) -> Any:
        """An id list as the one parameter ``{ids}`` takes."""
        return list(ids) if self.postgres else json.dumps(list(ids))

    def execute(self, text: str, params: Sequence[Any] = ()) -> Any:
        """Run *text* (see the module docstring); the DBAPI cursor, for its rows and
        ``rowcount``."""
        self._cursor.execute(_translate(text, self.postgres), tuple(params))
        return self._cursor

    def insert(self, text: str, params: Sequence[Any]) -> int:
        """Run the INSERT *text* of one row; the row's ``id``."""
        if self.postgres:
            return int(self.execute(text + " RETURNING id", params).fetchone()[0])
        return int(self.execute(text, params).lastrowid)

    def executemany(self, text: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._cursor.executemany(_translate(text, self.postgres), rows)

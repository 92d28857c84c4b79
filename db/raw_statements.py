"""A Core statement compiled once for a dialect and run straight on the DBAPI cursor.

The listener records one row set per C-STORE, and SQLAlchemy's per-execution work (execution
context, parameter processing, result wrapping) cost it more Python than the database's own work
took. ``Prepared`` keeps what SQLAlchemy would redo every time: the SQL text, the order of its
parameters for positional drivers (sqlite3), the values the statement itself fixes, and the
type processors of each parameter (``UTCDateTime`` and the dialect's own date handling). The
statement stays written as a SQLAlchemy construct, so one definition serves SQLite and
PostgreSQL, and runs on the caller's connection inside its transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler


@dataclass(frozen=True)
class Prepared:
    sql: str
    positions: tuple[str, ...] | None  # parameter names in order, for positional paramstyles
    fixed: Mapping[str, Any]  # the values the statement itself sets (``.values(status=...)``)
    required: frozenset[str]  # the parameters each execution must give
    processors: Mapping[str, Callable[[Any], Any]]

    @classmethod
    def of(cls, statement: ClauseElement, dialect: Dialect) -> Prepared:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        fixed, required, processors = {}, set(), {}
        for bind, name in compiled.bind_names.items():
            if bind.required:
                required.add(name)
            else:
                fixed[name] = bind.effective_value
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                processors[name] = processor
        positions = tuple(compiled.positiontup or ()) if compiled.positional else None
        return cls(compiled.string, positions, fixed, frozenset(required), processors)

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        missing = self.required - values.keys()
        if missing:
            raise ValueError(f"no value for {sorted(missing)}")
        merged = {**self.fixed, **values}
        for name, processor in self.processors.items():
            merged[name] = processor(merged[name])
        if self.positions is None:
            return merged
        return tuple(merged[name] for name in self.positions)

    def one(self, connection: Connection, values: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """Run it in ``connection``'s transaction; its first row, if it returned any."""
        cursor = connection.connection.cursor()
        try:
            cursor.execute(self.sql, self.parameters(values))
            return cursor.fetchone() if cursor.description is not None else None
        finally:
            cursor.close()

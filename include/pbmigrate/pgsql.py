"""PostgreSQL identifiers, literals and schema templates as SQL text, through `psycopg.sql`.

Most statements are composed as text (DDL over many tables, checksum SQL that validation and the
loader must agree on), so these return strings; psycopg does the quoting, nothing here hand-quotes.
"""

from __future__ import annotations

from typing import Any

from psycopg import sql

from pbmigrate.errors import MappingError

PG_MAX_IDENT = 63


def qi(ident: str) -> str:
    """A quoted PostgreSQL identifier (keywords and quotes included). PostgreSQL would silently cut
    a longer name to 63 bytes, so two long names could become one: refused instead."""
    if len(ident.encode()) > PG_MAX_IDENT:
        raise MappingError(f"identifier {ident!r} is longer than PostgreSQL's {PG_MAX_IDENT} bytes; rename it")
    return sql.Identifier(ident).as_string()


def ql(value: Any) -> str:
    """A PostgreSQL literal (text, number, list as array...), quoted by psycopg."""
    return sql.Literal(value).as_string()


def ql_list(values: Any) -> str:
    """`'a', 'b'`: text literals for an `IN (...)` list."""
    return ", ".join(ql(str(v)) for v in values)


def with_schema(template: str, schema: str) -> str:
    """A PocketBase index or a mapping's `derive` SELECT with `{schema}` replaced by the quoted
    schema. Not `sql.SQL(...).format()`: the user's SQL may hold braces of its own ('{a,b}')."""
    return template.replace("{schema}", qi(schema))

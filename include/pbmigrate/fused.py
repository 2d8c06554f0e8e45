"""One function per table that converts a row and builds its checksum text in a single pass.

Per row, the loader used to call a converter and a canonical-form function for every column:
two Python calls per value, about a third of a batch's time. The function generated here inlines
the common cases (text without NUL, PocketBase's own date format, floats, integers, 0/1 bools)
and their canonical forms; every other value goes to the column's own converter and canonical
function, so results and rejects are exactly theirs (tests compare both ways on every field type).
Code generation, as `dataclasses` and `namedtuple` do it, because a closure cannot inline.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from pbmigrate import checksum
from pbmigrate.convert import INT64_MAX, INT64_MIN, Converter
from pbmigrate.plan import Column, Table

RowFunction = Callable[[tuple], tuple[list[Any], str]]
TEXT_FIELDS = frozenset({"text", "editor", "email", "url"})  # converted by convert.text


def _fast(col: Column, i: int) -> tuple[list[str], str] | None:
    """(statements setting v{i} from r, canonical expression) for a column with a fast path."""
    f, p = col.field, col.position
    if col.canon != col.type or f.secret:
        return None
    if col.type == "text" and f.type in TEXT_FIELDS:
        return [f"v{i} = r[{p}]", f"if type(v{i}) is not str or '\\x00' in v{i}: v{i} = c{i}(v{i})"], f"v{i}"
    if col.type == "timestamptz" and f.type in ("date", "autodate"):
        return [f"x = r[{p}]",
                "try:",
                f"    v{i} = fromiso(x) if type(x) is str and len(x) == 24 and x[-1] == 'Z' else c{i}(x)",
                "except ValueError:",
                f"    v{i} = c{i}(x)"], f"NULL if v{i} is None else str((v{i} - EPOCH) // US)"
    # A mapping may override a column's type, so each fast path also checks the field it expects.
    if col.type == "double precision" and f.type == "number" and not f.only_int:
        return [f"v{i} = r[{p}]", f"if type(v{i}) is not float or v{i} != v{i}: v{i} = c{i}(v{i})"], \
            f"pack(v{i}).hex()"
    if col.type == "bigint" and f.type == "number" and f.only_int:
        return [f"v{i} = r[{p}]", f"if type(v{i}) is not int or not {INT64_MIN} <= v{i} <= {INT64_MAX}: "
                                  f"v{i} = c{i}(v{i})"], f"str(v{i})"
    if col.type == "boolean" and f.type == "bool":
        return [f"x = r[{p}]", f"v{i} = (x == 1) if type(x) is int and (x == 0 or x == 1) else c{i}(x)"], \
            f"'t' if v{i} else 'f'"
    return None


def source(table: Table) -> str:
    """The Python source of `row_function`: readable, for a person checking it."""
    lines, canon = ["def row(r):"], []
    for i, col in enumerate(table.columns):
        fast = _fast(col, i)
        if fast is None:
            lines.append(f"    v{i} = c{i}(r[{col.position}])")
            canon.append(f"k{i}(v{i})")
        else:
            lines += ["    " + s for s in fast[0]]
            canon.append(fast[1])
    values = ", ".join(f"v{i}" for i in range(len(table.columns)))
    lines.append(f"    return [{values}], SEP.join(({', '.join(canon)},))")
    return "\n".join(lines)


def row_function(table: Table, converters: list[Converter]) -> RowFunction:
    """row tuple -> (values to COPY, canonical text for the checksum); raises convert.Reject.
    `converters` are `table.converters(...)`, the same the caller reports rejects with."""
    env: dict[str, Any] = {"fromiso": datetime.fromisoformat, "SEP": checksum.SEP, "NULL": checksum.NULL,
                           "pack": checksum.pack_float8, "EPOCH": checksum.EPOCH, "US": checksum.MICROSECOND}
    for i, (col, conv) in enumerate(zip(table.columns, converters)):
        env[f"c{i}"] = conv
        env[f"k{i}"] = checksum.PY_CANON[col.canon]
    # Only positions and constants enter the source, never a name or value from the data.
    exec(compile(source(table), f"<pbmigrate row function of {table.name}>", "exec"), env)
    return env["row"]

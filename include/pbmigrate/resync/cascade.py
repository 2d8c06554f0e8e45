"""The re-sync transaction's shared state, and what deletes and rejects do to other rows.

Deleted and rejected ids are doomed in a temporary table and removed children first; references
into them follow PocketBase's own semantics for deleted records (the foreign keys' cascade and set
null) and the migration's `orphans` policy for rejected ones, as `finalize` decides them.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from pbmigrate.pgsql import qi
from pbmigrate.plan.model import Junction, Plan, Table, dangling_reason
from pbmigrate.resync import reads
from pbmigrate.resync.table import REJECT_STAGES, TableSync
from pbmigrate.source import Source


def order(plan: Plan) -> list[Table]:
    """Parents before children (foreign keys and junction targets); cycles broken by name."""
    deps = {t.name: {fk.target_table for fk in t.foreign_keys} | {j.target_table for j in t.junctions
                                                                   if j.target_table} for t in plan.tables}
    names = set(deps)
    for name in names:
        deps[name] = (deps[name] & names) - {name}
    ordered: list[str] = []
    while deps:
        ready = sorted(n for n, d in deps.items() if not d) or [sorted(deps)[0]]
        for n in ready:
            ordered.append(n)
            del deps[n]
        for d in deps.values():
            d.difference_update(ready)
    return [plan.table_named(n) for n in ordered]


@dataclass
class _Ref:
    """A reference into a table: a single relation column, or a junction's target column."""

    child: Table
    column: str
    nullable: bool
    on_delete: str
    field: str
    junction: Junction | None = None


class Cascade:
    """State of one re-sync transaction: the doomed and written ids, in temporary tables, and what
    their deletes and rejects do to the rows that reference them."""

    def __init__(self, conn: psycopg.Connection, schema: str, run_id: str, orphans: str, has_secrets: bool,
                 plan: Plan):
        self.conn, self.schema, self.run_id, self.orphans = conn, schema, run_id, orphans
        self.has_secrets, self.plan = has_secrets, plan
        self.s = qi(schema)
        self._temps = 0
        self.incoming: dict[str, list[_Ref]] = {t.name: [] for t in plan.tables}
        for t in plan.tables:
            for fk in t.foreign_keys:
                col = next(c for c in t.columns if c.name == fk.column)
                if fk.target_table in self.incoming:
                    self.incoming[fk.target_table].append(_Ref(t, fk.column, col.nullable, fk.on_delete, fk.field))
            for j in t.junctions:
                if j.target_table in self.incoming:
                    self.incoming[j.target_table].append(_Ref(t, j.target, True, "CASCADE", j.field.name, j))
        conn.execute('CREATE TEMP TABLE pbm_doomed (tbl text, id text COLLATE "C", why text, done boolean '
                     'NOT NULL DEFAULT false, PRIMARY KEY (tbl, id)) ON COMMIT DROP')
        conn.execute('CREATE TEMP TABLE pbm_written (tbl text, id text COLLATE "C", inserted boolean, '
                     'PRIMARY KEY (tbl, id)) ON COMMIT DROP')
        self.syncs: dict[str, TableSync] = {}
        self.revived: dict[str, list[str]] = {}  # table -> ids whose reject was lifted in this run

    def next_temp(self) -> int:
        self._temps += 1
        return self._temps

    def doom(self, table: str, ids: list[str], why: str) -> None:
        with self.conn.cursor() as cur, cur.copy("COPY pbm_doomed (tbl, id, why) FROM STDIN") as copy:
            for rid in ids:
                copy.write_row((table, rid, why))

    def _reject_rows(self, t: Table, rows: list[tuple[str, str, str]]) -> None:
        """Rows of `t` that a removed parent or a dangling id makes rejects: record, then remove."""
        sync = self.syncs[t.name]
        by_id: dict[str, list[tuple[str, str]]] = {}
        for rid, fname, reason in rows:
            by_id.setdefault(rid, []).append((fname, reason))
        written = dict(self.conn.execute("SELECT id, inserted FROM pbm_written WHERE tbl = %s AND id = ANY(%s)",
                                         (t.name, list(by_id))).fetchall())
        for ins in written.values():  # written earlier in this run: it did not land after all
            if ins:
                sync.result.inserted -= 1
            else:
                sync.result.updated -= 1
        sync.reject(by_id, present=set(by_id))

    def drain(self) -> None:
        """Delete doomed rows, children first; references into them follow PocketBase's semantics
        for deleted records (the foreign keys' cascade / set null) and the orphans policy for
        rejected ones. Repeats until no new row is doomed."""
        children_first = list(reversed(order(self.plan)))
        while True:
            pending = {r[0] for r in self.conn.execute("SELECT DISTINCT tbl FROM pbm_doomed WHERE NOT done")}
            if not pending:
                return
            for t in children_first:
                if t.name in pending:
                    self._drain_table(t)

    def _drain_table(self, t: Table) -> None:
        null_mode = self.orphans == "null"
        for ref in self.incoming[t.name]:
            c = ref.child
            ct = f"{self.s}.{qi(c.name if ref.junction is None else ref.junction.table)}"
            owner = "id" if ref.junction is None else qi(ref.junction.owner)
            args = {"t": t.name, "c": c.name}
            restrict = ref.junction is None and ref.on_delete == "RESTRICT"
            # Deleted parents: the foreign key's own action is PocketBase's cascade or unset, and
            # PocketBase refuses to delete a record a required relation still points at, so only
            # RESTRICT needs a decision. Rejected parents: the orphans policy, as the full load.
            why = "" if restrict else "AND d.why = 'rejected'"
            hits = (f"FROM {ct} x JOIN pbm_doomed d ON d.tbl = %(t)s AND NOT d.done {why} "
                    f"AND d.id = x.{qi(ref.column)} WHERE NOT EXISTS "
                    f"(SELECT 1 FROM pbm_doomed e WHERE e.tbl = %(c)s AND e.id = x.{owner})")
            if null_mode and ref.nullable and not restrict:
                if ref.junction is None:
                    self.conn.execute(f"UPDATE {ct} y SET {qi(ref.column)} = NULL WHERE y.id IN "
                                      f"(SELECT x.id {hits})", args)
                continue  # junction rows go with their target (ON DELETE CASCADE)
            rows = self.conn.execute(f"SELECT DISTINCT x.{owner} {hits}", args).fetchall()
            if not rows:
                continue
            reason = dangling_reason(ref.field, t.name, junction=ref.junction is not None)
            self._reject_rows(c, [(r[0], ref.field, reason) for r in rows])
            if c.name != t.name:
                self._drain_table(c)  # gone before their parent, which a RESTRICT key requires
        self.conn.execute(f"DELETE FROM {self.s}.{qi(t.name)} WHERE id IN "
                          "(SELECT id FROM pbm_doomed WHERE tbl = %s AND NOT done)", (t.name,))
        gone = [r[0] for r in self.conn.execute(
            "UPDATE pbm_doomed SET done = true WHERE tbl = %s AND NOT done RETURNING id, why", (t.name,))
            if r[1] == "deleted"]
        sync = self.syncs[t.name]
        stale = [rid for rid in gone if rid in sync.rejected]
        if stale:
            self.conn.execute(
                "DELETE FROM pbm_meta.rejects WHERE run_id = %s AND collection = %s AND record_id = ANY(%s) "
                "AND stage = ANY(%s)", (self.run_id, sync.name, stale, list(REJECT_STAGES)))
            for rid in stale:
                del sync.rejected[rid]

    def revive_children(self, source: Source) -> None:
        """orphans=null: rows whose relation was nulled because its record was rejected get the
        relation back once that record lands (reject mode retries them through the id walk)."""
        if self.orphans != "null":
            return
        for parent, ids in self.revived.items():
            for ref in self.incoming.get(parent, []):
                child = self.syncs.get(ref.child.name)
                if child is not None and ref.nullable:
                    child.apply(reads.chunks_referencing(source, ref.child, ref.field, ids))

    def settle_written(self) -> None:
        """Rows written in this run that point at ids the target does not hold: nulled or rejected
        by the orphans policy (a parent may have been rejected, or never existed)."""
        null_mode = self.orphans == "null"
        for t in self.plan.tables:
            tt = f"{self.s}.{qi(t.name)}"
            written = "JOIN pbm_written w ON w.tbl = %(t)s AND w.id = x.id"
            for fk in t.foreign_keys:
                col = next(c for c in t.columns if c.name == fk.column)
                c = qi(fk.column)
                dangling = (f"SELECT x.id FROM {tt} x {written} LEFT JOIN {self.s}.{qi(fk.target_table)} y "
                            f"ON y.id = x.{c} WHERE x.{c} IS NOT NULL AND y.id IS NULL")
                if null_mode and col.nullable:
                    self.conn.execute(f"UPDATE {tt} SET {c} = NULL WHERE id IN ({dangling})", {"t": t.name})
                    continue
                rows = self.conn.execute(dangling, {"t": t.name}).fetchall()
                if rows:
                    self._reject_rows(t, [(r[0], fk.field, dangling_reason(fk.field, fk.target_table)) for r in rows])
            for j in t.junctions:
                if not j.target_table:
                    continue
                jt, o, g = f"{self.s}.{qi(j.table)}", qi(j.owner), qi(j.target)
                missing = f"NOT EXISTS (SELECT 1 FROM {self.s}.{qi(j.target_table)} y WHERE y.id = x.{g})"
                mine = f"x.{o} IN (SELECT id FROM pbm_written WHERE tbl = %(t)s)"
                if null_mode:
                    self.conn.execute(f"DELETE FROM {jt} x WHERE {mine} AND {missing}", {"t": t.name})
                    continue
                rows = self.conn.execute(f"SELECT DISTINCT x.{o} FROM {jt} x WHERE {mine} AND {missing}",
                                         {"t": t.name}).fetchall()
                if rows:
                    self._reject_rows(t, [(r[0], j.field.name, dangling_reason(j.field.name, j.target_table,
                                                                               junction=True)) for r in rows])
        self.drain()

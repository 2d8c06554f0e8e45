"""`pbmigrate` console script: the assessment and a starter mapping, without Airflow.

Every expected failure prints one line naming the problem and exits non-zero; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pbmigrate.errors import PbmError


# Each command imports what it needs when it runs: `pbmigrate --help` and a bad argument answer at
# once, without loading Arrow, DuckDB and GX.
def _assess(args: argparse.Namespace) -> int:
    from pbmigrate.plan.mapping import load_mapping
    from pbmigrate.validate.assess import assess, render

    source = _open(args)
    try:
        report = assess(source, load_mapping(args.mapping), args.collections or None)
    finally:
        source.close()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def _open(args: argparse.Namespace):
    from pbmigrate.source import open_source

    if not args.source and not args.url:
        raise PbmError("give a data.db / pb_data path, or --url with --email and a password")
    if args.source:
        return open_source(args.source)
    password = args.password or os.environ.get("PBM_POCKETBASE_PASSWORD", "")
    return open_source(None, url=args.url, email=args.email, password=password)


def _mapping_init(args: argparse.Namespace) -> int:
    from pbmigrate.plan.starter import starter_mapping
    from pbmigrate.preflight import safe_url

    source = _open(args)
    try:
        catalog = source.catalog()
        counts = {c.name: source.count(c) for c in catalog.migrating()}
    finally:
        source.close()
    text = starter_mapping(catalog, source=args.source or safe_url(args.url), counts=counts)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}: {len(counts)} collections; give it as the DAG param mapping", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", help="data.db or pb_data folder (omit for API mode)")
    p.add_argument("--url", help="PocketBase URL (API mode)")
    p.add_argument("--email", help="superuser email (API mode)")
    p.add_argument("--password", help="superuser password (or env PBM_POCKETBASE_PASSWORD)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pbmigrate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("assess", help="pre-migration assessment of a PocketBase database or server")
    _source_args(a)
    a.add_argument("--mapping", default="", help="mapping file or bundled name (default: identity)")
    a.add_argument("--collections", nargs="*", help="only these collections")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    m = sub.add_parser("mapping", help="mapping files")
    msub = m.add_subparsers(dest="mapping_command", required=True)
    init = msub.add_parser("init", help="write a starter mapping for a PocketBase database or server")
    _source_args(init)
    init.add_argument("-o", "--output", help="write to this file (default: standard output)")
    args = parser.parse_args(argv)
    try:
        return _mapping_init(args) if args.command == "mapping" else _assess(args)
    except PbmError as exc:
        print(f"pbmigrate: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

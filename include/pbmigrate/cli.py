"""`pbmigrate` console script: the assessment (and the sample builder) without Airflow.

Every expected failure prints one line naming the problem and exits non-zero; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pbmigrate.errors import PbmError


def _assess(args: argparse.Namespace) -> int:
    from pbmigrate.assess import assess, render
    from pbmigrate.mapping import load_mapping
    from pbmigrate.sources import open_source

    if not args.source and not args.url:
        raise PbmError("give a data.db / pb_data path, or --url with --email and a password")
    password = args.password or os.environ.get("PBM_POCKETBASE_PASSWORD", "")
    source = open_source(args.source, url=args.url, email=args.email, password=password) if not args.source \
        else open_source(args.source)
    try:
        report = assess(source, load_mapping(args.mapping), args.collections or None)
    finally:
        source.close()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def _sample(argv: list[str]) -> int:
    from pbmigrate.sample import main as sample_main

    return sample_main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "sample":
        try:
            return _sample(argv[1:])
        except PbmError as exc:
            print(f"pbmigrate: {exc}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="pbmigrate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("assess", help="pre-migration assessment of a PocketBase database or server")
    a.add_argument("source", nargs="?", help="data.db or pb_data folder (omit for API mode)")
    a.add_argument("--url", help="PocketBase URL (API mode)")
    a.add_argument("--email", help="superuser email (API mode)")
    a.add_argument("--password", help="superuser password (or env PBM_POCKETBASE_PASSWORD)")
    a.add_argument("--mapping", default="", help="mapping file or bundled name (default: identity)")
    a.add_argument("--collections", nargs="*", help="only these collections")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("sample", help="build the sample game database (see: pbmigrate sample --help)")
    args = parser.parse_args(argv)
    try:
        return _assess(args)
    except PbmError as exc:
        print(f"pbmigrate: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Errors a user can act on: each says in one line what is wrong and where.

`Permanent` marks an error that a retry cannot fix (a bad mapping or param, a missing privilege,
a source that is not PocketBase, a refused gate): the DAGs fail such a task at once instead of
retrying it for minutes. Everything else (a server down, a connection lost) may pass on retry.
"""

from __future__ import annotations


class PbmError(Exception):
    """Base class for every error pbmigrate raises on purpose (the CLI prints it as one line)."""


class Permanent(PbmError):
    """The same call would fail the same way again: fail now, do not retry."""


class SourceError(PbmError):
    """The source is not readable right now (a server down, a snapshot that failed)."""


class BadSource(SourceError, Permanent):
    """The source is not a PocketBase database or server, does not exist, or refuses our login."""


class CatalogError(Permanent):
    """The PocketBase catalog holds something this version cannot map."""


class MappingError(Permanent):
    """The mapping file names something that does not exist or is malformed."""


class ParamError(Permanent, ValueError):
    """A DAG param (or its command-line twin) is out of range."""


class Refused(Permanent):
    """A request that cannot be met as things stand (nothing to cut over, a gate said no)."""


class ResyncRefused(Refused):
    """The re-sync must not run against this target now (cut over, nothing loaded, params differ)."""


class TargetCutOver(ResyncRefused):
    """The target was cut over: PostgreSQL is the source of truth, there is nothing to re-sync.

    Its own class so a scheduled run can end as skipped (a state, not a fault) while every other
    refusal still fails."""


class TargetError(PbmError):
    """PostgreSQL or Redis is unreachable or failed."""


class BadTarget(TargetError, Permanent):
    """PostgreSQL or Redis is misconfigured or lacks a privilege the run needs."""

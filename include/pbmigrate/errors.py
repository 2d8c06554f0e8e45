"""Errors a user can act on: each says in one line what is wrong and where."""

from __future__ import annotations


class PbmError(Exception):
    """Base class for every error pbmigrate raises on purpose (the CLI prints it as one line)."""


class SourceError(PbmError):
    """The source is not a readable PocketBase database or server."""


class CatalogError(PbmError):
    """The PocketBase catalog holds something this version cannot map."""


class MappingError(PbmError):
    """The mapping file names something that does not exist or is malformed."""


class Refused(PbmError):
    """A request that cannot be met as things stand (nothing to cut over, a gate said no): the same
    call would refuse again, so a task should fail at once instead of retrying."""


class TargetError(PbmError):
    """PostgreSQL or Redis is missing, unreachable or lacks a privilege."""

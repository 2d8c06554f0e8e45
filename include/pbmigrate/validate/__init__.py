"""Validate: the pre-migration assessment, the checks and checksums after the load, the reconciliation report."""

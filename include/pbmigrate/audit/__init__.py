"""Audit: the `pbm_meta` schema (one ordered list of migrations), runs, the per-target guard and metrics."""

"""Load: one id range of one collection into typed tables (columnar path, binary COPY, ledger), then finalize."""

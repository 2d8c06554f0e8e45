"""The columnar batch path: Arrow record batches from the source to typed PostgreSQL tables.

A batch is read as bounded Arrow record batches (`read`), converted and checked column by column
(`vector`), checksummed by DuckDB over the canonical form validation recomputes in PostgreSQL
(`digest`), and written with binary COPY whose rows Arrow's kernels assemble (`pgbinary`).
Per-row Python runs only for the few rows a column check sends back (`fallback`): an unusual
storage class or a value that fails, so each bad field is named with exactly `convert`'s reason.
"""

import os

import pyarrow as pa

# Arrow's default pool in this build (mimalloc) keeps much of what it freed: with the system
# allocator a load process peaked 20-40 MB lower for the same CPU (per table, 2M sample; jemalloc
# did as well as the system's). An explicit ARROW_DEFAULT_MEMORY_POOL still decides.
if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
    pa.set_memory_pool(pa.system_memory_pool())

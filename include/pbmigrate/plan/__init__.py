"""Plan: mapping files, PocketBase-to-PostgreSQL types and converters, and the target DDL."""

"""Cache: the Redis key schema and its client, and the warm-up from the migrated tables."""

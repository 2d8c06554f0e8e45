"""pbmigrate: move a live PocketBase backend into PostgreSQL and Redis, prove nothing was lost."""

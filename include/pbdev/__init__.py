"""Development tools: a real PocketBase server harness and the sample game builder (not part of the engine)."""

"""Cut-over: the gate, backups, the schema swap, the backend flag and the roll-back."""

"""Sandboxes and their mechanisms: lifecycle, DeltaFS, DeltaCR, warm pools, processes."""

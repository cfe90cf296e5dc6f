"""The state directory: sandbox/checkpoint metadata, its on-disk layout and the XFS backing."""

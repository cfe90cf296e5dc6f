"""Host mechanisms: the only place with FFI (linux primitives, cgroups, CRIU, network, the init protocol)."""

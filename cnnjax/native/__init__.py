"""Native CPU kernels called from XLA through its FFI (optional: everything works without them)."""

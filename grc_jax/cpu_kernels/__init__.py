"""Native CPU kernels called through XLA's FFI (jax.ffi), each beside its XLA reference."""

"""GPU kernels (Pallas, Triton backend)."""

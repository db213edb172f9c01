"""TPU kernels (Pallas, Mosaic backend)."""

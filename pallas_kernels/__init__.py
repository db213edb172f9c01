"""Pallas kernels for intent_jax's decode attention.

No kernel is implemented yet: the GPU kernel (issue "pallas_gpu") and the TPU kernel
("pallas_tpu") register themselves with `intent_jax.attention` when they land. Until then
`decode_attention` uses the "xla" and "reference" implementations.
"""

"""Pallas kernels for intent_jax's decode attention.

gpu/selected_page_decode.py: implementation "pallas_gpu" (Triton backend), registered with
`intent_jax.attention`. A TPU kernel ("pallas_tpu") is not written yet.
"""

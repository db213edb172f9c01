"""Pallas kernels for intent_jax's decode attention, registered with `intent_jax.attention`.

gpu/selected_page_decode.py: implementation "pallas_gpu" (Triton backend).
tpu/selected_page_decode.py: implementation "pallas_tpu" (Mosaic backend).
"""

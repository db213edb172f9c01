"""Merging the flash-decoding splits of a GPU decode kernel in one launch (Pallas, Triton backend).

Reference: `splits.combine`, the answer this must match (its merge is
`reference.merge_partials`).

At B=1 the decode kernel itself takes 20-55 us, and each small XLA kernel around it 1.5-3 us;
`splits.combine` compiles to four (the splits' log-sum-exp, their weights, the weights' sum, the
weighted sum), this to one: a program per (sequence, kv head, 32 channels) reads the splits' (m,
l) twice (for the maximum, then for the weights) and their acc once, several splits a load, and
writes the query rows' output in the caller's dtype (and their log-sum-exp).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import splits

_CHUNK_VALUES = 8192  # Float32 values of acc a program holds at once.
# Channels a program merges: at B=1 a program per (kv head, 32 channels) spreads the loads over
# 4x the multiprocessors (a program per kv head took 8 us on the H100, 16 splits).
_CHANNELS = 32


def _kernel(m_ref, l_ref, acc_ref, *refs, rows: int, chunk: int, with_sinks: bool,
            return_lse: bool):
  """m_ref, l_ref f32[splits, padded rows], acc_ref f32[splits, padded rows, channels] of one
  (sequence, kv head, block of channels); the first `rows` rows -> out_ref [rows, channels] (and
  lse_ref [rows], the same from each block of channels).
  Splits are read `chunk` at a time, so their loads are in flight together."""
  sinks_ref = refs[0] if with_sinks else None
  out_ref, *lse_ref = refs[1:] if with_sinks else refs
  num_splits, _, channels = acc_ref.shape
  first_rows = pl.ds(0, rows)

  def chunk_lse(c):
    """Splits c * chunk.. : their log-sum-exp [chunk, rows], -inf where they saw nothing, and
    their l (1 there)."""
    at = (pl.ds(c * chunk, chunk), first_rows)
    l = l_ref[at]
    seen = l > 0
    l = jnp.where(seen, l, 1.0)
    return jnp.where(seen, m_ref[at] + jnp.log(l), -jnp.inf), l

  chunks = num_splits // chunk
  top = lax.fori_loop(0, chunks, lambda c, top: jnp.maximum(top, chunk_lse(c)[0].max(axis=0)),
                      jnp.full((rows,), -jnp.inf, jnp.float32))
  if with_sinks:
    sinks = sinks_ref[...]
    top = jnp.maximum(top, sinks)
  top = jnp.where(top == -jnp.inf, 0.0, top)  # No split and no sink: every weight is 0.

  def add(c, carry):
    denominator, numerator = carry
    lse, l = chunk_lse(c)
    weight = jnp.exp(lse - top[None, :])
    # Each split's output acc / l, weighted: one division a row.
    acc = acc_ref[pl.ds(c * chunk, chunk), first_rows, :]
    numerator = numerator + (acc * (weight / l)[:, :, None]).sum(axis=0)
    return denominator + weight.sum(axis=0), numerator

  denominator, numerator = lax.fori_loop(
      0, chunks, add,
      (jnp.zeros((rows,), jnp.float32), jnp.zeros((rows, channels), jnp.float32)))
  if with_sinks:
    denominator = denominator + jnp.exp(sinks - top)
  seen = denominator > 0
  out_ref[...] = (numerator / jnp.where(seen, denominator, 1.0)[:, None]).astype(out_ref.dtype)
  if return_lse:
    lse_ref[0][...] = jnp.where(seen, top + jnp.log(jnp.where(seen, denominator, 1.0)),
                                -jnp.inf)


def _chunk(num_splits: int, rows: int, channels: int) -> int:
  """Splits a program reads at once: the largest power of two dividing num_splits whose acc
  block stays within _CHUNK_VALUES (registers: 64 a thread at 4 warps)."""
  chunk = num_splits & -num_splits
  while chunk > 1 and chunk * rows * channels > _CHUNK_VALUES:
    chunk //= 2
  return chunk


def combine_splits(partials, q_shape, *, sinks=None, return_lse: bool = False,
                   out_dtype=jnp.float32, interpret: bool = False):
  """`splits.combine` in one Pallas launch.

  Args:
    partials: (m, l, acc[, acc_low, acc_high]): m, l f32[batch, kv heads, splits, padded
      rows], acc f32[batch, kv heads, splits, padded rows, head_dim] (or two halves of it); row
      t * group + g is query head g of the group at token t (`splits.query_rows`).
    q_shape: (batch, q_len, num_q_heads, head_dim), head_dim a power of two.
    sinks: optional f32[num_q_heads].
    return_lse: also return the merged log-sum-exp f32[batch, q_len, num_q_heads].
    out_dtype: dtype of the output (float32 with return_lse).
    interpret: run in Pallas interpret mode (CPU tests).

  Returns:
    [batch, q_len, num_q_heads, head_dim] in out_dtype, zeros where nothing is visible (and the
    log-sum-exp with return_lse).
  """
  m, l, acc = splits.whole_acc(partials)
  batch, num_kv_heads, num_splits, padded_rows, head_dim = acc.shape
  _, q_len, num_q_heads, _ = q_shape
  used_rows = num_q_heads // num_kv_heads * q_len
  rows = splits.next_power_of_two(used_rows)  # Triton's arrays: sizes are powers of two.
  if rows > padded_rows:
    raise ValueError(f"partials hold {padded_rows} rows a kv head, fewer than the {rows} needed")
  if head_dim & (head_dim - 1):
    raise ValueError(f"combine_splits merges a head_dim that is a power of two, got {head_dim}")
  if return_lse:
    out_dtype = jnp.float32
  channels = min(head_dim, _CHANNELS)
  per_head = lambda *tail: pl.BlockSpec((None, None) + tail,
                                        lambda b, h, c: (b, h) + (0,) * len(tail))
  per_channels = lambda *tail: pl.BlockSpec((None, None) + tail + (channels,),
                                            lambda b, h, c: (b, h) + (0,) * len(tail) + (c,))
  arrays = [m, l, acc]
  in_specs = [per_head(num_splits, padded_rows)] * 2 + [per_channels(num_splits, padded_rows)]
  if sinks is not None:
    # Each row's sink: row t * group + g is query head h * group + g; padding rows see none.
    row_sinks = jnp.tile(sinks.astype(jnp.float32).reshape(num_kv_heads, -1), (1, q_len))
    arrays.append(jnp.pad(row_sinks, ((0, 0), (0, rows - used_rows)),
                          constant_values=-jnp.inf))
    in_specs.append(pl.BlockSpec((None, rows), lambda b, h, c: (h, 0)))
  out_shape = [jax.ShapeDtypeStruct((batch, num_kv_heads, rows, head_dim), out_dtype)]
  out_specs = [per_channels(rows)]
  if return_lse:
    out_shape.append(jax.ShapeDtypeStruct((batch, num_kv_heads, rows), jnp.float32))
    out_specs.append(per_head(rows))
  kernel = functools.partial(_kernel, rows=rows, chunk=_chunk(num_splits, rows, channels),
                             with_sinks=sinks is not None, return_lse=return_lse)
  outs = pl.pallas_call(kernel, grid=(batch, num_kv_heads, head_dim // channels),
                        in_specs=in_specs,
                        out_specs=out_specs, out_shape=out_shape, interpret=interpret,
                        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
                        name="combine_splits")(*arrays)
  outs = [splits.unpack_rows(x, q_len, num_q_heads) for x in outs]
  return tuple(outs) if return_lse else outs[0]

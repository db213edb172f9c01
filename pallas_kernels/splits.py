"""Flash-decoding splits: merging the partial results of the kernels' programs.

A program that attends part of a sequence's keys writes, per query row, its running maximum logit
`m`, its softmax denominator `l` (relative to m) and its unnormalized output `acc`. `combine` merges
the splits of every (sequence, kv head) by log-sum-exp, adds the per-head sink logits to the
denominator, and returns the attention output.
"""

import jax.numpy as jnp

MASK_VALUE = -1e30  # Logit of an invisible key; finite, so no inf - inf.


def combine(partials, q_shape, num_kv_heads: int, *, sinks=None):
  """Log-sum-exp over the splits' partial results; the sinks join the denominator.

  Returns f32[batch, q_len, num_q_heads, head_dim].
  """
  m, l, acc, *halves = partials
  if halves:
    acc = acc + jnp.concatenate(halves, axis=-1)
  batch, q_len, num_q_heads, head_dim = q_shape
  group = num_q_heads // num_kv_heads
  used_rows, rows = group * q_len, m.shape[-1]
  top = jnp.max(m, axis=2)  # [batch, kv heads, rows]
  if sinks is not None:
    sink_rows = jnp.repeat(sinks.astype(jnp.float32).reshape(num_kv_heads, group), q_len, axis=1)
    sink_rows = jnp.pad(sink_rows, ((0, 0), (0, rows - used_rows)), constant_values=MASK_VALUE)
    top = jnp.maximum(top, sink_rows[None])
  weight = jnp.exp(m - top[:, :, None])
  numerator = jnp.sum(acc * weight[..., None], axis=2)
  denominator = jnp.sum(l * weight, axis=2)
  if sinks is not None:
    denominator = denominator + jnp.exp(sink_rows[None] - top)
  out = numerator / jnp.where(denominator > 0, denominator, 1.0)[..., None]
  out = out[:, :, :used_rows].reshape(batch, num_kv_heads, group, q_len, head_dim)
  return jnp.moveaxis(out, 3, 1).reshape(batch, q_len, num_q_heads, head_dim)

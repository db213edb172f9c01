"""The block loop of the TPU scoring kernels: two VMEM buffers, the next block's copies in flight
while the current block is computed."""

import jax
from jax.experimental import pallas as pl


def walk_blocks(num_blocks, copies, compute) -> None:
  """Computes blocks 0 .. num_blocks - 1 in order, block j from buffer j % 2.

  Args:
    num_blocks: blocks to walk (an int or a traced scalar).
    copies: copies(block, buffer, action) starts (action "start") or waits for ("wait") the
      copies that bring block `block` into buffer `buffer`.
    compute: compute(block, buffer) uses them; called after they are waited for, and after the
      next block's copies into the other buffer have started.
  """
  copies(0, 0, "start")

  def body(block, carry):
    buffer = block % 2

    @pl.when(block + 1 < num_blocks)
    def _():
      copies(block + 1, 1 - buffer, "start")

    copies(block, buffer, "wait")
    compute(block, buffer)
    return carry

  jax.lax.fori_loop(0, num_blocks, body, 0)

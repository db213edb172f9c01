r"""What reading r of a key's channels costs, with K row-major (the cache's layout) or
channel-major.

Query-aware selection by the channels where the query is largest
(`scoring.top_channel_page_logits`) needs r / head_dim of every key. In the cache's row-major
pages, [kv_heads, pages, page_size, head_dim], those r channels are scattered inside each key's
row; a channel-major copy, [kv_heads, pages, head_dim, page_size], keeps each channel of a page
contiguous. Each variant computes, per page and kv head, the largest of the keys' dot products
with a query over the chosen channels (a different channel set per kv head), with XLA's gather:
no kernel. Bytes are K's, all of it or r / head_dim of it.

  python -m benchmarks.channel_read_bench --pages=65536 --channels=4,16,32 --json_out=/tmp/c.json
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from benchmarks import report
from benchmarks import timing

_PAGES = flags.DEFINE_integer("pages", 65536, "Pages per kv head (65536: 8 x 128K tokens).")
_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 8, "KV heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Channels per head.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per page.")
_CHANNELS = flags.DEFINE_list("channels", ["4", "16", "32"], "Channels read, r.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the rows to this JSON file.")


def page_max(keys, q, spec):
  """f32[kv_heads, pages]: per page, the largest dot product of its keys with q."""
  return jnp.max(jnp.einsum(spec, keys.astype(jnp.float32), q), axis=-1)


def main(argv):
  del argv
  h, d = _KV_HEADS.value, _HEAD_DIM.value
  k = jax.random.normal(jax.random.key(0), (h, _PAGES.value, _PAGE_SIZE.value, d), jnp.bfloat16)
  q = jax.random.normal(jax.random.key(1), (h, d), jnp.float32)
  k_channel_major = jnp.swapaxes(k, -1, -2)
  rows = []

  def record(name, channels, seconds, nbytes):
    rows.append(dict(name=name, channels=channels, us=seconds * 1e6, bytes=nbytes,
                     gbps=nbytes / seconds / 1e9, platform=str(jax.devices()[0])))
    print(f"{name:<28} r={channels:<4} {seconds * 1e6:9.1f} us {nbytes / 1e6:8.0f} MB"
          f" {nbytes / seconds / 1e9:6.0f} GB/s", flush=True)

  print(f"K: {k.nbytes / 1e6:.0f} MB bf16, {jax.devices()[0]}")
  record("all channels, row-major", d, timing.median_seconds(
      jax.jit(lambda k, q: page_max(k, q, "hpsd,hd->hps")), k, q), k.nbytes)
  for channels in map(int, _CHANNELS.value):
    chosen = jnp.argsort(-jnp.abs(q), axis=-1)[:, :channels].astype(jnp.int32)  # Scattered.
    q_part = jnp.take_along_axis(q, chosen, axis=-1)
    row_major = jax.jit(lambda k, c, q: page_max(
        jnp.take_along_axis(k, c[:, None, None, :], axis=-1), q, "hpsr,hr->hps"))
    channel_major = jax.jit(lambda k, c, q: page_max(
        jnp.take_along_axis(k, c[:, None, :, None], axis=-2), q, "hprs,hr->hps"))
    needed = k.nbytes * channels // d
    record("some channels, row-major", channels,
           timing.median_seconds(row_major, k, chosen, q_part), needed)
    record("some channels, channel-major", channels,
           timing.median_seconds(channel_major, k_channel_major, chosen, q_part), needed)
  report.write_json(_JSON_OUT.value, rows)


if __name__ == "__main__":
  app.run(main)

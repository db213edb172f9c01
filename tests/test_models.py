"""Tests of intent_jax.models: the decoder, generation over routed caches, checkpoints."""

import contextlib
import io
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from intent_jax import cache as cache_lib
from intent_jax import models
from intent_jax.layout import BlockLayout, BlockPolicy, SemanticBlock
from intent_jax.models import generation as generation_lib
from intent_jax.precision import Precision
from intent_jax.router import RouterConfig, route

CONFIG = models.DecoderConfig(vocab_size=64, model_dim=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=16, mlp_dim=128)
MAX_LEN = 80


def _prompts(batch=3, seed=1):
  prompts = jax.random.randint(jax.random.key(seed), (batch, 24), 0, CONFIG.vocab_size)
  return prompts, jnp.asarray([24, 15, 6][:batch])


class GenerationTest(parameterized.TestCase):

  @parameterized.parameters("float32", "bfloat16")
  def test_routed_generation_equals_dense_generation(self, storage):
    model = models.Decoder(CONFIG, rngs=nnx.Rngs(0))
    prompts, lengths = _prompts()
    dense = models.generate(model, prompts, lengths,
                            models.create_dense_kvs(CONFIG, batch=3, max_seq_len=MAX_LEN,
                                                    dtype=storage),
                            max_new_tokens=20, chunk=8)
    routed = models.generate(model, prompts, lengths,
                             models.create_caches(CONFIG, max_seqs=3, max_seq_len=MAX_LEN,
                                                  dtype=storage),
                             max_new_tokens=20, chunk=8,
                             router_config=RouterConfig(recent_tokens=0))
    np.testing.assert_array_equal(routed.tokens, dense.tokens)
    self.assertEqual(routed.tokens.shape, (3, 20))
    np.testing.assert_array_equal(routed.kvs[0].lengths, lengths + 19)

  def test_float32_logits_agree(self):
    model = models.Decoder(CONFIG, rngs=nnx.Rngs(2))
    prompts, lengths = _prompts()
    caches = models.create_caches(CONFIG, max_seqs=3, max_seq_len=MAX_LEN, dtype="float32")
    dense = models.create_dense_kvs(CONFIG, batch=3, max_seq_len=MAX_LEN, dtype="float32")
    logits_c, caches = model(prompts, caches, lengths=lengths)
    logits_d, dense = model(prompts, dense, lengths=lengths)
    np.testing.assert_allclose(logits_c, logits_d, atol=1e-4)
    layout = BlockLayout.stack([BlockLayout.from_blocks([], MAX_LEN)] * 3)
    for step in range(4):
      tokens = jax.random.randint(jax.random.key(10 + step), (3, 2), 0, CONFIG.vocab_size)
      counts = jnp.asarray([2, 1, 2])
      table = route(layout, caches[0].lengths + counts, RouterConfig(recent_tokens=0))
      logits_c, caches = model(tokens, caches, lengths=counts, table=table, decode=True)
      logits_d, dense = model(tokens, dense, lengths=counts, decode=True)
      np.testing.assert_allclose(logits_c[0], logits_d[0], atol=1e-4)
      np.testing.assert_allclose(logits_c[1, :1], logits_d[1, :1], atol=1e-4)

  def test_sampling(self):
    model = models.Decoder(CONFIG, rngs=nnx.Rngs(3))
    prompts, lengths = _prompts()
    run = lambda sampling, key=None: models.generate(
        model, prompts, lengths, models.create_dense_kvs(CONFIG, batch=3, max_seq_len=MAX_LEN),
        max_new_tokens=10, chunk=4, sampling=sampling, key=key).tokens
    greedy = run(models.SamplingConfig())
    np.testing.assert_array_equal(
        run(models.SamplingConfig(temperature=1.0, top_k=1), jax.random.key(0)), greedy)
    hot = models.SamplingConfig(temperature=2.0, top_k=20)
    first, again = run(hot, jax.random.key(1)), run(hot, jax.random.key(1))
    np.testing.assert_array_equal(first, again)
    self.assertFalse(np.array_equal(first, run(hot, jax.random.key(2))))
    with self.assertRaisesRegex(ValueError, "needs a PRNG key"):
      run(hot)

  def test_stops_each_sequence_at_eos(self):
    model = models.Decoder(CONFIG, rngs=nnx.Rngs(0))
    prompts, lengths = _prompts()
    kvs = lambda: models.create_dense_kvs(CONFIG, batch=3, max_seq_len=MAX_LEN)
    free = np.asarray(models.generate(model, prompts, lengths, kvs(), max_new_tokens=12,
                                      chunk=4).tokens)
    eos = int(free[0, 3])  # Sequence 0 emits this token at step 3.
    stopped = models.generate(model, prompts, lengths, kvs(), max_new_tokens=12, chunk=4,
                              sampling=models.SamplingConfig(eos_id=eos, pad_id=63))
    tokens = np.asarray(stopped.tokens)
    for b in range(3):
      hits = np.nonzero(free[b] == eos)[0]
      end = int(hits[0]) + 1 if hits.size else 12
      self.assertEqual(int(stopped.num_generated[b]), end)
      np.testing.assert_array_equal(tokens[b, :end], free[b, :end])
      np.testing.assert_array_equal(tokens[b, end:], 63)

  def test_decode_chunk_traces_once_with_a_growing_turn(self):
    model = models.Decoder(CONFIG, rngs=nnx.Rngs(4))
    prompts, lengths = _prompts()
    blocks = lambda n: [SemanticBlock("system", 0, 2, BlockPolicy.ALWAYS),
                        SemanticBlock("docs", 2, n - 2, BlockPolicy.ATTEND, 0.3),
                        SemanticBlock("turn", n - 2, n, BlockPolicy.RECENT)]
    layout = BlockLayout.stack([BlockLayout.from_blocks(blocks(int(n)), MAX_LEN)
                                for n in lengths])
    before = generation_lib.decode_chunk._cache_size()  # pylint: disable=protected-access
    routed = models.generate(
        model, prompts, lengths,
        models.create_caches(CONFIG, max_seqs=3, max_seq_len=MAX_LEN, dtype="float32"),
        max_new_tokens=25, chunk=6, layout=layout, open_block=2,
        router_config=RouterConfig(recent_tokens=4))
    self.assertEqual(generation_lib.decode_chunk._cache_size() - before, 1)  # 4 chunks, 1 trace.
    self.assertTrue(np.isfinite(np.asarray(routed.tokens)).all())

  def test_routed_pages_are_stored_in_mixed_precision(self):
    model = models.Decoder(CONFIG, rngs=nnx.Rngs(5))
    prompts, lengths = _prompts(batch=1)
    layout = BlockLayout.from_blocks([SemanticBlock("doc", 0, 16, BlockPolicy.ATTEND, 0.7)],
                                     MAX_LEN)
    caches = models.create_caches(CONFIG, max_seqs=1, max_seq_len=MAX_LEN, dtype="float32",
                                  pool_pages={Precision.BF16: 8, Precision.INT8: 4})
    routed = models.generate(model, prompts, lengths, caches, max_new_tokens=6, chunk=3,
                             layout=layout, router_config=RouterConfig(recent_tokens=4))
    for cache in routed.kvs:  # The doc's page went to INT8 in every layer.
      self.assertEqual(int(cache_lib.pages_in_use(cache)[Precision.INT8]), 1)

  def test_prefill_and_decode_step_functions(self):
    model = models.Decoder(CONFIG, rngs=nnx.Rngs(6))
    graphdef, params = nnx.split(model)
    prompts, lengths = _prompts()
    kvs = models.create_dense_kvs(CONFIG, batch=3, max_seq_len=MAX_LEN, dtype="float32")
    last_logits, kvs = models.prefill(graphdef, params, kvs, prompts, lengths)
    expected, _ = model(prompts, models.create_dense_kvs(CONFIG, batch=3, max_seq_len=MAX_LEN,
                                                         dtype="float32"), lengths=lengths)
    np.testing.assert_allclose(last_logits, expected[jnp.arange(3), lengths - 1], atol=1e-5)
    tokens = jnp.argmax(last_logits, -1)[:, None]
    logits, kvs = models.decode_step(graphdef, params, kvs, tokens, jnp.ones(3, jnp.int32))
    self.assertEqual(logits.shape, (3, 1, CONFIG.vocab_size))
    np.testing.assert_array_equal(kvs[0].lengths, lengths + 1)

  def test_forward_without_stores_equals_prefill(self):
    model = models.Decoder(CONFIG, rngs=nnx.Rngs(9))
    prompts, _ = _prompts()
    stored, _ = model(prompts, models.create_dense_kvs(CONFIG, batch=3, max_seq_len=MAX_LEN,
                                                       dtype="float32"))
    np.testing.assert_allclose(model(prompts, None)[0], stored, atol=1e-6)
    with self.assertRaisesRegex(ValueError, "decode needs the KV stores"):
      model(prompts[:, :1], None, decode=True)

  def test_a_table_function_routes_each_layer_inside_the_step(self):
    model = models.Decoder(CONFIG, rngs=nnx.Rngs(10))
    prompts, lengths = _prompts()

    def filled():  # A decode step donates the caches: each call gets its own.
      caches = models.create_caches(CONFIG, max_seqs=3, max_seq_len=MAX_LEN, dtype="float32")
      return model(prompts, caches, lengths=lengths)[1]

    blocks = BlockLayout.stack([BlockLayout.from_blocks(
        [SemanticBlock("old", 0, 8, BlockPolicy.SKIP)], MAX_LEN)] * 3)
    config = RouterConfig(recent_tokens=4)
    table = route(blocks, lengths + 1, config)
    token = prompts[:, :1]
    fixed, _ = model(token, filled(), table=table, decode=True)
    seen = []

    def per_layer(layer, q, kv):
      seen.append((layer, q.shape, int(kv.lengths[0])))
      return table

    routed, _ = model(token, filled(), table=per_layer, decode=True)
    np.testing.assert_array_equal(routed, fixed)
    shape = (3, 1, CONFIG.num_heads, CONFIG.head_dim)
    self.assertEqual(seen, [(0, shape, 25), (1, shape, 25)])  # After the append.
    everything = route(BlockLayout.stack([BlockLayout.from_blocks([], MAX_LEN)] * 3),
                       lengths + 1, config)
    layer_one_reads_all = lambda layer, q, kv: everything if layer == 1 else table
    mixed, _ = model(token, filled(), table=layer_one_reads_all, decode=True)
    self.assertFalse(np.allclose(mixed, fixed))  # Layer 1 really got its own table.

  def test_progress_bar(self):
    model = models.Decoder(CONFIG, rngs=nnx.Rngs(0))
    prompts, lengths = _prompts()
    drawn = io.StringIO()
    with contextlib.redirect_stderr(drawn):
      models.generate(model, prompts, lengths,
                      models.create_dense_kvs(CONFIG, batch=3, max_seq_len=MAX_LEN),
                      max_new_tokens=9, chunk=4, progress=True)
    self.assertIn("generate [", drawn.getvalue())
    self.assertTrue(drawn.getvalue().rstrip().endswith("9/9"))

  def test_capacity_is_checked(self):
    model = models.Decoder(CONFIG, rngs=nnx.Rngs(0))
    prompts, lengths = _prompts()
    with self.assertRaisesRegex(ValueError, "exceeds the KV stores' capacity of 30 tokens"):
      models.generate(model, prompts, lengths,
                      models.create_dense_kvs(CONFIG, batch=3, max_seq_len=30),
                      max_new_tokens=10)


class CheckpointTest(absltest.TestCase):

  def test_save_then_load_reproduces_the_model(self):
    folder = tempfile.TemporaryDirectory()
    self.addCleanup(folder.cleanup)
    path = os.path.join(folder.name, "decoder.npz")
    original = models.Decoder(CONFIG, rngs=nnx.Rngs(7))
    models.save(original, path)
    restored = models.load(models.Decoder(CONFIG, rngs=nnx.Rngs(8)), path)
    prompts, lengths = _prompts()
    logits = lambda m: m(prompts, models.create_dense_kvs(CONFIG, batch=3, max_seq_len=MAX_LEN),
                         lengths=lengths)[0]
    np.testing.assert_array_equal(logits(restored), logits(original))
    wider = models.DecoderConfig(**{**CONFIG.__dict__, "mlp_dim": 96})
    with self.assertRaisesRegex(ValueError, "has shape"):
      models.load(models.Decoder(wider, rngs=nnx.Rngs(0)), path)
    untied = models.DecoderConfig(**{**CONFIG.__dict__, "tie_embeddings": False})
    with self.assertRaisesRegex(ValueError, "missing \\['lm_head/kernel'\\]"):
      models.load(models.Decoder(untied, rngs=nnx.Rngs(0)), path)


if __name__ == "__main__":
  absltest.main()

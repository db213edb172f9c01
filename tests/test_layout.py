"""Tests of intent_jax.layout: validation, padding, stacking and token-to-block lookup."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from intent_jax.layout import BlockLayout, BlockPolicy, SemanticBlock, grow_block, set_block
from intent_jax.layout import token_block_ids
from intent_jax.page_table import token_mask
from intent_jax.router import RouterConfig, route
from tests import spec


class SemanticBlockTest(parameterized.TestCase):

  @parameterized.parameters(
      (("doc", 5, 5, BlockPolicy.ATTEND), ValueError, "block 'doc': start=5 must be < end=5"),
      (("doc", 9, 5, BlockPolicy.ATTEND), ValueError, "block 'doc': start=9 must be < end=5"),
      (("doc", -1, 5, BlockPolicy.ATTEND), ValueError, "block 'doc': start=-1 is negative"),
      (("doc", 0, 5, BlockPolicy.ATTEND, 1.5), ValueError,
       "block 'doc': score=1.5 is outside \\[0, 1\\]"),
      (("doc", 0, 5, BlockPolicy.ATTEND, -0.1), ValueError, "score=-0.1 is outside"),
      (("doc", 0, 5, BlockPolicy.ATTEND, float("nan")), ValueError, "score=nan is outside"),
      (("doc", 0, 5, 7), ValueError, "block 'doc': policy=7 is not a BlockPolicy"),
      (("doc", 0, 5, "ATTEND"), TypeError, "block 'doc': policy must be a BlockPolicy"),
      (("doc", 0.0, 5, BlockPolicy.ATTEND), TypeError, "block 'doc': start must be an int"),
      ((3, 0, 5, BlockPolicy.ATTEND), TypeError, "block name must be a str"),
      (("doc", 0, 5, BlockPolicy.ATTEND, "high"), TypeError, "block 'doc': score must be a float"),
  )
  def test_bad_block(self, args, error, message):
    with self.assertRaisesRegex(error, message):
      SemanticBlock(*args)

  def test_int_policy_becomes_enum(self):
    self.assertIs(SemanticBlock("a", 0, 1, 2).policy, BlockPolicy.SKIP)


class BlockLayoutTest(parameterized.TestCase):

  def test_from_blocks_sorts_and_pads(self):
    blocks = [SemanticBlock("late", 50, 60, BlockPolicy.RECENT),
              SemanticBlock("early", 0, 10, BlockPolicy.ALWAYS, 0.5)]
    layout = BlockLayout.from_blocks(blocks, 64, max_blocks=4)
    np.testing.assert_array_equal(layout.starts, [[0, 50, 0, 0]])
    np.testing.assert_array_equal(layout.ends, [[10, 60, 0, 0]])
    np.testing.assert_array_equal(layout.policies, [[0, 3, 2, 2]])
    np.testing.assert_array_equal(layout.valid, [[True, True, False, False]])
    self.assertEqual(layout.names, (("early", "late", "", ""),))
    self.assertEqual(layout.num_tokens, 64)
    self.assertEqual(layout.blocks(0), tuple(sorted(blocks, key=lambda b: b.start)))

  def test_overlap_is_named(self):
    blocks = [SemanticBlock("a", 0, 10, BlockPolicy.ALWAYS),
              SemanticBlock("b", 9, 20, BlockPolicy.SKIP)]
    with self.assertRaisesRegex(ValueError, "blocks 'a' \\[0, 10\\) and 'b' \\[9, 20\\) overlap"):
      BlockLayout.from_blocks(blocks, 32)

  def test_past_num_tokens_is_named(self):
    with self.assertRaisesRegex(ValueError, "block 'a': end=40 is past num_tokens=32"):
      BlockLayout.from_blocks([SemanticBlock("a", 0, 40, BlockPolicy.ALWAYS)], 32)

  @parameterized.parameters(
      (dict(num_tokens=0), ValueError, "num_tokens must be a positive int"),
      (dict(num_tokens=10.0), ValueError, "num_tokens must be a positive int"),
      (dict(num_tokens=32, max_blocks=1), ValueError, "max_blocks=1 must be an int >= the number"),
  )
  def test_bad_arguments(self, kwargs, error, message):
    blocks = [SemanticBlock("a", 0, 4, BlockPolicy.ALWAYS), SemanticBlock("b", 4, 8, 2)]
    with self.assertRaisesRegex(error, message):
      BlockLayout.from_blocks(blocks, **kwargs)

  def test_blocks_must_be_semantic_blocks(self):
    with self.assertRaisesRegex(TypeError, "blocks\\[0\\] must be a SemanticBlock"):
      BlockLayout.from_blocks([("a", 0, 4, 0)], 32)
    with self.assertRaisesRegex(TypeError, "blocks must be a sequence of SemanticBlock"):
      BlockLayout.from_blocks(SemanticBlock("a", 0, 4, 0), 32)

  def test_stack_pads_to_the_widest(self):
    one = BlockLayout.from_blocks([SemanticBlock("a", 0, 4, BlockPolicy.ALWAYS)], 16)
    two = BlockLayout.from_blocks([SemanticBlock("x", 0, 8, 1, 0.3),
                                   SemanticBlock("y", 8, 30, 2)], 32)
    both = BlockLayout.stack([one, two])
    self.assertEqual((both.batch_size, both.max_blocks, both.num_tokens), (2, 2, 32))
    self.assertEqual(both.names, (("a", ""), ("x", "y")))
    self.assertEqual(both.blocks(0), one.blocks(0))
    self.assertEqual(both.blocks(1), two.blocks(0))
    with self.assertRaisesRegex(TypeError, "layouts must be a non-empty sequence of BlockLayout"):
      BlockLayout.stack([])

  def test_empty_layout_is_allowed(self):
    layout = BlockLayout.from_blocks([], 16)
    self.assertEqual((layout.max_blocks, bool(layout.valid[0, 0])), (1, False))

  def test_unnamed_layouts_share_one_trace(self):

    @jax.jit
    @chex.assert_max_traces(n=1)
    def ends_sum(layout):
      return layout.ends.sum()

    for name in ("a", "b", "c"):
      layout = BlockLayout.from_blocks([SemanticBlock(name, 0, 4, BlockPolicy.ALWAYS)], 16)
      self.assertEqual(int(ends_sum(layout.unnamed())), 4)
      self.assertEqual(layout.unnamed().blocks(0)[0].name, "block_0")

  def test_token_block_ids_matches_a_loop(self):
    rng = np.random.default_rng(0)
    rows = [spec.random_blocks(rng, 90, 6) for _ in range(16)]
    layout = BlockLayout.stack([BlockLayout.from_blocks(r, 90, max_blocks=6) for r in rows])
    ids = np.asarray(token_block_ids(layout, 96))
    for b, blocks in enumerate(rows):
      expected = np.full(96, 6)
      for j, block in enumerate(sorted(blocks, key=lambda x: x.start)):
        expected[block.start:block.end] = j
      np.testing.assert_array_equal(ids[b], expected)


class TrackingTest(absltest.TestCase):

  def test_open_turn_grows_without_retracing(self):
    layout = BlockLayout.from_blocks([SemanticBlock("system", 0, 8, BlockPolicy.ALWAYS),
                                      SemanticBlock("turn", 8, 20, BlockPolicy.RECENT)], 64)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def grow(layout, ends):
      return grow_block(layout, 1, ends)

    for end in (21, 30, 47):
      grown = grow(layout.unnamed(), jnp.asarray([end]))
      np.testing.assert_array_equal(grown.ends, [[8, end]])

  def test_closing_a_turn_as_skip_drops_it(self):
    blocks = [SemanticBlock("system", 0, 8, BlockPolicy.ALWAYS),
              SemanticBlock("turn", 8, 40, BlockPolicy.RECENT)]
    layout = BlockLayout.from_blocks(blocks, 64, max_blocks=3)
    config = RouterConfig(recent_tokens=4, default_policy=BlockPolicy.SKIP)
    # The turn becomes [8, 24), a scratchpad to skip, and [24, 40) a new open turn.
    closed = set_block(grow_block(layout, 1, jnp.asarray([24])), 0, 2, 24, 40,
                       BlockPolicy.RECENT, 1.0)
    closed = set_block(closed, 0, 1, 8, 24, BlockPolicy.SKIP, 0.0)
    self.assertTrue(bool(closed.valid[0, 2]))
    mask = np.asarray(token_mask(route(closed, jnp.asarray([40]), config), 64))[0]
    expected = np.zeros(64, bool)
    expected[:8] = expected[24:40] = True
    np.testing.assert_array_equal(mask, expected)


class FromBlocksPropertyTest(absltest.TestCase):

  @settings(max_examples=200, deadline=None)
  @given(spans=st.lists(st.tuples(st.integers(0, 60), st.integers(1, 30)), max_size=6),
         num_tokens=st.integers(1, 64))
  def test_accepts_exactly_the_valid_block_sets(self, spans, num_tokens):
    blocks = [SemanticBlock(f"b{i}", start, start + length, BlockPolicy.ATTEND, 0.5)
              for i, (start, length) in enumerate(spans)]
    ordered = sorted(blocks, key=lambda b: b.start)
    in_range = all(b.end <= num_tokens for b in blocks)
    disjoint = all(a.end <= b.start for a, b in zip(ordered, ordered[1:]))
    if in_range and disjoint:
      layout = BlockLayout.from_blocks(blocks, num_tokens)
      self.assertEqual(layout.blocks(0), tuple(ordered))
    else:
      with self.assertRaisesRegex(ValueError, "overlap|is past num_tokens"):
        BlockLayout.from_blocks(blocks, num_tokens)


if __name__ == "__main__":
  absltest.main()

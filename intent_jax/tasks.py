"""Agentic recall: a seeded task whose answer lives in one block of a structured agentic context.

Every context is exactly `RecallTask.seq_len` tokens, in this order of blocks:

  system      ALWAYS     SYSTEM and a fixed instruction (the same in every context).
  doc_0..     ATTEND     DOCUMENT, then facts "key value", each followed by filler tokens.
  tool_0..    tool_0 SKIP (stale), the others ATTEND: TOOL and facts of the same form.
  scratchpad  SKIP       SCRATCHPAD and facts of the same form (look-alike distractors).
  old_turn    ATTEND     USER and filler.
  recent_turn RECENT     USER, filler, then `num_queries` questions "ASK key value".

Keys are unique within a context, so each key's fact sits in exactly one block. The first question
asks for a key of one document, the answer document (the others, in training contexts, for any
other fact): the answer is the value that followed the key where it was stated. The model reads
"ASK key" and must predict the value (the next token); training puts the loss on every question's
value, evaluation asks one question as the prompt's last token.
The layout's scores are the runtime's intent: the answer document scores in [0.85, 1], the other
documents in [0.05, 0.7] (`noisy_scores` weakens that knowledge).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from intent_jax.layout import BlockLayout, BlockPolicy
from intent_jax.validation import require_positive_ints

# Vocabulary (fits DecoderConfig's default vocab_size=256).
PAD, BOS, SYSTEM, DOCUMENT, TOOL, SCRATCHPAD, USER, ASK = range(8)
KEY_BASE, NUM_KEYS = 16, 128
VALUE_BASE, NUM_VALUES = KEY_BASE + NUM_KEYS, 64
FILLER_BASE, NUM_FILLER = VALUE_BASE + NUM_VALUES, 48
VOCAB_SIZE = FILLER_BASE + NUM_FILLER

_SYSTEM_PROMPT_SEED = 1234


@dataclasses.dataclass(frozen=True)
class RecallTask:
  """Shape of the contexts (hashable).

  Attributes:
    seq_len: tokens of every context, questions included.
    num_documents, facts_per_document: the retrieved documents.
    num_tool_outputs, facts_per_tool_output: tool outputs (the first is SKIPped as stale).
    scratchpad_facts: facts in the scratchpad.
    system_tokens: length of the system block.
    recent_filler: filler tokens of the recent turn before its questions.
    num_queries: questions per context (distinct keys; the first from the answer document).
  """

  seq_len: int = 1024
  num_documents: int = 8
  facts_per_document: int = 6
  num_tool_outputs: int = 4
  facts_per_tool_output: int = 6
  scratchpad_facts: int = 12
  system_tokens: int = 32
  recent_filler: int = 6
  num_queries: int = 1

  def __post_init__(self):
    require_positive_ints(self, [field.name for field in dataclasses.fields(self)])
    if self.num_facts > NUM_KEYS:
      raise ValueError(f"{self.num_facts} facts need more than the {NUM_KEYS} keys")
    if self.num_queries > self.num_facts:
      raise ValueError(f"num_queries={self.num_queries} exceeds the {self.num_facts} facts")
    if self.filler_tokens < self.num_facts + 1:
      raise ValueError(
          f"seq_len={self.seq_len} leaves {self.filler_tokens} filler tokens; the facts and the"
          f" old turn need at least {self.num_facts + 1}")

  @property
  def num_facts(self) -> int:
    return (self.num_documents * self.facts_per_document +
            self.num_tool_outputs * self.facts_per_tool_output + self.scratchpad_facts)

  @property
  def num_blocks(self) -> int:
    return self.num_documents + self.num_tool_outputs + 4

  @property
  def filler_tokens(self) -> int:
    """Filler spread over the facts and the old turn."""
    headers = self.num_documents + self.num_tool_outputs + 1 + 2  # Blocks' first tokens.
    fixed = (self.system_tokens + headers + 2 * self.num_facts + self.recent_filler +
             3 * self.num_queries)
    return self.seq_len - fixed

  def block_names(self) -> tuple[str, ...]:
    return (("system",) + tuple(f"doc_{i}" for i in range(self.num_documents)) +
            tuple(f"tool_{i}" for i in range(self.num_tool_outputs)) +
            ("scratchpad", "old_turn", "recent_turn"))


@dataclasses.dataclass(frozen=True)
class RecallExamples:
  """A batch of contexts (numpy arrays, host side).

  tokens: i32[n, seq_len]; answer_positions: i32[n, num_queries], the position of each question's
  key (the value is predicted there); answers: i32[n, num_queries], the value tokens;
  answer_blocks: i32[n, num_queries], the layout block holding each answer;
  fact_positions: i32[n, num_queries], where the answer's fact ("key value") starts in the context;
  starts, ends, policies, scores: [n, num_blocks], the layout (scores: the runtime's intent).
  """

  task: RecallTask
  tokens: np.ndarray
  answer_positions: np.ndarray
  answers: np.ndarray
  answer_blocks: np.ndarray
  fact_positions: np.ndarray
  starts: np.ndarray
  ends: np.ndarray
  policies: np.ndarray
  scores: np.ndarray

  def __len__(self) -> int:
    return self.tokens.shape[0]

  def layout(self, scores=None) -> BlockLayout:
    """The batch's BlockLayout (named blocks), with `scores` f32[n, num_blocks] if given."""
    n = len(self)
    scores = self.scores if scores is None else scores
    return BlockLayout(
        starts=jnp.asarray(self.starts, jnp.int32), ends=jnp.asarray(self.ends, jnp.int32),
        policies=jnp.asarray(self.policies, jnp.int32),
        scores=jnp.asarray(scores, jnp.float32),
        valid=jnp.ones(self.starts.shape, jnp.bool_),
        names=(self.task.block_names(),) * n, num_tokens=self.task.seq_len)

  def take(self, index) -> "RecallExamples":
    """The examples at `index` (a slice or integer array)."""
    pick = lambda x: x[index]
    return dataclasses.replace(
        self, tokens=pick(self.tokens), answer_positions=pick(self.answer_positions),
        answers=pick(self.answers), answer_blocks=pick(self.answer_blocks),
        fact_positions=pick(self.fact_positions), starts=pick(self.starts),
        ends=pick(self.ends), policies=pick(self.policies),
        scores=pick(self.scores))


def _system_prompt(length: int) -> np.ndarray:
  rng = np.random.default_rng(_SYSTEM_PROMPT_SEED)
  return np.concatenate([[SYSTEM], FILLER_BASE + rng.integers(NUM_FILLER, size=length - 1)])


def _one_context(task: RecallTask, rng: np.random.Generator):
  """(tokens, answer positions, answers, answer blocks, fact positions, starts, ends, policies,
  scores)."""
  keys = KEY_BASE + rng.permutation(NUM_KEYS)[:task.num_facts]
  values = VALUE_BASE + rng.integers(NUM_VALUES, size=task.num_facts)
  # Filler after each fact and in the old turn: at least one token each, the rest at random.
  slots = task.num_facts + 1
  filler_counts = 1 + rng.multinomial(task.filler_tokens - slots, np.full(slots, 1.0 / slots))
  filler = lambda n: FILLER_BASE + rng.integers(NUM_FILLER, size=n)

  pieces, starts, ends, policies, scores = [_system_prompt(task.system_tokens)], [0], [], [], []
  policies.append(BlockPolicy.ALWAYS)
  scores.append(1.0)
  position = task.system_tokens
  ends.append(position)
  fact = 0
  fact_positions = np.zeros(task.num_facts, np.int64)  # Position of each fact's key.

  def facts_block(header, count):
    nonlocal position, fact
    starts.append(position)
    pieces.append(np.asarray([header]))
    position += 1
    for _ in range(count):
      fact_positions[fact] = position
      pieces.append(np.asarray([keys[fact], values[fact]]))
      pieces.append(filler(filler_counts[fact]))
      position += 2 + filler_counts[fact]
      fact += 1
    ends.append(position)

  answer_doc = int(rng.integers(task.num_documents))
  for i in range(task.num_documents):
    facts_block(DOCUMENT, task.facts_per_document)
    policies.append(BlockPolicy.ATTEND)
    scores.append(rng.uniform(0.85, 1.0) if i == answer_doc else rng.uniform(0.05, 0.7))
  for i in range(task.num_tool_outputs):
    facts_block(TOOL, task.facts_per_tool_output)
    policies.append(BlockPolicy.SKIP if i == 0 else BlockPolicy.ATTEND)
    scores.append(rng.uniform(0.2, 0.8))
  facts_block(SCRATCHPAD, task.scratchpad_facts)
  policies.append(BlockPolicy.SKIP)
  scores.append(0.0)

  old_turn = np.concatenate([[USER], filler(filler_counts[-1])])
  pieces.append(old_turn)
  starts.append(position)
  position += old_turn.size
  ends.append(position)
  policies.append(BlockPolicy.ATTEND)
  scores.append(rng.uniform(0.4, 0.9))

  # Questions: the first asks about the answer document; the others about any other fact.
  per_doc = task.facts_per_document
  first = answer_doc * per_doc + int(rng.integers(per_doc))
  others = rng.permutation(np.setdiff1d(np.arange(task.num_facts), [first]))[:task.num_queries - 1]
  asked = np.concatenate([[first], others]).astype(np.int64)
  recent = [np.asarray([USER]), filler(task.recent_filler)]
  starts.append(position)
  position += 1 + task.recent_filler
  answer_positions = []
  for f in asked:
    recent.append(np.asarray([ASK, keys[f], values[f]]))
    answer_positions.append(position + 1)
    position += 3
  pieces.extend(recent)
  ends.append(position)
  policies.append(BlockPolicy.RECENT)
  scores.append(1.0)

  tokens = np.concatenate(pieces)
  assert tokens.size == task.seq_len == position, (tokens.size, position)
  fact_blocks = np.repeat(np.arange(1, len(starts) - 2), [per_doc] * task.num_documents + [
      task.facts_per_tool_output] * task.num_tool_outputs + [task.scratchpad_facts])
  answer_blocks = fact_blocks[asked]
  return (tokens, np.asarray(answer_positions), values[asked], answer_blocks,
          fact_positions[asked], np.asarray(starts),
          np.asarray(ends), np.asarray(policies, np.int64), np.asarray(scores))


def recall_examples(task: RecallTask, num: int, *, seed: int = 0,
                    split: str = "train") -> RecallExamples:
  """`num` contexts drawn from `seed` within `split` ("train" or "eval": disjoint streams)."""
  if split not in ("train", "eval"):
    raise ValueError(f"split={split!r} must be 'train' or 'eval'")
  if not isinstance(num, int) or num < 1:
    raise ValueError(f"num={num!r} must be a positive int")
  rng = np.random.default_rng([seed, 0 if split == "train" else 1])
  columns = list(zip(*(_one_context(task, rng) for _ in range(num))))
  stacked = [np.stack(column).astype(np.int32) for column in columns[:-1]]
  scores = np.stack(columns[-1]).astype(np.float32)
  return RecallExamples(task, *stacked, scores)


def noisy_scores(examples: RecallExamples, p: float, *, seed: int = 0) -> np.ndarray:
  """f32[n, num_blocks]: the layout's scores, except that the answer document tops the documents
  only with probability `p`; otherwise another document does and the answer document scores like
  an irrelevant one. Other blocks keep their scores."""
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"p={p} must be in [0, 1]")
  rng = np.random.default_rng(seed)
  n, num_docs = len(examples), examples.task.num_documents
  scores = examples.scores.copy()
  docs = rng.uniform(0.05, 0.7, size=(n, num_docs))
  answer_doc = examples.answer_blocks[:, 0] - 1
  wrong = (answer_doc + rng.integers(1, max(num_docs, 2), size=n)) % num_docs
  winner = np.where(rng.uniform(size=n) < p, answer_doc, wrong)
  docs[np.arange(n), winner] = rng.uniform(0.85, 1.0, size=n)
  scores[:, 1:1 + num_docs] = docs
  return scores.astype(np.float32)


def copy_examples(seq_len: int, span: int, num: int, *, seed: int = 0):
  """Random tokens in which a span of `span` tokens recurs at a random later offset.

  The pretraining stage that teaches induction (attend to the token after the earlier
  occurrence of the current one), which recall needs and does not teach from scratch.
  Returns (tokens i32[num, seq_len], positions i32[num, span - 1], next tokens i32[num, span - 1]):
  inside the repeat, the token after each position is predictable.
  """
  if not 2 <= span <= seq_len // 2:
    raise ValueError(f"span={span} must be in [2, seq_len // 2 = {seq_len // 2}]")
  rng = np.random.default_rng([seed, 2])
  tokens = rng.integers(KEY_BASE, VOCAB_SIZE, size=(num, seq_len))
  first = rng.integers(0, seq_len - 2 * span + 1, size=num)
  second = first + span + rng.integers(0, seq_len - 2 * span - first + 1)
  offsets = np.arange(span)
  rows = np.arange(num)[:, None]
  tokens[rows, second[:, None] + offsets] = tokens[rows, first[:, None] + offsets]
  positions = second[:, None] + offsets[:-1]
  return tokens.astype(np.int32), positions.astype(np.int32), tokens[rows, positions + 1]

"""intent_jax: intent-aware KV execution for long-context LLM decoding.

layout -> router -> page table -> attention. See README.md and docs/architecture.md.
"""

from intent_jax.attention import IMPLEMENTATIONS
from intent_jax.attention import decode_attention
from intent_jax.attention import default_implementations
from intent_jax.attention import register_implementation
from intent_jax.layout import BlockLayout
from intent_jax.layout import BlockPolicy
from intent_jax.layout import SemanticBlock
from intent_jax.page_table import PageTable
from intent_jax.page_table import token_mask
from intent_jax.precision import Precision
from intent_jax.router import Decision
from intent_jax.router import Reason
from intent_jax.router import RouterConfig
from intent_jax.router import explain
from intent_jax.router import route

__version__ = "0.1.0"

"""A small decoder over intent-routed KV caches, its generation loop and checkpoints."""

from intent_jax.models.checkpoint import load
from intent_jax.models.checkpoint import save
from intent_jax.models.decoder import CONFIGS
from intent_jax.models.decoder import Decoder
from intent_jax.models.decoder import DecoderConfig
from intent_jax.models.decoder import create_caches
from intent_jax.models.decoder import create_dense_kvs
from intent_jax.models.generation import Generated
from intent_jax.models.generation import SamplingConfig
from intent_jax.models.generation import decode_step
from intent_jax.models.generation import generate
from intent_jax.models.generation import prefill

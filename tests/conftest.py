"""Test-process setup: 8 simulated CPU devices for tests/test_sharded.py.

XLA reads the flag when JAX first starts its CPU backend, so it is set here, before any test
module imports JAX. Other tests run on the first device as before.
"""

import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}".strip()

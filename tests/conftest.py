"""Test-process setup: XLA flags, set here before any test module imports JAX (XLA reads them
when JAX first starts its CPU backend).

* 8 simulated CPU devices for tests/test_sharded.py; other tests run on the first device.
* LLVM optimization level 0 for the CPU backend: the suite compiles hundreds of small programs
  (eager ops, interpret-mode kernels), and compiling them unoptimized halves their compile time
  (tests/test_cache.py: 27 s -> 15 s; the whole suite on 2 cores 12 min 10 s -> 8 min 53 s, at
  level 1 10 min 51 s). XLA's own HLO passes still run and fast math stays off; every test
  passes at either level.
"""

import os

for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

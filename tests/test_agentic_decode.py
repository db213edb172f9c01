"""Runs the demo binary on a small context and checks what it reports."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl.testing import absltest

ROOT = pathlib.Path(__file__).resolve().parent.parent


class AgenticDecodeTest(absltest.TestCase):

  def test_small_run_reports_a_routed_step(self):
    folder = tempfile.TemporaryDirectory()
    self.addCleanup(folder.cleanup)
    out = pathlib.Path(folder.name) / "decode.json"
    command = [sys.executable, "-m", "benchmarks.agentic_decode", "--num_tokens=4096",
               "--num_q_heads=8", "--num_kv_heads=2", "--head_dim=64", "--recent_tokens=256",
               "--rounds=1", "--calls=2", f"--json_out={out}"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    self.assertEqual(run.returncode, 0, run.stderr)
    self.assertIn("ATTENDED", run.stdout)
    results = json.loads(out.read_text())
    self.assertLess(results["rel_error_vs_oracle_same_pages"], 1e-2)
    self.assertLessEqual(results["pages_read"], results["table_capacity"])
    self.assertEqual(sum(results["pages_read_by_precision"].values()), results["pages_read"])
    self.assertGreater(results["pages_read_by_precision"]["INT4"], 0)  # Pressure compressed some.
    self.assertLess(results["kv_bytes_read"], results["kv_bytes_dense"])
    self.assertGreater(results["pool_bytes_in_use"]["BF16"], 0)
    self.assertFalse(results["truncated"])

if __name__ == "__main__":
  absltest.main()

"""The Colab notebooks run top to bottom on CPU (small sizes) and are stored without outputs."""

import glob
import os

from absl.testing import absltest
from absl.testing import parameterized
import nbclient
import nbformat

COLAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab")
NOTEBOOKS = sorted(glob.glob(os.path.join(COLAB, "*.ipynb")))


class NotebookTest(parameterized.TestCase):

  def test_the_three_notebooks_exist(self):
    names = [os.path.basename(path) for path in NOTEBOOKS]
    self.assertEqual(names, ["01_quickstart.ipynb", "02_kernels.ipynb",
                             "03_agentic_decode.ipynb"])

  @parameterized.parameters(*NOTEBOOKS)
  def test_stored_stripped_with_a_badge_and_a_guarded_install(self, path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    self.assertIn("colab-badge.svg", notebook.cells[0].source)
    self.assertIn('if "google.colab" in sys.modules:', notebook.cells[1].source)
    for cell in notebook.cells:
      if cell.cell_type == "code":
        self.assertEqual(cell.outputs, [], f"{path}: outputs must be stripped")
        self.assertIsNone(cell.execution_count)

  @parameterized.parameters(*NOTEBOOKS)
  def test_runs_top_to_bottom(self, path):
    notebook = nbformat.read(path, as_version=4)
    env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": COLAB}})
    client.execute(env=env)
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    self.assertEqual(errors, [])


if __name__ == "__main__":
  absltest.main()

"""Runs the README's Python examples, so the documented API stays true."""

import pathlib
import re

from absl.testing import absltest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


class ReadmeTest(absltest.TestCase):

  def test_python_examples_run(self):
    examples = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    self.assertNotEmpty(examples)
    for example in examples:
      exec(compile(example, str(README), "exec"), {})  # pylint: disable=exec-used


if __name__ == "__main__":
  absltest.main()

"""The README's Python examples run as written, top to bottom, in one namespace."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run():
  blocks = python_blocks()
  assert blocks, "the README has no ```python example"
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)


def test_quick_start_is_two_commands():
  quick_start = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
  commands = re.findall(r"```(?:sh|bash)\n(.*?)```", quick_start, flags=re.S)
  lines = [line for block in commands for line in block.strip().splitlines()]
  assert lines == ["make demo", "make test"]

"""The README's Python examples run as written, top to bottom, in one namespace."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def section(title: str) -> str:
  return README.read_text().split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def python_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run():
  blocks = python_blocks()
  assert blocks, "the README has no ```python example"
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)


def test_installation_is_pip_install_then_the_two_commands():
  commands = re.findall(r"```(?:sh|bash)\n(.*?)```", section("Installation"), flags=re.S)
  lines = [line for block in commands for line in block.strip().splitlines()]
  assert lines == ["pip install .", "make demo", "make test"]


def test_the_feature_table_names_public_names_only():
  import optaxderived as od

  table = section("Features")
  for name in re.findall(r"`od\.([A-Za-z_]+)`", table):
    assert hasattr(od, name), name


def test_no_figure_that_goes_stale():
  """Counts and ratios live in benchmarks/RESULTS.md and the docs, not here."""
  text = README.read_text()
  assert not re.search(r"\d+ tests|\d+(\.\d+)?×|\d+(\.\d+)?x faster", text)

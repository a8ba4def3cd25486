"""The notebooks in colabs/: listed on the docs site, stored without outputs, on current names.

`make docs` executes every notebook (the docs build renders their plots and fails on any
error), so they are not executed again here.
"""

import pathlib
import re

import nbformat
import pytest

import optaxderived as od

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLABS = ROOT / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))


def test_there_are_notebooks():
  assert any(p.name == "00_quickstart.ipynb" for p in NOTEBOOKS)


def test_the_docs_link_the_notebooks_and_build_them_from_colabs():
  docs_colabs = ROOT / "docs" / "colabs"
  assert docs_colabs.is_symlink() and docs_colabs.resolve() == COLABS
  index = (ROOT / "docs" / "index.md").read_text()
  listed = re.findall(r"^colabs/(\S+)$", index, flags=re.M)
  assert listed == [p.stem for p in NOTEBOOKS], "every notebook in the docs' toctree, in order"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_valid_and_stored_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  assert notebook.metadata.get("kernelspec", {}).get("name") == "python3"
  assert notebook.cells[0].cell_type == "markdown"
  assert notebook.cells[0].source.startswith("# "), "a notebook's title is its first cell"
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not cell.get("outputs"), f"{path.name}: commit notebooks without outputs"
      assert cell.get("execution_count") is None, f"{path.name}: clear the execution counts"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_only_public_names(path):
  notebook = nbformat.read(path, as_version=4)
  code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
  submodules = {"ode": od.ode, "sparse": od.sparse, "regularizers": od.regularizers}
  for dotted in sorted(set(re.findall(r"\bod\.([A-Za-z_][\w.]*)", code))):
    first, *rest = dotted.split(".")
    if first == "__version__":
      continue
    if first in submodules and rest:
      module, name = submodules[first], rest[0]
      assert name in module.__all__, f"{path.name}: od.{first}.{name} is not public"
    else:
      public = first in od.__all__ or first in submodules
      assert public, f"{path.name}: od.{first} is not public"

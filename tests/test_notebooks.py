"""Executes every notebook in colabs/ headless, at the small sizes CI uses.

A notebook reads ``OPTAXDERIVED_SMALL=1`` from the environment and shrinks its loops.
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

COLABS = pathlib.Path(__file__).resolve().parent.parent / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))


def test_there_are_notebooks():
  assert any(p.name == "00_quickstart.ipynb" for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("OPTAXDERIVED_SMALL", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  notebook = nbformat.read(path, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not cell.get("outputs"), f"{path.name}: commit notebooks without outputs"
  client = NotebookClient(
    notebook,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": tmp_path}},
  )
  client.execute()  # raises CellExecutionError, with the cell's traceback, on any error

"""The docs site: its API pages list exactly the public names, and its examples run.

`make docs` builds the site (warnings are errors) and executes the notebooks; these tests are
the cheap checks that need no build.
"""

import pathlib
import re

import pytest

import optaxderived as od

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
API_PAGES = {
  "optaxderived": DOCS / "api" / "optaxderived.rst",
  "optaxderived.ode": DOCS / "api" / "ode.rst",
  "optaxderived.sparse": DOCS / "api" / "sparse.rst",
  "optaxderived.regularizers": DOCS / "api" / "regularizers.rst",
}
MODULES = {
  "optaxderived": od,
  "optaxderived.ode": od.ode,
  "optaxderived.sparse": od.sparse,
  "optaxderived.regularizers": od.regularizers,
}
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)


def autosummary_entries(page: pathlib.Path) -> list[tuple[str, str]]:
  """The ``(current module, name)`` of every entry of every autosummary of an rst page."""
  entries, module, in_autosummary = [], None, False
  for line in page.read_text().splitlines():
    if m := re.match(r"\.\. currentmodule:: (\S+)", line):
      module = m.group(1)
    if line.startswith(".. "):
      in_autosummary = line.startswith(".. autosummary::")
      continue
    if in_autosummary and line.strip() and not line.strip().startswith(":"):
      if not line.startswith("   "):
        in_autosummary = False
        continue
      entries.append((module, line.strip()))
  return entries


@pytest.mark.parametrize("module", sorted(API_PAGES))
def test_the_api_page_lists_exactly_the_public_names(module):
  entries = autosummary_entries(API_PAGES[module])
  assert {m for m, _ in entries} == {module}, "every entry under its module's currentmodule"
  names = [name for _, name in entries]
  twice = sorted({n for n in names if names.count(n) > 1})
  assert not twice, f"listed twice: {twice}"
  public = set(MODULES[module].__all__)
  assert set(names) == public, (
    f"missing from the page: {sorted(public - set(names))}; "
    f"not public: {sorted(set(names) - public)}"
  )


def test_the_api_index_links_every_api_page():
  index = (DOCS / "api" / "index.rst").read_text()
  for page in API_PAGES.values():
    assert re.search(rf"^\s+{page.stem}$", index, flags=re.M), page.name


def python_blocks(page: pathlib.Path) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_the_python_examples_of_a_page_run(page):
  """Each page's ```python blocks run as written, top to bottom, in one namespace."""
  namespace: dict = {}
  for block in python_blocks(page):
    exec(compile(block, str(page), "exec"), namespace)


def test_the_pages_have_examples():
  assert sum(bool(python_blocks(page)) for page in PAGES) >= 8

"""Sphinx configuration of the optaxderived docs: `make docs` builds them into docs/_build/html.

The notebooks in colabs/ (linked here as docs/colabs) are executed by the build, once, so
their plots are on the pages; a notebook that raises fails the build.
"""

import concurrent.futures
import os
import pathlib
import re
import sys
import tempfile

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))

from sphinx.errors import PycodeError  # noqa: E402
from sphinx.pycode import ModuleAnalyzer  # noqa: E402
from sphinx.util import logging  # noqa: E402

import optaxderived  # noqa: E402

logger = logging.getLogger(__name__)

project = "optaxderived"
author = "optaxderived authors"
copyright = "2026, the optaxderived authors"
release = optaxderived.__version__
version = release

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "myst_nb",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "colabs/README*"]
templates_path = ["_templates"]

# References: `name` in a docstring is a Python object reference (a link when the object is
# documented here, plain code otherwise); names are shown without their module.
default_role = "py:obj"
add_module_names = False
python_use_unqualified_type_names = True
toc_object_entries_show_parents = "hide"

# API pages: one generated page per public name, listed in docs/api/*.md.
autosummary_generate = True
autosummary_imported_members = False
autosummary_ignore_module_all = False
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# The annotations are strings (``from __future__ import annotations``): keep the aliases short
# instead of expanding them into their unions.
autodoc_type_aliases = {
  "Patterns": "optaxderived.Patterns",
  "paths.Patterns": "optaxderived.Patterns",
  "optax.ScalarOrSchedule": "optax.ScalarOrSchedule",
  "optax.Schedule": "optax.Schedule",
  "optax.Params": "optax.Params",
  "optax.Updates": "optax.Updates",
  "optax.OptState": "optax.OptState",
}
autoclass_content = "class"

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True
napoleon_attr_annotations = False  # the Attributes: texts give the types

# MyST pages and notebooks.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
myst_dmath_double_inline = True

# The notebooks run once per build, in parallel (see _execute_notebooks), each in a temporary
# directory. Their results are cached under docs/_build/.jupyter_cache by their code: a
# rebuild re-runs only the notebooks whose code changed (`make clean` or `rm -rf docs/_build`
# runs them all again; CI always starts from scratch). A notebook that raises fails the build.
nb_execution_mode = "cache"
nb_execution_cache_path = str(DOCS / "_build" / ".jupyter_cache")
nb_execution_timeout = 900  # per cell
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_in_temp = True
nb_merge_streams = True
nb_output_stderr = "remove"  # tqdm's progress bars and library warnings: not page content
# Plots are drawn by the kernel's inline backend (an Agg backend set outside would hide them).
os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"

html_theme = "sphinx_book_theme"
html_title = f"optaxderived {release}"
html_static_path = []
html_theme_options = {
  "show_toc_level": 2,
  "navigation_with_keys": False,
}


def _resolve_od_alias(app, env, node, contnode):
  """Resolves ``od.name`` (the import alias the docs use) to ``optaxderived.name``."""
  target = node.get("reftarget", "")
  if node.get("refdomain") != "py" or not target.startswith("od."):
    return None
  domain = env.get_domain("py")
  return domain.resolve_xref(
    env,
    node["refdoc"],
    app.builder,
    node["reftype"],
    "optaxderived." + target[len("od.") :],
    node,
    contnode,
  )


def _attribute_docstring(app, what, name, obj, options, lines):
  """A public constant's docstring (``Patterns``, ``od.ode.HEUN``), not its type's.

  Module-level constants are documented by the string literal under their assignment, in the
  private module that defines them; autodoc looks in the public module, finds nothing and
  falls back to the docstring of the value's type.
  """
  if what != "data" or not name.startswith("optaxderived."):
    return
  attr = name.rsplit(".", 1)[1]
  for module_name, module in sorted(sys.modules.items()):
    if not module_name.startswith("optaxderived") or getattr(module, attr, None) is not obj:
      continue
    try:
      docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
    except PycodeError:
      continue
    if ("", attr) in docs:
      lines[:] = list(docs[("", attr)])
      return


_FORWARD_REF = re.compile(r"TypeAliasForwardRef\('([\w.]+)'\)")


def _short_aliases(app, what, name, obj, options, signature, return_annotation):
  """Writes a type alias nested in a union or a generic as its name, like a top-level one."""

  def short(text):
    if text is None:
      return None
    text = _FORWARD_REF.sub(lambda m: m.group(1), text)
    return text.replace("optaxderived.Patterns", "Patterns")

  return short(signature), short(return_annotation)


def _execute_notebooks(app):
  """Runs the notebooks that the cache lacks, several at a time, before Sphinx reads them.

  myst-nb would run them one after the other while it reads the sources; each notebook is
  mostly one Python process on one core, so running ``os.cpu_count()`` of them at once
  divides the build's time. Their results go into myst-nb's cache, where it finds them.
  """
  if app.config.nb_execution_mode != "cache":
    return
  import nbformat
  from jupyter_cache import get_cache
  from jupyter_cache.base import CacheBundleIn
  from jupyter_cache.executors.utils import single_nb_execution

  cache = get_cache(app.config.nb_execution_cache_path)
  pending = []
  for path in sorted((DOCS / "colabs").glob("*.ipynb")):
    notebook = nbformat.read(path, as_version=4)
    try:
      cache.match_cache_notebook(notebook)
    except KeyError:
      pending.append((path, notebook))
  if not pending:
    return

  def run(item):
    path, notebook = item
    with tempfile.TemporaryDirectory() as cwd:
      return path, single_nb_execution(
        notebook,
        cwd=cwd,
        timeout=app.config.nb_execution_timeout,
        allow_errors=False,
        extra_arguments=["--IPKernelApp.log_level=ERROR"],  # no kernel start-up chatter
      )

  workers = min(len(pending), os.cpu_count() or 1)
  logger.info(f"executing {len(pending)} notebooks, {workers} at a time")
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    results = list(pool.map(run, pending))
  failed = []
  for path, result in results:
    if result.err is None:
      data = {"execution_seconds": result.time}
      bundle = CacheBundleIn(result.nb, str(path), data=data)
      cache.cache_notebook_bundle(bundle, check_validity=False, overwrite=True)
      logger.info(f"{path.name}: {result.time:.0f} s")
    else:  # reported once here (an error fails the build), then not run again by myst-nb
      cell_and_traceback = re.sub(r"\x1b\[[0-9;]*m", "", str(result.err))
      logger.error(f"colabs/{path.name} failed: {cell_and_traceback}")
      failed.append(f"colabs/{path.name}")
  app.config.nb_execution_excludepatterns = [*app.config.nb_execution_excludepatterns, *failed]


def setup(app):
  # Before myst-nb reads its configuration (at the default priority, 500).
  app.connect("builder-inited", _execute_notebooks, priority=400)
  app.connect("autodoc-process-signature", _short_aliases)
  app.connect("missing-reference", _resolve_od_alias)
  app.connect("autodoc-process-docstring", _attribute_docstring)

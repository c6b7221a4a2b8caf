"""Sphinx configuration of the plasticine documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``. Nothing here needs the
network, at build time or when the pages are read: no intersphinx, and MathJax is the copy packaged by
``sphinx-mathjax-offline`` (the ``docs`` extra), written into ``_static/mathjax`` of the site.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import plasticine  # noqa: E402

project = "plasticine"
author = "plasticine developers"
copyright = "plasticine developers, Apache-2.0"
release = plasticine.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # serves MathJax from _static/mathjax: formulas render offline
    "sphinx.ext.viewcode",
]

# No network at build time: no intersphinx, and unresolved references to outside projects are not errors.
nitpicky = False

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
html_static_path: list[str] = []

# -- autodoc / napoleon -------------------------------------------------------------------
autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "class"
# Show only what plasticine writes: no torch.nn.Module docstrings on forward/extra_repr.
autodoc_inherit_docstrings = False
# Optional heavy backends are imported lazily by the library; should one be imported at module level,
# the documentation still builds without it.
autodoc_mock_imports = [
    "ants",
    "monai",
    "diffusers",
    "voxelmorph",
    "deepali",
    "torchreg",
    "pottslab",
    "skimage",
    "sklearn",
    "nibabel",
    "pydicom",
    "matplotlib",
]

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# ``Attributes:`` sections become ``:ivar:`` fields: as ``.. attribute::`` entries they would describe
# the fields of a NamedTuple or dataclass a second time (autodoc documents those too).
napoleon_use_ivar = True
napoleon_custom_sections = ["Shape"]

# -- HTML ----------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"plasticine {release}"
html_show_sourcelink = False
pygments_style = "sphinx"


# -- one home per object ---------------------------------------------------------------------
# A name that a package re-exports is documented once. On every ``automodule`` of the API pages,
# ``:exclude-members:`` is filled in at read time with
#   * names the module re-exports from outside itself (they are documented at their home), and
#   * names the parent package re-exports from it (they are documented on the package's entry).
# Without this, a re-export added later would document an object twice and make cross-references
# ambiguous, which fails the build under ``-W``.
_AUTOMODULE = re.compile(r"^\.\. automodule:: (?P<name>\S+)\n(?P<options>(?:[ ]{3}:[^\n]*\n)*)", re.M)


def _home(obj: object) -> str | None:
    return getattr(obj, "__module__", None) if callable(obj) or isinstance(obj, type) else None


def _reexported(modname: str) -> list[str]:
    try:
        mod = importlib.import_module(modname)
    except Exception:  # autodoc reports the import error itself
        return []
    names: set[str] = set()
    for n in getattr(mod, "__all__", None) or []:
        home = _home(getattr(mod, n, None))
        if home is not None and home != modname and not home.startswith(modname + "."):
            names.add(n)
    parent_name = modname.rpartition(".")[0]
    if "." in parent_name:
        parent = importlib.import_module(parent_name)
        for n in getattr(parent, "__all__", None) or []:
            if _home(getattr(parent, n, None)) == modname:
                names.add(n)
    return sorted(names)


def _exclude_reexports(app, docname: str, source: list[str]) -> None:
    if not docname.startswith("api/"):
        return

    def fill(match: re.Match) -> str:
        names = _reexported(match.group("name"))
        if not names or ":exclude-members:" in match.group("options"):
            return match.group(0)
        return match.group(0) + f"   :exclude-members: {', '.join(names)}\n"

    source[0] = _AUTOMODULE.sub(fill, source[0])


def _skip_namedtuple_aliases(app, what, name, obj, skip, options):
    """Hide the generated "Alias for field number i" entries of NamedTuple fields (described in
    the class's ``Attributes:`` section instead) and the ``extra_repr`` of modules."""
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    if name == "extra_repr":  # the repr helper of torch modules
        return True
    return None


def setup(app):
    app.connect("source-read", _exclude_reexports)
    app.connect("autodoc-skip-member", _skip_namedtuple_aliases)
    return {"parallel_read_safe": True}

"""Sphinx configuration of the plasticine documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``; nothing here needs
the network (no intersphinx, MathJax is only referenced by the pages, not fetched at build time).
"""

from __future__ import annotations

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
napoleon_custom_sections = ["Shape"]

# -- HTML ----------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"plasticine {release}"
html_show_sourcelink = False
pygments_style = "sphinx"

"""Imports go down the layers of the package, never up (docs/architecture.rst draws them).

Every module of ``plasticine`` is parsed with :mod:`ast`; every import of a plasticine module, at
module level or inside a function (a lazy import counts the same), must go to a lower layer, to the
same part of the package, or along one of the few sideways edges listed in SIDEWAYS. Layers, low to
high (a higher rank may import a lower one):

* 0 ``core``: conventions, grids, warps, deformations, protocols (imports no other part);
* 1 ``losses``, ``segmentation``, ``metrics`` (image comparison);
* 2 ``diffusion``, ``registration`` (same rank, no edge between them: they meet only in the
  translator; registration optimises the losses below it);
* 3 ``data`` (synthetic deformations are integrated velocity fields);
* 4 ``translator``;
* 5 ``checkpoint``, ``io`` (persistence; ``io`` writes atomically through ``checkpoint``);
* 6 ``training``, ``viewer``, ``interop`` (torchio and MONAI images; no edge between them); 7 ``recipes``; 8 ``demo``; 9 ``cli``; 10 ``__main__``.

KNOWN_UPWARD lists the upward imports that exist today, each with the change that removes it; the
test fails for any other upward import and for an entry that no longer exists (remove it then).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "plasticine"

RANKS = {
    "core": 0,
    "losses": 1,
    "segmentation": 1,
    "metrics": 1,
    "diffusion": 2,
    "registration": 2,
    "data": 3,
    "translator": 4,
    "checkpoint": 5,
    "io": 5,
    "training": 6,
    "viewer": 6,
    "interop": 6,
    "recipes": 7,
    "evaluation": 8,
    "demo": 9,
    "cli": 10,
    "__main__": 11,
    "__init__": 12,  # the package itself (holds only the version today)
}

SIDEWAYS = {("io", "checkpoint")}
"""Allowed imports between two parts of the same rank."""

KNOWN_UPWARD: dict[tuple[str, str], str] = {}
"""Upward imports that exist today, each with the change that removes it."""


def part_of(module: str) -> str:
    """The layer key of a dotted module name: ``plasticine.core.warp`` -> ``core``."""
    parts = module.split(".")
    assert parts[0] == "plasticine", module
    return "__init__" if len(parts) == 1 else parts[1]


def module_name(path: Path) -> tuple[str, bool]:
    """Dotted name of a source file and whether it is a package ``__init__``."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def imports(path: Path) -> list[tuple[str, int]]:
    """Every plasticine module a file imports, with the line, at any depth of the syntax tree."""
    name, is_package = module_name(path)
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "plasticine"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "plasticine":
                continue
            if node.module is None or target == "plasticine":  # from . import x: x may be a module
                found += [(f"{target}.{a.name}", node.lineno) for a in node.names]
            else:
                found.append((target, node.lineno))
    return found


def edges() -> list[tuple[str, str, str]]:
    """``(from part, to part, where)`` for every import between two different parts."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = part_of(module_name(path)[0])
        for target, line in imports(path):
            dst = part_of(target)
            if dst != src:
                out.append((src, dst, f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"))
    return out


def test_every_part_has_a_layer():
    parts = {part_of(module_name(p)[0]) for p in PACKAGE.rglob("*.py")}
    assert parts <= set(RANKS), f"give these parts of plasticine a layer in RANKS: {sorted(parts - set(RANKS))}"


def test_imports_go_down_the_layers():
    upward = []
    seen_known = set()
    for src, dst, where in edges():
        if RANKS[dst] < RANKS[src] or (src, dst) in SIDEWAYS:
            continue
        if (src, dst) in KNOWN_UPWARD:
            seen_known.add((src, dst))
            continue
        upward.append(f"{where} ({src} rank {RANKS[src]} -> {dst} rank {RANKS[dst]})")
    assert not upward, "imports that go up or sideways across the layers:\n" + "\n".join(upward)
    stale = sorted(set(KNOWN_UPWARD) - seen_known)
    assert not stale, f"these upward imports are gone: remove them from KNOWN_UPWARD: {stale}"


def test_core_imports_no_other_part():
    assert [where for src, dst, where in edges() if src == "core"] == []


def test_diffusion_and_registration_meet_only_in_the_translator():
    assert [where for src, dst, where in edges() if {src, dst} == {"diffusion", "registration"}] == []


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from ..registration import x\n", "plasticine.registration"),
        ("def f():\n    from ..registration.integrators import y\n", "plasticine.registration.integrators"),
        ("import plasticine.registration.network\n", "plasticine.registration.network"),
        ("from .. import registration\n", "plasticine.registration"),
        ("from plasticine import registration\n", "plasticine.registration"),
    ],
)
def test_the_parser_sees_every_form_of_import(tmp_path, monkeypatch, source, expected):
    """A module of diffusion importing registration in each form is caught, lazy imports included."""
    fake = tmp_path / "plasticine"
    (fake / "diffusion").mkdir(parents=True)
    (fake / "diffusion" / "bad.py").write_text(source)
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert [t for t, _ in imports(fake / "diffusion" / "bad.py")] == [expected]
    assert [(s, d) for s, d, _ in edges()] == [("diffusion", "registration")]

"""The examples of docs/extending.rst run, and each passes the contract suite of its protocol.

The page's ``code-block:: python`` sections are executed in one namespace; every example class is
then put through the tests of its suite in ``tests/contracts/`` (those that take a ``make``
factory; the hypothesis ones are left to the suite itself), over the suite's own parameter grids.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import re
from pathlib import Path

import pytest
import torch

PAGE = Path(__file__).resolve().parents[1] / "docs" / "extending.rst"

# example class -> (contract module, factory of an instance from the suite's factory arguments)
EXAMPLES = {
    "CentroidRegistration": ("contracts.test_registration_backend", lambda cls: lambda ndim: cls()),
    "MeanSquaredError": ("contracts.test_similarity_loss", lambda cls: cls),
    "ThresholdExtractor": ("contracts.test_structure_extractor", lambda cls: cls),
}

FIXTURES = {"dtype": [torch.float32, torch.float64], "device": [torch.device("cpu")]}


def page_namespace() -> dict:
    blocks = re.findall(r"^\.\. code-block:: python\n\n((?:(?:   .*)?\n)+)", PAGE.read_text(), re.M)
    assert len(blocks) == len(EXAMPLES), f"expected {len(EXAMPLES)} python examples on {PAGE.name}, found {len(blocks)}"
    namespace: dict = {}
    for block in blocks:
        exec(compile("\n".join(line[3:] for line in block.splitlines()), str(PAGE), "exec"), namespace)
    return namespace


def _values(values) -> list:
    return [v.values[0] if hasattr(v, "values") and hasattr(v, "marks") else v for v in values]


def contract_cases(module, make):
    """``(test name, function, kwargs)`` for every suite test that takes a factory."""
    for name, fn in vars(module).items():
        if not name.startswith("test_") or not callable(fn) or hasattr(fn, "hypothesis"):
            continue
        params = list(inspect.signature(fn).parameters)
        if "make" not in params:
            continue
        grid = {m.args[0]: _values(m.args[1]) for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"}
        grid.update({k: v for k, v in FIXTURES.items() if k in params})
        grid["make"] = [make]
        names = [p for p in params if p in grid]
        assert names == params, f"{name}: no values for {set(params) - set(names)}"
        for combo in itertools.product(*(grid[p] for p in names)):
            yield name, fn, dict(zip(names, combo))


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_example_passes_its_contract_suite(example):
    namespace = page_namespace()
    module_name, factory = EXAMPLES[example]
    module = importlib.import_module(module_name)
    make = factory(namespace[example])
    ran = 0
    for name, fn, kwargs in contract_cases(module, make):
        try:
            fn(**kwargs)
        except pytest.skip.Exception:
            continue
        ran += 1
    assert ran >= 5, f"only {ran} contract tests ran for {example}"


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_example_saves_and_loads(example, tmp_path):
    """Each example inherits Configurable, so a checkpoint rebuilds it from its arguments."""
    from plasticine.checkpoint import load_component, save_component

    cls = page_namespace()[example]
    obj = cls()
    save_component(obj, tmp_path / "part.pt")
    back = load_component(tmp_path / "part.pt", expected=cls)
    assert type(back) is cls and back.config == obj.config

"""plasticine.core.config and plasticine.core.validate: arguments captured once, JSON both ways, shared checks."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from plasticine.core import (
    Config,
    ConfigError,
    Configurable,
    check_image,
    check_int,
    check_number,
    check_option,
    from_json,
    register_settings,
    registered_classes,
    to_json,
)
from plasticine.diffusion.conditioning import ConcatConditioning, LearnedConditioning
from plasticine.registration import AntsRegistration, LearnedRegistration
from plasticine.segmentation import KMeansExtractor, PottsExtractor


@register_settings(name="test_core_config.Knobs")
@dataclasses.dataclass(frozen=True)
class Knobs:
    width: int = 4
    sizes: tuple[int, ...] = (1, 2)


class Part(Configurable, config_name="test_core_config.Part"):
    def __init__(self, scale: float = 1.0, knobs: Knobs | None = None, *, dtype: torch.dtype = torch.float32, **extra):
        self.scale, self.knobs, self.dtype, self.extra = scale, knobs, dtype, extra


class Holder(Configurable, torch.nn.Module, config_name="test_core_config.Holder", config_ignore=("generator",)):
    def __init__(self, part: Part, channels: tuple[int, ...] = (2, 3), generator: torch.Generator | None = None):
        super().__init__()
        self.part = part
        self.layer = torch.nn.Linear(channels[0], channels[1])


class SubPart(Part, config_name="test_core_config.SubPart"):
    """A subclass without its own __init__: the parent's arguments are captured, under its own name."""


class Wrapping(Part, config_name="test_core_config.Wrapping"):
    def __init__(self, factor: int = 2):
        super().__init__(scale=float(factor), knobs=Knobs(width=factor))  # the outer arguments are what is recorded


def test_config_records_the_arguments_with_defaults_in_signature_order():
    p = Part(0.5, mode="fast")
    assert isinstance(p.config, Config) and dict(p.config) == {"scale": 0.5, "knobs": None, "dtype": torch.float32, "mode": "fast"}
    assert not callable(p.config) and repr(p.config) == "Config(scale=0.5, knobs=None, dtype=torch.float32, mode='fast')"
    assert dict(SubPart(2.0).config) == {"scale": 2.0, "knobs": None, "dtype": torch.float32}
    assert dict(Wrapping(3).config) == {"factor": 3}  # not what it passed to Part.__init__
    h = Holder(Part(), generator=torch.Generator().manual_seed(0))
    assert set(h.config) == {"part", "channels"} and h.config["part"] is h.part  # the generator is not recorded


def test_config_is_read_only_and_so_are_the_arguments():
    p = Part(0.5)
    with pytest.raises(TypeError):
        p.config["scale"] = 2.0  # type: ignore[index]
    with pytest.raises(AttributeError, match=r"^Part\.scale: a constructor argument, read-only once built"):
        p.scale = 2.0
    p.other = 1  # an attribute that is no argument stays free
    h = Holder(Part())
    with pytest.raises(AttributeError, match="read-only"):
        h.part = Part()
    h.layer = torch.nn.Linear(2, 2)  # submodules that are no arguments can still be set


def test_copies_and_pickles_keep_the_config():
    h = Holder(Part(0.25, Knobs(8)), channels=(3, 1))
    for c in (copy.deepcopy(h), pickle.loads(pickle.dumps(h))):
        assert c.config["channels"] == (3, 1) and c.config["part"] is c.part and c.part.config["knobs"] == Knobs(8)
        with pytest.raises(AttributeError, match="read-only"):
            c.part = Part()


def test_json_forms_of_every_kind_of_value():
    p = Part(float("inf"), Knobs(3, (4, 5)), dtype=torch.float64, values=[1, (2.5, None)], table={"a": float("nan")}, betas=torch.tensor([0.1, 0.2], dtype=torch.float64))
    data = to_json(p)
    assert json.loads(json.dumps(data, allow_nan=False)) == data  # strict JSON
    cfg = data["config"]
    assert data["class"] == "test_core_config.Part" and cfg["scale"] == {"float": "inf"} and cfg["dtype"] == {"dtype": "float64"}
    assert cfg["knobs"] == {"class": "test_core_config.Knobs", "config": {"width": 3, "sizes": {"tuple": [4, 5]}}}
    assert cfg["values"] == [1, {"tuple": [2.5, None]}] and cfg["table"] == {"dict": {"a": {"float": "nan"}}}
    assert cfg["betas"] == {"tensor": {"dtype": "float64", "shape": [2], "values": [0.1, 0.2]}}
    q = from_json(json.loads(json.dumps(data)))
    assert type(q) is Part and q.scale == math.inf and q.knobs == Knobs(3, (4, 5)) and q.dtype is torch.float64
    assert q.extra["values"] == [1, (2.5, None)] and math.isnan(q.extra["table"]["a"])
    assert q.extra["betas"].dtype == torch.float64 and torch.equal(q.extra["betas"], p.extra["betas"])
    assert to_json(q) == data


def test_nested_components_come_back_as_components():
    h = Holder(Part(0.5, Knobs(2)), channels=(4, 2))
    g = from_json(to_json(h))
    assert type(g) is Holder and type(g.part) is Part and g.part.config["knobs"] == Knobs(2) and g.layer.in_features == 4
    assert Holder.from_config(h.config).part is h.part  # from_config takes the objects themselves


@given(st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
))
def test_plain_values_round_trip_exactly(value):
    p = Part(1.0, payload=value)
    q = from_json(json.loads(json.dumps(to_json(p), allow_nan=False)))
    assert q.extra["payload"] == value and type(q.extra["payload"]) is type(value)


class NotAComponent:
    pass


def test_values_that_cannot_be_written_are_named():
    with pytest.raises(ConfigError, match=r"^test_core_config.Part.helper: cannot write a tests?\.?\w*\.?NotAComponent|NotAComponent into a config: a component must inherit"):
        to_json(Part(helper=NotAComponent()))
    with pytest.raises(ConfigError, match=r"Part.fn: cannot write a builtins.function"):
        to_json(Part(fn=lambda x: x))
    with pytest.raises(ConfigError, match=r"Part.table: dict keys in a config must be strings, got 1"):
        to_json(Part(table={1: 2}))
    with pytest.raises(ConfigError, match="^to_json: expected a Configurable component"):
        to_json(NotAComponent())
    with pytest.raises(ConfigError, match=r"Star: 1 extra positional argument\(s\) cannot be recorded"):
        class Star(Configurable, config_name="test_core_config.Star"):
            def __init__(self, *args):
                pass

        Star(1).config  # noqa: B018 - the capture happens at construction
    with pytest.raises(ConfigError, match="positional-only"):
        class Slash(Configurable, config_name="test_core_config.Slash"):
            def __init__(self, a, /):
                pass


def test_bad_json_is_refused_naming_the_place():
    good = to_json(Part(0.5, Knobs()))
    for data, match in [
        ({"class": "nowhere.Missing", "config": {}}, r"^nowhere.Missing: the class 'nowhere.Missing' is not registered; import the module"),
        ({"class": "test_core_config.Holder", "config": {"part": good, "channels": {"tuple": [3]}}}, r"^test_core_config.Holder: cannot rebuild test_core_config.Holder from its config: tuple index out of range$"),
        ({"class": "test_core_config.Holder", "config": {"part": good, "bogus": 1}}, r"unknown argument\(s\) \['bogus'\]"),
        ({"class": "test_core_config.Part", "config": {"scale": {"tuple": 3}}}, r"Part.scale: expected a list under 'tuple'"),
        ({"class": "test_core_config.Part", "config": {"dtype": {"dtype": "os.system"}}}, r"Part.dtype: expected the name of a torch dtype"),
        ({"class": "test_core_config.Part", "config": {"x": {"tensor": {"dtype": "float32", "shape": [3], "values": [1.0]}}}}, r"Part.x: 1 values do not make a float32 tensor of shape \[3\]"),
        ({"class": "test_core_config.Part", "config": {"x": {"a": 1, "b": 2}}}, r"Part.x: expected \{'class': name, 'config'"),
        ([1, 2], r"^from_json: expected"),
    ]:
        with pytest.raises(ConfigError, match=match):
            from_json(data)


def test_names_are_unique_and_redefinition_replaces():
    assert registered_classes()["test_core_config.Part"] is Part and registered_classes()["test_core_config.Knobs"] is Knobs
    with pytest.raises(ConfigError, match=r"the config name 'test_core_config.Part' is already registered for test_core_config.Part"):
        type("Other", (Configurable,), {"__init__": lambda self: None}, config_name="test_core_config.Part")

    def define():
        class Local(Configurable):
            def __init__(self, n: int = 1):
                self.n = n

        return Local

    first, second = define(), define()  # the same class statement run twice (a module reloaded): the new one wins
    assert registered_classes()[second.__qualname__] is second and type(from_json(to_json(second(3)))) is second
    with pytest.raises(ConfigError, match="was defined again since this object was built"):
        to_json(first(3))
    with pytest.raises(ConfigError, match="register_settings: expected a dataclass"):
        register_settings(int)


def test_abstract_bases_are_not_registered():
    class Base(Configurable, config_abstract=True):
        def __init__(self, k: int = 1):
            self.k = k

    class Leaf(Base):
        pass

    names = registered_classes()
    assert Base.__qualname__ not in names and names[Leaf.__qualname__] is Leaf and dict(Leaf(4).config) == {"k": 4}


# -- validators ------------------------------------------------------------------------------------


def test_check_int():
    assert check_int(3, "steps", 1) == 3 and type(check_int(np.int64(4), "steps")) is int
    for bad, match in [(True, r"^steps: expected an int >= 1, got True$"), (2.0, "got 2.0"), ("3", "got '3'"), (0, "got 0"), (None, "got None")]:
        with pytest.raises(ValueError, match=match):
            check_int(bad, "steps", 1)
    with pytest.raises(ValueError, match=r"^k: expected an int in \[0, 5\], got 6$"):
        check_int(6, "k", 0, 5)
    with pytest.raises(ValueError, match=r"^k: expected an int <= 5, got 6$"):
        check_int(6, "k", maximum=5)


def test_check_number():
    assert check_number(1, "eta", 0, 1) == 1.0 and type(check_number(np.float32(0.5), "eta")) is float
    for bad in (float("nan"), float("inf"), True, "0.5", None, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"^eta: expected a number in \[0, 1\], got"):
            check_number(bad, "eta", 0, 1)
    with pytest.raises(ValueError, match=r"^p: expected a number in \(0, 1\), got 0$"):
        check_number(0, "p", 0, 1, min_open=True, max_open=True)
    with pytest.raises(ValueError, match=r"^s: expected a number > 0, got 0.0$"):
        check_number(0.0, "s", 0, min_open=True)
    with pytest.raises(ValueError, match=r"^x: expected a finite number, got nan$"):
        check_number(float("nan"), "x")


def test_check_option():
    assert check_option("a", "mode", ("a", "b")) == "a" and check_option(2, "order", (1, 2)) == 2
    for bad in (True, 3, "1", torch.tensor([1, 2])):
        with pytest.raises(ValueError, match=r"^order: expected one of \(1, 2\), got"):
            check_option(bad, "order", (1, 2))


def test_check_image():
    assert check_image(torch.zeros(2, 1, 4, 5), "x")["S"] == (4, 5)
    with pytest.raises(ValueError, match="^x: expected a floating-point tensor"):
        check_image(torch.zeros(2, 1, 4, 5, dtype=torch.long), "x")
    with pytest.raises(ValueError, match=r"^x: expected finite values, found 1 NaN"):
        check_image(torch.tensor([[[[0.0, float("nan")]]]]), "x")
    with pytest.raises(ValueError, match=r"^x: expected shape \(B, C, \*S\)"):
        check_image(torch.zeros(4, 5), "x")


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: KMeansExtractor(2, max_iter=2.5), "max_iter"),  # was truncated to 2
        (lambda: KMeansExtractor(2, smoothing_sigma="1"), "smoothing_sigma"),  # was kept as a string
        (lambda: PottsExtractor(2, max_iter=7.9), "max_iter"),
        (lambda: ConcatConditioning(True), "num_labels"),  # a bool taken for 1
        (lambda: LearnedConditioning(True), "in_channels"),
        (lambda: LearnedConditioning(2, channels=(True, 4)), r"channels\[\.\.\.\]"),
        (lambda: LearnedRegistration(None, downsample=True), "downsample"),
        (lambda: AntsRegistration(pad=3.7), "pad"),  # was truncated to 3
    ],
    ids=["kmeans-max_iter", "kmeans-sigma", "potts-max_iter", "concat-bool", "learned-bool", "learned-channels", "downsample-bool", "ants-pad"],
)
def test_constructors_refuse_what_they_used_to_truncate_or_misread(make, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        make()


def test_no_private_name_crosses_a_package():
    """What one package of plasticine shares with another is public (documented), never a ``_name``."""
    root = Path(__file__).resolve().parents[1] / "plasticine"
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        home = parts[0] if len(parts) > 1 else path.stem  # the package, or the top-level module
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            base = list(parts[:-1])[: len(parts) - node.level]
            target = (base + (node.module or "").split("."))[0] if base or node.module else home
            if private and target != home:
                found.append(f"{'/'.join(parts)}: from {'.' * node.level}{node.module or ''} import {', '.join(private)}")
    assert found == []

"""Bounded fuzz of every io loader: random bytes, mutated valid files and random JSON structures.

Each loader either returns a valid result or raises a one-line ValueError naming the file; any other
exception (KeyError, TypeError, UnicodeDecodeError, zlib.error, IndexError...) fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plasticine.core import Deformation
from plasticine.io import read_deformation, read_image, read_points, write_deformation, write_image, write_trace

pytest.importorskip("PIL.Image", reason="the io extra (pillow) is not installed")
pytest.importorskip("nibabel", reason="the io extra (nibabel) is not installed")
pydicom = pytest.importorskip("pydicom", reason="the io extra (pydicom) is not installed")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about damaged elements

# each example writes into the module's folder (replacing the previous example's file)
fuzz = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """Valid files of every kind, as bytes, to mutate."""
    from pydicom.data import get_testdata_file

    d = tmp_path_factory.mktemp("seeds")
    g = torch.Generator().manual_seed(0)
    write_image(d / "g.png", torch.rand(1, 6, 5, generator=g))
    write_image(d / "v.nii", torch.rand(1, 4, 3, 2, generator=g))
    write_image(d / "v.nii.gz", torch.rand(1, 4, 3, 2, generator=g))
    f = torch.randn(1, 2, 4, 3, generator=g)
    write_deformation(d / "d.npz", Deformation(f, -f, f / 2))
    write_deformation(d / "d.nii.gz", Deformation(f, -f))
    write_trace(d / "t.json", torch.rand(2, 2, generator=g), torch.rand(2, 2, generator=g), input="x.png")
    (d / "p.csv").write_text("# z, y\n1, 2\n3.5 4\n")
    out = {p.name: p.read_bytes() for p in d.iterdir()}
    mr = get_testdata_file("MR_small.dcm")
    if mr is not None:
        out["s.dcm"] = Path(mr).read_bytes()
    return out


def _check(loader, path: Path, *names: str):
    """Call the loader: a valid result, or a one-line ValueError naming the file."""
    try:
        out = loader(path)
    except ValueError as err:
        message = str(err)
        assert any(n in message for n in (path.name, *names)), message
        assert "\n" not in message, message
        return None
    if isinstance(out, Deformation):
        tensors = [out.forward, out.inverse] + ([] if out.velocity is None else [out.velocity])
        assert out.forward.shape[0] == 1 and out.ndim in (2, 3)
    else:
        tensors = [out]
    for t in tensors:
        assert t.dtype == torch.float32 and bool(torch.isfinite(t).all())
    return out


def _load(folder: Path, name: str):
    path = folder / name
    if name.endswith((".png", ".nii", ".dcm")) or name == "v.nii.gz":
        out = _check(read_image, path)
        assert out is None or out.dim() in (3, 4)
    elif name.startswith("d."):
        _check(read_deformation, path, "d_inverse.nii.gz")
    else:
        out = _check(read_points, path)
        assert out is None or (out.dim() == 2 and out.shape[1] in (2, 3))


KINDS = ["g.png", "v.nii", "v.nii.gz", "s.dcm", "d.npz", "d.nii.gz", "t.json", "p.csv"]


def _write(folder: Path, name: str, data: bytes, seeds: dict[str, bytes]) -> None:
    for p in folder.iterdir():
        p.unlink()
    (folder / name).write_bytes(data)
    if name == "d.nii.gz":  # the inverse file stays valid: the forward one is fuzzed
        (folder / "d_inverse.nii.gz").write_bytes(seeds["d_inverse.nii.gz"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_seeds_are_valid(seeds, folder):
    for name in KINDS:
        if name in seeds:
            _write(folder, name, seeds[name], seeds)
            path = folder / name
            loader = read_image if name in ("g.png", "v.nii", "v.nii.gz", "s.dcm") else read_deformation if name.startswith("d.") else read_points
            assert loader(path) is not None


@fuzz
@given(name=st.sampled_from(KINDS), data=st.binary(max_size=400))
def test_random_bytes(seeds, folder, name, data):
    _write(folder, name, data, seeds)
    _load(folder, name)


@fuzz
@given(
    name=st.sampled_from(KINDS),
    flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255), st.booleans()), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 2**31)),
)
def test_mutated_valid_files(seeds, folder, name, flips, cut):
    if name not in seeds:
        pytest.skip(f"no seed file for {name}")
    data = bytearray(seeds[name])
    for pos, value, near_start in flips:  # mostly in the headers, where the structure is
        data[pos % min(len(data), 512) if near_start else pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _write(folder, name, bytes(data), seeds)
    _load(folder, name)


_keys = st.sampled_from(["format", "version", "points", "source", "target", "units", "x"])
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**40), 10**40), st.floats(allow_nan=False), st.text(max_size=4), st.just("plasticine-trace")
)
_json = st.recursive(_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(_keys, c, max_size=4), max_leaves=16)
_trace = st.fixed_dictionaries(
    {"format": st.just("plasticine-trace"), "version": st.sampled_from([1, 1, 2, "1", None])},
    optional={"points": st.one_of(_json, st.lists(st.dictionaries(st.sampled_from(["source", "target"]), _json, max_size=2), max_size=3))},
)


@fuzz
@given(doc=st.one_of(_json, _trace), which=st.sampled_from(["source", "target"]))
def test_random_json_points(seeds, folder, doc, which):
    _write(folder, "t.json", json.dumps(doc).encode(), seeds)
    _check(lambda p: read_points(p, which=which), folder / "t.json")


@fuzz
@given(lines=st.lists(st.text(alphabet="0123456789.,-+eE naif#\t", max_size=12), max_size=5))
def test_random_csv_points(seeds, folder, lines):
    _write(folder, "p.csv", "\n".join(lines).encode(), seeds)
    _check(read_points, folder / "p.csv")

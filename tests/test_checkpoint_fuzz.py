"""A bounded fuzz of the checkpoint loaders: random bytes, truncated and byte-flipped valid files.

Every loader (:func:`load_tensors`, :func:`load_state`, :func:`load_translator`) either
loads or raises a one-line :class:`CheckpointError` naming the file, for both formats; no other
exception type escapes, and no code is run (a file with a pickled function call is among the seeds).
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_checkpoint import MARKER, Evil
from test_translator import make_translator

from plasticine.checkpoint import CheckpointError, load_state, load_tensors, load_translator, save_component, save_state

LOADERS = (load_tensors, load_state, load_translator)
SUFFIXES = (".pt", ".safetensors")


class _Seeds(dict):
    def __repr__(self) -> str:  # a failing example names the seeds, not their megabytes
        return f"<seed files {sorted(self)}>"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """Valid files of every kind (and one with a pickled call), as bytes."""
    folder = tmp_path_factory.mktemp("seeds")
    t = make_translator()
    save_component(t, folder / "m.pt")
    save_component(t, folder / "m.safetensors")
    net = torch.nn.Linear(3, 2)
    optimizer = {  # what Adam's state_dict holds (int keys, tuples), without the cost of a first step
        "state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.ones_like(p), "exp_avg_sq": torch.ones_like(p)} for i, p in enumerate(net.parameters())},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "foreach": None, "params": [0, 1]}],
    }
    save_state(folder / "s.pt", {"format": "plasticine-training", "step": 1, "model": net.state_dict(), "optimizer": optimizer, "rng": torch.get_rng_state()})
    torch.save({"format": "plasticine", "version": 2, "config": "{}", "tensors": {}, "payload": Evil(str(folder / "executed"))}, folder / "evil.pt")
    return _Seeds({p.name: p.read_bytes() for p in sorted(folder.iterdir())})


def _loads_or_refuses(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzzed{suffix}"
        path.write_bytes(data)
        for load in LOADERS:
            try:
                load(path)
            except CheckpointError as err:
                message = str(err)
                assert str(path) in message and "\n" not in message, (load.__qualname__, message)
        assert sorted(p.name for p in Path(d).iterdir()) == [path.name]  # nothing written, nothing run
    assert not MARKER


def _positions(n: int) -> st.SearchStrategy[int]:
    """Anywhere, with the headers at both ends (zip directory, safetensors header) drawn often."""
    return st.one_of(st.integers(0, min(n, 2048) - 1), st.integers(max(0, n - 2048), n - 1), st.integers(0, n - 1))


@given(
    data=st.one_of(
        st.binary(max_size=2048),
        st.binary(max_size=2048).map(lambda b: b"PK\x03\x04" + b),  # a zip start (torch.save's format)
        st.tuples(st.integers(0, 4096), st.binary(max_size=2048)).map(lambda nb: struct.pack("<Q", nb[0]) + nb[1]),  # a safetensors header length
        st.tuples(st.integers(0, 200), st.binary(max_size=256)).map(lambda nb: struct.pack("<Q", nb[0]) + b'{"__metadata__":' + nb[1]),
    ),
    suffix=st.sampled_from(SUFFIXES),
)
def test_random_bytes(data, suffix):
    _loads_or_refuses(data, suffix)


@given(st.data())
def test_truncated_files(seeds, data):
    name = data.draw(st.sampled_from(sorted(seeds)))
    raw = seeds[name]
    cut = data.draw(_positions(len(raw)))
    _loads_or_refuses(raw[:cut], data.draw(st.sampled_from(SUFFIXES)))


@given(st.data())
def test_flipped_files(seeds, data):
    name = data.draw(st.sampled_from(sorted(seeds)))
    raw = bytearray(seeds[name])
    for position, mask in data.draw(st.lists(st.tuples(_positions(len(raw)), st.integers(1, 255)), min_size=1, max_size=64)):
        raw[position] ^= mask
    _loads_or_refuses(bytes(raw), Path(name).suffix)


def test_seeds_load(seeds, tmp_path):
    """The unmodified seeds load (the evil one is refused), so the fuzz starts from valid files."""
    for name, raw in seeds.items():
        (tmp_path / name).write_bytes(raw)
    for suffix in SUFFIXES:
        load_translator(tmp_path / f"m{suffix}")
    assert load_state(tmp_path / "s.pt")["step"] == 1
    with pytest.raises(CheckpointError, match="refused to load"):
        load_tensors(tmp_path / "evil.pt")
    assert not (tmp_path / "executed").exists() and not MARKER

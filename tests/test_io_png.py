"""The built-in PNG encoder of write_image: valid PNG bytes, exact 8-bit values, no optional package needed."""

from __future__ import annotations

import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from conftest import make_generator
from hypothesis import given
from hypothesis import strategies as st

from plasticine.io import write_image


def _parse_png(data: bytes) -> tuple[dict, np.ndarray]:
    """Check signature, chunk order and every CRC; return the header and the decoded uint8 array."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, compression, filtering, interlace) == (8, 0, 0, 0) and colour in (0, 2)
    channels = 1 if colour == 0 else 3
    raw = np.frombuffer(zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT")), np.uint8).reshape(h, 1 + w * channels)
    assert (raw[:, 0] == 0).all()  # filter type None on every row
    pixels = raw[:, 1:].reshape(h, w, channels)
    return {"width": w, "height": h, "colour": colour}, pixels[..., 0] if channels == 1 else pixels


@given(seed=st.integers(0, 2**31 - 1), h=st.integers(1, 9), w=st.integers(1, 9), channels=st.sampled_from([1, 3]))
def test_written_png_is_valid_and_holds_the_8_bit_values(tmp_path_factory, seed, h, w, channels):
    k = torch.randint(0, 256, (channels, h, w), generator=make_generator(seed))
    path = write_image(tmp_path_factory.mktemp("png") / "x.png", k.double() / 255.0)
    header, pixels = _parse_png(path.read_bytes())
    assert (header["width"], header["height"], header["colour"]) == (w, h, 0 if channels == 1 else 2)
    expected = k.numpy().astype(np.uint8)
    np.testing.assert_array_equal(pixels, expected[0] if channels == 1 else np.moveaxis(expected, 0, -1))


def test_pillow_decodes_the_written_png(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="pillow is not installed")
    x = torch.rand(3, 13, 17, generator=make_generator(1))
    x[:, 0, 0], x[:, 0, 1] = 0.0, 1.0
    expected = np.round(x.double().numpy() * 255).astype(np.uint8)
    for image, mode, want in ((x[:1], "L", expected[0]), (x, "RGB", np.moveaxis(expected, 0, -1))):
        write_image(tmp_path / f"{mode}.png", image)
        with Image.open(tmp_path / f"{mode}.png") as im:
            im.verify()
        with Image.open(tmp_path / f"{mode}.png") as im:
            assert im.format == "PNG" and im.mode == mode and im.size == (17, 13)
            np.testing.assert_array_equal(np.asarray(im), want)


def test_writing_png_needs_no_optional_package(tmp_path, monkeypatch):
    for module in ("PIL", "PIL.Image", "nibabel", "pydicom"):
        monkeypatch.setitem(sys.modules, module, None)  # importing any of them now fails
    path = write_image(tmp_path / "g.png", torch.full((1, 2, 3), 0.5))
    _, pixels = _parse_png(path.read_bytes())
    assert (pixels == 128).all()

"""Image loading: every PIL mode to RGB uint8, EXIF orientation, and clear errors for bad files."""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_rgb, read_image_size


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A 1-bit grayscale PNG that declares ``width`` x ``height`` but holds no pixel data: only a header can be read."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    path.write_bytes(signature + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_rgba_drops_alpha(tmp_path):
    Image.new("RGBA", (3, 2), (10, 20, 30, 40)).save(tmp_path / "a.png")
    rgb = load_rgb(tmp_path / "a.png")
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb.reshape(-1, 3).tolist() == [[10, 20, 30]] * 6


def test_palette_becomes_palette_colours(tmp_path):
    image = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0, 0, 0] * 253)
    image.save(tmp_path / "p.png")
    assert load_rgb(tmp_path / "p.png").tolist() == [[[0, 0, 0], [255, 0, 0]], [[0, 0, 255], [255, 0, 0]]]


def test_gray_alpha(tmp_path):
    Image.new("LA", (2, 2), (100, 50)).save(tmp_path / "la.png")
    assert load_rgb(tmp_path / "la.png").reshape(-1, 3).tolist() == [[100, 100, 100]] * 4


def test_16_bit_grayscale_scaled_to_8_bit(tmp_path):
    values = np.array([[0, 257, 65535], [32896, 512, 1000]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = load_rgb(tmp_path / "deep.png")
    np.testing.assert_array_equal(rgb[..., 0], [[0, 1, 255], [128, 2, 3]])  # v >> 8
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_cmyk(tmp_path):
    image = Image.new("CMYK", (16, 8))
    image.paste((0, 0, 0, 0), (0, 0, 8, 8))  # white
    image.paste((255, 0, 0, 0), (8, 0, 16, 8))  # cyan
    image.save(tmp_path / "c.jpg", quality=100)  # a CMYK JPEG (print workflows write them)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    rgb = load_rgb(tmp_path / "c.jpg").astype(int)
    assert np.abs(rgb[4, 2] - [255, 255, 255]).max() <= 3 and np.abs(rgb[4, 12] - [0, 255, 255]).max() <= 3


def test_exif_orientation_6_rotates(tmp_path):
    image = Image.new("RGB", (16, 8), (0, 0, 255))  # stored 16 wide x 8 high; left half red, right half blue
    image.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    image.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    rgb = load_rgb(tmp_path / "r.jpg")
    assert rgb.shape == (16, 8, 3)
    assert read_image_size(tmp_path / "r.jpg") == (16, 8)
    assert rgb[3, 4, 0] > 200 and rgb[3, 4, 2] < 60  # stored left half is now on top
    assert rgb[12, 4, 2] > 200 and rgb[12, 4, 0] < 60


def test_read_image_size_plain(tmp_path):
    Image.new("L", (7, 5)).save(tmp_path / "g.png")
    assert read_image_size(tmp_path / "g.png") == (5, 7)
    assert load_rgb(tmp_path / "g.png").shape == (5, 7, 3)


@pytest.mark.parametrize("reader", [load_rgb, read_image_size])
def test_missing_and_zero_byte_files(tmp_path, reader):
    with pytest.raises(ImageLoadError, match=r"nope\.jpg: image file missing"):
        reader(tmp_path / "nope.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.jpg: zero-byte file"):
        reader(tmp_path / "empty.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all")
    with pytest.raises(ImageLoadError, match=r"junk\.jpg: not a recognised image file"):
        reader(tmp_path / "junk.jpg")


def test_truncated_jpeg_fails_at_load(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buffer = BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert read_image_size(tmp_path / "cut.jpg") == (64, 64)  # the header is intact
    with pytest.raises(ImageLoadError, match=r"cut\.jpg: truncated or corrupt image: image file is truncated"):
        load_rgb(tmp_path / "cut.jpg")


@pytest.mark.parametrize("reader", [load_rgb, read_image_size])
def test_too_large_refused_from_header_with_default_limit(tmp_path, reader):
    assert DEFAULT_MAX_PIXELS == 178956970
    huge = png_header_only(tmp_path / "huge.png", 30000, 30000)  # beyond PIL's own 2x bomb limit
    with pytest.raises(ImageLoadError) as error:
        reader(huge)
    assert str(error.value) == f"{huge}: image too large: 30000x30000 = 900000000 pixels > limit 178956970"
    big = png_header_only(tmp_path / "big.png", 14000, 14000)  # between PIL's warning and error thresholds
    with pytest.raises(ImageLoadError, match=r"big\.png: image too large: 14000x14000 = 196000000 pixels > limit"):
        reader(big)


def test_caller_limit_overrides_both_ways(tmp_path):
    huge = png_header_only(tmp_path / "huge.png", 30000, 30000)
    assert read_image_size(huge, max_pixels=10**9) == (30000, 30000)  # header only: no pixel data was needed
    Image.new("RGB", (10, 10)).save(tmp_path / "small.png")
    with pytest.raises(ImageLoadError, match=r"small\.png: image too large: 10x10 = 100 pixels > limit 99"):
        load_rgb(tmp_path / "small.png", max_pixels=99)
    assert load_rgb(tmp_path / "small.png", max_pixels=100).shape == (10, 10, 3)

"""Image loading that fails loudly and early: RGB uint8 arrays, EXIF orientation applied, sizes from headers.

Every failure is an ``ImageLoadError`` whose message names the path and the reason: missing file, zero-byte file,
unidentifiable or truncated data, a format we do not read, or more pixels than ``max_pixels`` (checked from the header,
before any decoding).

What a file is follows from its bytes, not its name: PIL identifies the format, and only ``ALLOWED_FORMATS`` (JPEG,
PNG, BMP, WebP: what the datasets ship and what photos are saved as) are read. Others fail with ``ImageFormatError``;
a float TIFF saved as ``.jpg``, say, would otherwise be clipped to an all-white picture, and a GIF or a multi-page
TIFF would silently give its first frame.
Sizes are reported after EXIF orientation, so ``read_image_size`` agrees with the shape ``load_rgb`` returns.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

DEFAULT_MAX_PIXELS = 178956970  # PIL's own Image.MAX_IMAGE_PIXELS default
EXIF_ORIENTATION_TAG = 0x0112
ORIENTATIONS_SWAPPING_AXES = (5, 6, 7, 8)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "WEBP")  # PIL's names for them (``Image.format``)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # file names adapters look for, in any letter case
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error, zlib.error)


class ImageLoadError(ValueError):
    """An image that cannot be used: missing, empty, corrupt, truncated, or too large."""


class ImageFormatError(ImageLoadError):
    """A readable image of a format that is not read (not in ``ALLOWED_FORMATS``): TIFF, GIF, ..."""


def _open_ignoring_pil_limit(path: Path) -> ImageFile.ImageFile | None:
    """Open ``path`` header-only through PIL's format registry, without PIL's global pixel limit; None if unidentified.

    Used only when ``Image.open`` refused the file as a decompression bomb, to report its size or to admit it when the
    caller's ``max_pixels`` is higher than PIL's global limit.
    """
    Image.init()
    with open(path, "rb") as fp:
        prefix = fp.read(16)
    for image_format in Image.ID:
        factory, accept = Image.OPEN[image_format]
        accepted = True if accept is None else accept(prefix)
        if not accepted or isinstance(accepted, str):
            continue
        try:
            return factory(str(path))  # given a path, the image owns (and closes) its file
        except DECODE_ERRORS:
            continue
    return None


def _open_checked(path: Path, max_pixels: int) -> ImageFile.ImageFile:
    """Open ``path`` reading only its header.

    Raises:
        ImageLoadError: missing, zero-byte, unidentifiable, or more than ``max_pixels`` pixels.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"{path}: image file missing")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"{path}: zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError:
        image = _open_ignoring_pil_limit(path)
        if image is None:
            raise ImageLoadError(f"{path}: image too large for PIL's pixel limit") from None
    except Image.UnidentifiedImageError as error:
        raise ImageLoadError(f"{path}: not a recognised image file: {error}") from error
    except DECODE_ERRORS as error:
        raise ImageLoadError(f"{path}: truncated or corrupt image: {error}") from error
    if image.format not in ALLOWED_FORMATS:
        found = image.format or type(image).__name__
        image.close()
        raise ImageFormatError(f"{path}: a {found} image (by its content); only {', '.join(ALLOWED_FORMATS)} are read")
    width, height = image.size
    if width <= 0 or height <= 0:
        image.close()
        raise ImageLoadError(f"{path}: truncated or corrupt image: size {width}x{height}")
    if width * height > max_pixels:
        image.close()
        pixels = width * height
        raise ImageLoadError(f"{path}: image too large: {width}x{height} = {pixels} pixels > limit {max_pixels}")
    return image


def _header_orientation(image: Image.Image) -> int:
    """EXIF orientation (1-8) from the header only; ``Image.Image.getexif`` skips the PNG plugin's full decode."""
    try:
        orientation = Image.Image.getexif(image).get(EXIF_ORIENTATION_TAG, 1)
    except DECODE_ERRORS:
        return 1
    return orientation if isinstance(orientation, int) else 1


def read_image_size(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of the image at ``path`` after EXIF orientation, from its header (no pixel decoding).

    A PNG whose EXIF chunk follows the pixel data is sized without it (finding it would need a full decode).

    Raises:
        ImageLoadError: missing, zero-byte, unidentifiable or too large (more than ``max_pixels``).
    """
    with _open_checked(path, max_pixels) as image:
        width, height = image.size
        if _header_orientation(image) in ORIENTATIONS_SWAPPING_AXES:
            width, height = height, width
    return height, width


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; 16-bit grayscale scaled to 8 bits (v >> 8), alpha dropped, CMYK converted."""
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode the image at ``path`` fully into an HxWx3 uint8 RGB array, EXIF orientation applied.

    Palette, alpha (RGBA/LA/PA), grayscale, CMYK and 16-bit grayscale images are converted to RGB; alpha is dropped.

    Raises:
        ImageLoadError: missing, zero-byte, unidentifiable, truncated or corrupt, or more than ``max_pixels`` pixels
            (checked before decoding).
    """
    with _open_checked(path, max_pixels) as image:
        try:
            image.load()  # full decode here, so truncated files fail here and not later
            upright = ImageOps.exif_transpose(image)
            rgb = np.asarray(_to_rgb(upright), dtype=np.uint8)
        except DECODE_ERRORS as error:
            raise ImageLoadError(f"{path}: truncated or corrupt image: {error}") from error
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageLoadError(f"{path}: decoded to shape {rgb.shape}, expected HxWx3")
    return np.ascontiguousarray(rgb)

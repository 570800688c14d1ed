"""Decoding: every image a user may hand us becomes upright 8-bit RGB, or a clear refusal.

Every image is decoded by :func:`load_image` (an opened PIL image by :func:`to_rgb`), with PIL
rather than OpenCV: every mode a user may hand us becomes 8-bit RGB (deep integer and float
modes scaled by their type's range, see :func:`_to_8bit`), photos are turned upright as their
EXIF Orientation says (as a browser shows them), and decompression bombs are refused rather
than loaded. :func:`image_extensions` is every extension Pillow decodes here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageFile

# Formats Pillow registers but cannot turn into pixels here: stubs that only identify a file
# (BUFR, GRIB, HDF5, and WMF/EMF off Windows), MPEG (a video's header), and EPS/PS (drawings
# that need Ghostscript). Their files are skipped as non-images, not retried every epoch.
UNDECODED_FORMATS = frozenset({"BUFR", "GRIB", "HDF5", "WMF", "MPEG", "EPS"})


class UnreadableImageError(OSError):
    """An image file that cannot be used: not an image, truncated, empty, or a bomb."""


def load_image(path: str | Path | BinaryIO) -> Image.Image:
    """Decode an image file (a path or an open binary file) as upright 8-bit RGB.

    The one decoder of training, check-data, pack, predict, serve and the notebooks, so that
    they all see the same pixels: the EXIF Orientation applied, deep modes scaled by their
    type's range (:func:`_to_8bit`), transparency composited on white.

    Raises
    ------
    UnreadableImageError
        The file is empty, unreadable, not an image, truncated, or larger than PIL's pixel
        limit (a possible decompression bomb, refused before its pixels are decoded). The
        message is the reason, for per-file reports.
    """
    with _unreadable_reasons(path):
        if isinstance(path, str | Path) and os.path.getsize(path) == 0:
            raise UnreadableImageError("empty file (0 bytes)")
        with warnings.catch_warnings():
            # Beyond MAX_IMAGE_PIXELS PIL only warns; a bomb must be refused, not loaded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return _upright_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """An already opened PIL image as upright 8-bit RGB, by the rules of :func:`load_image`.

    Raises
    ------
    UnreadableImageError
        Its pixels cannot be decoded, or there are more than PIL's limit.
    """
    with _unreadable_reasons():
        if img.width * img.height > Image.MAX_IMAGE_PIXELS:
            raise UnreadableImageError(too_many_pixels(img.size))
        return _upright_rgb(img)


def too_many_pixels(size: tuple[int, int] | None) -> str:
    """Why an image over PIL's pixel limit is refused: its own size, then the limit."""
    limit = Image.MAX_IMAGE_PIXELS
    what = "more pixels than that"
    if size is not None:
        what = f"{size[0]}x{size[1]} pixels ({size[0] * size[1] / 1e6:.1f} megapixels)"
    return (
        f"{what}: over the decoder's limit of {limit} pixels ({limit / 1e6:.1f} megapixels), "
        "refused as a possible decompression bomb; scale the image down"
    )


def unchecked_size(source: str | Path | BinaryIO) -> tuple[int, int] | None:
    """An image's width and height from its header, past PIL's pixel limit; ``None`` if no
    format reads it.

    ``Image.open`` refuses a header over the limit without saying the size; its format
    readers, called as it calls them, only read the header.
    """
    Image.init()
    try:
        with contextlib.ExitStack() as stack:
            fp = source
            if isinstance(source, str | Path):
                fp = stack.enter_context(open(source, "rb"))
            fp.seek(0)
            prefix = fp.read(16)
            for factory, accept in Image.OPEN.values():
                if accept and not accept(prefix):
                    continue
                fp.seek(0)
                with contextlib.suppress(Exception):
                    return tuple(factory(fp, "").size)
    except OSError:
        return None
    return None


@contextlib.contextmanager
def _unreadable_reasons(source: str | Path | BinaryIO | None = None):
    """Turn whatever PIL raises on a bad file into :class:`UnreadableImageError` with a reason;
    ``source`` is the file, to say the size of one over PIL's pixel limit."""
    # Importing gluoncv sets this process-wide to True (gluoncv/data/mhp.py), and PIL then
    # pads a truncated or damaged file with grey instead of raising: refuse such files.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    except UnreadableImageError:
        raise
    except FileNotFoundError:
        raise UnreadableImageError("file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        size = unchecked_size(source) if source is not None else None
        raise UnreadableImageError(too_many_pixels(size)) from None
    except Image.UnidentifiedImageError:
        raise UnreadableImageError("not an image (no image format recognizes it)") from None
    except Exception as err:  # noqa: BLE001  PIL raises many types on corrupt data
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise UnreadableImageError(
            f"cannot decode ({type(err).__name__}{': ' + detail if detail else ''})"
        ) from None


# The transposes that show a photo as its EXIF Orientation (2-8) says it is viewed: those of
# ImageOps.exif_transpose, without its rewriting of the metadata, which can raise on an odd EXIF
# block (and lose a good photo) and which a decoded training image does not keep anyway.
_ORIENTATION_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright_rgb(img: Image.Image) -> Image.Image:
    """Decode ``img``'s pixels as 8-bit RGB, turned as its EXIF Orientation says."""
    img.load()
    rgb = _as_rgb(img)
    turn = _ORIENTATION_TRANSPOSES.get(_exif_orientation(img))
    return rgb if turn is None else rgb.transpose(turn)


def _exif_orientation(img: Image.Image) -> int:
    """The EXIF (or XMP) Orientation tag; 1 (as stored) when absent or unreadable."""
    try:
        return img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001  a damaged EXIF block must not lose good pixels
        return 1


def _as_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return Image.fromarray(_to_8bit(img)).convert("RGB")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: transparent pixels have arbitrary colour underneath.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> np.ndarray:
    """The uint8 grey levels of a one-channel integer (``I;16*``, ``I``) or float (``F``) image.

    Scaled by the range of the sample type, never by the image's own extremes, so a dark image
    stays dark and the same pixels give the same result in every file format:

    - integers: the top 8 of the bits the file declares (16-bit: ``>> 8``, which is also what
      Pillow does to 16-bit RGB); for signed types the range is ``0 .. 2**(bits-1) - 1`` and
      negative values are black. See :func:`_integer_depth` for what each format declares.
    - float: ``0 .. 1`` is black to white (the convention of float images in PFM, TIFF and
      scikit-image); values outside are clipped, NaN is black.
    """
    pixels = np.asarray(img)
    if img.mode == "F":
        return np.round(np.clip(np.nan_to_num(pixels, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    bits, signed = _integer_depth(img)
    if not signed and pixels.dtype == np.int32:
        pixels = pixels.view(np.uint32)  # Pillow holds unsigned 32-bit samples as int32
    shift = max(0, bits - signed - 8)
    return np.clip(pixels >> shift, 0, 255).astype(np.uint8)


def _integer_depth(img: Image.Image) -> tuple[int, bool]:
    """``(bits per sample, signed)`` of an integer-mode image, as its file declares them.

    ``I;16*`` modes hold unsigned 16-bit samples. Pillow widens the others to ``I`` (32-bit
    signed): a TIFF declares its bits and sign in its tags (16 or 32, signed or not); a PGM/PPM
    with a maxval over 255 is rescaled by Pillow to ``0 .. 65535``, so 16 bits; anything else
    in ``I`` (a FITS or IM file, an array made with ``Image.fromarray``) is signed 32-bit.
    """
    if img.format == "TIFF" and hasattr(img, "tag_v2"):
        bits = _first(img.tag_v2.get(258))  # BitsPerSample
        sample_format = _first(img.tag_v2.get(339))  # SampleFormat: 1 unsigned, 2 signed
        if isinstance(bits, int) and 8 < bits <= 32:
            return bits, sample_format == 2
    if img.mode.startswith("I;16") or img.format == "PPM":
        return 16, False
    return 32, True


def _first(value):
    """A TIFF tag's value, or the first of its per-channel values."""
    return value[0] if isinstance(value, tuple) and value else value


@functools.cache
def image_extensions() -> frozenset[str]:
    """Every file extension (lower case, with its dot) of a format Pillow decodes here.

    ``.jpg .jpeg .jpe .jfif .png .apng .webp .gif .bmp .tif .tiff .pgm .ppm .pnm .pfm .ico .psd
    .tga .qoi .jp2 .mpo`` and more: every format Pillow opens, less :data:`UNDECODED_FORMATS`;
    save-only ones (``.pdf``) are not among them.
    """
    registered = Image.registered_extensions()  # imports every plugin, which fills Image.OPEN
    # MPO (a stereo camera's JPEG) is registered for saving only; the JPEG plugin opens it.
    decodable = ({*Image.OPEN} | {"MPO"}) - UNDECODED_FORMATS
    return frozenset(ext for ext, fmt in registered.items() if fmt in decodable)

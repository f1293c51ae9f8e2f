"""Image decoding and ``pixel_values`` exactly as Meta's processor computes them, without torch.

Meta (``sam3/model/sam3_image_processor.py``) does ``to_image`` -> ``Resize((S, S))`` on the uint8
tensor (torchvision v2: bilinear, antialias=True) -> ``ToDtype(float32, scale=True)`` ->
``Normalize(0.5, 0.5)``. On uint8 input torch's antialiased bilinear runs in fixed point
(``_compute_index_ranges_int16_weights`` + ``basic_loop_aa_horizontal/vertical<uint8_t>`` in
``aten/src/ATen/native/cpu/UpSampleKernel.cpp``; the AVX2 kernel computes the same integers):
PIL-style support-scaled triangle weights normalised in float64, rounded to int16 at the largest
precision whose biggest weight still fits, a horizontal pass then a vertical pass with an
intermediate uint8 image (round half up, clamp). :func:`resize_uint8_aa` reimplements that in
numpy integer arithmetic; it matches torchvision bit for bit (tests/engines/test_preprocess.py).
Pillow's BILINEAR uses the same filter but 22-bit weights: measured up to 2/255 off torchvision
(480x640 -> 1008), which is why we do not simply call ``Image.resize``. Resizing in float instead
of uint8 differs by up to 0.0078 after normalisation (measured on the same 480x640 image).

Decoding refuses over-limit images from the header, before any pixel is decoded.
"""

from __future__ import annotations

import hashlib
import io
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from engines.bundle import Preprocessing
from engines.errors import BundleError, ImageTooLarge, InvalidImage, UnsupportedImageType
from engines.options import DEFAULT_MAX_MEGAPIXELS
from engines.types import LoadedImage

ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike, np.ndarray, Image.Image]

SUPPORTED_RESIZE = "bilinear_antialias_uint8"

# Our own limit (max_megapixels, checked from the header on every path) replaces Pillow's global
# guard, which warns at ~89 MP and raises at ~179 MP inside Image.open: left on, it would refuse
# images a larger configured limit allows and report them as undecodable rather than too large.
Image.MAX_IMAGE_PIXELS = None


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def load_image(source: ImageSource, *, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
               image_id: str | None = None) -> LoadedImage:
    """Decode ``source`` to RGB uint8 after EXIF orientation; typed errors for bad input.

    ``image_id`` is the sha256 of the encoded bytes (files and bytes) so that re-sending the same
    file hits the embedding cache; for arrays it hashes the pixel buffer plus its shape/dtype.
    A caller that already hashed the bytes passes ``image_id`` so they are not hashed twice.
    """
    if isinstance(source, np.ndarray):
        pixels = _array_to_rgb(source)
        _check_size(pixels.shape[1], pixels.shape[0], max_megapixels)
        return LoadedImage(pixels=pixels, image_id=_array_id(pixels))
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, max_megapixels)
        try:
            pixels = _oriented(_pil_to_rgb(source), _orientation(source))
        except (OSError, ValueError, SyntaxError, EOFError) as exc:  # a lazily opened, broken file
            raise InvalidImage(f"the image cannot be decoded: {exc}") from exc
        return LoadedImage(pixels=pixels, image_id=_array_id(pixels))
    if isinstance(source, (str, os.PathLike)):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise InvalidImage(f"cannot read image file {source}: {exc.strerror or exc}") from exc
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise UnsupportedImageType(f"cannot load an image from {type(source).__name__}")
    return decode_image_bytes(data, max_megapixels=max_megapixels, image_id=image_id)


def decode_image_bytes(data: bytes, *, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
                       image_id: str | None = None) -> LoadedImage:
    """Decode encoded bytes. ``image_id``: the bytes' sha256 when the caller already has it (the
    server hashes first, to look the cache up before decoding), so it is not computed twice."""
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except UnidentifiedImageError:
        raise InvalidImage("the bytes are not an image in a format this server can decode") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(f"cannot read the image header: {exc}") from exc
    with image:
        _check_size(image.width, image.height, max_megapixels)  # before image.load()
        try:
            image.load()
            # EXIF orientation on the RGB array (views, one copy): Pillow's exif_transpose would
            # copy the decoded image even when it is upright (4 bytes per pixel).
            pixels = _oriented(_pil_to_rgb(image), _orientation(image))
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            # truncated files raise OSError("image file is truncated ...")
            raise InvalidImage(f"the image cannot be decoded ({image.format}): {exc}") from exc
    return LoadedImage(pixels=pixels, image_id=image_id or hashlib.sha256(data).hexdigest())


def _check_size(width: int, height: int, max_megapixels: float) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImage(f"the image has no pixels ({width}x{height})")
    if width * height > max_megapixels * 1e6:
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height / 1e6:.1f} MP, over the {max_megapixels:g} MP limit"
        )


# Decoding converts in bands of about this many pixels, so a conversion's temporaries (float64
# for 16-bit images: 8 bytes per pixel) are bounded instead of a multiple of the image.
_BAND_PIXELS = 1 << 18


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode to RGB uint8. 16-bit and 32-bit modes are rescaled, never clipped.

    Peak memory: the decoded image plus the 3-byte output, plus one band (a 40 MP JPEG measured
    573 MB converted whole, 14 bytes per pixel, and a 16-bit PNG of that size over 1 GB)."""
    width, height = image.size
    rows = max(1, _BAND_PIXELS // max(width, 1))
    bands = [(y, min(height, y + rows)) for y in range(0, height, rows)]
    convert = _band_converter(image, bands)
    out = np.empty((height, width, 3), dtype=np.uint8)
    for top, bottom in bands:
        out[top:bottom] = convert(image.crop((0, top, width, bottom)))
    return out


def _band_converter(image: Image.Image, bands: list[tuple[int, int]]) -> Callable[[Image.Image], np.ndarray]:
    """The per-band conversion of ``image``'s mode; whole-image statistics computed first."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return lambda band: _gray_float_to_rgb(np.asarray(band).astype(np.float64) / 65535.0)
    if mode in ("I", "F"):
        low, high = np.inf, -np.inf
        for top, bottom in bands:
            arr = np.asarray(image.crop((0, top, image.width, bottom)))
            if arr.size:
                low, high = min(low, float(np.nanmin(arr))), max(high, float(np.nanmax(arr)))
                if mode == "I":
                    high = max(high, float(np.abs(arr).max()))
        if mode == "I":
            # PNG 16-bit gray decodes to mode "I" with values 0..65535; anything wider is scaled by its max.
            top_value = 65535.0 if low >= 0 and high <= 65535 or low > high else high
            return lambda band: _gray_float_to_rgb(np.asarray(band).astype(np.float64) / top_value)
        scale = 1.0 if low <= high and low >= 0 and high <= 1 else 255.0
        return lambda band: _gray_float_to_rgb(np.nan_to_num(np.asarray(band, dtype=np.float64)) / scale)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent pixels keep their colour (no compositing), as PIL's convert("RGB") and
        # torchvision's decode do: the reference saw the same RGB values.
        return lambda band: np.asarray(band.convert("RGBA").convert("RGB"), dtype=np.uint8)
    if mode == "RGB":
        return lambda band: np.asarray(band, dtype=np.uint8)
    return lambda band: np.asarray(band.convert("RGB"), dtype=np.uint8)  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except (ValueError, TypeError, SyntaxError):  # unreadable EXIF: as Pillow, show it as stored
        return 1


def _oriented(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """``ImageOps.exif_transpose`` on an [H, W, 3] array (EXIF orientation 1-8)."""
    flips = {
        2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
        3: lambda a: a[::-1, ::-1],  # ROTATE_180
        4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
        5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
        6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # ROTATE_270
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # TRANSVERSE
        8: lambda a: a.transpose(1, 0, 2)[::-1],  # ROTATE_90
    }
    flip = flips.get(orientation)
    return pixels if flip is None else np.ascontiguousarray(flip(pixels))


def _gray_float_to_rgb(gray: np.ndarray) -> np.ndarray:
    u8 = np.clip(np.rint(gray * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(u8[:, :, None], 3, axis=2)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx3, HxWx4 arrays (uint8, uint16, float in [0, 1]) to RGB uint8 (assumed RGB order)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InvalidImage(f"an image array must be HxW or HxWx{{1,3,4}}, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidImage(f"the image has no pixels ({array.shape[1]}x{array.shape[0]})")
    if array.dtype == np.uint8:
        out = array
    elif array.dtype == np.uint16:
        out = np.clip(np.rint(array.astype(np.float64) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidImage("the image array contains NaN or infinity")
        out = np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    elif array.dtype == np.bool_:
        out = array.astype(np.uint8) * 255
    else:
        raise InvalidImage(f"unsupported image array dtype {array.dtype}")
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return np.ascontiguousarray(out[:, :, :3])


def _array_id(pixels: np.ndarray) -> str:
    digest = hashlib.sha256(f"{pixels.shape}|{pixels.dtype}|".encode())
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Resize + normalise
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _aa_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """torch's uint8 antialiased-bilinear taps for one axis: (indices [out, K], int weights [out, K], precision).

    Port of ``HelperInterpBase::_compute_indices_min_size_weights_aa`` and
    ``_compute_index_ranges_int16_weights`` (align_corners=False, no explicit scale).
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # interp_size (2) * 0.5, widened when downscaling
    taps = int(np.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    index = np.zeros((out_size, taps), dtype=np.intp)
    weight = np.zeros((out_size, taps), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)  # C++ truncation toward zero
        xsize = min(int(center + support + 0.5), in_size) - xmin
        xsize = min(max(xsize, 0), taps)
        j = np.arange(xsize)
        w = np.maximum(0.0, 1.0 - np.abs((j + xmin - center + 0.5) * invscale))  # triangle filter
        total = w.sum()
        if total != 0.0:
            w = w / total
        weight[i, :xsize] = w
        index[i, :xsize] = xmin + j
        index[i, xsize:] = xmin  # zero-weight padding taps
    wt_max = float(weight.max())
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    int_weight = np.floor(weight * (1 << precision) + 0.5).astype(np.int32)  # weights are >= 0
    return index, int_weight, precision


def _resample_axis(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    index, weight, precision = _aa_weights(image.shape[axis], out_size)
    shape = [1] * image.ndim
    shape[axis] = out_size
    acc = np.full(
        [out_size if a == axis else s for a, s in enumerate(image.shape)], 1 << (precision - 1), np.int32
    )
    for k in range(index.shape[1]):
        # int32 is exact: sum(weights) ~ 2**precision <= 2**22, times 255 < 2**31
        acc += np.take(image, index[:, k], axis=axis).astype(np.int32) * weight[:, k].reshape(shape)
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_uint8_aa(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision ``Resize((height, width), antialias=True)`` on a uint8 HxWxC image, bit-exact."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"expected an HxWxC uint8 image, got {pixels.dtype} {pixels.shape}")
    out = pixels
    if out.shape[1] != width:  # horizontal pass first, as torch does
        out = _resample_axis(out, width, axis=1)
    if out.shape[0] != height:
        out = _resample_axis(out, height, axis=0)
    return out if out is not pixels else pixels.copy()


def to_pixel_values(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [1, 3, S, S] as Meta's ``Sam3Processor.transform``."""
    if prep.resize != SUPPORTED_RESIZE:
        raise BundleError(f"preprocessing resize {prep.resize!r} is not supported (expected {SUPPORTED_RESIZE!r})")
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InvalidImage(f"expected RGB uint8 pixels [H, W, 3], got {pixels.dtype} {pixels.shape}")
    size = int(prep.image_size)
    resized = resize_uint8_aa(pixels, size, size)
    chw = np.ascontiguousarray(resized.transpose(2, 0, 1)).astype(np.float32)
    # torchvision: image.to(float32).mul_(1 / 255); normalize: sub_(mean).div_(std), all in float32
    chw *= np.float32(prep.rescale_factor)
    mean = np.asarray(prep.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(prep.std, dtype=np.float32).reshape(3, 1, 1)
    chw -= mean
    chw /= std
    return chw[None]

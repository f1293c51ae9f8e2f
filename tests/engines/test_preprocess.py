"""load_image / to_pixel_values against Meta's torchvision v2 transform; image modes; bad inputs."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from engines.bundle import Preprocessing
from engines.errors import ImageTooLarge, InvalidImage, UnsupportedImageType
from engines.preprocess import load_image, resize_uint8_aa, to_pixel_values


def _meta_pixel_values(pixels: np.ndarray, size: int) -> np.ndarray:
    """Meta's Sam3Processor.transform (sam3/model/sam3_image_processor.py), verbatim."""
    torch = pytest.importorskip("torch")
    v2 = pytest.importorskip("torchvision.transforms.v2")
    transform = v2.Compose(
        [
            v2.ToDtype(torch.uint8, scale=True),
            v2.Resize(size=(size, size)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        ]
    )
    return transform(v2.functional.to_image(pixels)).unsqueeze(0).numpy()


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients + noise + hard edges: exercises rounding everywhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], axis=2)
    img = img + rng.normal(0, 20, img.shape)
    img[h // 3 : h // 2, w // 4 : w // 2] = [250, 10, 128]
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "shape, size",
    [
        ((480, 640), 1008),  # upscale, landscape
        ((1500, 1100), 1008),  # downscale, portrait
        ((2000, 3001), 1008),  # downscale, odd size
        ((1008, 1008), 1008),  # identity
        ((1, 1), 252),  # 1x1
        ((17, 900), 252),  # extreme aspect: up in H, down in W
        ((300, 200), 252),  # SAM3-Small size
    ],
)
def test_pixel_values_equal_torchvision(shape: tuple[int, int], size: int) -> None:
    pixels = _photo(*shape)
    ours = to_pixel_values(pixels, Preprocessing(image_size=size))
    ref = _meta_pixel_values(pixels, size)
    assert ours.dtype == np.float32 and ours.shape == (1, 3, size, size)
    # measured: bit-exact (max abs diff 0.0) for every case here
    np.testing.assert_array_equal(ours, ref)


def test_random_noise_resize_bit_exact() -> None:
    torch = pytest.importorskip("torch")
    v2 = pytest.importorskip("torchvision.transforms.v2")
    rng = np.random.default_rng(3)
    for h, w, oh, ow in [(123, 457, 1008, 1008), (999, 77, 252, 300), (640, 480, 1000, 333)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = v2.Resize((oh, ow))(torch.from_numpy(img).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(resize_uint8_aa(img, oh, ow), ref)


def test_pillow_bilinear_is_not_exact() -> None:
    """Why resize_uint8_aa exists: Pillow's BILINEAR (22-bit weights) differs from torch (int16 weights)."""
    pixels = _photo(480, 640)
    pil = np.asarray(Image.fromarray(pixels).resize((1008, 1008), Image.BILINEAR))
    ours = resize_uint8_aa(pixels, 1008, 1008)
    diff = np.abs(pil.astype(int) - ours.astype(int))
    assert 0 < diff.max() <= 2


def test_transformers_processor_within_one_ulp() -> None:
    """transformers' Sam3ImageProcessor resizes the same way but fuses rescale+normalise ((x-127.5)/127.5)."""
    mod = pytest.importorskip("transformers.models.sam3.image_processing_sam3")
    pixels = _photo(375, 500)
    ref = mod.Sam3ImageProcessor()(images=Image.fromarray(pixels), return_tensors="np")["pixel_values"]
    ours = to_pixel_values(pixels, Preprocessing(image_size=1008))
    assert ref.shape == ours.shape
    assert np.abs(ref - ours).max() <= 2.5e-7


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_bytes_path_array_pil_agree(tmp_path: Path) -> None:
    pixels = _photo(40, 60)
    data = _encode(Image.fromarray(pixels), "PNG")
    (tmp_path / "x.png").write_bytes(data)
    from_bytes = load_image(data)
    from_path = load_image(tmp_path / "x.png")
    from_str = load_image(str(tmp_path / "x.png"))
    from_array = load_image(pixels)
    from_pil = load_image(Image.fromarray(pixels))
    for loaded in (from_bytes, from_path, from_str, from_array, from_pil):
        np.testing.assert_array_equal(loaded.pixels, pixels)
        assert loaded.pixels.dtype == np.uint8 and (loaded.width, loaded.height) == (60, 40)
    import hashlib

    assert from_bytes.image_id == from_path.image_id == hashlib.sha256(data).hexdigest()
    assert from_array.image_id == from_pil.image_id != from_bytes.image_id
    assert load_image(pixels[:, :30]).image_id != from_array.image_id


def test_exif_rotated_jpeg() -> None:
    stored = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide x 20 high
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    loaded = load_image(_encode(image, "JPEG", quality=95, exif=exif.tobytes()))
    assert (loaded.width, loaded.height) == (20, 40)
    expected = np.rot90(stored, k=-1)  # 90 CW: the red half ends up on top
    diff = np.abs(loaded.pixels.astype(int) - expected.astype(int))
    # away from the red/blue edge (JPEG chroma subsampling blurs it over a few rows)
    assert diff[:16].max() < 40 and diff[24:].max() < 40
    assert loaded.pixels[5, 10, 0] > 200 and loaded.pixels[35, 10, 2] > 200


def test_gray_rgba_palette_modes() -> None:
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))
    out = load_image(_encode(Image.fromarray(gray, "L"), "PNG")).pixels
    assert out.shape == (8, 64, 3)
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, 2))

    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 200, 30, 0  # fully transparent
    out = load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG")).pixels
    np.testing.assert_array_equal(out, rgba[..., :3])  # colour kept, as convert("RGB") does

    la = Image.fromarray(np.stack([gray, np.full_like(gray, 128)], 2), "LA")
    np.testing.assert_array_equal(load_image(_encode(la, "PNG")).pixels[..., 0], gray)

    pal = Image.fromarray(_photo(16, 16)).convert("P", palette=Image.ADAPTIVE, colors=8)
    out = load_image(_encode(pal, "PNG")).pixels
    np.testing.assert_array_equal(out, np.asarray(pal.convert("RGB")))
    pal.info["transparency"] = 0
    assert load_image(_encode(pal, "PNG", transparency=0)).pixels.shape == (16, 16, 3)

    gif = load_image(_encode(pal, "GIF")).pixels
    assert gif.shape == (16, 16, 3)


def test_16bit_png_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    ok, buf = cv2.imencode(".png", ramp)
    assert ok
    out = load_image(buf.tobytes()).pixels
    expected = np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out.max() == 255 and out.min() == 0 and len(np.unique(out)) > 200  # a clip would give {0, 255}

    ok, buf = cv2.imencode(".png", np.dstack([ramp, ramp, ramp]))  # 16-bit RGB
    out = load_image(buf.tobytes()).pixels
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1


def test_float_and_int32_modes() -> None:
    arr = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    out = load_image(_encode(Image.fromarray(arr, "F"), "TIFF")).pixels
    np.testing.assert_array_equal(out[..., 0], np.rint(arr * 255).astype(np.uint8))
    i32 = Image.fromarray((np.arange(64, dtype=np.int32) * 1000).reshape(8, 8), "I")
    out = load_image(_encode(i32, "TIFF")).pixels
    assert out.max() > 200 and out.dtype == np.uint8


def test_cmyk_jpeg() -> None:
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    out = load_image(_encode(cmyk, "JPEG", quality=95)).pixels
    assert out.shape == (16, 16, 3)
    assert out[..., 0].max() < 30 and out[..., 1].min() > 225 and out[..., 2].min() > 225


def test_one_by_one_is_valid() -> None:
    loaded = load_image(_encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"))
    assert loaded.pixels.tolist() == [[[1, 2, 3]]]
    assert to_pixel_values(loaded.pixels, Preprocessing(image_size=252)).shape == (1, 3, 252, 252)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny IDAT: nothing like its claimed pixels exists."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_from_header(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _png_header(30000, 30000)
    assert len(data) < 200
    loads = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(1))  # prove no decode happens
    with pytest.raises(ImageTooLarge) as err:
        load_image(data)
    assert "900.0 MP" in str(err.value) and not loads
    with pytest.raises(ImageTooLarge):
        load_image(_png_header(8000, 6000), max_megapixels=40)


def test_limit_is_configurable() -> None:
    data = _encode(Image.new("RGB", (100, 100)), "PNG")
    assert load_image(data, max_megapixels=0.01).width == 100
    with pytest.raises(ImageTooLarge):
        load_image(data, max_megapixels=0.0099)
    with pytest.raises(ImageTooLarge):
        load_image(np.zeros((100, 101, 3), np.uint8), max_megapixels=0.01)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"this is not an image",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 30,
        bytes(range(256)) * 4,
    ],
)
def test_undecodable_bytes(data: bytes) -> None:
    with pytest.raises(InvalidImage):
        load_image(data)


def test_zero_sized() -> None:
    with pytest.raises(InvalidImage):
        load_image(_png_header(0, 0))
    with pytest.raises(InvalidImage):
        load_image(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(InvalidImage):
        load_image(np.zeros((5, 0), np.uint8))


def test_truncated_jpeg() -> None:
    data = _encode(Image.fromarray(_photo(200, 300)), "JPEG", quality=90)
    with pytest.raises(InvalidImage, match="decoded"):
        load_image(data[: len(data) // 2])


def test_truncated_png_pixels() -> None:
    data = _encode(Image.fromarray(_photo(200, 300)), "PNG")
    with pytest.raises(InvalidImage):
        load_image(data[: len(data) - 2000])


def test_missing_file_and_bad_types(tmp_path: Path) -> None:
    with pytest.raises(InvalidImage):
        load_image(tmp_path / "nope.png")
    with pytest.raises(UnsupportedImageType):
        load_image(12345)  # type: ignore[arg-type]
    with pytest.raises(InvalidImage):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(InvalidImage):
        load_image(np.full((4, 4), np.nan, np.float32))


def test_pixel_values_input_checks() -> None:
    from engines.errors import BundleError

    with pytest.raises(InvalidImage):
        to_pixel_values(np.zeros((4, 4), np.uint8), Preprocessing(image_size=8))
    with pytest.raises(BundleError):
        to_pixel_values(np.zeros((4, 4, 3), np.uint8), Preprocessing(image_size=8, resize="nearest"))

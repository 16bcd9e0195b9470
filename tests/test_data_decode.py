"""Decoding: the zoo of odd but valid images decodes correctly, the bad ones raise BadImage with a reason."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from resnet.data.decode import BadImage, decode_image, image_size, to_gray


def _rgb(h=6, w=10):
    """An image whose pixel values say where they are (so rotations and flips are detectable)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([y * 20, x * 20, np.full_like(x, 128)], axis=-1).astype(np.uint8)


def test_rgb_png_exact(tmp_path):
    arr = _rgb()
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (3, 6, 10)
    assert np.array_equal(out, arr.transpose(2, 0, 1))


def test_grayscale_becomes_three_equal_channels_or_one(tmp_path):
    gray = (np.arange(60).reshape(6, 10) * 4).astype(np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out3 = decode_image(tmp_path / "g.png", 3)
    out1 = decode_image(tmp_path / "g.png", 1)
    assert out3.shape == (3, 6, 10) and all(np.array_equal(out3[c], gray) for c in range(3))
    assert out1.shape == (1, 6, 10) and np.array_equal(out1[0], gray)


def test_rgb_to_one_channel_is_luma(tmp_path):
    arr = _rgb()
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png", 1)
    expect = np.asarray(Image.fromarray(arr).convert("L"))
    assert np.abs(out[0].astype(int) - expect).max() <= 1
    assert np.abs(to_gray(arr.transpose(2, 0, 1))[0].astype(int) - expect).max() <= 1


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)  # pure red in CMYK
    out = decode_image(tmp_path / "c.jpg")
    assert out.shape == (3, 8, 8)
    r, g, b = (int(out[c].mean()) for c in range(3))
    assert r > 200 and g < 60 and b < 60


def test_palette_with_transparency_composited_on_white(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 255] + [255, 0, 0] + [0] * 762)  # index 0 blue (transparent), 1 red
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    out = decode_image(tmp_path / "p.png")
    assert tuple(out[:, 0, 0]) == (255, 0, 0)  # opaque red stays red
    assert tuple(out[:, 1, 1]) == (255, 255, 255)  # transparent blue becomes the white background


@pytest.mark.parametrize(
    "mode, transparent, opaque",
    [("L", 0, 200), ("RGB", (0, 0, 0), (200, 10, 10))],
)
def test_grey_and_rgb_png_with_a_trns_colour_composited_on_white(tmp_path, mode, transparent, opaque):
    # A tRNS chunk in an L or RGB PNG names one grey level or colour as transparent; it shows as the page.
    img = Image.new(mode, (3, 3), transparent)
    img.putpixel((1, 1), opaque)
    img.save(tmp_path / "t.png", transparency=transparent)
    out = decode_image(tmp_path / "t.png")
    assert tuple(out[:, 0, 0]) == (255, 255, 255)
    assert tuple(out[:, 1, 1]) == ((opaque,) * 3 if mode == "L" else opaque)


def test_rgba_alpha_composited(tmp_path):
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (10, 20, 30, 255)  # opaque
    arr[1, 1] = (0, 0, 0, 0)  # fully transparent black
    arr[0, 1] = (0, 0, 0, 128)  # half-transparent black over white: mid grey
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png")
    assert tuple(out[:, 0, 0]) == (10, 20, 30)
    assert tuple(out[:, 1, 1]) == (255, 255, 255)
    assert all(120 <= v <= 135 for v in out[:, 0, 1])


def test_16bit_grayscale_scaled_not_white(tmp_path):
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = decode_image(tmp_path / "d.png")
    assert out.shape == (3, 1, 4)
    assert list(out[0, 0]) == [0, 4, 128, 255]


def test_exif_rotated_jpeg_is_upright(tmp_path):
    arr = np.zeros((4, 8, 3), np.uint8)
    arr[:, :4] = 255  # white on the left half of a wide image
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = decode_image(tmp_path / "r.jpg")
    assert out.shape == (3, 8, 4)  # tall after rotation
    assert out[:, :3].mean() > 200 and out[:, 5:].mean() < 50  # the white half is now on top
    assert image_size(tmp_path / "r.jpg") == (8, 4)


@pytest.mark.parametrize("orientation", [1, 3, 5, 6, 7, 8])
def test_exif_rotated_tiff_size_is_the_decoded_size(tmp_path, orientation):
    """Pillow turns a TIFF upright itself and reports its upright size: the header probe that sizes the
    decode cache must agree with the decoder, or every rotated TIFF is squeezed into the wrong shape."""
    img = Image.fromarray(_rgb(6, 10))
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "r.tif", exif=exif)
    out = decode_image(tmp_path / "r.tif")
    assert out.shape == (3, 10, 6) if orientation >= 5 else (3, 6, 10)
    assert image_size(tmp_path / "r.tif") == out.shape[1:]
    # the same picture as a JPEG-free reference: the PNG with the same tag decodes to the same pixels
    img.save(tmp_path / "r.png", exif=exif)
    assert np.array_equal(decode_image(tmp_path / "r.png"), out)


def test_float_tiff_in_a_16_bit_range_is_scaled_not_white(tmp_path):
    arr = np.array([[0.0, 16384.0, 32768.0, 65535.0]], np.float32)
    Image.fromarray(arr, mode="F").save(tmp_path / "f.tif")
    assert decode_image(tmp_path / "f.tif")[0, 0].tolist() == [0, 64, 128, 255]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bad_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image\n")
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    # A PNG whose header claims 40000 x 40000 pixels (1.6 gigapixels) in a few dozen bytes.
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 100))
    (tmp_path / "bomb.png").write_bytes(bomb + _png_chunk(b"IEND", b""))
    return {
        "empty.jpg": "empty",
        "text.png": "not an image",
        "truncated.jpg": "cannot be decoded",
        "bomb.png": "decompression bomb",
    }


def test_bad_files_raise_badimage_with_reason(tmp_path):
    for name, words in _bad_files(tmp_path).items():
        with pytest.raises(BadImage) as err:
            decode_image(tmp_path / name)
        assert words in str(err.value), (name, str(err.value))


def test_pixel_limit_is_a_parameter(tmp_path):
    Image.fromarray(_rgb(20, 20)).save(tmp_path / "a.png")
    assert decode_image(tmp_path / "a.png", max_pixels=400).shape == (3, 20, 20)
    with pytest.raises(BadImage, match="limit of 399"):
        decode_image(tmp_path / "a.png", max_pixels=399)


def test_draft_mode_decodes_a_smaller_jpeg_but_never_below_the_request(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 320, 3), dtype=np.uint8)).save(
        tmp_path / "big.jpg", quality=90
    )
    full = decode_image(tmp_path / "big.jpg")
    small = decode_image(tmp_path / "big.jpg", draft_size=(60, 60))
    assert full.shape == (3, 256, 320)
    assert small.shape == (3, 64, 80)  # 1/4 scale: the smallest DCT scale still >= 60 on both sides

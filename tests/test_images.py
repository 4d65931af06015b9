"""Image files are seen as displayed: the EXIF orientation read from the header gives the size the decoder returns."""

import io
import struct
import zlib

import pytest
from PIL import Image

from focusdpo.images import displayed_size, open_upright


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_late_exif(orientation: int, corrupt_pixels: bool = False) -> bytes:
    """A 16x24 PNG whose eXIf chunk comes after the pixel data (the PNG standard allows it; PIL reads it only when
    decoding); ``corrupt_pixels``: the compressed pixel data is garbled (its chunk's length and CRC kept), so any
    decode fails."""
    buffer = io.BytesIO()
    Image.effect_noise((16, 24), 64).convert("RGB").save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    if corrupt_pixels:
        start = data.index(b"IDAT") + 4
        data[start:start + 200] = bytes(b ^ 0xFF for b in data[start:start + 200])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return bytes(data[:-12]) + chunk(b"eXIf", exif.tobytes()) + bytes(data[-12:])  # eXIf before IEND


@pytest.mark.parametrize("orientation, shown", [(1, (16, 24)), (3, (16, 24)), (6, (24, 16)), (8, (24, 16))])
def test_a_late_exif_orientation_is_read_from_the_chunk_headers(orientation, shown):
    data = png_with_late_exif(orientation)
    source = io.BytesIO(data)
    with Image.open(source) as image:
        assert image.size == (16, 24) and displayed_size(image, source) == shown
    assert open_upright(io.BytesIO(data)).size == shown  # the decoder agrees


def test_the_displayed_size_decodes_no_pixels():
    data = png_with_late_exif(6, corrupt_pixels=True)
    source = io.BytesIO(data)
    with Image.open(source) as image:
        assert displayed_size(image, source) == (24, 16)
    with pytest.raises(OSError):
        open_upright(io.BytesIO(data))

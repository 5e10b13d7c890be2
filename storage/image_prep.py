"""Images with alpha composited on white before img2dataset sees them, in integers, in bounded memory.

img2dataset's resizer decodes with ``cv2.IMREAD_UNCHANGED`` and, for a four-channel result, mattes on
white in float64 (``rint(clip(a / 255 * c + 255 - a))``): about 60 bytes per pixel at its peak, so a
6000x6000 RGBA PNG of 140 KB costs some 2 GB. :func:`flatten_alpha` does the same compositing with
the same decode, row by row in 16-bit integers, and hands img2dataset a binary PPM, which it decodes
as three channels (so its matting never runs): the picture img2dataset would store, at a few bytes
per pixel. The caller checks the area from the header first: this decodes the whole image.
"""
from __future__ import annotations

import io

# numpy, Pillow and OpenCV are imported where they are used: storage.download imports this module,
# and the CLI imports storage.download for its constants.

_CHUNK_PIXELS = 1 << 20  # pixels composited at a time: a few MB of temporaries
_MAX8 = 255
_MAX16 = 65535


def flatten_alpha(img_stream) -> io.BytesIO | None:
    """An image with an alpha channel, composited on white, as a binary PPM; None: left as it is.

    ``img_stream`` is a seekable binary stream (img2dataset's ``io.BytesIO``); it is read from its
    start and left at position 0.

    None (img2dataset then handles the stream as before) when Pillow, reading the header only, sees no
    alpha band and no transparency, or cannot identify the image; or when ``cv2.imdecode(...,
    IMREAD_UNCHANGED)`` -- img2dataset's own decode -- fails, gives fewer than four channels (a grey
    PNG with a tRNS chunk, say), or gives a depth other than 8 or 16 bits.

    Otherwise a new ``io.BytesIO`` at position 0: a PPM (``P6``, maxval 255) of the same width and
    height, 8 bits per channel, RGB, alpha gone. Its pixels:

    - 8-bit sources (RGBA, LA, palette or RGB with tRNS, WebP, TIFF, BMP with alpha...):
      ``round(c * a / 255 + 255 - a)`` per channel, exactly img2dataset's value (no ties: 255 is odd).
    - 16-bit sources: the composite at 16-bit precision scaled to 8 bits,
      ``round((c * a / 65535 + 65535 - a) / 257)``. img2dataset's matting takes alpha as 0..255 here
      and gives a near-white picture; this is the picture itself.

    Memory: the decoded four-channel image plus one RGB uint8 image (7 bytes a pixel at 8 bits, 11 at
    16), then the PPM (3 bytes a pixel) which img2dataset reads without a copy and decodes once more
    (3 bytes a pixel).
    """
    from PIL import Image

    img_stream.seek(0)
    try:
        with Image.open(img_stream) as im:
            has_alpha = "transparency" in im.info or any(band in ("A", "a") for band in im.getbands())
    except Exception:  # noqa: BLE001 - not ours to classify: img2dataset decodes it and says what failed
        has_alpha = False
    img_stream.seek(0)
    if not has_alpha:
        return None
    rgb = _decoded_on_white(img_stream.read())
    img_stream.seek(0)
    if rgb is None:
        return None
    height, width = rgb.shape[:2]
    # bytes + buffer is one copy; io.BytesIO shares a bytes object, and its whole read() returns it.
    return io.BytesIO(b"P6\n%d %d\n255\n" % (width, height) + memoryview(rgb))


def _decoded_on_white(data: bytes):
    """The image decoded as img2dataset decodes it, composited on white: (H, W, 3) uint8 RGB, or None."""
    import cv2
    import numpy as np
    from img2dataset.resizer import SuppressStdoutStderr

    try:
        with SuppressStdoutStderr():  # as img2dataset: decoders' warnings stay off the terminal
            cv2.setNumThreads(1)
            bgra = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except Exception:  # noqa: BLE001 - img2dataset decodes it again and reports the error itself
        return None
    if bgra is None or bgra.ndim != 3 or bgra.shape[2] != 4 or bgra.dtype not in (np.uint8, np.uint16):
        return None
    height, width = bgra.shape[:2]
    rgb = np.empty((height, width, 3), np.uint8)
    composite = _on_white_8 if bgra.dtype == np.uint8 else _on_white_16
    rows = max(1, _CHUNK_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        chunk = bgra[top:top + rows]
        composite(chunk[..., 2::-1], chunk[..., 3:4], rgb[top:top + rows])
    return rgb


def _on_white_8(colour, alpha, out) -> None:
    """``out = round(c * a / 255 + 255 - a)`` = ``(255 * 255 + 127 - a * (255 - c)) // 255``, all in uint16."""
    import numpy as np

    t = np.subtract(_MAX8, colour, dtype=np.uint16)
    t *= alpha
    np.subtract(_MAX8 * _MAX8 + _MAX8 // 2, t, out=t)
    t //= _MAX8
    out[...] = t


def _on_white_16(colour, alpha, out) -> None:
    """``out = round((c * a / 65535 + 65535 - a) / 257)``: 65535 * 257 divides, in uint64."""
    import numpy as np

    divisor = _MAX16 * (_MAX16 // _MAX8)
    t = np.subtract(_MAX16, colour, dtype=np.uint64)
    t *= alpha
    np.subtract(_MAX16 * _MAX16 + divisor // 2, t, out=t)
    t //= divisor
    out[...] = t

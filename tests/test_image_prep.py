"""flatten_alpha: images with alpha composited on white in integers, the same picture img2dataset stores.

Each kind of alpha (RGBA, LA, palette and RGB with tRNS, WebP; every (alpha, colour) pair of 8 bits)
goes through img2dataset's real Resizer twice, as it is and flattened: the outputs are the same bytes.
16-bit alpha is checked against the composite computed in float64 here. Images without alpha are
left alone. Memory: benchmarks/alpha_memory.py, a 6000x6000 RGBA PNG resized in fresh processes.
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from img2dataset.resizer import Resizer
from PIL import Image

from storage.image_prep import flatten_alpha

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lossless and whole (the composite itself, pixel for pixel), and as ccrk acquires (resized to JPEG).
RESIZERS = {"png-whole": Resizer(image_size=0, resize_mode="no", resize_only_if_bigger=False,
                                 encode_format="png", encode_quality=1),
            "jpg-border": Resizer(image_size=100, resize_mode="border", resize_only_if_bigger=False)}


def _every_pair() -> np.ndarray:
    """256x256 RGBA: alpha = the row, the colour channels the column, its inverse and noise."""
    alpha, colour = np.mgrid[0:256, 0:256].astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    return np.stack([colour, 255 - colour, noise, alpha], axis=-1)


def _encoded(im: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _alpha_images() -> dict[str, bytes]:
    rgba = Image.fromarray(_every_pair(), "RGBA")
    palette = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return {"rgba": _encoded(rgba), "la": _encoded(rgba.convert("LA")),
            "p-trns": _encoded(palette, transparency=bytes(range(0, 256, 4))),
            "rgb-trns": _encoded(rgba.convert("RGB"), transparency=(0, 255, 7)),
            "webp-rgba": _encoded(rgba, "WEBP", lossless=True)}


ALPHA = _alpha_images()


def _decoded(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("resizer", RESIZERS)
@pytest.mark.parametrize("kind", ALPHA)
def test_resizer_output_is_the_same_flattened_or_not(kind, resizer):
    original = io.BytesIO(ALPHA[kind])
    flat = flatten_alpha(original)
    assert flat is not None and original.tell() == 0 and flat.tell() == 0
    assert flat.read(2) == b"P6"
    want, got = RESIZERS[resizer](io.BytesIO(ALPHA[kind])), RESIZERS[resizer](flat)
    assert want[-1] is None and got[-1] is None
    assert got[1:] == want[1:]  # sizes, original sizes, no error
    assert got[0] == want[0], np.abs(_decoded(got[0]).astype(int) - _decoded(want[0])).max()


def test_every_8_bit_pair_is_img2dataset_s_rounding_of_the_composite():
    flat = flatten_alpha(io.BytesIO(ALPHA["rgba"]))
    rgb = np.asarray(Image.open(flat))
    src = _every_pair().astype(np.float64)
    a = src[..., 3:]
    assert np.array_equal(rgb, np.rint(src[..., :3] * a / 255 + 255 - a))
    assert (rgb[0] == 255).all() and np.array_equal(rgb[255], _every_pair()[255, :, :3])


def test_16_bit_alpha_is_the_composite_at_16_bits_in_8_bits():
    rng = np.random.default_rng(1)
    bgra = rng.integers(0, 65536, (60, 80, 4), dtype=np.uint16)
    bgra[:10, :, 3], bgra[10:20, :, 3] = 0, 65535
    flat = flatten_alpha(io.BytesIO(cv2.imencode(".png", bgra)[1].tobytes()))
    rgb = np.asarray(Image.open(flat)).astype(np.float64)
    colour, a = bgra[..., 2::-1].astype(np.float64), bgra[..., 3:].astype(np.float64)
    want = (colour * a / 65535 + 65535 - a) / 257
    assert np.abs(rgb - want).max() <= 0.5 + 1e-9  # rounded to the nearest level
    assert (rgb[:10] == 255).all()


@pytest.mark.parametrize("kind", ["rgb-png", "jpeg", "p-png", "grey-trns", "grey16", "not-an-image", "empty"])
def test_images_without_alpha_are_left_as_they_are(kind):
    rgb = Image.fromarray(_every_pair()[..., :3], "RGB")
    data = {"rgb-png": _encoded(rgb), "jpeg": _encoded(rgb, "JPEG"),
            "p-png": _encoded(rgb.convert("P", palette=Image.Palette.ADAPTIVE)),
            # PIL sees the tRNS chunk; img2dataset's cv2 decodes one grey channel, no alpha: left alone.
            "grey-trns": _encoded(rgb.convert("L"), transparency=7),
            "grey16": cv2.imencode(".png", np.arange(4096, dtype=np.uint16).reshape(64, 64) * 16)[1].tobytes(),
            "not-an-image": b"<html>not found</html>", "empty": b""}[kind]
    stream = io.BytesIO(data)
    stream.seek(3 if data else 0)
    assert flatten_alpha(stream) is None
    assert stream.tell() == 0


def test_a_6000x6000_rgba_png_costs_a_fraction_of_img2dataset_s_memory():
    """The benchmark, in fresh processes: peak resident memory over a floor of the same imports."""
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "alpha_memory.py"), "--side", "6000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    print(out.stdout)
    over = {m[1]: int(m[2]) for m in re.finditer(r"^(img2dataset|flattened)\s+\d+\s+\d+\s+(\d+)", out.stdout, re.M)}
    assert set(over) == {"img2dataset", "flattened"}, out.stdout
    ratio, identical = re.search(r"^ratio=([\d.]+) identical=(\w+)$", out.stdout, re.M).groups()
    assert identical == "True", out.stdout
    assert over["img2dataset"] > 1000, out.stdout  # its float64 matting: some 2.5 GB
    assert float(ratio) < 0.5 and over["flattened"] < 600, out.stdout

"""Evaluation images kept out of pre-training: exclusion lists, the identities of a build's source
images, and the match between the two. This module knows no benchmark: the ccrk layer makes the
lists from a benchmark's files (:mod:`ccrk.evaluation.exclusion`).

An exclusion list is a parquet table (:data:`SCHEMA`) ``benchmark, split, kind, value``: one row per
identity of one evaluation image, ``kind`` one of :data:`KINDS` --

- ``coco_id`` / ``flickr_id``: the COCO image id or the Flickr photo id (decimal, no leading zeros);
- ``url``: the url it is published under, :func:`normalize_urls`-normalised;
- ``sha256``: of the image file's bytes;
- ``phash``: :func:`phash_image` of its pixels (16 hex digits).

A source image's identities (:func:`load_identities`, a DuckDB temp table ``ident``):

- ids: the source id of a source whose ids are COCO's or Flickr's (:data:`SOURCE_ID_KINDS`: coco,
  multi30k); the ``coco_id`` / ``flickr_id`` columns of ``images.parquet`` (Visual Genome's); ids
  written in its url
  (:func:`url_identities`: COCO's image urls, Flickr's static photo urls such as SBU's, whose number
  before ``_`` is the photo id -- Flickr30K's file name);
- ``url``: its url, normalised;
- ``sha256``: img2dataset's ``sha256`` status column -- the hash of the bytes as downloaded, before
  any resizing, so it equals the hash of the benchmark's file when the web served that file;
- ``phash``: of the image as stored, with img2dataset's border padding cut off (from the original
  width and height it records) so that it compares to the benchmark's original; computed once per
  finished source tar and cached beside it (:func:`tar_phashes`).

The match (:func:`match_exclusions`) is exact on ids, urls and sha256, and within ``max_distance``
differing bits on the pHash. pHash candidates come from a multi-block index instead of a cross
product: the 64 bits are cut into ``m`` blocks; two hashes within ``d`` bits differ in at most
``d // m`` bits in some block (pigeonhole), so every benchmark hash's block values with up to
``d // m`` bits flipped are joined with the source hashes' block values, and each candidate pair is
then checked on all 64 bits. Every pair within ``d`` bits is found -- none is missed -- whatever
``m`` (chosen to make the fewest rows for the two table sizes).
"""
from __future__ import annotations

import io
import itertools
import json
import math
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage import atomic
from storage.errors import CCRKError
from storage.sidecar import cached_beside
from storage.specs import MATCH_KINDS  # what a build may match on, in the order a match is attributed

KINDS = ("coco_id", "flickr_id", "url", "sha256", "phash")
KIND_OF = {"coco_id": "id", "flickr_id": "id", "url": "url", "sha256": "sha256", "phash": "phash"}
SCHEMA = pa.schema([("benchmark", pa.string()), ("split", pa.string()), ("kind", pa.string()),
                    ("value", pa.string())])
EXCLUSION_FILE = "exclusion.parquet"
# A source whose source_id is another dataset's image id (Multi30K's: the Flickr30K file name's stem,
# a photo id, also ``<photo id>_<secret>``).
SOURCE_ID_KINDS = {"coco": "coco_id", "multi30k": "flickr_id"}
# Image ids in urls, matched on the normalised url (lower case, no scheme): COCO's image server
# (train2014/COCO_train2014_000000391895.jpg, val2017/000000391895.jpg) and Flickr's static photo
# urls (static.flickr.com/2723/4385058960_b0f291553e.jpg, farm4.staticflickr.com/..., live.staticflickr.com/...).
URL_ID_PATTERNS = {
    "coco_id": r"^(?:[a-z0-9-]+\.)*cocodataset\.org/(?:[a-z]+\d{4}/)?(?:coco_[a-z]+\d{4}_)?0*(?P<id>\d+)\.jpg$",
    "flickr_id": r"^(?:[a-z0-9-]+\.)*static\.?flickr\.com/(?:\d+/)*0*(?P<id>\d+)_[0-9a-z]+(?:_[0-9a-z]+)?\.[a-z]+$",
}

HASH_SIDE = 32  # the grey image the DCT is taken of
HASH_LOW = 8    # the low-frequency block kept: 8 x 8 = 64 bits


# ---------------------------------------------------------------------------- perceptual hash


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: ``D @ x`` is the DCT of the column ``x``."""
    k, x = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


_DCT = _dct_matrix(HASH_SIDE)[:HASH_LOW]


def _grey(img, box: tuple[int, int, int, int] | None) -> tuple:
    """``img`` decoded in grey -- a JPEG at the smallest DCT scale that still gives 32 pixels across
    ``box`` (PIL's ``draft``: a few times faster, the same low frequencies) -- and ``box`` scaled to it."""
    width, height = img.size
    left, top, right, bottom = box or (0, 0, width, height)
    if getattr(img, "format", None) == "JPEG":
        img.draft("L", (math.ceil(width * HASH_SIDE / max(1, right - left)),
                        math.ceil(height * HASH_SIDE / max(1, bottom - top))))
    sx, sy = img.size[0] / width, img.size[1] / height
    scaled = (round(left * sx), round(top * sy), round(right * sx), round(bottom * sy))
    return img.convert("L"), scaled


def _hash_grey(grey) -> int:
    from PIL import Image

    pixels = np.asarray(grey.resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BOX), dtype=np.float64)
    coeffs = (_DCT @ pixels @ _DCT.T).ravel()
    bits = coeffs > np.median(coeffs[1:])
    return int(np.packbits(bits).view(">u8")[0])


def phash_image(img, box: tuple[int, int, int, int] | None = None) -> int:
    """The 64-bit DCT perceptual hash of a PIL image (``box``: only that part, (left, top, right,
    bottom) in pixels): grey, area-averaged to 32 x 32, the 8 x 8 lowest frequencies of its 2-D DCT,
    one bit each for whether a coefficient is above the median of the 63 but the DC term (bit 63
    is the first coefficient)."""
    grey, scaled = _grey(img, box)
    return _hash_grey(grey if box is None else grey.crop(scaled))


def phash_bytes(data: bytes) -> int | None:
    """:func:`phash_image` of encoded image bytes; None when they do not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return phash_image(img)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def content_box(width: int, height: int, original_width, original_height) -> tuple[int, int, int, int] | None:
    """Where the picture lies in an image img2dataset resized to ``width`` x ``height`` from
    ``original_width`` x ``original_height`` with its border mode (scaled to fit, then padded to
    the centre), or None when it fills the image (no padding: keep_ratio, no resize, same aspect)."""
    if not original_width or not original_height:
        return None
    scale = min(width / original_width, height / original_height)
    cw, ch = min(width, round(original_width * scale)), min(height, round(original_height * scale))
    if cw >= width and ch >= height or cw < 1 or ch < 1:
        return None
    left, top = (width - cw) // 2, (height - ch) // 2
    return left, top, left + cw, top + ch


def _flat_margins(grey, box: tuple[int, int, int, int]) -> bool:
    """Whether everything outside ``box`` of a grey image is one flat colour (padding), not picture:
    a centre-cropped image of the same size has no such margins and is hashed whole."""
    a = np.asarray(grey, dtype=np.int16)
    left, top, right, bottom = box
    values = np.concatenate([m.ravel() for m in (a[:top], a[bottom:], a[:, :left], a[:, right:]) if m.size])
    return values.size == 0 or float(np.abs(values - np.median(values)).mean()) < 8.0


def stored_phash(data: bytes, meta: dict) -> int | None:
    """:func:`phash_image` of a stored source image (img2dataset's jpg and its json), its border
    padding cut off so that it compares with the original; None when it does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            box = content_box(img.size[0], img.size[1], meta.get("original_width"), meta.get("original_height"))
            grey, scaled = _grey(img, box)
            if box is not None and _flat_margins(grey, scaled):
                grey = grey.crop(scaled)
            return _hash_grey(grey)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


PHASH_CACHE = 1  # the format of the cached tar pHashes (bump to ignore old caches)


def tar_phashes(tar: str) -> tuple[list[str], list[str]]:
    """(member keys, pHashes in hex) of the images of a finished img2dataset tar, cached beside it in
    ``.<name>.phash.json`` (:func:`storage.sidecar.cached_beside`). Read in one pass, each image
    hashed as soon as its json is read too (memory holds a sample or two); a damaged tail ends it."""
    def compute(path: str) -> dict:
        pending: dict[str, dict] = {}
        keys, hashes = [], []
        try:
            with tarfile.open(path, "r:") as tf:
                for member in tf:
                    key, ext = os.path.splitext(member.name)
                    if ext not in (".jpg", ".json") or not member.isfile():
                        continue
                    data = tf.extractfile(member).read()
                    got = pending.setdefault(key, {})
                    got[ext] = data
                    if len(got) == 2:
                        del pending[key]
                        try:
                            meta = json.loads(got[".json"])
                        except ValueError:
                            meta = {}
                        h = stored_phash(got[".jpg"], meta if isinstance(meta, dict) else {})
                        if h is not None:
                            keys.append(key)
                            hashes.append(f"{h:016x}")
        except (tarfile.TarError, OSError, EOFError):
            pass  # a truncated or damaged tail: the images before it count
        for key, got in sorted(pending.items()):  # an image without its json: hashed whole
            h = stored_phash(got[".jpg"], {}) if ".jpg" in got else None
            if h is not None:
                keys.append(key)
                hashes.append(f"{h:016x}")
        return {"keys": keys, "phash": hashes}

    if not os.path.exists(tar):
        return [], []
    got = cached_beside(tar, "phash", compute, version=PHASH_CACHE,
                        valid=lambda v: len(v["keys"]) == len(v["phash"]))
    return got["keys"], got["phash"]


# ---------------------------------------------------------------------------- urls and ids


def normalize_urls(urls: pa.Array) -> pa.Array:
    """Urls as compared: trimmed, lower case, without scheme, ``www.``, fragment or trailing ``/``
    (http and https, and a url differing in case only, name one image: a false match costs one
    training image, a miss leaks a test image)."""
    u = pc.utf8_lower(pc.utf8_trim_whitespace(pc.cast(urls, pa.string())))
    u = pc.replace_substring_regex(u, r"#.*$", "")
    u = pc.replace_substring_regex(u, r"^[a-z][a-z0-9+.-]*://", "")
    u = pc.replace_substring_regex(u, r"^www\.", "")
    u = pc.replace_substring_regex(u, r"/+$", "")
    return pc.if_else(pc.equal(u, ""), pa.scalar(None, pa.string()), u)


def url_identities(urls: pa.Array) -> dict[str, pa.Array]:
    """Per kind (``url``, ``coco_id``, ``flickr_id``), each url's value of that kind (null where it
    has none): the normalised url and the ids its pattern names (:data:`URL_ID_PATTERNS`)."""
    norm = normalize_urls(urls)
    out = {"url": norm}
    for kind, pattern in URL_ID_PATTERNS.items():
        found = pc.extract_regex(pc.fill_null(norm, ""), pattern)
        ids = pc.struct_field(found, "id")
        out[kind] = pc.if_else(pc.is_valid(found), ids, pa.scalar(None, pa.string()))
    return out


def decimal_id(value) -> str | None:
    """An id as the lists hold it: decimal digits without leading zeros (None for anything else)."""
    text = str(value).strip() if value is not None else ""
    return str(int(text)) if text.isdigit() else None


# ---------------------------------------------------------------------------- lists


def exclusion_table(benchmark: str, rows: list[tuple[str, str, str]]) -> pa.Table:
    """An exclusion list of ``benchmark`` from (split, kind, value) rows, deduplicated and sorted."""
    unique = sorted(set(rows))
    bad = next((k for _, k, _ in unique if k not in KINDS), None)
    if bad is not None:
        raise CCRKError(f"exclusion kind {bad!r}; choose one of {', '.join(KINDS)}")
    return pa.table({"benchmark": [benchmark] * len(unique), "split": [r[0] for r in unique],
                     "kind": [r[1] for r in unique], "value": [r[2] for r in unique]}, schema=SCHEMA)


def write_exclusion_list(table: pa.Table, path: str) -> str:
    atomic.write_parquet(table.cast(SCHEMA), path)
    return path


def read_exclusion_list(path: str) -> pa.Table:
    """An exclusion list, checked: the four columns, known kinds, pHashes of 16 hex digits."""
    if not os.path.isfile(path):
        raise CCRKError(f"exclusion list {path} not found")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise CCRKError(f"exclusion list {path} is not a parquet file: {exc}") from None
    lacking = [c for c in SCHEMA.names if c not in table.column_names]
    if lacking:
        raise CCRKError(f"exclusion list {path} lacks column(s) {', '.join(lacking)}")
    table = table.select(SCHEMA.names).cast(SCHEMA)
    kinds = set(pc.unique(table.column("kind")).to_pylist())
    unknown = sorted(str(k) for k in kinds - set(KINDS))
    if unknown:
        raise CCRKError(f"exclusion list {path}: unknown kind {unknown[0]!r}; use {', '.join(KINDS)}")
    hashes = table.filter(pc.equal(table.column("kind"), "phash")).column("value")
    if len(hashes) and not pc.all(pc.match_substring_regex(hashes, r"^[0-9a-f]{16}$")).as_py():
        raise CCRKError(f"exclusion list {path}: a phash value is not 16 lower-case hex digits")
    return table


# ---------------------------------------------------------------------------- source identities


@dataclass
class SourceImages:
    """What a build knows of one source's images: ``images.parquet``, and img2dataset's status
    parquet files and tars of its finished shards."""
    name: str
    images: str
    status: list[str]
    tars: list[str]


def _sql_str(value) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _parquet_columns(path: str) -> list[str]:
    return pq.read_schema(path).names


def load_identities(con, sources: list[SourceImages], kinds, images_table: str = "img",
                    threads: int | None = None) -> None:
    """The temp table ``ident(source, image_key, kind, value)`` of the source images of
    ``images_table`` (source, image_key, url, source_id; one row per image): the identities of
    :data:`KINDS` in ``kinds`` (see the module docstring). pHashes are computed for the finished
    tars not yet cached, ``threads`` at a time (default: the CPUs)."""
    kinds = set(kinds)
    parts = ["SELECT NULL::VARCHAR AS source, NULL::VARCHAR AS image_key, NULL::VARCHAR AS kind, "
             "NULL::VARCHAR AS value WHERE false"]
    registered = []
    if kinds & {"url", "coco_id", "flickr_id"}:
        urls = con.sql(f"SELECT source, image_key, url FROM {images_table}").to_arrow_table()
        found = url_identities(urls.column("url").combine_chunks())
        rows = [pa.table({"source": urls.column("source"), "image_key": urls.column("image_key"),
                          "kind": pa.repeat(pa.scalar(kind, pa.string()), urls.num_rows), "value": found[kind]})
                for kind in ("url", "coco_id", "flickr_id") if kind in kinds]
        con.register("ident_urls", pa.concat_tables(rows))
        registered.append("ident_urls")
        parts.append("SELECT * FROM ident_urls WHERE value IS NOT NULL")
    for source_name, kind in SOURCE_ID_KINDS.items():
        if kind in kinds:
            number = r"TRY_CAST(regexp_extract(source_id, '^(\d+)(_[0-9a-f]+)?$', 1) AS HUGEINT)"
            parts.append(f"SELECT source, image_key, {_sql_str(kind)}, CAST({number} AS VARCHAR) "
                         f"FROM {images_table} WHERE source = {_sql_str(source_name)} AND {number} IS NOT NULL")
    for s in sources:
        cols = _parquet_columns(s.images)
        for kind in ("coco_id", "flickr_id"):
            if kind in kinds and kind in cols:
                parts.append(f"SELECT {_sql_str(s.name)}, CAST(image_key AS VARCHAR), {_sql_str(kind)}, "
                             f"CAST(TRY_CAST({kind} AS HUGEINT) AS VARCHAR) FROM read_parquet({_sql_str(s.images)}) "
                             f"WHERE TRY_CAST({kind} AS HUGEINT) IS NOT NULL")
    status = [(s.name, f) for s in sources for f in s.status]
    if status and kinds & {"sha256", "phash"}:
        files = ", ".join(_sql_str(f) for _, f in status)
        names = " UNION ALL ".join(f"SELECT {_sql_str(n)} AS source, {_sql_str(f)} AS file" for n, f in status)
        has_sha = any("sha256" in _parquet_columns(f) for _, f in status)
        sha = "lower(CAST(p.sha256 AS VARCHAR))" if has_sha else "NULL::VARCHAR"
        # One row per successful download: which image of which source it is, its bytes' sha256.
        con.execute(f"""CREATE OR REPLACE TEMP TABLE ident_status AS
                        SELECT n.source, CAST(p.key AS VARCHAR) AS shard_key, CAST(p.image_key AS VARCHAR) AS image_key,
                               {sha} AS sha256
                        FROM read_parquet([{files}], filename = true, union_by_name = true) p
                        JOIN ({names}) n ON n.file = p.filename WHERE p.status = 'success'""")
        if "sha256" in kinds:
            parts.append("SELECT source, image_key, 'sha256', sha256 FROM ident_status WHERE sha256 IS NOT NULL")
        if "phash" in kinds:
            con.register("ident_tar_phash", _source_phashes(sources, threads))
            registered.append("ident_tar_phash")
            parts.append("SELECT h.source, st.image_key, 'phash', h.phash FROM ident_tar_phash h "
                         "JOIN ident_status st ON st.source = h.source AND st.shard_key = h.shard_key")
    try:
        con.execute(f"""CREATE OR REPLACE TEMP TABLE ident AS
                        SELECT DISTINCT i.source, i.image_key, x.kind, x.value
                        FROM ({' UNION ALL '.join(parts)}) x
                        JOIN {images_table} i ON i.source = x.source AND i.image_key = x.image_key""")
    finally:
        for name in registered:
            con.unregister(name)
        con.execute("DROP TABLE IF EXISTS ident_status")


def _source_phashes(sources: list[SourceImages], threads: int | None) -> pa.Table:
    """(source, shard_key, phash) of every image of the sources' finished tars."""
    jobs = [(s.name, tar) for s in sources for tar in s.tars]
    with ThreadPoolExecutor(max(1, threads or os.cpu_count() or 1)) as pool:  # PIL's decoding releases the GIL
        found = list(pool.map(lambda job: tar_phashes(job[1]), jobs))
    src, keys, hashes = [], [], []
    for (name, _), (k, h) in zip(jobs, found):
        src += [name] * len(k)
        keys += k
        hashes += h
    return pa.table({"source": pa.array(src, pa.string()), "shard_key": pa.array(keys, pa.string()),
                     "phash": pa.array(hashes, pa.string())})


# ---------------------------------------------------------------------------- the match


def _block_widths(m: int) -> list[int]:
    return [64 // m + (1 if j < 64 % m else 0) for j in range(m)]


def _n_variants(width: int, flips: int) -> int:
    return sum(math.comb(width, k) for k in range(flips + 1))


def phash_blocks(max_distance: int, n_source: int, n_bench: int) -> list[int]:
    """The widths of the blocks the 64 bits are cut into for the pHash match within
    ``max_distance`` bits: the number of blocks ``m`` whose index makes the fewest rows (benchmark
    variants, source block values and expected candidate pairs of uniformly spread hashes)."""
    best, best_cost = [64], None
    for m in range(1, min(64, max_distance + 1) + 1):
        widths = _block_widths(m)
        flips = max_distance // m
        variants = sum(_n_variants(w, flips) for w in widths)
        if variants * max(1, n_bench) > 200_000_000:
            continue
        cost = n_bench * variants + n_source * m + sum(
            n_source * n_bench * _n_variants(w, flips) / 2.0 ** w for w in widths)
        if best_cost is None or cost < best_cost:
            best, best_cost = widths, cost
    if best_cost is None:
        raise CCRKError(f"a pHash distance of {max_distance} bits is too far to search; use at most 16")
    return best


def _flip_masks(width: int, flips: int) -> np.ndarray:
    masks = [0]
    for k in range(1, flips + 1):
        masks += [sum(1 << b for b in bits) for bits in itertools.combinations(range(width), k)]
    return np.array(masks, dtype=np.uint64)


def _hex_to_u64(values: pa.Array) -> np.ndarray:
    return np.array([int(v, 16) for v in values.to_pylist()], dtype=np.uint64)


def _phash_matches(con, bench: pa.Table, max_distance: int) -> pa.Table:
    """(source, image_key, benchmark, split, value) of every source pHash within ``max_distance``
    bits of a benchmark pHash (``bench``: the lists' phash rows)."""
    src = con.sql("SELECT source, image_key, value FROM ident WHERE kind = 'phash'").to_arrow_table()
    empty = pa.table({"source": pa.array([], pa.string()), "image_key": pa.array([], pa.string()),
                      "benchmark": pa.array([], pa.string()), "split": pa.array([], pa.string()),
                      "value": pa.array([], pa.string())})
    if not src.num_rows or not bench.num_rows:
        return empty
    s_hash = _hex_to_u64(src.column("value").combine_chunks())
    b_hash = _hex_to_u64(bench.column("value").combine_chunks())
    widths = phash_blocks(max_distance, len(s_hash), len(b_hash))
    flips = max_distance // len(widths)
    s_blocks, b_blocks, shift = [], [], 0
    for j, w in enumerate(widths):
        mask = np.uint64((1 << w) - 1)
        sv = (s_hash >> np.uint64(shift)) & mask
        s_blocks.append(pa.table({"j": np.full(len(sv), j, np.int16), "v": sv, "sid": np.arange(len(sv))}))
        bv = ((b_hash >> np.uint64(shift)) & mask)[:, None] ^ _flip_masks(w, flips)[None, :]
        b_blocks.append(pa.table({"j": np.full(bv.size, j, np.int16), "v": bv.ravel(),
                                  "bid": np.repeat(np.arange(len(b_hash)), bv.shape[1])}))
        shift += w
    tables = {"ph_src": pa.concat_tables(s_blocks), "ph_bench": pa.concat_tables(b_blocks),
              "ph_s": pa.table({"sid": np.arange(len(s_hash)), "h": s_hash}),
              "ph_b": pa.table({"bid": np.arange(len(b_hash)), "h": b_hash})}
    for name, table in tables.items():
        con.register(name, table)
    try:
        pairs = con.sql(f"""
            SELECT c.sid, c.bid FROM (SELECT DISTINCT s.sid, b.bid FROM ph_src s JOIN ph_bench b USING (j, v)) c
            JOIN ph_s ON ph_s.sid = c.sid JOIN ph_b ON ph_b.bid = c.bid
            WHERE bit_count(xor(ph_s.h, ph_b.h)) <= {int(max_distance)}
            ORDER BY c.sid, c.bid""").fetchnumpy()
    finally:
        for name in tables:
            con.unregister(name)
    sid, bid = pa.array(pairs["sid"]), pa.array(pairs["bid"])
    return pa.table({"source": src.column("source").take(sid), "image_key": src.column("image_key").take(sid),
                     "benchmark": bench.column("benchmark").take(bid), "split": bench.column("split").take(bid),
                     "value": bench.column("value").take(bid)})


def match_exclusions(con, lists: pa.Table, kinds, max_distance: int) -> None:
    """The temp table ``excluded(source, image_key, benchmark, split, kind, value)``: each source
    image of ``ident`` (:func:`load_identities`) that some row of the exclusion ``lists`` names,
    once per benchmark, with the first kind of match in :data:`MATCH_KINDS` order (``kinds``: those
    used) and the benchmark's value it matched. pHashes match within ``max_distance`` bits."""
    kinds = set(kinds)
    use = [k for k in KINDS if KIND_OF[k] in kinds]
    lists = lists.filter(pc.is_in(lists.column("kind"), pa.array(use, pa.string())))
    rank = " ".join(f"WHEN {_sql_str(k)} THEN {MATCH_KINDS.index(KIND_OF[k])}" for k in KINDS)
    exact = lists.filter(pc.not_equal(lists.column("kind"), "phash"))
    near = _phash_matches(con, lists.filter(pc.equal(lists.column("kind"), "phash")), max_distance) \
        if "phash" in use else None
    con.register("excl_exact", exact)
    if near is not None:
        con.register("excl_near", near)
    try:
        near_sql = ("UNION ALL SELECT source, image_key, benchmark, split, 'phash' AS kind, value FROM excl_near"
                    if near is not None else "")
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE excluded AS
            SELECT source, image_key, benchmark, split, kind, value FROM (
              SELECT *, row_number() OVER (PARTITION BY source, image_key, benchmark
                                           ORDER BY CASE kind {rank} END, kind, split, value) AS rn
              FROM (SELECT i.source, i.image_key, e.benchmark, e.split, e.kind, e.value
                    FROM ident i JOIN excl_exact e ON i.kind = e.kind AND i.value = e.value
                    {near_sql}))
            WHERE rn = 1""")
    finally:
        con.unregister("excl_exact")
        if near is not None:
            con.unregister("excl_near")


def overlap_counts(con, lists: pa.Table, kinds) -> pa.Table:
    """``benchmark_overlap(benchmark, kind, n_images)`` from ``excluded``: every benchmark of the
    lists with every kind of match used (zeros included), in :data:`MATCH_KINDS` order."""
    benchmarks = sorted(set(lists.column("benchmark").to_pylist()))
    used = [k for k in KINDS if KIND_OF[k] in set(kinds)]
    got = dict(((b, k), n) for b, k, n in con.execute(
        "SELECT benchmark, kind, count(*) FROM excluded GROUP BY ALL").fetchall())
    rows = [(b, k, int(got.get((b, k), 0))) for b in benchmarks for k in used]
    return pa.table({"benchmark": pa.array([r[0] for r in rows], pa.string()),
                     "kind": pa.array([r[1] for r in rows], pa.string()),
                     "n_images": pa.array([r[2] for r in rows], pa.int64())})

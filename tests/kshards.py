"""Test helper: a small K-lingual dataset dir (shards/shard-*.tar of {key}.jpg + {key}.json) drawn
from the demo grammar: coloured shapes at positions, captions in en/es/id/ru/tr."""
from __future__ import annotations

import io
import json
import os
import random

from PIL import Image, ImageDraw

from storage.demo import grammar

_CENTER = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
           "center": (0.5, 0.5)}


def draw_scene(scene, side: int = 64) -> Image.Image:
    img = Image.new("RGB", (side, side), (205, 205, 205))
    d = ImageDraw.Draw(img)
    for o in sorted(scene, key=lambda o: o.size != "large"):
        r = side * (0.22 if o.size == "large" else 0.12)
        cx, cy = (_CENTER[o.position][0] * side, _CENTER[o.position][1] * side)
        box = [cx - r, cy - r, cx + r, cy + r]
        fill = grammar.RGB[o.color]
        if o.shape == "circle":
            d.ellipse(box, fill=fill)
        elif o.shape == "square":
            d.rectangle(box, fill=fill)
        elif o.shape == "triangle":
            d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        elif o.shape == "star":
            d.polygon([(cx, cy - r), (cx + r * 0.3, cy), (cx + r, cy), (cx + r * 0.35, cy + r * 0.3),
                       (cx + r * 0.6, cy + r), (cx, cy + r * 0.5), (cx - r * 0.6, cy + r),
                       (cx - r * 0.35, cy + r * 0.3), (cx - r, cy), (cx - r * 0.3, cy)], fill=fill)
        else:  # heart
            d.ellipse([cx - r, cy - r, cx, cy], fill=fill)
            d.ellipse([cx, cy - r, cx + r, cy], fill=fill)
            d.polygon([(cx - r, cy - r / 2), (cx + r, cy - r / 2), (cx, cy + r)], fill=fill)
    return img


def make_klingual_dataset(out_dir: str, n_images: int = 64, seed: int = 0, per_shard: int = 32,
                          drop_prob: float = 0.0, side: int = 64) -> str:
    """A dataset dir as the build stage writes it: shards by KLingualShardWriter, manifest by
    storage.manifest.write_manifest_tables. ``drop_prob`` removes non-English captions at random (K varies)."""
    import pyarrow as pa

    from storage.manifest import write_manifest_tables
    from storage.shards import KLingualShardWriter, shard_name

    rng = random.Random(seed)
    plan = {k: [] for k in ("idx", "key", "shard", "source", "image_key", "source_id", "url", "n_captions", "langs")}
    caps = {k: [] for k in ("key", "caption_index", "lang", "text")}
    shards = []
    for s in range(0, n_images, per_shard):
        writer = KLingualShardWriter(os.path.join(out_dir, "shards", shard_name(s // per_shard)))
        for i in range(s, min(s + per_shard, n_images)):
            scene = grammar.sample_scene(rng)
            captions = [grammar.render_all(p) for p in grammar.scene_phrases(scene, rng, n=2)]
            for c in captions:
                for lang in list(c):
                    if lang != "en" and rng.random() < drop_prob:
                        del c[lang]
            key = f"test-{i:05d}"
            buf = io.BytesIO()
            draw_scene(scene, side).save(buf, format="JPEG", quality=90)
            writer.add(key, buf.getvalue(), json.dumps({"captions": captions, "source": "test",
                                                         "image_key": key}).encode())
            for name, value in (("idx", i), ("key", key), ("shard", s // per_shard), ("source", "test"),
                                ("image_key", key), ("source_id", str(i)), ("url", ""),
                                ("n_captions", len(captions)), ("langs", ",".join(sorted(set().union(*captions))))):
                plan[name].append(value)
            for ci, c in enumerate(captions):
                for lang, text in sorted(c.items()):
                    for name, value in (("key", key), ("caption_index", ci), ("lang", lang), ("text", text)):
                        caps[name].append(value)
        info = writer.close()
        shards.append({"name": info.name, "n_samples": info.n_samples, "bytes": info.bytes, "sha256": info.sha256,
                       "members": [[m.key, m.jpg_offset, m.jpg_size, m.json_offset, m.json_size] for m in info.members]})
    offsets = {m[0]: m[1:] for s in shards for m in s["members"]}  # key -> jpg/json offsets and sizes
    for j, name in enumerate(("jpg_offset", "jpg_size", "json_offset", "json_size")):
        plan[name] = [offsets[k][j] for k in plan["key"]]
    plan["shard"] = [shard_name(s) for s in plan["shard"]]
    write_manifest_tables(out_dir, pa.table(plan), pa.table(caps), [], shards,
                          {"name": "test", "version": f"test{seed}", "rows": [["test", "seed", str(seed)]]})
    return out_dir

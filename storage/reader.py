"""The training reader: a dataset version as an iterable of ``(PIL RGB image, [ {lang: text}, ... ])``.

The manifest knows where every sample's jpg and json lie inside its shard, so the reader seeks
straight to them: the order is the dataset order, or a seeded permutation of all samples
(``shuffle_seed``, plus ``set_epoch``), and ``iter_from(offset)`` resumes at exactly the
``offset``-th sample of that order. In DataLoader workers each worker takes every
``num_workers``-th sample of the same order.
"""
from __future__ import annotations

import io
import json
import os
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from storage import manifest
from storage.errors import CCRKError


class KLingualDataset(torch.utils.data.IterableDataset):
    def __init__(self, dataset_dir: str, shuffle_seed: int | None = None, langs=None):
        super().__init__()
        self.dataset_dir = os.path.abspath(str(dataset_dir))
        self.shuffle_seed = shuffle_seed
        self.langs = tuple(langs) if langs else None
        self.epoch = 0
        index = manifest.sample_index(self.dataset_dir)
        self._shards = index.column("shard").to_pylist()
        self._jpg = np.stack([index.column("jpg_offset").to_numpy(), index.column("jpg_size").to_numpy()], axis=1)
        self._json = np.stack([index.column("json_offset").to_numpy(), index.column("json_size").to_numpy()], axis=1)
        self.keys = index.column("key").to_pylist()
        if not self.keys:
            raise CCRKError(f"{self.dataset_dir}: the dataset has no samples")

    def samples(self) -> int:
        return len(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def set_epoch(self, epoch: int) -> None:
        """A different (still seeded) permutation per epoch when shuffling."""
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        n = len(self.keys)
        if self.shuffle_seed is None:
            return np.arange(n)
        return np.random.default_rng([int(self.shuffle_seed), self.epoch]).permutation(n)

    def __iter__(self) -> Iterator[tuple[Image.Image, list[dict[str, str]]]]:
        return self.iter_from(0)

    def iter_from(self, offset: int, part: int | None = None, parts: int | None = None
                  ) -> Iterator[tuple[Image.Image, list[dict[str, str]]]]:
        """Samples from the ``offset``-th of this epoch's order onwards; of those, every
        ``parts``-th starting at ``part`` (default: this DataLoader worker's share, else all)."""
        order = self.order()[int(offset):]
        if parts is None:
            info = torch.utils.data.get_worker_info()
            part, parts = (info.id, info.num_workers) if info is not None else (0, 1)
        order = order[int(part or 0)::int(parts)]
        files: dict[str, object] = {}
        try:
            for i in order:
                yield self._read(int(i), files)
        finally:
            for f in files.values():
                f.close()

    def sample(self, i: int) -> tuple[Image.Image, list[dict[str, str]]]:
        """The ``i``-th sample in dataset order (random access)."""
        files: dict[str, object] = {}
        try:
            return self._read(i, files)
        finally:
            for f in files.values():
                f.close()

    def metadata(self, i: int) -> dict:
        """The full json of the ``i``-th sample (source, url, image_key, caption_ids, boxes...)."""
        files: dict[str, object] = {}
        try:
            return json.loads(self._bytes(i, self._json, files))
        finally:
            for f in files.values():
                f.close()

    def _bytes(self, i: int, where: np.ndarray, files: dict) -> bytes:
        shard = self._shards[i]
        f = files.get(shard)
        if f is None:
            f = files[shard] = open(os.path.join(self.dataset_dir, "shards", shard), "rb")
        off, size = where[i]
        f.seek(int(off))
        data = f.read(int(size))
        if len(data) != size:
            raise CCRKError(f"{self.dataset_dir}/shards/{shard}: sample {self.keys[i]} is truncated; run ccrk verify")
        return data

    def _read(self, i: int, files: dict) -> tuple[Image.Image, list[dict[str, str]]]:
        meta = json.loads(self._bytes(i, self._json, files))
        image = Image.open(io.BytesIO(self._bytes(i, self._jpg, files))).convert("RGB")
        captions = meta["captions"]
        if self.langs is not None:
            captions = [{lang: c[lang] for lang in self.langs if lang in c} for c in captions]
            captions = [c for c in captions if c]
        return image, captions

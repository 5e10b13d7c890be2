"""Training input: image transforms (random resized crop, flip, RandAugment, all PIL), caption
normalisation, selection and tokenisation, collation, and a deterministic, resumable batch stream
over the shards.

With ``data: {pre_caption: true}`` every caption goes through the authors' normalisation
(:func:`ccrk.captions.pre_caption`, at most ``data.max_words`` words) before tokenisation; a caption
it leaves empty counts as missing (``rejected_captions``), and a sample left with none is skipped.

Every random choice for a sample (crop, flip, augmentation, which caption dict, which language in
1-to-1 mode) comes from a generator seeded by (seed, epoch, offset): a batch is a pure function of
its stream position, so resuming needs only the position.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from ccrk.captions import EmptyCaptionError, pre_caption
from ccrk.specs import AugmentSpec, DataSpec, LossSpec
from storage.errors import CCRKError
from storage.reader import KLingualDataset

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
# The ``data:`` section's defaults (augmentation, pre_caption off unless a config turns it on, 40
# words: the authors' pre-training limit) are ccrk.specs.DataSpec's; benchmarks use their own
# limits (evaluation.benchmarks).
_FILL = (124, 116, 104)

# ---------------------------------------------------------------------- RandAugment (PIL)


def _shear_x(img, v, rng):
    return img.transform(img.size, Image.AFFINE, (1, v, 0, 0, 1, 0), Image.BICUBIC, fillcolor=_FILL)


def _shear_y(img, v, rng):
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, v, 1, 0), Image.BICUBIC, fillcolor=_FILL)


def _translate_x(img, v, rng):
    return img.transform(img.size, Image.AFFINE, (1, 0, v * img.size[0], 0, 1, 0), fillcolor=_FILL)


def _translate_y(img, v, rng):
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, v * img.size[1]), fillcolor=_FILL)


# op -> (function(img, value, rng), value at magnitude 10, signed). CCLM's pre-training list: no
# hue/solarize/posterize. AutoContrast, Equalize and Brightness still change colours (Equalize turns a
# flat background into noise and a blue square black): a config whose captions name colours (the demo)
# picks ops with ``randaugment: {ops: [...]}``.
RANDAUGMENT_OPS = {
    "Identity": (lambda img, v, rng: img, 0.0, False),
    "AutoContrast": (lambda img, v, rng: ImageOps.autocontrast(img), 0.0, False),
    "Equalize": (lambda img, v, rng: ImageOps.equalize(img), 0.0, False),
    "Brightness": (lambda img, v, rng: ImageEnhance.Brightness(img).enhance(1 + v), 0.9, True),
    "Sharpness": (lambda img, v, rng: ImageEnhance.Sharpness(img).enhance(1 + v), 0.9, True),
    "ShearX": (_shear_x, 0.3, True),
    "ShearY": (_shear_y, 0.3, True),
    "TranslateX": (_translate_x, 0.3, True),
    "TranslateY": (_translate_y, 0.3, True),
    "Rotate": (lambda img, v, rng: img.rotate(v, resample=Image.BICUBIC, fillcolor=_FILL), 30.0, True),
}


def randaugment(img: Image.Image, rng: random.Random, n: int = 2, m: float = 7, ops=None) -> Image.Image:
    """``n`` ops drawn uniformly from ``ops`` (default: all), each applied with probability 0.5 at
    magnitude ``m`` (of 10)."""
    names = sorted(RANDAUGMENT_OPS) if ops is None else sorted(ops)
    unknown = set(names) - set(RANDAUGMENT_OPS)
    if unknown:
        raise ValueError(f"unknown RandAugment ops {sorted(unknown)}; available: {', '.join(sorted(RANDAUGMENT_OPS))}")
    for name in rng.choices(names, k=n):
        fn, top, signed = RANDAUGMENT_OPS[name]
        if rng.random() < 0.5:
            v = top * m / 10.0
            img = fn(img, -v if signed and rng.random() < 0.5 else v, rng)
    return img


def random_resized_crop(img: Image.Image, size: int, rng: random.Random, scale=(0.2, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> Image.Image:
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), Image.BICUBIC, box=(x, y, x + cw, y + ch))
    return img.resize((size, size), Image.BICUBIC)  # central fallback: the whole image


def to_tensor(img: Image.Image) -> torch.Tensor:
    x = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    x = (x - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


class ImageTransform:
    """PIL image -> normalised tensor; ``train`` adds crop / flip / RandAugment from ``rng``."""

    def __init__(self, config: dict, train: bool):
        self.size = int(config["model"]["vision"]["image_size"])
        self.train = train
        self.aug = AugmentSpec.parse((config.get("data") or {}).get("augment"), section="data.augment").to_config()

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        img = img.convert("RGB")
        if not self.train:
            return to_tensor(img.resize((self.size, self.size), Image.BICUBIC))
        rng = rng or random.Random()
        img = random_resized_crop(img, self.size, rng, tuple(self.aug["crop_scale"]))
        if self.aug["hflip"] and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.aug.get("randaugment"):
            img = randaugment(img, rng, **self.aug["randaugment"])
        return to_tensor(img)


def image_transform(config: dict, train: bool) -> ImageTransform:
    """The model's image transform (evaluation uses ``train=False``: resize + normalise)."""
    return ImageTransform(config, train)


# ---------------------------------------------------------------------- captions and collation


def data_spec(config: dict) -> DataSpec:
    """The run config's ``data:`` section, validated (defaults filled)."""
    return DataSpec.parse(config.get("data"), section="data")


def uses_pre_caption(config: dict) -> bool:
    """Whether captions are normalised: in pre-training, and on the benchmarks its checkpoints meet."""
    return data_spec(config).pre_caption


def pretrain_max_words(config: dict) -> int | None:
    """Pre-training's pre_caption word limit, or None when captions are tokenised as they are."""
    data = data_spec(config)
    return data.max_words if data.pre_caption else None


def clean_captions(captions: list[dict], langs: list[str], max_words: int | None) -> tuple[list[dict], int]:
    """(caption dicts of ``langs`` passed through pre_caption, number rejected); ``max_words`` None: unchanged.
    A rejected caption is dropped like a missing language; dicts left without text are dropped."""
    if max_words is None:
        return captions, 0
    out, rejected = [], 0
    for caption in captions:
        kept = {}
        for lang in langs:
            if caption.get(lang):
                try:
                    kept[lang] = pre_caption(caption[lang], max_words)
                except EmptyCaptionError:
                    rejected += 1
        if kept:
            out.append(kept)
    return out, rejected


def choose_captions(captions: list[dict], langs: list[str], rng: random.Random, kcl: bool) -> list[str | None]:
    """One caption dict of the image (random), as K slots in ``langs`` order (None = missing).
    Without KCL (1-to-1), one random present language: a single slot."""
    usable = [c for c in captions if any(c.get(lang) for lang in langs)]
    if not usable:
        return []
    chosen = rng.choice(usable)
    slots = [chosen.get(lang) or None for lang in langs]
    if not kcl:
        slots = [rng.choice([s for s in slots if s])]
    return slots


def collate(images: list[torch.Tensor], slots: list[list[str | None]], tokenizer, max_tokens: int) -> dict:
    """pixel_values [B,3,H,W]; input_ids / attention_mask [B,K,L]; text_valid [B,K]."""
    b, k = len(slots), len(slots[0])
    texts = [s or "" for row in slots for s in row]
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt")
    length = enc["input_ids"].shape[1]
    return {"pixel_values": torch.stack(images),
            "input_ids": enc["input_ids"].reshape(b, k, length),
            "attention_mask": enc["attention_mask"].reshape(b, k, length),
            "text_valid": torch.tensor([[s is not None for s in row] for row in slots], dtype=torch.bool)}


# ---------------------------------------------------------------------- the batch stream


def open_dataset(dataset_dir: str, shuffle_seed: int | None = None, langs=None):
    return KLingualDataset(dataset_dir, shuffle_seed=shuffle_seed, langs=langs)


def sample_rng(seed: int, epoch: int, position: int) -> random.Random:
    return random.Random(f"ccrk-sample/{seed}/{epoch}/{position}")


class BatchStream(torch.utils.data.Dataset):
    """This rank's batches as a map from the global batch number: a pure function of (seed, number).

    Epoch ``e`` is the reader's seeded permutation for ``e`` minus the held-out samples (dataset
    indices < ``heldout``); global batch ``b`` of the epoch is positions ``[b*B*W, (b+1)*B*W)`` of it
    (the remainder of an epoch is dropped) and rank r reads its contiguous ``B`` positions only,
    by random access. A sample with no caption in ``langs`` (after normalisation) is counted and
    replaced by the next sample after the global batch's window.
    """

    def __init__(self, dataset_dir: str, config: dict, tokenizer, rank: int = 0, world: int = 1, heldout: int = 0):
        self.dir, self.tok, self.rank, self.world = dataset_dir, tokenizer, rank, world
        self.langs = list(config["langs"])
        self.seed = int(config.get("seed", 0))
        self.batch_size = int(config["train"]["batch_size"])
        self.kcl = LossSpec.parse(config.get("loss"), section="loss").kcl
        self.max_tokens = data_spec(config).max_tokens
        self.max_words = pretrain_max_words(config)
        self.transform = ImageTransform(config, train=True)
        self.ds = open_dataset(dataset_dir, shuffle_seed=self.seed, langs=self.langs)
        self.heldout = int(heldout)
        self.per_epoch = (self.ds.samples() - self.heldout) // (self.batch_size * world)
        if self.per_epoch < 1:
            raise CCRKError(f"{dataset_dir}: {self.ds.samples()} samples ({self.heldout} held out) make no "
                            f"global batch of {self.batch_size * world}")
        self._order: tuple[int, np.ndarray] | None = None
        self.skipped = 0
        self.rejected_captions = 0  # captions pre_caption left empty (treated as missing)

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self.ds.set_epoch(epoch)
            full = self.ds.order()
            self._order = (epoch, full[full >= self.heldout])
        return self._order[1]

    def __getitem__(self, number: int) -> dict:
        epoch, b = divmod(int(number), self.per_epoch)
        order = self.order(epoch)
        window = self.batch_size * self.world
        start = b * window + self.rank * self.batch_size
        spare = (b + 1) * window  # replacements come from after the window
        images, slots = [], []
        for pos in range(start, start + self.batch_size):
            while True:
                img, captions = self.ds.sample(int(order[pos % len(order)]))
                captions, rejected = clean_captions(captions, self.langs, self.max_words)
                self.rejected_captions += rejected
                rng = sample_rng(self.seed, epoch, pos)
                chosen = choose_captions(captions, self.langs, rng, self.kcl)
                if chosen:
                    break
                self.skipped += 1
                pos, spare = spare, spare + 1
            images.append(self.transform(img, rng))
            slots.append(chosen)
        return collate(images, slots, self.tok, self.max_tokens)

    def loader(self, start: int, num_workers: int = 0):
        """Batches ``start, start+1, ...`` (endless), built in ``num_workers`` processes, in order."""
        import itertools

        return torch.utils.data.DataLoader(self, batch_size=None, sampler=itertools.count(start),
                                           num_workers=num_workers, persistent_workers=num_workers > 0,
                                           prefetch_factor=4 if num_workers else None)


def heldout_slice(dataset_dir: str, config: dict, n: int) -> list[tuple[Image.Image, list[dict]]]:
    """The first ``n`` samples in dataset order (never trained on): the in-training retrieval set,
    captions normalised as in training."""
    langs = list(config["langs"])
    ds = open_dataset(dataset_dir, shuffle_seed=None, langs=langs)
    max_words = pretrain_max_words(config)
    out = [ds.sample(i) for i in range(min(n, ds.samples()))]
    out = [(img, clean_captions(caps, langs, max_words)[0]) for img, caps in out]
    return [(img, caps) for img, caps in out if caps]

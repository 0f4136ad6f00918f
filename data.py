"""
Data. Two things live here:

1. The "shapes" world: this repo's CPU demo (like nanoGPT's shakespeare_char). A procedural
   text-to-image world: one coloured shape on a black background, 6 colours x 3 shapes x 5 positions
   x 2 sizes, captioned by a small grammar. A tiny pixel-space diffusion model learns it in minutes,
   then a real language model is bridged into it and tested on three generalisation sets:
   "seen" (training wording, training combinations), "unseen" (training wording, held-out
   colour/shape pairs never drawn in training) and "paraphrase" (synonyms and rephrasings that never
   occur in a training caption). analyze() reads a generated image back into attributes, so
   evaluate() can score a model without a human looking at pictures.

2. ImageTextDataset: real image-text pairs for training (a TSV "path<TAB>caption" as the LaVi-Bridge
   release reads, a folder of image + .txt pairs, or WebDataset-style .tar shards). Bad data is
   counted, skipped and reported, never silently replaced.
"""
import glob
import io
import itertools
import os
import re
import tarfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# -----------------------------------------------------------------------------
# the shapes world: attributes and drawing

COLOURS = {  # well separated in chromaticity (r, g, b) / (r + g + b), which is what analyze() compares
    "red": (220, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 80, 235),
    "yellow": (235, 220, 30),
    "purple": (150, 40, 200),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")  # the triangle points up
POSITIONS = {  # (x, y) of the shape's bounding-box centre, as a fraction of the image side
    "left": (0.22, 0.5),
    "right": (0.78, 0.5),
    "top": (0.5, 0.22),
    "bottom": (0.5, 0.78),
    "center": (0.5, 0.5),
}
SIZES = {"small": 0.2, "large": 0.4}  # bounding-box side (width = height for all shapes), fraction of the image
BACKGROUND = (0, 0, 0)
JITTER_POS = 0.03    # +- uniform offset of the centre, fraction of the image (1 px at 32 px)
JITTER_SCALE = 0.08  # +- uniform relative change of the side
# held-out colour/shape pairs: never drawn or captioned in training; every colour and shape still is
UNSEEN = (("red", "triangle"), ("blue", "square"), ("yellow", "circle"), ("purple", "triangle"))
SPLITS = ("train", "seen", "unseen", "paraphrase")  # "seen" = the training distribution, another stream


@dataclass(frozen=True)
class Attrs:
    colour: str
    shape: str
    position: str
    size: str


def as_attrs(a):
    """Attrs from an Attrs, a dict or a (colour, shape, position, size) tuple, checked."""
    if isinstance(a, dict):
        a = Attrs(**a)
    elif isinstance(a, (tuple, list)):
        a = Attrs(*a)
    if not isinstance(a, Attrs):
        raise TypeError(f"expected Attrs, dict or tuple, got {type(a).__name__}")
    for name, allowed in (("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS), ("size", SIZES)):
        if getattr(a, name) not in allowed:
            raise ValueError(f"unknown {name} {getattr(a, name)!r} (choose from {', '.join(allowed)})")
    return a


def all_attrs(split="train"):
    """Every (colour, shape, position, size) of a split, in a fixed order: 140 for train/seen/paraphrase, 40 for unseen."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    held_out = split == "unseen"
    return [Attrs(c, s, p, z) for c, s, p, z in itertools.product(COLOURS, SHAPES, POSITIONS, SIZES)
            if ((c, s) in UNSEEN) == held_out]


def coverage_map(shape, cx, cy, side, H, W, ss=4):
    """Exact-ish (ss x ss supersampled) coverage (H, W) in [0, 1] of a shape with bounding-box centre (cx, cy)
    and side, all in fractions of the image: the same geometry render() draws."""
    o = (np.arange(ss) + 0.5) / ss
    ys = ((np.arange(H)[:, None] + o[None]).ravel() / H)[:, None]  # (H * ss, 1) sample rows
    xs = ((np.arange(W)[:, None] + o[None]).ravel() / W)[None, :]  # (1, W * ss) sample columns
    u, v = (xs - cx) / (side / 2), (ys - cy) / (side / 2)  # box coordinates in [-1, 1], v down
    if shape == "circle":
        inside = u ** 2 + v ** 2 <= 1
    elif shape == "square":
        inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    else:  # apex at v = -1, base at v = 1
        inside = (v <= 1) & (np.abs(u) <= (v + 1) / 2)
    return inside.reshape(H, ss, W, ss).mean(axis=(1, 3))  # (H, W)


def render(attrs, size=32, rng=None):
    """Draw one shape: uint8 (size, size, 3). rng (np.random.Generator) adds a small position/size jitter.
    Anti-aliased by 4x4 supersampling (pixel = coverage x colour + (1 - coverage) x background), with the
    exact geometry of coverage_map(), which the analyzer fits back."""
    a = as_attrs(attrs)
    if size < 16:
        raise ValueError(f"image size {size} too small for the shapes world (>= 16)")
    cx, cy = POSITIONS[a.position]
    side = SIZES[a.size]
    if rng is not None:
        cx += rng.uniform(-JITTER_POS, JITTER_POS)
        cy += rng.uniform(-JITTER_POS, JITTER_POS)
        side *= rng.uniform(1 - JITTER_SCALE, 1 + JITTER_SCALE)
    cov = coverage_map(a.shape, cx, cy, side, size, size)[..., None]  # (H, W, 1)
    img = cov * np.asarray(COLOURS[a.colour], np.float64) + (1 - cov) * np.asarray(BACKGROUND, np.float64)
    return np.round(img).astype(np.uint8)  # (H, W, 3)


# -----------------------------------------------------------------------------
# the shapes world: captions

# training grammar ("a" becomes "an" before a vowel)
TEMPLATES = (
    "a {size} {colour} {shape} {where}",          # a small red circle on the left
    "a {colour} {shape}, {size}, {where}",        # a red circle, small, on the left
    "{size} {colour} {shape} at the {position}",  # small red circle at the left
    "{where}, a {size} {colour} {shape}",         # on the left, a small red circle
    "the {shape} is {colour} and {size}, {where}",
)
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "center": "in the center"}

# paraphrase grammar: every caption uses a colour, shape and size word that no training caption has,
# a position phrase and a template that no training caption has
PARA_TEMPLATES = (
    "there is a {size} {colour} {shape} {where}",
    "a picture of a {size} {colour} {shape} {where}",
    "{where} you can see a {size} {colour} {shape}",
    "one {colour} {shape}, quite {size}, {where}",
    "an image showing a {size} {colour} {shape} {where}",
)
PARA_COLOURS = {"red": ("crimson", "scarlet"), "green": ("emerald", "jade"), "blue": ("azure", "cobalt"),
                "yellow": ("golden", "lemon"), "purple": ("violet", "amethyst"), "orange": ("tangerine", "amber")}
PARA_SHAPES = {"circle": ("disc", "ball"), "square": ("box", "tile"), "triangle": ("pyramid", "triangular shape")}
PARA_SIZES = {"small": ("tiny", "little"), "large": ("big", "huge")}
PARA_WHERE = {"left": ("on the left side", "toward the left edge"),
              "right": ("on the right side", "toward the right edge"),
              "top": ("at the top of the picture", "near the upper edge"),
              "bottom": ("at the bottom of the picture", "near the lower edge"),
              "center": ("in the middle", "in the centre of the picture")}


# a second language (Spanish), template by template a translation of TEMPLATES, so that
# parallel_captions() pairs each caption with its English original. Every shape is masculine in
# Spanish (el circulo, el cuadrado, el triangulo): the adjectives need no agreement.
SPANISH_TEMPLATES = (
    "un {shape} {colour} {size} {where}",          # a small red circle on the left
    "un {shape} {colour}, {size}, {where}",        # a red circle, small, on the left
    "{shape} {colour} {size} en {place}",          # small red circle at the left
    "{where}, un {shape} {colour} {size}",         # on the left, a small red circle
    "el {shape} es {colour} y {size}, {where}",    # the circle is red and small, on the left
)
SPANISH_COLOURS = {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "purple": "morado",
                   "orange": "naranja"}
SPANISH_SHAPES = {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo"}
SPANISH_SIZES = {"small": "pequeño", "large": "grande"}
SPANISH_WHERE = {"left": "a la izquierda", "right": "a la derecha", "top": "arriba", "bottom": "abajo",
                 "center": "en el centro"}
SPANISH_PLACE = {"left": "la izquierda", "right": "la derecha", "top": "la parte de arriba",
                 "bottom": "la parte de abajo", "center": "el centro"}
LANGUAGES = ("spanish",)  # foreign grammars: captions_of(a, "spanish"), parallel_captions(split, "spanish")


def _fill(template, a, colour, shape, size, where):
    s = template.format(colour=colour, shape=shape, size=size, where=where, position=a.position)
    return re.sub(r"\ba (?=[aeiou])", "an ", s)


def captions_of(attrs, grammar="train"):
    """Every caption the grammar ("train" or "paraphrase") can write for attrs, in a fixed order."""
    a = as_attrs(attrs)
    if grammar == "train":
        return [_fill(t, a, a.colour, a.shape, a.size, WHERE[a.position]) for t in TEMPLATES]
    if grammar == "paraphrase":
        return [_fill(t, a, c, s, z, w) for t, c, s, z, w in itertools.product(
            PARA_TEMPLATES, PARA_COLOURS[a.colour], PARA_SHAPES[a.shape], PARA_SIZES[a.size], PARA_WHERE[a.position])]
    if grammar == "spanish":
        return [t.format(colour=SPANISH_COLOURS[a.colour], shape=SPANISH_SHAPES[a.shape], size=SPANISH_SIZES[a.size],
                         where=SPANISH_WHERE[a.position], place=SPANISH_PLACE[a.position]) for t in SPANISH_TEMPLATES]
    raise ValueError(f"unknown grammar {grammar!r} (train, paraphrase or one of {', '.join(LANGUAGES)})")


def caption(attrs, rng, grammar="train"):
    """One random caption of attrs (rng: np.random.Generator)."""
    options = captions_of(attrs, grammar)
    return options[rng.integers(len(options))]


def all_captions(split="train"):
    """Every distinct caption a split can produce (sorted): a frozen LM's outputs can be cached on them."""
    grammar = "paraphrase" if split == "paraphrase" else "train"
    return sorted({c for a in all_attrs(split) for c in captions_of(a, grammar)})


def parallel_captions(split="train", language="spanish"):
    """[(foreign caption, English caption)] for every attribute tuple of a split and every training
    template, in a fixed order: the i-th template of the language translates the i-th English one."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r} (choose from {', '.join(LANGUAGES)})")
    if split == "paraphrase":
        raise ValueError("the paraphrase grammar has no translation: use train, seen or unseen")
    return [pair for a in all_attrs(split) for pair in zip(captions_of(a, language), captions_of(a, "train"))]


def words_of(text):
    return re.findall(r"[a-z]+", text.lower())


# the toy base model's word-level vocabulary: every word of the training grammar (held-out pairs included:
# their words are all training words anyway). ids: 0 = pad, 1 = unknown word, WORDS[i] = i + 2
WORDS = sorted({w for a in itertools.product(COLOURS, SHAPES, POSITIONS, SIZES)
                for c in captions_of(a, "train") for w in words_of(c)})
WORD_IDS = {w: i + 2 for i, w in enumerate(WORDS)}
VOCAB_SIZE = len(WORDS) + 2


def _check_grammar():
    """The paraphrase set must be new wording: its synonyms and its template words never occur in training."""
    syn = {w for table in (PARA_COLOURS, PARA_SHAPES, PARA_SIZES) for v in table.values() for p in v for w in words_of(p)}
    leaked = syn & set(WORDS)
    assert not leaked, f"paraphrase synonyms that occur in training captions: {sorted(leaked)}"
    for t in PARA_TEMPLATES:  # each paraphrase template has a word of its own
        own = set(words_of(re.sub(r"\{\w+\}", "", t))) - {"a", "an"}
        assert own - set(WORDS), f"paraphrase template {t!r} uses only training words"
    for table in PARA_WHERE.values():  # each position phrase has a word of its own
        for p in table:
            assert set(words_of(p)) - set(WORDS), f"paraphrase position phrase {p!r} uses only training words"


_check_grammar()


def tokenize_words(captions, max_len=16):
    """Word ids for the toy base model's own text encoder: (ids LongTensor (B, max_len), mask BoolTensor (B, max_len)).
    0 = pad (mask False), 1 = a word outside WORDS (every paraphrase synonym). Longer captions are truncated.
    An empty caption (the CFG null caption) is all pad: its mask is all False."""
    if isinstance(captions, str):
        captions = [captions]
    ids = torch.zeros(len(captions), max_len, dtype=torch.long)  # (B, T)
    for i, c in enumerate(captions):
        t = [WORD_IDS.get(w, 1) for w in words_of(c)][:max_len]
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    return ids, ids != 0


# -----------------------------------------------------------------------------
# the shapes world: sampling, the training stream and the evaluation sets

def to_tensor(img):
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)


def to_uint8(images):
    """float tensor (N, 3, H, W) or (3, H, W) in [-1, 1] -> uint8 numpy (N, H, W, 3) or (H, W, 3)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()  # (..., H, W, 3)


def _sample(rng, split, size):
    """One (uint8 image, caption, attrs) of a split."""
    combos = [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in UNSEEN) == (split == "unseen")]
    c, s = combos[rng.integers(len(combos))]
    a = Attrs(c, s, list(POSITIONS)[rng.integers(len(POSITIONS))], list(SIZES)[rng.integers(len(SIZES))])
    img = render(a, size, rng)
    return img, caption(a, rng, "paraphrase" if split == "paraphrase" else "train"), a


def sample_batch(rng, n, size=32, split="train"):
    """n random samples without a DataLoader: (images float (n, 3, H, W) in [-1, 1], captions, attrs).
    rng: np.random.Generator or an int seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    imgs, caps, attrs = zip(*(_sample(rng, split, size) for _ in range(n)))
    return torch.stack([to_tensor(x) for x in imgs]), list(caps), list(attrs)  # (n, 3, H, W)


class ShapesDataset(torch.utils.data.IterableDataset):
    """Endless (image float (3, H, W) in [-1, 1], caption) stream of the shapes world, deterministic from seed.
    Each (rank, DataLoader worker) draws its own independent stream, so no two of them repeat each other."""

    def __init__(self, seed=0, size=32, split="train", rank=0, world_size=1):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.seed, self.size, self.split, self.rank, self.world_size = seed, size, split, rank, world_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), self.rank, self.world_size, worker, workers])
        while True:
            img, cap, _ = _sample(rng, self.split, self.size)
            yield to_tensor(img), cap


EVAL_SETS = ("seen", "unseen", "paraphrase") + LANGUAGES  # "spanish": the seen combinations, captioned in Spanish


def eval_set(name, n=None, seed=0):
    """A fixed list of (caption, Attrs) for name in seen / unseen / paraphrase / spanish.
    n=None: every attribute tuple of the split exactly once (140 / 40 / 140 / 140), captions drawn from seed;
    else the first n of a seeded shuffle (cycled when n exceeds the count)."""
    if name not in EVAL_SETS:
        raise ValueError(f"unknown eval set {name!r} (choose from {', '.join(EVAL_SETS)})")
    if name in LANGUAGES:  # the training combinations, in another language
        rng = np.random.default_rng([seed, len(SPLITS) + LANGUAGES.index(name)])
        pool = all_attrs("seen")
        grammar = name
    else:
        rng = np.random.default_rng([seed, SPLITS.index(name)])
        pool = all_attrs(name)
        grammar = "paraphrase" if name == "paraphrase" else "train"
    if n is None:
        picked = pool
    else:
        order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-n // len(pool)))])[:n]
        picked = [pool[i] for i in order]
    return [(caption(a, rng, grammar), a) for a in picked]


# -----------------------------------------------------------------------------
# the shapes world: reading an image back (for scoring generated samples)

FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding-box area
FG_THRESHOLD = 64  # max-channel distance from the background that seeds the foreground (of 255)
FIT_BLURS = (0.0, 0.5, 0.9)  # Gaussian blurs (px at 32 px) tried on each shape: generated images are soft
SIZE_THRESHOLD = float(np.sqrt(SIZES["small"] * SIZES["large"]))  # on the bounding-box side


def _largest_component(mask):
    """The largest 8-connected component of a bool (H, W) mask, or None when the mask is empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    y0, x0 = ys.min(), xs.min()
    m = mask[y0:ys.max() + 1, x0:xs.max() + 1]  # (h, w) crop to the mask's box
    h, w = m.shape
    big = h * w + 1
    p = np.full((h + 2, w + 2), big)  # padded labels: the border never wins a minimum
    p[1:-1, 1:-1] = np.where(m, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:  # propagate the smallest label through each component
        nb = np.minimum.reduce([p[1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
        nb = np.where(m, nb, big)
        if (nb == p[1:-1, 1:-1]).all():
            break
        p[1:-1, 1:-1] = nb
    ids, counts = np.unique(nb[m], return_counts=True)
    out = np.zeros_like(mask)
    out[y0:y0 + h, x0:x0 + w] = nb == ids[counts.argmax()]
    return out


def _gauss_matrix(n, sigma):
    """(n, n) matrix of a 1-D Gaussian blur (zero padding), identity for sigma 0: blurred = G @ x."""
    if sigma <= 0:
        return np.eye(n)
    i = np.arange(n)
    return np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2) / (np.sqrt(2 * np.pi) * sigma)


def _nearest_colour(rgb):
    rgb = np.clip(np.asarray(rgb, np.float64), 0, None)
    chroma = rgb / max(rgb.sum(), 1e-6)
    names = list(COLOURS)
    pal = np.array([COLOURS[k] for k in names], np.float64)
    pal = pal / pal.sum(1, keepdims=True)
    return names[int(((pal - chroma) ** 2).sum(1).argmin())]


def _as_image(img):
    if isinstance(img, torch.Tensor):
        img = to_uint8(img)
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
    return img


def analyze(img):
    """Read the attributes of a (possibly generated, noisy) shapes image: uint8 (H, W, 3) or float (3, H, W)
    in [-1, 1]. Fields are None when no foreground is found.
    1. foreground: the largest 8-connected blob far from the background; its core's median is the observed
       colour; coverage = projection of every pixel on that colour (1 inside, 0 on the background), kept on
       the blob re-segmented at 50 % coverage plus a two-pixel ring (the anti-aliased or blurred edge).
    2. colour: the palette colour of nearest chromaticity.
    3. analysis by synthesis: for each shape, the area and centroid of the coverage give its side and
       bounding-box centre; the shape whose drawn coverage (sharp or slightly blurred) is closest (L2) wins,
       and its box gives position (nearest centre) and size (side against the geometric mean of the sizes)."""
    x = _as_image(img).astype(np.float32)
    H, W, _ = x.shape
    d = x - np.asarray(BACKGROUND, np.float32)  # (H, W, 3)
    strength = np.abs(d).max(axis=2)  # (H, W)
    seed = _largest_component(strength > FG_THRESHOLD)
    if seed is None:
        return Attrs(None, None, None, None)
    s = strength[seed]
    observed = np.median(d[seed][s >= 0.8 * s.max()], axis=0)  # (3,) colour of the blob's core
    colour = _nearest_colour(observed + np.asarray(BACKGROUND, np.float32))
    coverage = np.clip((d @ observed) / max(float(observed @ observed), 1e-6), 0, 1)  # (H, W)
    blob = _largest_component(coverage >= 0.5)
    blob = seed if blob is None else blob
    ring = blob
    for _ in range(2):  # dilate by two pixels (8-neighbourhood): the anti-aliased or blurred edge
        p = np.pad(ring, 1)
        ring = np.logical_or.reduce([p[1 + dy:H + 1 + dy, 1 + dx:W + 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    soft = coverage * ring  # (H, W)

    area = soft.sum() / (H * W)  # fraction of the image
    cx = (soft.sum(0) * (np.arange(W) + 0.5)).sum() / soft.sum() / W  # centroid, fractions of the image
    cy = (soft.sum(1) * (np.arange(H) + 0.5)).sum() / soft.sum() / H
    best = None
    for shape in SHAPES:
        side = np.sqrt(area / FILL[shape])
        box_cy = cy - side / 6 if shape == "triangle" else cy  # a triangle's centroid is side/6 below its box centre
        drawn = coverage_map(shape, cx, box_cy, side, H, W)  # (H, W)
        for sigma in FIT_BLURS:
            g = _gauss_matrix(H, sigma * H / 32), _gauss_matrix(W, sigma * W / 32)
            err = ((g[0] @ drawn @ g[1].T - soft) ** 2).sum()
            if best is None or err < best[0]:
                best = (err, shape, box_cy, side)
    _, shape, box_cy, side = best
    position = min(POSITIONS, key=lambda k: (POSITIONS[k][0] - cx) ** 2 + (POSITIONS[k][1] - box_cy) ** 2)
    size = "large" if side > SIZE_THRESHOLD else "small"
    return Attrs(colour, shape, position, size)


ATTRIBUTES = ("colour", "shape", "position", "size")


def score(img, attrs):
    """{attribute: bool} for one image against the attributes it should show."""
    want, got = as_attrs(attrs), analyze(img)
    return {k: getattr(got, k) == getattr(want, k) for k in ATTRIBUTES}


def evaluate(images, attrs_list):
    """Per-attribute accuracy and "all" (all four right) over a batch: images float (N, 3, H, W) in [-1, 1],
    uint8 (N, H, W, 3), or a list of uint8 (H, W, 3)."""
    if isinstance(images, torch.Tensor):
        images = to_uint8(images)
    if len(images) != len(attrs_list):
        raise ValueError(f"{len(images)} images but {len(attrs_list)} attribute sets")
    if len(images) == 0:
        raise ValueError("evaluate() needs at least one image")
    scores = [score(img, a) for img, a in zip(images, attrs_list)]
    out = {k: float(np.mean([s[k] for s in scores])) for k in ATTRIBUTES}
    out["all"] = float(np.mean([all(s.values()) for s in scores]))
    return out


def image_grid(images, nrow=8, pad=2):
    """Tile images (float (N, 3, H, W) in [-1, 1] or uint8 (N, H, W, 3)) into one uint8 (rows, cols, 3) grid."""
    if isinstance(images, torch.Tensor):
        images = to_uint8(images)
    images = np.asarray(images)
    n, h, w, _ = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 128, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    return grid


# -----------------------------------------------------------------------------
# real image-text pairs

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_WORKERS = 64  # rows of the shared load counters: one per DataLoader worker, so no two processes write one
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def transform(img, size, flip=False):
    """PIL image -> float (3, size, size) in [-1, 1], as the LaVi-Bridge release (torchvision): resize the
    shorter side to size (BILINEAR, PIL's anti-aliased filter; long side int(size * long / short)),
    center crop (offset round((L - size) / 2)), optional horizontal flip."""
    img = img.convert("RGB")
    w, h = img.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - size) / 2)), int(round((nh - size) / 2))
    img = img.crop((left, top, left + size, top + size))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(np.array(img))


def _expand_braces(pattern):
    """WebDataset shard lists: "shard-{000..009}.tar" -> 10 names (zero padding kept)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m is None:
        return [pattern]
    a, b = m.group(1), m.group(2)
    width = len(a) if a.startswith("0") else 0
    return [n for i in range(int(a), int(b) + 1)
            for n in _expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])]


def _split_key(name):
    """WebDataset key/extension split: the extension starts at the first dot of the base name."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(d, stem), "." + ext.lower()


def collate(batch):
    """[(image (3, H, W), caption), ...] -> (images (B, 3, H, W), captions list)."""
    images, captions = zip(*batch)
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) != 1:
        raise ValueError(f"cannot batch images of different shapes: {sorted(shapes)}")
    return torch.stack(images), list(captions)  # (B, 3, H, W)


class ImageTextDataset(torch.utils.data.IterableDataset):
    """Image-caption pairs from a TSV "path<TAB>caption" (paths relative to the TSV's folder), a folder of
    image + .txt pairs (same stem, searched recursively), or WebDataset-style plain .tar shards (a list, a
    glob, or "shard-{000..009}.tar"; image and .txt share a key). Yields (image float (3, size, size) in
    [-1, 1], caption).

    An IterableDataset: each epoch is one seeded permutation of the index, identical on every rank, dealt
    round-robin over (rank, DataLoader worker) shards, so one pass visits every item exactly once across
    all of them. repeat=True (training) runs endless epochs (set_epoch picks the first); repeat=False
    stops after one pass (its shards may differ in length by one item).
    Bad data is counted and skipped, never replaced by another item: a TSV line without a TAB or an
    unreadable caption file (bad_line) and a missing image or caption (missing) are found when the index is
    built; an image that does not decode (unreadable) when it is loaded. stats / report() add up the
    counters of all DataLoader workers (shared memory); ok counts images loaded."""

    def __init__(self, source, size=512, flip=True, rank=0, world_size=1, shuffle=True, seed=0, repeat=True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.source, self.size, self.flip, self.rank, self.world_size = source, size, flip, rank, world_size
        self.shuffle, self.seed, self.repeat, self.epoch = shuffle, seed, repeat, 0
        self.index_counts = {"bad_line": 0, "missing": 0, "unreadable": 0}  # found while indexing
        self.examples = {k: [] for k in self.index_counts}  # a few of each, for the report
        self.items = self._build_index(source)  # [(path, offset or None, nbytes or None, caption, name)]
        self._load_counts = torch.zeros(MAX_WORKERS, 2, dtype=torch.long).share_memory_()  # (worker, [unreadable, ok])
        if not self.items:
            raise ValueError(f"no usable image-text pair in {source!r}: " + self._problems())
        if any(self.index_counts.values()):
            warnings.warn(f"{self.report()} (skipped)")

    # --- building the index

    def _bad(self, kind, where):
        self.index_counts[kind] += 1
        if len(self.examples[kind]) < 5:
            self.examples[kind].append(where)

    def _build_index(self, source):
        if isinstance(source, (list, tuple)):
            return self._index_tars(list(source))
        source = os.fspath(source)
        if os.path.isdir(source):
            return self._index_folder(source)
        if re.search(r"[*?\[]|\{\d+\.\.\d+\}", source):
            shards = sorted({p for pat in _expand_braces(source) for p in (glob.glob(pat) or [pat])})
            return self._index_tars(shards)
        if source.endswith(".tar"):
            return self._index_tars([source])
        return self._index_tsv(source)

    def _index_tsv(self, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"caption file not found: {path}")
        root, items = os.path.dirname(os.path.abspath(path)), []
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue  # blank lines are layout, not data
                rel, tab, cap = line.partition("\t")
                if not tab or not rel.strip():
                    self._bad("bad_line", f"{path}:{n}: {line[:80]!r}")
                    continue
                p = os.path.join(root, rel.strip())
                if not os.path.isfile(p):
                    self._bad("missing", f"{path}:{n}: {p}")
                    continue
                items.append((p, None, None, cap.strip(), p))
        return items

    def _pair(self, groups, read_caption, where):
        """groups: {key: {ext: handle}} -> items; counts missing halves and unreadable captions."""
        items = []
        for key in sorted(groups):
            g = groups[key]
            imgs = [e for e in g if e in IMAGE_EXTS]
            if not imgs and ".txt" not in g:
                continue  # other files (json, ...) are not ours
            if not imgs or ".txt" not in g:
                self._bad("missing", f"{where}: {key} has no {'image' if not imgs else 'caption (.txt)'}")
                continue
            try:
                cap = read_caption(g[".txt"]).decode("utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                self._bad("bad_line", f"{where}: {key}.txt: {e}")
                continue
            items.append(g[sorted(imgs)[0]] + (cap, f"{where}:{key}"))
        return items

    def _index_folder(self, folder):
        items = []
        for d, dirs, files in os.walk(folder):
            dirs.sort()
            groups = {}
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                groups.setdefault(os.path.join(d, stem), {})[ext.lower()] = (os.path.join(d, name), None, None)

            def read(h):
                with open(h[0], "rb") as f:
                    return f.read()
            items += self._pair(groups, read, d)
        return items

    def _index_tars(self, shards):
        if not shards:
            raise FileNotFoundError("no tar shard given")
        items = []
        for path in shards:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"tar shard not found: {path}")
            groups = {}
            try:
                with tarfile.open(path, mode="r:") as tf:  # plain tar only: members are read by offset
                    for m in tf:
                        if m.isfile():
                            key, ext = _split_key(m.name)
                            groups.setdefault(key, {})[ext] = (path, m.offset_data, m.size)
            except tarfile.ReadError as e:  # truncated or not a plain tar: keep what was read before
                self._bad("unreadable", f"{path}: {e}")

            def read(h):
                with open(h[0], "rb") as f:
                    f.seek(h[1])
                    data = f.read(h[2])
                if len(data) != h[2]:
                    raise OSError("truncated member")
                return data
            items += self._pair(groups, read, path)
        return items

    # --- reporting

    @property
    def stats(self):
        """{bad_line, missing, unreadable, ok} over the index and every worker's loads so far."""
        unreadable, ok = self._load_counts.sum(0).tolist()
        return {"bad_line": self.index_counts["bad_line"], "missing": self.index_counts["missing"],
                "unreadable": self.index_counts["unreadable"] + unreadable, "ok": ok}

    def _problems(self):
        parts = [f"{k} {v}" for k, v in self.index_counts.items()]
        ex = [e for k in self.examples for e in self.examples[k][:2]]
        return ", ".join(parts) + (" (e.g. " + "; ".join(ex) + ")" if ex else "")

    def report(self):
        """One line: the source, usable items, and every counter with a few examples of index-time problems."""
        s = self.stats
        msg = (f"ImageTextDataset {self.source!r}: {len(self.items)} usable pairs; loaded ok {s['ok']}, "
               f"bad_line {s['bad_line']}, missing {s['missing']}, unreadable {s['unreadable']}")
        ex = [e for k in self.examples for e in self.examples[k][:2]]
        return msg + (" (e.g. " + "; ".join(ex) + ")" if ex else "")

    # --- loading

    def set_epoch(self, epoch):
        self.epoch = epoch

    def load(self, i, flip=False):
        """Item i as (image (3, size, size), caption), or None when its image does not decode."""
        path, offset, nbytes, cap, name = self.items[i]
        try:
            if offset is None:
                img = Image.open(path)
            else:
                with open(path, "rb") as f:
                    f.seek(offset)
                    img = Image.open(io.BytesIO(f.read(nbytes)))
            img.load()  # decode now: truncated and corrupt files fail here, not later
            img = img.convert("RGB")
        except DECODE_ERRORS as e:
            warnings.warn(f"skipping unreadable image {name}: {type(e).__name__}: {e}")
            return None
        return transform(img, self.size, flip), cap

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shard, shards = self.rank * workers + worker, self.world_size * workers
        if shards > len(self.items):
            raise ValueError(f"{len(self.items)} items cannot feed {shards} shards (ranks x workers)")
        counts = self._load_counts[worker % MAX_WORKERS]
        epoch = self.epoch
        while True:
            order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.items)) if self.shuffle
                     else np.arange(len(self.items)))
            flips = np.random.default_rng([self.seed, epoch, shard, 1])
            yielded = 0
            for i in order[shard::shards]:
                flip = bool(self.flip and flips.random() < 0.5)
                out = self.load(int(i), flip)
                if out is None:
                    counts[0] += 1
                    continue
                counts[1] += 1
                yielded += 1
                yield out
            if not yielded:
                raise RuntimeError(f"shard {shard}/{shards} of {self.source!r} has no readable image: {self.report()}")
            if not self.repeat:
                return
            epoch += 1

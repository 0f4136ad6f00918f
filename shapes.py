"""
The shapes world: this repository's CPU-sized world, in which the whole method runs end to end in minutes
and is measured (as nanoGPT's shakespeare_char). One coloured shape on a black background, 6 colours x
3 shapes x 5 positions x 2 sizes, captioned by a small grammar (and its Spanish translation); a frozen
pretrained base model of it (a pixel-space U-Net with its own word-level text encoder, shipped as
shapes/base.safetensors); an analyzer that reads the attributes back from an image, so that a bridge is
scored without a human looking at pictures, on three generalisation sets: "seen" (training wording,
training combinations), "unseen" (colour/shape pairs never drawn in training) and "paraphrase" (synonyms
and phrasings that never occur in a training caption); and the image grids of sample.py and train.py.
"""
import hashlib
import itertools
import json
import os
import re
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import audio
from model_io import BadInput, MissingInput, load_strict, read_safetensors, save_safetensors
from unet import UNet, UNetConfig

# -----------------------------------------------------------------------------
# attributes and drawing

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
# bounding-box side (width = height for all shapes), fraction of the image
SIZES = {"small": 0.2, "large": 0.4}
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
            raise BadInput(f"unknown {name} {getattr(a, name)!r} (choose from {', '.join(allowed)})")
    return a


def all_attrs(split="train"):
    """Every (colour, shape, position, size) of a split, in a fixed order: 140 for train/seen/paraphrase,
    40 for unseen."""
    if split not in SPLITS:
        raise BadInput(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
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
        raise BadInput(f"image size {size} too small for the shapes world (>= 16)")
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
# captions

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
                "yellow": ("golden", "lemon"), "purple": ("violet", "amethyst"),
                "orange": ("tangerine", "amber")}
PARA_SHAPES = {"circle": ("disc", "ball"), "square": ("box", "tile"),
               "triangle": ("pyramid", "triangular shape")}
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
            PARA_TEMPLATES, PARA_COLOURS[a.colour], PARA_SHAPES[a.shape], PARA_SIZES[a.size],
            PARA_WHERE[a.position])]
    if grammar == "spanish":
        words = dict(colour=SPANISH_COLOURS[a.colour], shape=SPANISH_SHAPES[a.shape],
                     size=SPANISH_SIZES[a.size], where=SPANISH_WHERE[a.position],
                     place=SPANISH_PLACE[a.position])
        return [t.format(**words) for t in SPANISH_TEMPLATES]
    raise BadInput(f"unknown grammar {grammar!r} (train, paraphrase or one of {', '.join(LANGUAGES)})")


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
        raise BadInput(f"unknown language {language!r} (choose from {', '.join(LANGUAGES)})")
    if split == "paraphrase":
        raise BadInput("the paraphrase grammar has no translation: use train, seen or unseen")
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
    syn = {w for table in (PARA_COLOURS, PARA_SHAPES, PARA_SIZES) for v in table.values() for p in v
           for w in words_of(p)}
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
    """Word ids for the toy base model's own text encoder: (ids LongTensor (B, max_len), mask BoolTensor (B,
    max_len)). 0 = pad (mask False), 1 = a word outside WORDS (every paraphrase synonym). Longer captions are
    truncated. An empty caption (the CFG null caption) is all pad: its mask is all False."""
    if isinstance(captions, str):
        captions = [captions]
    ids = torch.zeros(len(captions), max_len, dtype=torch.long)  # (B, T)
    for i, c in enumerate(captions):
        t = [WORD_IDS.get(w, 1) for w in words_of(c)][:max_len]
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    return ids, ids != 0


# -----------------------------------------------------------------------------
# sampling, the training stream and the evaluation sets

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
        raise BadInput(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    imgs, caps, attrs = zip(*(_sample(rng, split, size) for _ in range(n)))
    return torch.stack([to_tensor(x) for x in imgs]), list(caps), list(attrs)  # (n, 3, H, W)


def samples_at(seed, gs, size=32, split="train"):
    """The training samples of global sample indices gs: (images (len(gs), 3, H, W), captions), sample g
    drawn from its own generator (seed, g), so that any batch size, world size or accumulation draws the
    same sample for the same g."""
    imgs, caps, _ = zip(*(_sample(np.random.default_rng([seed, g]), split, size) for g in gs))
    return torch.stack([to_tensor(x) for x in imgs]), list(caps)


class ShapesDataset(torch.utils.data.IterableDataset):
    """Endless (image float (3, H, W) in [-1, 1], caption) stream of the shapes world, deterministic from
    seed. Each (rank, DataLoader worker) draws its own independent stream, so no two of them repeat each
    other."""

    def __init__(self, seed=0, size=32, split="train", rank=0, world_size=1):
        if split not in SPLITS:
            raise BadInput(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
        if not 0 <= rank < world_size:
            raise BadInput(f"rank {rank} outside world_size {world_size}")
        self.seed, self.size, self.split, self.rank, self.world_size = seed, size, split, rank, world_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), self.rank, self.world_size, worker,
                                     workers])
        while True:
            img, cap, _ = _sample(rng, self.split, self.size)
            yield to_tensor(img), cap


# -----------------------------------------------------------------------------
# the world spoken: its captions read aloud by espeak-ng voices, the source of the sound bridges

# (espeak-ng voice, words a minute, pitch 0-99): the training voices, and voices held out for evaluation
SPEECH_VOICES = (("en-us", 160, 50), ("en-us+f3", 175, 65), ("en-gb", 150, 45), ("en-us+m3", 185, 40),
                 ("en-gb-scotland", 165, 55), ("en-029+f2", 155, 60))
HELDOUT_VOICES = (("en-gb-x-rp+f4", 170, 70), ("en-us-nyc+m5", 150, 35))
SPEECH_WINDOW, SPEECH_POOL = 4.0, 4  # seconds of audio the encoder hears; its tokens averaged in fours
SPEECH_CACHE = os.path.join("out", "speech")  # the synthesized WAVs (16 kHz mono), made once


def spoken(captions, voices, folder=SPEECH_CACHE, progress=True):
    """WAV paths of each caption read by the voice of the same index (voices cycled): synthesized with
    espeak-ng on first use, then read from folder."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, c in enumerate(tqdm(captions, desc="speaking", disable=not progress, leave=False)):
        voice, speed, pitch = voices[i % len(voices)]
        key = hashlib.sha1(f"{c}|{voice}|{speed}|{pitch}".encode()).hexdigest()[:16]
        path = os.path.join(folder, f"{voice.replace('+', '_')}_{key}.wav")
        if not os.path.exists(path):
            clip = audio.synthesize(c, voice=voice, speed=speed, pitch=pitch)
            audio.write_wav(path, clip, audio.SAMPLE_RATE)
        paths.append(path)
    return paths


def speech_pairs(split="train", per_caption=2, seed=0, folder=SPEECH_CACHE):
    """[(WAV path, caption)]: every caption of a split spoken by per_caption training voices drawn for it."""
    caps = all_captions(split)
    rng = np.random.default_rng([seed, 77])
    picks = [rng.choice(len(SPEECH_VOICES), per_caption, replace=False) for _ in caps]
    items = [(c, SPEECH_VOICES[v]) for c, vs in zip(caps, picks) for v in vs]
    captions = [c for c, _ in items]
    return list(zip(spoken(captions, [v for _, v in items], folder), captions))


def colourless(attrs):
    """A training-grammar caption of attrs without its colour (the speech half of a mixed prompt)."""
    a = as_attrs(attrs)
    return re.sub(r"\ba (?=[aeiou])", "an ", f"a {a.size} {a.shape} {WHERE[a.position]}")


# "spanish": the seen combinations, captioned in Spanish; spoken / spoken-unseen: the seen / unseen
# combinations in held-out voices; mixed: the seen ones, the shape spoken (colourless()) and the colour typed
SPOKEN_SETS = ("spoken", "spoken-unseen", "mixed")
EVAL_SETS = ("seen", "unseen", "paraphrase") + LANGUAGES + SPOKEN_SETS


def typed_sets(sets):
    """The typed counterparts of evaluation sets (spoken -> seen, spoken-unseen -> unseen; mixed has
    none), in order, each once."""
    typed = [{"spoken": "seen", "spoken-unseen": "unseen"}.get(s, s) for s in sets if s != "mixed"]
    return list(dict.fromkeys(typed))


def check_sets(sets, speech):
    """A speech bridge is evaluated on the spoken sets, any other on the typed ones."""
    wrong = [s for s in sets if (s in SPOKEN_SETS) != speech]
    if wrong:
        right = SPOKEN_SETS if speech else [s for s in EVAL_SETS if s not in SPOKEN_SETS]
        raise BadInput(f"eval sets {', '.join(wrong)}: a {'speech' if speech else 'text'} bridge is measured "
                       f"on {', '.join(right)}")


def eval_set(name, n=None, seed=0):
    """A fixed list of (caption, Attrs) for name in seen / unseen / paraphrase / spanish.
    n=None: every attribute tuple of the split exactly once (140 / 40 / 140 / 140), captions drawn from seed;
    else the first n of a seeded shuffle (cycled when n exceeds the count)."""
    if name not in EVAL_SETS:
        raise BadInput(f"unknown eval set {name!r} (choose from {', '.join(EVAL_SETS)})")
    if name in SPOKEN_SETS:  # the typed sets' items; evaluate_bridge speaks them
        return eval_set("unseen" if name == "spoken-unseen" else "seen", n, seed)
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
# the analyzer: reading an image back (for scoring generated samples)

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
        nb = np.minimum.reduce([p[1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx]
                                for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
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
        raise BadInput(f"expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
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
        ring = np.logical_or.reduce([p[1 + dy:H + 1 + dy, 1 + dx:W + 1 + dx]
                                     for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    soft = coverage * ring  # (H, W)

    area = soft.sum() / (H * W)  # fraction of the image
    cx = (soft.sum(0) * (np.arange(W) + 0.5)).sum() / soft.sum() / W  # centroid, fractions of the image
    cy = (soft.sum(1) * (np.arange(H) + 0.5)).sum() / soft.sum() / H
    best = None
    for shape in SHAPES:
        side = np.sqrt(area / FILL[shape])
        # a triangle's centroid is side/6 below its box centre
        box_cy = cy - side / 6 if shape == "triangle" else cy
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
        raise BadInput(f"{len(images)} images but {len(attrs_list)} attribute sets")
    if len(images) == 0:
        raise BadInput("evaluate() needs at least one image")
    scores = [score(img, a) for img, a in zip(images, attrs_list)]
    out = {k: float(np.mean([s[k] for s in scores])) for k in ATTRIBUTES}
    out["all"] = float(np.mean([all(s.values()) for s in scores]))
    return out


# -----------------------------------------------------------------------------
# the base model: a pixel-space U-Net and its own word-level text encoder

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes", "base.safetensors")
# the base model predicts v; DDIM's clip_sample stays off (it clips the x0 estimate but steps with the
# unclipped noise estimate, and with v-prediction that drift grows with the number of steps)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                 timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                 prediction_type="v_prediction")


class PixelCodec(nn.Module):
    """The shapes world's 'VAE': an exact 2x2 space-to-depth, (B, 3, 32, 32) <-> (B, 12, 16, 16)."""
    downscale = 2  # pixels per latent along each side

    def __init__(self):
        super().__init__()
        self.cfg = SimpleNamespace(scaling_factor=1.0)

    def encode(self, x):
        """x (B, 3, H, W) -> (mean, logvar) of a point mass: the posterior sample is the mean."""
        z = F.pixel_unshuffle(x, 2)  # (B, 12, H/2, W/2)
        return z, torch.full_like(z, -30.0)

    def decode(self, z):
        return F.pixel_shuffle(z, 2)  # (B, 3, H, W)


@dataclass
class WordEncoderConfig:
    vocab_size: int = VOCAB_SIZE
    max_length: int = 16
    width: int = 64
    layers: int = 2
    heads: int = 4


class WordEncoder(nn.Module):
    """The base model's native text encoder: word embeddings + a small pre-LN transformer, with the
    tokenize / forward(ids, mask) / width interface of encoders.TextEncoder."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.width, self.lora_targets = cfg, cfg.width, None  # no LoRA in the word encoder
        self.tok = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Embedding(cfg.max_length, cfg.width)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)

    @property
    def model(self):  # the bridge addresses an encoder's network as `.model`, as with HF models
        return self

    @property
    def token_count(self):
        return self.cfg.max_length

    def tokenize(self, prompts):
        return tokenize_words(prompts, self.cfg.max_length)

    def forward(self, ids, mask):
        """ids, mask (B, T) -> hidden (B, T, width), mask (B, T) for the vision model."""
        x = self.tok(ids) + self.pos.weight[: ids.shape[1]]  # (B, T, C)
        # PyTorch's inference fast path turns a fully padded row (the empty caption of CFG) into NaN;
        # the regular path, which training takes, keeps it finite: use that one always
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            x = self.norm(self.blocks(x, src_key_padding_mask=mask == 0))
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
        return x, mask

    def encode(self, prompts):
        return self(*self.tokenize(prompts))


def unet_config():
    """A 3.6M-parameter pixel-space U-Net: 16x16x12 in, attention only at 8x8 and 4x4."""
    return UNetConfig(in_channels=12, out_channels=12, block_out_channels=(32, 64, 128), layers_per_block=1,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      attention_head_dim=4, cross_attention_dim=64, sample_size=16)


def base_path(vision):
    """'shapes' is the shipped base model, 'shapes:PATH' another base model file of this world."""
    return BASE if vision == "shapes" else vision[len("shapes:"):]


def load_base(path=BASE):
    """(U-Net, word encoder, scheduler config) of a base model file, loaded strictly."""
    if not os.path.isfile(path):
        raise MissingInput(f"the shapes base model {path} is missing: train it with "
                           f"`python train.py --preset shapes-base` (see README)")
    sd, meta = read_safetensors(path, "shapes base model")
    ucfg = json.loads(meta["unet"])
    unet = UNet(UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ucfg.items()}))
    words = WordEncoder(WordEncoderConfig(**json.loads(meta["text"])))
    load_strict(unet, {k[5:]: v for k, v in sd.items() if k.startswith("unet.")}, "shapes U-Net")
    load_strict(words, {k[5:]: v for k, v in sd.items() if k.startswith("text.")}, "shapes word encoder")
    return unet, words, json.loads(meta["scheduler"]) if "scheduler" in meta else dict(SCHEDULER)


def new_unet():
    """(U-Net, None, scheduler config) of a base model to train from scratch, as load_base gives them."""
    return UNet(unet_config()), None, dict(SCHEDULER)


def new_words():
    """A word encoder to train from scratch with new_unet()'s U-Net."""
    return WordEncoder(WordEncoderConfig())


def save_base(path, unet, words, step):
    """U-Net and word encoder in one safetensors file, their configs in its metadata."""
    sd = {f"unet.{k}": v.float() for k, v in unet.state_dict().items()}
    sd.update({f"text.{k}": v.float() for k, v in words.state_dict().items()})
    meta = {"unet": json.dumps(asdict(unet.cfg)), "text": json.dumps(asdict(words.cfg)), "step": str(step),
            "scheduler": json.dumps(SCHEDULER)}
    save_safetensors(sd, path, meta)


# -----------------------------------------------------------------------------
# evaluating a bridge: images for held-out captions, read back by the analyzer

STEPS, GUIDANCE = 20, 1.5  # DDIM steps and CFG scale of this world (the README gives the measurements)
PROMPTS = ["a small red circle on the left", "a large blue square at the top",
           "a small green triangle on the right", "a large yellow circle in the center",
           "a small purple square at the bottom", "a large orange triangle on the left",
           "a large red triangle at the bottom", "a small blue circle at the top"]


def evaluate_bridge(bridge, n=48, sets=("seen", "unseen", "paraphrase"), steps=STEPS, guidance=GUIDANCE,
                    seed=0, scheduler="ddim", mix_split=1):
    """{set: {attribute: accuracy}} of anything with model.Bridge's sample(); the spoken sets (a speech
    bridge) in the held-out voices; "mixed" with GlueGen's rule at mix_split."""
    res = {}
    for name in tqdm(sets, desc="evaluating", leave=False):
        items = eval_set(name, n=n, seed=seed)
        prompts, kw = [c for c, _ in items], {}
        if name == "mixed":
            prompts = spoken([colourless(a) for _, a in items], HELDOUT_VOICES, progress=False)
            kw = dict(mix=[a.colour for _, a in items], mix_split=mix_split)
        elif name in SPOKEN_SETS:
            prompts = spoken(prompts, HELDOUT_VOICES, progress=False)
        imgs = bridge.sample(prompts, steps=steps, guidance=guidance, seed=seed, progress=False,
                             scheduler=scheduler, **kw)
        res[name] = evaluate(imgs.numpy(), [a for _, a in items])
    return res


def eval_table(rows):
    """{model: {set: {attribute: accuracy}}} -> a markdown table, one row per (model, set)."""
    attrs = list(next(iter(next(iter(rows.values())).values())))
    lines = ["| model | set | " + " | ".join(attrs) + " |", "|---|---|" + "---|" * len(attrs)]
    for model, res in rows.items():
        for s, acc in res.items():
            lines.append(f"| {model} | {s} | " + " | ".join(f"{100 * acc[a]:.0f}%" for a in attrs) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# image grids a person can read: tiles upscaled by nearest neighbour, each prompt written under its tile

GRID_TILE = 128  # smallest tile side in pixels


def save_grid(images, path, captions=None, cols=None):
    """images (N, H, W, 3) uint8 -> one PNG: tiles of at least GRID_TILE px, captions (one per image) under
    them, wrapped to the tile's width."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    scale = max(1, -(-GRID_TILE // min(h, w)))  # nearest-neighbour factor
    th, tw = h * scale, w * scale
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    font = ImageFont.load_default()
    lines = [_wrap(c, font, tw - 4) for c in captions] if captions is not None else [[] for _ in range(n)]
    line_h = (font.getbbox("Ag")[3] + 2) if captions is not None else 0
    text_h = line_h * max((len(ls) for ls in lines), default=0) + (4 if captions is not None else 0)
    pad = 2
    grid = Image.new("RGB", (cols * (tw + pad) + pad, rows * (th + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x, y = pad + c * (tw + pad), pad + r * (th + text_h + pad)
        grid.paste(Image.fromarray(im).resize((tw, th), Image.NEAREST), (x, y))
        for j, line in enumerate(lines[i]):
            draw.text((x + 2, y + th + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)


def _wrap(text, font, width):
    """text -> lines no wider than width pixels in font, broken between words."""
    out, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            out.append(line)
            trial = word
        line = trial
    return out + ([line] if line else [])

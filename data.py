"""
The data a training run reads, step by step:
- ImageTextDataset: image-caption pairs from a TSV "path<TAB>caption" (as the LaVi-Bridge release reads), a
  folder of image + .txt pairs, or WebDataset-style .tar shards; resized, center-cropped and flipped as the
  release, each image's original size and crop recorded (SDXL's micro-conditions); with buckets, cropped
  to the bucket nearest its aspect ratio instead of a square. Bad data is counted and reported: a bad line
  or missing file is skipped while indexing; an image that does not decode is replaced, in its batch, by
  the next readable item of the run's order.
- the order of a run: global sample index g -> (item, flip), a function of (seed, g) alone, so that a run
  draws the same data whatever its world size, DataLoader workers or resume point (with buckets, of
  (seed, g, micro-batch size): every micro-batch is one bucket's);
- the latent cache: every image VAE-encoded once (both flips), the posterior kept;
- caption pairs for the text-only methods (source<TAB>target files, or the shapes world's);
- Batches: one rank's micro-batches by step, from any of these or drawn from the shapes world.
"""
import codecs
import functools
import glob
import io
import json
import os
import re
import tarfile
import warnings

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import audio
import shapes
from model_io import BadInput, MissingInput, read_safetensors, save_safetensors

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
MAX_PIXELS = 64 * 2 ** 20  # larger images are refused from their header, before decoding
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white


def text_lines(path):
    """(line number, text without the line break, or None where the line is not UTF-8) of a text file;
    a UTF-8 byte-order mark is dropped."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield n, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield n, None


def to_rgb(img):
    """Any image Pillow opens -> 8-bit RGB: 16- and 32-bit greyscale scaled down (not clipped), float
    greyscale from [0, 1], palette images through their palette, transparency composited on BACKGROUND."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        peak = a.max(initial=0)
        top = 1.0 if img.mode == "F" and peak <= 1 else 255.0 if peak <= 255 else 65535.0
        img = Image.fromarray(np.clip(np.round(a * (255 / top)), 0, 255).astype(np.uint8), "L")
    if img.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba)
    return img.convert("RGB")

# -----------------------------------------------------------------------------
# real image-text pairs


def _hw(size):
    """An image size: an int (square) or (height, width)."""
    return (size, size) if isinstance(size, int) else tuple(size)


def crop_box(w, h, size):
    """(resized width, resized height, left, top) of a w x h image resized to cover size (an int, square, or
    (H, W)) and center-cropped to it. Square: the release's (torchvision) rule, the shorter side to size, the
    long side int(size * long / short); offsets round((L - size) / 2)."""
    th, tw = _hw(size)
    if w * th <= h * tw:  # relatively taller than the target: the width fits
        nw, nh = tw, max(th, int(tw * h / w))
    else:
        nw, nh = max(tw, int(th * w / h)), th
    return nw, nh, int(round((nw - tw) / 2)), int(round((nh - th) / 2))


def micro_conditions(w, h, size, flip=False):
    """SDXL's conditions of a w x h image as transform() crops it: (original height, original width, crop
    top, crop left), the crop in pixels of the resized image as the model sees it (flipped: from its new
    left edge, as a flip before the crop gives it)."""
    nw, _, left, top = crop_box(w, h, size)
    return h, w, top, nw - _hw(size)[1] - left if flip else left


def transform(img, size, flip=False):
    """PIL image -> float (3, H, W) in [-1, 1], as the LaVi-Bridge release (torchvision): resize to cover
    size (an int: the square size x size; or a bucket (H, W)) with BILINEAR (PIL's anti-aliased filter),
    center crop (crop_box), optional horizontal flip."""
    img = to_rgb(img)
    w, h = img.size
    (th, tw), (nw, nh, left, top) = _hw(size), crop_box(w, h, size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    img = img.crop((left, top, left + tw, top + th))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)


def make_buckets(size, step=64, max_ratio=4.0):
    """Aspect-ratio buckets of about size x size pixels (SDXL's: 1024 -> 1024x1024, 1152x896, ..., 512x2048):
    [(H, W)] by aspect ratio W / H: for each width the tallest height with H * W <= size^2, both multiples
    of step, the longer side at most max_ratio x the shorter; each also turned on its side."""
    out = {(size, size)}
    for w in range(step, 4 * size + 1, step):
        h = size * size // w // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            out |= {(h, w), (w, h)}
    return sorted(out, key=lambda b: b[1] / b[0])


def nearest_bucket(w, h, buckets):
    """The index of the bucket (H, W) whose aspect ratio is nearest a w x h image's (in log ratio; the first
    of equals)."""
    r = np.log(w / h)
    return int(np.argmin([abs(np.log(bw / bh) - r) for bh, bw in buckets]))


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


class ImageTextDataset:
    """Image-caption pairs, indexed once: a TSV "path<TAB>caption" (paths relative to the TSV's folder), a
    folder of image + .txt pairs (same stem, searched recursively), or WebDataset-style plain .tar shards (a
    list, a glob, or "shard-{000..009}.tar"; image and .txt share a key). load(i, flip) decodes item i.
    Skipped while indexing and counted (index_counts): a TSV line without a TAB, not UTF-8, or a caption
    file that cannot be read (bad_line); a TSV line of more than two fields (extra_fields: which is the
    caption?); a missing image or caption (missing); a shard that does not read (unreadable). An empty
    caption is kept and counted (empty_captions). An image that does not decode is found when loaded.
    buckets=True: make_buckets(size, bucket_step); each item goes to the bucket nearest its aspect ratio,
    read from the image's header (one whose header does not read goes to the square bucket, and is found
    when loaded)."""

    def __init__(self, source, size=512, flip=True, buckets=False, bucket_step=64):
        self.source, self.size, self.flip = source, size, flip
        self.index_counts = {"bad_line": 0, "extra_fields": 0, "missing": 0, "unreadable": 0}
        self.examples = {k: [] for k in self.index_counts}  # a few of each, for the report
        self.empty_captions = 0
        self.items = self._build_index(source)  # [(path, offset or None, nbytes or None, caption, name)]
        if not self.items:
            raise BadInput(f"no usable image-text pair in {source!r}: " + self._problems())
        if any(self.index_counts.values()):
            warnings.warn(f"{self.report()} (skipped)")
        self.buckets, self.bucket_of = None, None  # [(H, W)], each item's bucket index
        if buckets:
            if size % bucket_step:
                raise BadInput(f"--size {size} is not a multiple of --bucket-step {bucket_step}")
            self.buckets = make_buckets(size, bucket_step)
            square = self.buckets.index((size, size))
            sizes = [self._header_size(i) for i in tqdm(range(len(self.items)), desc="image sizes",
                                                         disable=len(self.items) < 10000)]
            self.bucket_of = [square if s is None else nearest_bucket(*s, self.buckets) for s in sizes]

    def size_of(self, i):
        """The (H, W) item i is cropped to: its bucket's, or the square."""
        return self.buckets[self.bucket_of[i]] if self.buckets else (self.size, self.size)

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
            raise MissingInput(f"caption file not found: {path}")
        root, items = os.path.dirname(os.path.abspath(path)), []
        for n, line in text_lines(path):
            if line is None:
                self._bad("bad_line", f"{path}:{n}: not UTF-8")
                continue
            if not line.strip():
                continue  # blank lines are layout, not data
            fields = line.split("\t")
            if len(fields) > 2:
                self._bad("extra_fields", f"{path}:{n}: {len(fields)} fields")
                continue
            if len(fields) < 2 or not fields[0].strip():
                self._bad("bad_line", f"{path}:{n}: {line[:80]!r}")
                continue
            p = os.path.join(root, fields[0].strip())
            if not os.path.isfile(p):
                self._bad("missing", f"{path}:{n}: {p}")
                continue
            items.append((p, None, None, self._caption(fields[1]), p))
        return items

    def _caption(self, text):
        text = text.strip()
        self.empty_captions += not text
        return text

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
                cap = read_caption(g[".txt"]).decode("utf-8-sig")
            except (OSError, UnicodeDecodeError) as e:
                self._bad("bad_line", f"{where}: {key}.txt: {e}")
                continue
            items.append(g[sorted(imgs)[0]] + (self._caption(cap), f"{where}:{key}"))
        return items

    def _index_folder(self, folder):
        items = []
        for d, dirs, files in os.walk(folder):
            dirs.sort()
            groups = {}
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                handle = (os.path.join(d, name), None, None)
                groups.setdefault(os.path.join(d, stem), {})[ext.lower()] = handle

            def read(h):
                with open(h[0], "rb") as f:
                    return f.read()
            items += self._pair(groups, read, d)
        return items

    def _index_tars(self, shards):
        if not shards:
            raise MissingInput("no tar shard given")
        items = []
        for path in shards:
            if not os.path.isfile(path):
                raise MissingInput(f"tar shard not found: {path}")
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

    def _problems(self):
        parts = [f"{k} {v}" for k, v in self.index_counts.items()]
        ex = [e for k in self.examples for e in self.examples[k][:2]]
        return "skipped " + ", ".join(parts) + (" (e.g. " + "; ".join(ex) + ")" if ex else "")

    def report(self):
        """One line: the source, its usable pairs, what indexing skipped (with a few examples), and how many
        pairs have an empty caption."""
        return (f"ImageTextDataset {self.source!r}: {len(self.items)} usable pairs "
                f"({self.empty_captions} with an empty caption); {self._problems()}")

    # --- loading

    def _open(self, i):
        """Item i's image, opened (its header read, nothing decoded)."""
        path, offset, nbytes = self.items[i][:3]
        if offset is None:
            return Image.open(path)
        with open(path, "rb") as f:
            f.seek(offset)
            return Image.open(io.BytesIO(f.read(nbytes)))

    def _header_size(self, i):
        """(w, h) of item i from its header, or None where it does not read."""
        try:
            with self._open(i) as img:
                return img.size
        except DECODE_ERRORS:
            return None

    def load(self, i, flip=False):
        """Item i as (image float (3, H, W) in [-1, 1] at size_of(i), caption, SDXL's micro-conditions
        (original height, width, crop top, left) as a tuple of ints), or None when its image does not decode
        (a warning names it)."""
        cap, name = self.items[i][3:]
        try:
            img = self._open(i)
            if img.size[0] * img.size[1] > MAX_PIXELS:  # from the header: nothing decoded yet
                raise ValueError(f"{img.size[0]}x{img.size[1]} pixels, above the limit of {MAX_PIXELS}")
            img.load()  # decode now: truncated and corrupt files fail here, not later
            img = to_rgb(img)
        except DECODE_ERRORS as e:
            warnings.warn(f"skipping unreadable image {name}: {type(e).__name__}: {e}")
            return None
        size = self.size_of(i)
        return transform(img, size, flip), cap, micro_conditions(*img.size, size, flip)


# -----------------------------------------------------------------------------
# the order of a run: global sample index -> item


class IndexedImages(torch.utils.data.Dataset):
    """Global sample index g -> (image (3, H, W), caption, g, [items that did not decode], micro-conditions).
    g walks epochs of a seeded permutation (epoch g // N); the flip is seeded by g. An item that does not
    decode is replaced by the next one of the permutation that does (a function of g alone, so any world
    size, worker count or resume point draws the same); image None: no item of the dataset decodes.
    A bucketed dataset (ds.buckets) needs batch_size, the micro-batch: an epoch is every bucket's items in a
    seeded permutation, cut into micro-batches (the last of a bucket filled from its start again), the
    micro-batches of all buckets in a seeded order; g is sample g % batch_size of micro-batch
    g // batch_size, and a replacement comes from the same bucket."""

    def __init__(self, ds, seed, batch_size=None):
        self.ds, self.seed, self.bs, self._perm = ds, seed, batch_size, (None, None)
        if ds.buckets is not None:
            if not batch_size:
                raise ValueError("a bucketed dataset is ordered by micro-batch: give batch_size")
            members = [[] for _ in ds.buckets]
            for i, k in enumerate(ds.bucket_of):
                members[k].append(i)
            self.members = [np.array(m) for m in members]
            self.per_epoch = sum(-(-len(m) // batch_size) for m in members)

    def __len__(self):
        return 1 << 62

    def _epoch(self, epoch):
        """This epoch's order, made once: a permutation of the items, or (bucketed) [(bucket permutation,
        its micro-batch's items)] in micro-batch order."""
        if self._perm[0] == epoch:
            return self._perm[1]
        if self.ds.buckets is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.ds.items))
        else:
            chunks = []
            for k, m in enumerate(self.members):
                if len(m):
                    perm = m[np.random.default_rng([self.seed, epoch, 2, k]).permutation(len(m))]
                    full = np.resize(perm, -(-len(m) // self.bs) * self.bs)  # wraps round to fill
                    chunks += [(perm, full[j:j + self.bs]) for j in range(0, len(full), self.bs)]
            order = [chunks[c] for c in np.random.default_rng([self.seed, epoch, 3]).permutation(len(chunks))]
        self._perm = (epoch, order)
        return order

    def position(self, g):
        """(item index, flip) of global sample g."""
        flip = bool(self.ds.flip and np.random.default_rng([self.seed, g, 1]).random() < 0.5)
        if self.ds.buckets is None:
            epoch, pos = divmod(g, len(self.ds.items))
            return int(self._epoch(epoch)[pos]), flip
        b, j = divmod(g, self.bs)
        epoch, pos = divmod(b, self.per_epoch)
        return int(self._epoch(epoch)[pos][1][j]), flip

    def candidates(self, g):
        """(item, flip) of g, then those of the items after it in its epoch's permutation (bucketed: its
        bucket's), wrapping round."""
        i, flip = self.position(g)
        if self.ds.buckets is None:
            perm, pos = self._perm[1], g % len(self.ds.items)
        else:
            perm = self._perm[1][(g // self.bs) % self.per_epoch][0]
            pos = int(np.flatnonzero(perm == i)[0])
        for k in range(len(perm)):
            yield int(perm[(pos + k) % len(perm)]), flip

    def __getitem__(self, g):
        bad = []
        for i, flip in self.candidates(g):
            out = self.ds.load(i, flip)
            if out is not None:
                return out[0], out[1], g, bad, out[2]
            bad.append(i)
        return None, None, g, bad, None


class StepSampler(torch.utils.data.Sampler):
    """This rank's global sample indices, one list per micro-batch, from micro-batch `start` on: micro-batch
    m of rank r holds g in [(m * world + r) * batch_size, ... + batch_size)."""

    def __init__(self, start, batch_size, rank, world):
        self.start, self.bs, self.rank, self.world = start, batch_size, rank, world

    def __iter__(self):
        m = self.start
        while True:
            lo = (m * self.world + self.rank) * self.bs
            yield list(range(lo, lo + self.bs))
            m += 1


def collate(items):
    """[IndexedImages items] -> (images (B, 3, H, W) or None when no item decodes, captions, gs, [the items
    that did not decode, one per failed draw], micro-conditions (B, 4) long or None)."""
    bad = [i for x in items for i in x[3]]
    if any(x[0] is None for x in items):
        return None, [], [], bad, None
    sizes = {tuple(x[0].shape) for x in items}
    if len(sizes) != 1:
        raise BadInput(f"cannot batch images of different shapes: {sorted(sizes)}")
    cond = torch.tensor([x[4] for x in items], dtype=torch.long)
    return torch.stack([x[0] for x in items]), [x[1] for x in items], [x[2] for x in items], bad, cond


# -----------------------------------------------------------------------------
# the latent cache


@torch.no_grad()
def build_latent_cache(posterior, ds, folder, batch_size=8, dtype=torch.float16):
    """Encode every item of ds once, both flips, into folder/latents.safetensors: mean and std of the VAE
    posterior (N, 2, C, h, w) (the release samples from it, so the cache keeps the distribution), the
    micro-conditions (N, 2, 4) and a valid flag (N,) (0: the image did not decode). posterior: images
    (B, 3, H, W) -> (mean, std). Returns how many items are unreadable."""
    if ds.buckets is not None:
        raise BadInput("--latent-cache holds one square size: it does not take --buckets (yet)")
    n, means, stds, valid = len(ds.items), [], [], torch.zeros(len(ds.items), dtype=torch.uint8)
    cond = torch.zeros(n, 2, 4, dtype=torch.long)
    for lo in tqdm(range(0, n, batch_size), desc="latent cache"):
        idx = range(lo, min(n, lo + batch_size))
        loaded = [(ds.load(i, False), ds.load(i, True)) for i in idx]
        for j, (a, b) in zip(idx, loaded):
            valid[j] = a is not None and b is not None
            if valid[j]:
                cond[j] = torch.tensor([a[2], b[2]])
        blank = torch.zeros(2, 3, ds.size, ds.size)
        imgs = [torch.stack([a[0], b[0]]) if a is not None and b is not None else blank for a, b in loaded]
        mean, std = posterior(torch.cat(imgs))  # (2b, C, h, w) each
        means.append(mean.view(-1, 2, *mean.shape[1:]).to("cpu", dtype))
        stds.append(std.view(-1, 2, *mean.shape[1:]).to("cpu", dtype))
    meta = {"source": json.dumps(ds.source), "size": str(ds.size), "items": str(n),
            "captions": json.dumps([it[3] for it in ds.items])}
    save_safetensors({"mean": torch.cat(means), "std": torch.cat(stds), "valid": valid, "cond": cond},
                     os.path.join(folder, "latents.safetensors"), meta)
    return int(n - valid.sum())


def load_latent_cache(folder, ds):
    """(mean, std, valid, micro-conditions or None where an older cache lacks them) of a cache made by
    build_latent_cache for this very dataset, else a clear error."""
    path = os.path.join(folder, "latents.safetensors")
    t, meta = read_safetensors(path, "latent cache")
    made_for = (json.loads(meta["source"]), int(meta["size"]), int(meta["items"]))
    if made_for != (ds.source, ds.size, len(ds.items)):
        raise BadInput(f"{path} was made for {meta['source']} at {meta['size']} px ({meta['items']} "
                       f"items), not for {ds.source!r} at {ds.size} px ({len(ds.items)} items): delete "
                       f"it or pass another --latent-cache")
    return t["mean"], t["std"], t["valid"], t.get("cond")


# -----------------------------------------------------------------------------
# one rank's micro-batches, step by step


def open_dataset(source, size, flip, buckets=False, bucket_step=64):
    """The ImageTextDataset of a --data value (comma-separated: a list of shards)."""
    return ImageTextDataset(source.split(",") if "," in source else source, size=size, flip=flip,
                            buckets=buckets, bucket_step=bucket_step)


class Batches:
    """next(step, micro) -> (images or None, posterior (mean, std) or None, captions, global sample indices,
    micro-conditions (B, 4) long: original height, width, crop top, left; None in the shapes world, which
    draws every image at its size) of this rank, by global sample index: the shapes world's sample g from
    (seed, g), real data through a DataLoader (or the latent cache). An image that does not decode is
    replaced by the next readable one and counted: report() gives what was loaded and what was replaced."""

    def __init__(self, source, size, flip, seed, batch_size, grad_accum, rank=0, world=1, start_step=0,
                 num_workers=2, latent_cache="", posterior=None, barrier=None, dataset=None, buckets=False,
                 bucket_step=64):
        self.source, self.size, self.seed, self.bs, self.accum = source, size, seed, batch_size, grad_accum
        self.rank, self.world = rank, world
        # images trained on; skipped draws; their items
        self.used, self.skipped, self.unreadable = 0, 0, set()
        if source == "shapes":
            return
        self.ds = dataset or open_dataset(source, size, flip, buckets, bucket_step)
        self.indexed = IndexedImages(self.ds, seed, batch_size)
        self.cache = None
        if latent_cache:
            if not os.path.isfile(os.path.join(latent_cache, "latents.safetensors")):
                if rank == 0:
                    bad = build_latent_cache(posterior, self.ds, latent_cache)
                    print(f"latent cache written to {latent_cache} ({bad} unreadable images)")
                if barrier is not None:
                    barrier()
            self.cache = load_latent_cache(latent_cache, self.ds)
            return
        sampler = StepSampler(start_step * grad_accum, batch_size, rank, world)
        self.loader = iter(torch.utils.data.DataLoader(
            self.indexed, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
            persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
            generator=torch.Generator().manual_seed(seed)))  # not the global RNG: dropout's

    def next(self, step, micro):
        m = step * self.accum + micro
        lo = (m * self.world + self.rank) * self.bs
        if self.source == "shapes":  # drawn by global sample index
            gs = list(range(lo, lo + self.bs))
            images, captions = shapes.samples_at(self.seed, gs, self.size)
            return images, None, captions, gs, None
        if self.cache is not None:
            mean, std, valid, cond = self.cache
            if not valid.any():
                raise BadInput(f"no image of {self.source!r} decodes (its latent cache marks every one)")
            picks, bad = [], []
            for g in range(lo, lo + self.bs):  # as IndexedImages: the next valid item of the permutation
                for i, flip in self.indexed.candidates(g):
                    if valid[i]:
                        picks.append((i, flip))
                        break
                    bad.append(i)
            self._count(len(picks), bad)
            i, f = torch.tensor([p[0] for p in picks]), torch.tensor([int(p[1]) for p in picks])
            post = (mean[i, f].float(), std[i, f].float())  # (b, C, h, w)
            return (None, post, [self.ds.items[p[0]][3] for p in picks], list(range(lo, lo + self.bs)),
                    None if cond is None else cond[i, f])
        images, captions, gs, bad, conds = next(self.loader)
        if images is None:
            raise BadInput(f"no image of {self.source!r} decodes ({len(set(bad))} tried)")
        self._count(len(gs), bad)
        return images, None, captions, gs, conds

    def _count(self, used, bad_items):
        self.used += used
        self.skipped += len(bad_items)
        self.unreadable.update(bad_items)

    def report(self):
        """One line: what indexing skipped, and what training loaded and skipped (this rank)."""
        if self.source == "shapes":
            return ""
        rank = f" (rank {self.rank} of {self.world})" if self.world > 1 else ""
        return (f"{self.ds.report()}; in training: {self.used} images loaded, {self.skipped} draws of an "
                f"image that does not decode ({len(self.unreadable)} distinct), each replaced by the next "
                f"readable one{rank}")


# -----------------------------------------------------------------------------
# caption pairs for the text-only methods


def text_pairs(spec):
    """[(source caption, target caption)]: "shapes" (every training caption, itself as target),
    "shapes:<language>" (the foreign caption, its English original), a text file of one caption a line
    (itself as target), or "source<TAB>target" lines (e.g. a translation, its original)."""
    if spec == "shapes":
        return [(c, c) for c in shapes.all_captions("train")]
    if spec.startswith("shapes:"):
        return shapes.parallel_captions("train", spec[len("shapes:"):])
    if not os.path.isfile(spec):
        raise MissingInput(f"caption file not found: {spec} (text-only methods read shapes, "
                           "shapes:<language>, a .txt of captions or a source<TAB>target file)")
    pairs, bad = [], []
    for n, line in text_lines(spec):
        if line is not None and not line.strip():
            continue
        src, tab, tgt = (line or "").partition("\t")
        if line is None or tab and (not src.strip() or not tgt.strip() or "\t" in tgt):
            bad.append(n)
            continue
        pairs.append((src.strip(), tgt.strip() if tab else src.strip()))
    if bad:
        print(f"{spec}: skipped {len(bad)} malformed line(s) (not UTF-8, an empty side or more than one "
              f"TAB), e.g. line {bad[0]}")
    if not pairs:
        raise BadInput(f"{spec}: no caption in it")
    if sum(s.lower().endswith(IMAGE_EXTS) for s, _ in pairs) > len(pairs) // 2:
        raise BadInput(f"{spec} looks like an image-caption TSV (path<TAB>caption): the text-only methods "
                       f"read captions, or source<TAB>target caption pairs")
    return pairs


def audio_pairs(spec, window=30.0):
    """[(16 kHz mono WAV path, caption)] for a speech bridge: "shapes:speech" (every training caption in
    two training voices, synthesized once under shapes.SPEECH_CACHE) or a TSV "audio_path<TAB>caption"
    (paths relative to the TSV's folder). Every clip is read once here: a missing, empty, corrupt, stereo or
    other-rate file, or a malformed line, is skipped, counted and reported; clips longer than the encoder's
    window are kept and counted (the encoder hears their first `window` seconds)."""
    if spec == "shapes:speech":
        return shapes.speech_pairs("train")
    if not os.path.isfile(spec):
        raise MissingInput(f"audio-caption file not found: {spec} (a speech bridge reads shapes:speech or a "
                           f"TSV of audio_path<TAB>caption lines)")
    root, pairs, bad, skipped, long = os.path.dirname(os.path.abspath(spec)), [], [], {}, 0
    for n, line in text_lines(spec):
        if line is not None and not line.strip():
            continue
        path, tab, cap = (line or "").partition("\t")
        if line is None or not tab or not path.strip() or not cap.strip() or "\t" in cap:
            bad.append(n)
            continue
        path = os.path.join(root, path.strip())
        try:
            clip = audio.read_wav(path)
        except MissingInput:
            skipped.setdefault("missing", []).append(path)
            continue
        except BadInput as e:
            reasons = {"empty WAV": "empty", "channels": "not mono", "sample rate": "at another sample rate",
                       "truncated WAV": "truncated"}
            reason = next((r for k, r in reasons.items() if k in str(e)), "unreadable")
            skipped.setdefault(reason, []).append(path)
            continue
        long += len(clip) > window * audio.SAMPLE_RATE
        pairs.append((path, cap.strip()))
    parts = [f"{len(v)} {k} (e.g. {v[0]})" for k, v in skipped.items()]
    parts += [f"{len(bad)} malformed line(s) (not UTF-8, no TAB, an empty side or more than one TAB), e.g. "
              f"line {bad[0]}"] if bad else []
    if parts:
        print(f"{spec}: skipped {'; '.join(parts)}")
    if long:
        print(f"{spec}: {long} clip(s) longer than the {window:g} s window: the encoder hears their start")
    if not pairs:
        raise BadInput(f"{spec}: no usable audio-caption pair in it")
    return pairs


@functools.lru_cache(maxsize=2)
def _epoch_order(seed, epoch, n):
    return np.random.default_rng([seed, epoch]).permutation(n)


def text_batch(pairs, step, batch_size, seed=0, caption_dropout=0.0, drop_last=False, shuffle="epoch"):
    """The (sources, targets) of batch `step`: epochs of a seeded permutation (shuffle "epoch": a new one
    each epoch; "once": the first for every epoch, as GlueGen's loader), by global sample index, so that a
    batch may straddle two epochs; drop_last: each epoch is len(pairs) // batch_size whole batches, the rest
    of its order unused. A pair is replaced by ("", "") with probability caption_dropout (so that the empty
    caption of CFG maps right too)."""
    n, out = len(pairs), []
    per_epoch = n // batch_size * batch_size if drop_last else n
    if per_epoch == 0:
        raise BadInput(f"{n} pairs make no whole batch of {batch_size}")
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(g, per_epoch)
        i = _epoch_order(seed, epoch if shuffle == "epoch" else 0, n)[pos]
        drop = np.random.default_rng([seed, g, 2]).random() < caption_dropout
        out.append(("", "") if drop else pairs[i])
    return [s for s, _ in out], [t for _, t in out]

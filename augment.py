"""Data and augmentation for SSL pretraining and evaluation: datasets, view recipes, photometric ops.

The DataLoader workers only decode, crop and flip; the per-pixel colour work runs batched on the device:

  worker side   MultiViewDataset(base, recipe, seed)[i] -> dict of uint8 crops (3, h, w) + crop box + flip
  device side   PhotometricAugment.apply(x (B, 3, h, w) in [0, 1], params) -> augmented x, then `normalize`

Randomness is a pure function of (seed, epoch, sample index) on the worker side and of (seed, global step,
view id) on the device side, drawn for the whole global batch and sliced by rank, so a run replays exactly
whatever the number of workers or ranks (unlike DINO's fix_random_seeds, which gives every rank the same stream).

pretrain.py puts them together: build_recipe, make_step_inputs, ser_pair_sources (SER's b2 views).

    python augment.py --out samples.png     # a grid of synthetic images, one row per class
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import signal
import sys
import time
import traceback
import unicodedata
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info
from torchvision import datasets
from torchvision.transforms import v2

import losses
import vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def seed_from(*keys) -> int:
    """A 63-bit seed from a tuple of ints/strings. Stable across processes and Python runs (hash() is
    salted per process), and unrelated for neighbouring keys, unlike seed + index arithmetic."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def device_generator(seed: int, step: int, rank: int, view_id: int) -> torch.Generator:
    """CPU generator for the device-side photometric parameters of one view at one global step.
    Parameters are tiny, so drawing them on the CPU costs nothing and keeps them identical on any device."""
    return torch.Generator().manual_seed(seed_from("photometric", seed, step, rank, view_id))


SEED_RANGE = (lambda v: 0 <= v < 2**31, "in 0..2^31-1")  # every --seed: a run's seeds add offsets to it


def check_ranges(ranges, prefix=""):
    """Refuse out-of-range command-line values with one line naming the flag: ranges holds
    (flag, value or list of values, ok(v) -> bool, what is wanted); None means unset. math.isfinite
    comes first because nan fails every comparison (`nan <= 0` is False) and inf would only fail later."""
    for flag, values, ok, want in ranges:
        for v in values if isinstance(values, (list, tuple)) else [values]:
            if v is not None and not (math.isfinite(v) and ok(v)):
                raise SystemExit(f"{prefix}{flag} must be {want}, got {v}")


def refuse_ignored_flags(args, parser, readers, prefix=""):
    """Every flag set away from its default that this run would not read, refused in one line: a run that ignores a
    flag it was given is not the run asked for. readers: (dest, whether this run reads it, what reads it)."""
    def plain(v):  # nargs flags parse to lists, their defaults may be tuples
        return tuple(v) if isinstance(v, list) else v

    def typed(dest):  # as the user typed it: --no-x for a BooleanOptionalAction set to False
        return f"--{'no-' if getattr(args, dest) is False else ''}{dest.replace('_', '-')}"
    ignored = [(typed(dest), by) for dest, read, by in readers
               if not read and plain(getattr(args, dest)) != plain(parser.get_default(dest))]
    if ignored:
        (flag, by), others = ignored[0], [f for f, _ in ignored[1:]]
        raise SystemExit(f"{prefix}{flag} is read only with {by}; this run would ignore it: drop it"
                         + (f" (and {', '.join(others)}, ignored too)" if others else ""))


def progress(iterable, total, label, log=print, every=30.0):
    """Yield from `iterable`, logging "label 120/900, 2.1 min, ETA 13.5 min" at most every `every`
    seconds and once at the end: the long evaluation passes would otherwise be silent for minutes."""
    start = last = time.time()
    done = reported = 0
    for item in iterable:
        yield item
        done += 1
        now = time.time()
        if now - last >= every or done == total:
            eta = (now - start) / done * max(0, total - done)
            log(f"{label} {done}/{total}, {(now - start) / 60:.1f} min, ETA {eta / 60:.1f} min")
            last, reported = now, done
    if reported != done:  # fewer items than `total` (e.g. a shorter last shard): still say where it ended
        log(f"{label} {done}/{total}, {(time.time() - start) / 60:.1f} min, done")


# ---------------------------------------------------------------------- synthetic shapes: the offline default dataset
def regular_polygon(n, radius=1.0, phase=math.pi / 2):
    """(n, 2) vertices at `radius`, the first at angle `phase` (y down): the built-in shapes, also detect_eval's."""
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], 1)


def _star(points=5, inner=0.45):
    outer, inner_ = regular_polygon(points), regular_polygon(points, inner, math.pi / 2 + math.pi / points)
    return np.stack([outer, inner_], 1).reshape(-1, 2)


# Each class is a list of (polygon in unit coordinates, y pointing down, fill): fill 0 cuts a hole. Polygons
# are re-centred on the area centroid of their outer polygon, so that the placement does not depend on the class.
# Six shapes that stay distinct at 32 px; the triangle and the star also show a rot90 by their geometry.
_SHAPES = {
    "circle": [(regular_polygon(40), 1)],
    "triangle": [(regular_polygon(3) * 1.1, 1)],
    "square": [(regular_polygon(4, phase=math.pi / 4) * 0.95, 1)],
    "star": [(_star(), 1)],
    "cross": [(np.array([(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1), (-.3, 1),
                         (-.3, .3), (-1, .3), (-1, -.3), (-.3, -.3)]), 1)],
    "ring": [(regular_polygon(40), 1), (regular_polygon(40, 0.55), 0)],
}


def _centroid(p):
    cross = p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1) * p[:, 1]
    return ((p + np.roll(p, -1, 0)) * cross[:, None]).sum(0) / (3 * cross.sum())


_SHAPES = {name: [(p - _centroid(layers[0][0]), fill) for p, fill in layers] for name, layers in _SHAPES.items()}


@lru_cache(maxsize=8)
def _grid(size):
    """Pixel-centre coordinates in [-1, 1], (size, size) each, shared by all images of one size."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.meshgrid(c, c, indexing="xy")


def _texture(rng, size):
    """A random pattern t in [0, 1], (size, size): flat, gradient, stripes, checker or smooth blobs."""
    x, y = _grid(size)
    theta = rng.uniform(0, 2 * math.pi)
    u = math.cos(theta) * x + math.sin(theta) * y
    v = -math.sin(theta) * x + math.cos(theta) * y
    kind = rng.integers(5)
    if kind == 0:
        return np.zeros((size, size), np.float32)
    if kind == 1:
        return 0.5 + 0.35 * u
    if kind == 2:
        return 0.5 + 0.5 * np.sin(math.pi * rng.uniform(2, 8) * u + rng.uniform(0, 2 * math.pi))
    if kind == 3:
        f = rng.uniform(2, 6)
        return ((np.floor(u * f) + np.floor(v * f)) % 2).astype(np.float32)
    coarse = rng.random((4, 4), dtype=np.float32)  # smooth noise: bilinear upsampling of a 4x4 grid
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))


class SyntheticShapes(Dataset):
    """Procedural images of one object on a textured background, generated from (seed, split, index). The class is
    the object's geometry (`classes`); label = index % num_classes, so classes are balanced. Colours, background
    texture, position, scale and rotation are random and carry no label. Objects stay within MAX_ROTATION degrees of
    upright and are lit from above, so that, as in photographs, a rot90 is detectable (E-SSL's task is learnable;
    SER's rot90 is not a symmetry of the data). Nuisances are muted (grey levels, a background pattern at 30%
    contrast) because a self-supervised loss learns first the most distinctive property two views of an image
    share: SATURATION 0.3 / 0.1 / 0 gave SimCLR 27.1 / 32.8 / 46.2% k-NN after 75 steps."""

    SPLITS = {"train": 0, "val": 1}
    SATURATION, BACKGROUND_CONTRAST, MAX_ROTATION = 0.0, 0.3, 30.0
    KEEP_BYTES = 2 ** 29  # bytes of rendered images a split may keep, summed over the loader workers' own copies

    def __init__(self, split="train", length=10_000, img_size=64, seed=0, transform=None):
        if split not in self.SPLITS:
            raise ValueError(f"SyntheticShapes split must be one of {list(self.SPLITS)}, got {split!r}")
        if img_size < 8:
            raise ValueError(f"the built-in data needs --img-size >= 8, got {img_size}")
        self.split, self.length, self.img_size, self.seed = split, int(length), int(img_size), seed
        self.transform = transform
        # Later epochs reuse kept images: re-rendering made the data wait 2.3-2.7x longer at 224 px (README, Cost).
        self.kept = {} if self.keeps() else None
        self.classes = list(_SHAPES)
        self.num_classes = len(self.classes)

    def __len__(self):
        return self.length

    def keeps(self, num_workers=0):
        """Whether a loader with num_workers workers (0: the main process) keeps the images it renders."""
        return max(1, num_workers) * self.length * 3 * self.img_size ** 2 <= self.KEEP_BYTES

    def _muted(self, rgb):  # (..., 3) in [0, 1] -> the same colours at SATURATION of their distance to grey
        grey = rgb.mean(-1, keepdims=True)
        return grey + self.SATURATION * (rgb - grey)

    def render(self, index) -> tuple[np.ndarray, int]:
        """(H, W, 3) uint8 image and its label; the numpy core of __getitem__."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for SyntheticShapes of length {self.length}")
        label = index % self.num_classes
        rng = np.random.default_rng((self.seed, self.SPLITS[self.split], index))
        s = self.img_size
        _, y = _grid(s)

        # Background: two muted colours mixed by a faint random pattern.
        bg_a, bg_b = self._muted(rng.random((2, 3), dtype=np.float32))
        image = bg_a + self.BACKGROUND_CONTRAST * (bg_b - bg_a) * _texture(rng, s)[..., None]  # (s, s, 3)
        # Object colour: the farthest of 4 muted colours from the background, so the object is visible.
        candidates = self._muted(rng.random((4, 3), dtype=np.float32))
        fg = candidates[np.argmax(((candidates - bg_a) ** 2).sum(1))]
        fg = fg * (1.0 - 0.2 * y[..., None])  # light from above: a weak cue for the upright direction

        # Object mask: polygons drawn at 2x and box-filtered for anti-aliased edges.
        # Large and near the centre, so that crops down to a quarter of the image still show most of it.
        radius = rng.uniform(0.28, 0.42) * s
        centre = s / 2 + rng.uniform(-0.5, 0.5, 2) * (s - 1.6 * radius)
        angle = math.radians(rng.uniform(-self.MAX_ROTATION, self.MAX_ROTATION))
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        canvas = Image.new("L", (2 * s, 2 * s), 0)
        draw = ImageDraw.Draw(canvas)
        for polygon, fill in _SHAPES[self.classes[label]]:
            pts = (polygon @ rot.T * radius + centre) * 2
            draw.polygon([tuple(p) for p in pts], fill=255 * fill)
        mask = np.asarray(canvas.reduce(2), np.float32)[..., None] / 255  # (s, s, 1)

        image = image + (fg - image) * mask + rng.normal(0, 0.02, (s, s, 1)).astype(np.float32)
        return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), label

    def __getitem__(self, index):
        worker = get_worker_info()
        if self.kept is not None and worker and not self.keeps(worker.num_workers):
            self.kept = None  # this worker's copy only
        if self.kept is not None and index in self.kept:
            array, label = self.kept[index]
        else:
            array, label = self.render(index)
            if self.kept is not None:
                array.flags.writeable = False  # shared by every later view of this image
                self.kept[index] = array, label
        image = Image.fromarray(array)
        return (self.transform(image) if self.transform is not None else image), label


# ---------------------------------------------------------------------- real data
MAX_ASPECT = 1000  # no photograph is thinner; such an image only exhausts memory at the short-side resize


class UnreadableImage(ValueError):
    """An image file that does not decode; the message names it (run_script turns it into the script's last line)."""


def check_header(image):
    """What load_rgb refuses from an image's header alone, so that a list of images can be checked before any work."""
    tiff_tags = getattr(image, "tag_v2", {})
    if image.mode == "F" or tiff_tags.get(339) in (2, 3):  # float or signed pixels: no agreed range
        raise ValueError("float or signed pixels; save it with unsigned 8 or 16 bits per channel")
    if image.mode.startswith("I") and tiff_tags.get(262) == 0:  # PIL leaves 16-bit white-is-zero unflipped
        raise ValueError("16-bit white-is-zero pixels; save it black-is-zero")
    if max(image.size) > MAX_ASPECT * min(image.size):  # e.g. 3,000,000 x 1 px: a few KB on disk
        raise ValueError(f"{image.size[0]}x{image.size[1]} px, an aspect ratio above {MAX_ASPECT}:1; the "
                         "evaluations' short-side resize would make it billions of pixels")


def load_rgb(path: str) -> Image.Image:
    """An image file as 8-bit RGB, naming the file when decoding fails (torchvision's loader would not).
    16-bit greyscale (PIL modes I;16, I) is scaled to 8 bits: convert('RGB') would clip it at 255. As torchvision's
    loader (DINO's, MoCo v3's), EXIF orientation is not applied: COCO's boxes are on the stored pixels."""
    try:
        if not os.path.isfile(path):  # a named pipe would block open() for good
            raise ValueError("not a regular file")
        with open(path, "rb") as f:
            image = Image.open(f)
            check_header(image)
            if image.mode == "P" and "transparency" in image.info:  # PIL warns on P -> RGB; same colours via RGBA
                image = image.convert("RGBA")
            if image.mode.startswith("I"):
                pixels = np.asarray(image)
                if image.mode == "I" and not 0 <= pixels.min() <= pixels.max() <= 65535:
                    raise ValueError("integer pixels beyond 16 bits; save it with 8 or 16 bits per channel")
                # round(v / 257) in integers: float64 copies of a 12000^2 image took 2.5 GB
                image = Image.fromarray(((pixels.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8))
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"cannot read image file {path}: {e}; remove or replace it") from None


def run_script(main):
    """A script's entry point. An unreadable image ends it with one line naming the file (from a loader worker it
    arrives inside the worker's traceback, as that traceback's last line), and so does the error a rank meets in a
    collective when another rank has stopped; any other error prints its traceback and exits 1 through SystemExit,
    which releases the loaders so that their workers shut down: an exception left to the interpreter keeps them
    referenced at exit, where pretrain's workers, which ignore SIGTERM, would hang it."""
    try:
        return main()
    except SystemExit as e:  # a settings error met before the ranks meet is the same line on every rank: rank 0's
        first = dist.is_available() and dist.is_initialized()
        try:
            peer = losses.launch_env()[0] > 0
        except SystemExit:  # a malformed launch environment is said by every process
            peer = False
        if isinstance(e.code, str) and peer and not first:
            raise SystemExit(1) from None
        raise
    except KeyboardInterrupt:  # Ctrl-C outside pretrain's loop (which saves a checkpoint on it): no traceback
        print("interrupted; every file already written is complete (outputs are written whole or not at all)",
              file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except Exception as e:
        if isinstance(e, UnreadableImage):
            status = "error: " + str(e).strip().splitlines()[-1].split("UnreadableImage: ")[-1]
        elif isinstance(e, dist.DistNetworkError) or any(m in str(e) for m in ("Connection closed by peer",
                                                                               "Connection reset by peer")):
            status = "error: another rank stopped (its own error says why); this one stops with it"
        else:
            traceback.print_exc()
            status = 1
        traceback.clear_frames(e.__traceback__)  # the loaders in them, kept by a reference cycle, go now
    raise SystemExit(status)


def ignore_stop_signals(worker_id):
    """Workers ignore the scheduler's signal to the process group: a dead worker would crash the main
    process before it saves. They exit when the main process does."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class Interrupt:
    """SIGTERM/SIGINT (preemption, Ctrl-C) ask the loop to save a checkpoint and stop; the process then
    exits with 128 + the signal number, so a scheduler sees it did not finish. close() gives the signals back their
    earlier handlers: after the loop nothing is checkpointed (detect_eval's evaluation), so a signal stops at once."""

    def __init__(self, world=1):
        self.signum, self.world, self.vote = 0, world, None  # signum: the signal received, 0 while none
        self.previous = {sig: signal.signal(sig, self._received) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _received(self, signum, frame):
        if not self.signum and losses.rank() == 0:  # said at once: a k-NN pass or a save may take minutes first
            # os.write: a print here could interrupt a print of the loop's (a reentrant call on the stream)
            os.write(2, f"{signal.Signals(signum).name}: saving a checkpoint and stopping after this step\n".encode())
        self.signum = signum

    def poll(self):
        """The signal every rank stops on after this step (0: go on). Ranks may see a signal at different
        steps but must stop at the same one: the signal number is max-reduced on the host-side group
        without waiting, and read one step later (so at the first step no rank stops on its own flag)."""
        if self.world == 1:
            return self.signum
        agreed = 0
        if self.vote is not None:
            self.vote[1].wait()
            agreed = int(self.vote[0].item())
        flag = torch.tensor([self.signum])
        self.vote = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=losses.cpu_group(), async_op=True))
        return agreed

    def close(self):
        if self.vote is not None:
            self.vote[1].wait()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _inside(path: str, roots) -> str | None:
    """The folder of `roots` (real paths) that holds the real path `path` at any depth, or None."""
    while path not in roots and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path if path in roots else None


def _check_image_tree(data: str, folder: str) -> tuple[frozenset, frozenset]:
    """The real paths of every folder ImageFolder reads under `folder` and of every symlinked folder or image in it,
    after refusing what it would read silently wrong. It follows directory links: one back into the tree
    (`train/a/up -> ..`) adds the images again, level after level, until the OS gives up; one outside is fine.
    One pass over the listings, which tell files, symlinks and folders apart: only links cost system calls (a few
    each: a symlink farm of ImageNet's 50k val images, a fraction of a second on a local disk)."""
    top, seen, linked, real_dirs = os.path.realpath(folder), {}, set(), {}
    classes = {}  # real path of each class folder -> its name: a linked image keeps the label of its own folder
    listed = datasets.folder.IMG_EXTENSIONS
    # Raster formats people keep photos in that ImageFolder does not list (Pillow's registry also holds video, HDF5
    # and PostScript stubs, which are no images to convert)
    skipped_kinds = {".gif", ".jfif", ".jpe", ".apng", ".avif", ".heic", ".heif", ".jp2", ".j2k", ".jpx", ".pnm",
                     ".pbm", ".ico", ".tga", ".psd", ".qoi", ".dib", ".pcx", ".sgi"} - set(listed)
    loose, skipped = [], []
    stack = [(folder, None, False)]  # (folder, its class (None: the split itself), under a hidden folder)
    while stack:
        parent, label, hidden = stack.pop()
        try:
            with os.scandir(parent) as listing:
                entries = list(listing)
        except OSError as e:
            raise ValueError(f"--data {data}: cannot read folder {e.filename} ({e.strerror}); fix its permissions") \
                from None
        here = os.path.realpath(parent)
        if here in seen:
            raise ValueError(f"--data {data}: {seen[here]} and {parent} are the same folder ({here}) through "
                             "symlinks; its images would be counted twice. Remove one of the links")
        seen[here] = parent
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:  # as os.walk and ImageFolder: not a folder
                is_dir = False
            path = entry.path
            if is_dir:
                if label is None and entry.name.startswith("."):
                    raise ValueError(f"--data {data}: {path} is a hidden folder, which ImageFolder would read as one "
                                     f"more class; remove it or move it out of {folder}")
                if entry.is_symlink():
                    target = os.path.realpath(path)
                    loops = os.path.commonpath([here, target]) == target  # the target contains the link itself
                    if loops or os.path.commonpath([target, top]) == top:
                        raise ValueError(f"--data {data}: {path} is a symlink to {target}, back into the image tree; "
                                         "its images would be counted again under other labels. Remove the link or "
                                         f"point it outside {folder}")
                    linked.add(target)
                if label is None:
                    classes[os.path.realpath(path)] = entry.name
                stack.append((path, label or entry.name, hidden or entry.name.startswith(".")))
                continue
            if label is None and entry.is_symlink() and not os.path.exists(path):  # a class folder's broken link:
                # ImageFolder would skip the class (a link to a file, e.g. a labels .csv, is no class: ignored)
                raise ValueError(f"--data {data}: {path} is a symlink to {os.path.realpath(path)}, which does not "
                                 "exist, so ImageFolder would skip it as a class; point it at a class folder or "
                                 "remove it")
            name = entry.name.lower()
            if not name.endswith(listed):
                if os.path.splitext(name)[1] in skipped_kinds:
                    skipped.append(path)
                continue
            if label is None:
                loose.append(entry.name)
                continue
            if hidden or name.startswith("."):
                raise ValueError(f"--data {data}: {path} is hidden (a '.' name, or in a '.' folder), yet ImageFolder "
                                 f"would read it as an image of class {label} (macOS '._' files are metadata, not "
                                 "images); remove it")
            try:  # follows a link (a stat); a run would meet it mid-epoch or hang on a pipe
                regular = entry.is_file()
            except OSError:  # a link to itself, or into a folder that cannot be searched
                regular = False
            if not regular:
                raise ValueError(f"--data {data}: {path} is no regular file (a broken link, a pipe or a device), yet "
                                 "ImageFolder would list it as an image; remove or replace it")
            if entry.is_symlink():
                # Its folder resolved once: a symlink farm (ImageNet's val/ into class folders) links 50k images
                head, tail = os.path.split(os.path.join(here, os.readlink(path)))
                if head not in real_dirs:
                    real_dirs[head] = os.path.realpath(head)
                target = os.path.join(real_dirs[head], tail)
                target = os.path.realpath(target) if os.path.islink(target) else target
                linked.add(target)
                owner = _inside(target, classes)
                if owner is not None and classes[owner] != label:
                    raise ValueError(f"--data {data}: {path} is a symlink to {target} in class folder "
                                     f"{classes[owner]}, so one image would carry two labels; remove the link")
        if loose:  # only the top holds loose images, and it is read first
            raise ValueError(f"--data {data}: {folder} holds {len(loose)} images (e.g. {loose[0]}) beside its class "
                             "folders, which ImageFolder ignores; move them into a class folder")
    if skipped:
        kinds = sorted({os.path.splitext(p)[1].lower() for p in skipped})
        raise ValueError(f"--data {data}: {folder} holds {len(skipped)} images ImageFolder skips for their extension "
                         f"({', '.join(kinds)}; e.g. {', '.join(skipped[:3])}); convert them to .png or .jpg, or move "
                         "them out of the tree")
    return frozenset(seen), frozenset(linked)


def _refuse_shared_folders(data: str, split: str, folders: frozenset, linked: frozenset):
    """val/ must be held out: a val/ that is, or holds at any depth, a link into train/ or one of its class folders
    (which may be links themselves), or a link to an image in them, would score training images; so would a link in
    train/ into val/. Only the other split's top level is checked: walking ImageNet's train/ per val/ costs seconds."""
    other, own = "val" if split == "train" else "train", {os.path.realpath(os.path.join(data, split))}
    # train/ may be what val/ links to (building val says so), but may not link into val/ itself
    paths = folders | linked if split == "val" else {p for p in linked if not _inside(p, own)}
    if not paths:
        return
    try:
        roots = {os.path.realpath(e.path) for e in os.scandir(os.path.join(data, other)) if e.is_dir()}
    except OSError:  # no readable other split: nothing to share (building it says why, if it is needed)
        return
    roots.add(os.path.realpath(os.path.join(data, other)))
    shared = sorted(p for p in paths if _inside(p, roots))
    if shared:
        what = "folder" if os.path.isdir(shared[0]) else "image"
        raise ValueError(f"--data {data}: train/ and val/ share the {what} {shared[0]} through symlinks, so val "
                         f"would score training images; give {split}/ images of its own")


def refuse_output_in_data(data: str, path: str, flag: str = "--output-dir", prefix: str = ""):
    """An output folder inside an ImageFolder split would be read as one of its classes, or inside one (an empty new
    class: an error on every later run over that data; figures: images of a class)."""
    for split in ("train", "val"):
        root = os.path.realpath(os.path.join(data, split))
        if os.path.isdir(root) and os.path.commonpath([os.path.realpath(path), root]) == root:
            raise SystemExit(f"{prefix}{flag} {path} is inside {os.path.join(data, split)}, whose folders are the "
                             "classes of --data; write outputs elsewhere")


def check_same_classes(train: Dataset, val: Dataset, data: str):
    """Refuse train/val splits with different class names: labels are positions in the class list, so
    train {a, b} and val {b, c} would silently score val's 'b' as 'a'."""
    a, b = list(train.classes), list(val.classes)
    if a != b:
        only_train, only_val = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        detail = (f"only in train: {only_train[:5]}, only in val: {only_val[:5]}" if only_train or only_val
                  else "same names in another order")
        if only_train and {unicodedata.normalize("NFC", c) for c in only_train} == {
                unicodedata.normalize("NFC", c) for c in only_val}:  # names that print alike
            detail = (f"train's {ascii(only_train[:5])} are val's {ascii(only_val[:5])} in another Unicode form: "
                      "rename one split's folders")
        raise ValueError(f"--data {data}: the train and val splits have different classes ({detail}); "
                         "labels are class positions, so both splits need the same class folders")


def _stl10_classes(data: str, dataset) -> list[str]:
    """STL-10's class names, from its class_names.txt, which torchvision's checksums leave out and it reads as is:
    a missing file would leave no classes, a blank line one class more, a lost line labels beyond the names."""
    path = os.path.join(dataset.root, dataset.base_folder, dataset.class_names_file)
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text"
        raise ValueError(f"--data {data}: cannot read {path} ({reason}); restore it from the STL-10 archive") from None
    top = int(dataset.labels.max()) if len(dataset.labels) else 0
    if len(names) != 10 or top >= len(names):
        raise ValueError(f"--data {data}: {path} names {len(names)} classes, STL-10 has 10 (labels up to {top}); "
                         "restore it from the STL-10 archive")
    return names


def build_dataset(data: str, split: str, transform=None, img_size=64, length=None) -> Dataset:
    """Dataset of (image, label) with `.num_classes` and `.classes`. data: 'synthetic' (generated at img_size) | an
    ImageFolder root with train/ and val/ | 'cifar10:<dir>' | 'stl10:<dir>' (torchvision files already on disk, never
    downloaded; STL-10 'train' is the 5k labelled set). transform: applied to the PIL image; None returns the PIL image
    (what MultiViewDataset wants). length: truncate (evenly strided) or, for synthetic, set the length."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if data == "synthetic":
        n = length or {"train": 10_000, "val": 2_000}[split]
        return SyntheticShapes(split, n, img_size=img_size, transform=transform)

    kind, _, root = data.partition(":")
    if root and kind.isalnum() and kind not in ("cifar10", "stl10") and not os.path.exists(data):
        raise ValueError(f"--data {data}: unknown dataset {kind!r}; use cifar10:<dir>, stl10:<dir> or an ImageFolder "
                         "root")
    if kind in ("cifar10", "stl10") and root:
        if not os.path.isdir(root):
            raise ValueError(f"--data {data}: folder {root} does not exist")
        try:
            if kind == "cifar10":
                dataset = datasets.CIFAR10(root, train=split == "train", transform=transform, download=False)
            else:
                dataset = datasets.STL10(root, split="train" if split == "train" else "test",
                                         transform=transform, download=False)
                dataset.classes = _stl10_classes(data, dataset)
        except RuntimeError:  # torchvision's "not found or corrupted", which advises download=True
            files = datasets.CIFAR10 if kind == "cifar10" else datasets.STL10  # STL-10's also needs unlabeled_X.bin
            folder = os.path.join(root, files.base_folder)
            names = [f for f, _ in files.train_list + files.test_list] + ([files.meta["filename"]]
                                                                            if hasattr(files, "meta") else [])
            absent = [f for f in names if not os.path.isfile(os.path.join(folder, f))]
            why = f"missing {', '.join(absent)}" if absent else "a file fails torchvision's checksum"
            raise ValueError(f"--data {data}: the {kind} files in {folder}: {why}; place the extracted torchvision "
                             "archive there (nothing is downloaded)") from None
    else:
        folder = os.path.join(data, split)
        if not os.path.isdir(folder):
            raise ValueError(f"--data {data}: expected an ImageFolder root with train/ and val/, "
                             f"but folder {folder} does not exist")
        _refuse_shared_folders(data, split, *_check_image_tree(data, folder))
        try:
            dataset = datasets.ImageFolder(folder, transform=transform, loader=load_rgb)
        except FileNotFoundError as e:  # no class folders, or class folders without images
            raise ValueError(f"--data {data}: folder {folder} holds no images in class sub-folders ({e})") from None
    dataset.num_classes = len(dataset.classes)
    if length is not None and length < len(dataset):  # every k-th item: a class-sorted folder keeps all classes
        step = len(dataset) / length
        short = torch.utils.data.Subset(dataset, [int(i * step) for i in range(length)])
        short.classes, short.num_classes = dataset.classes, dataset.num_classes
        dataset = short
    return dataset


def class_balanced_prefix(dataset: Dataset, n: int) -> list[int]:
    """Indices of n images in round-robin class order (each class's k-th image, in dataset order, before any
    class's (k+1)-th): the first n of a class-sorted ImageFolder would hold its first classes only. The built-in
    data, whose labels cycle with the index, keeps its own order."""
    if isinstance(dataset, SyntheticShapes):
        labels = [i % dataset.num_classes for i in range(len(dataset))]
    else:  # ImageFolder and CIFAR-10: targets; STL-10: labels
        labels = [int(y) for y in (dataset.targets if hasattr(dataset, "targets") else dataset.labels)]
    seen, rank_in_class = {}, []
    for y in labels:
        rank_in_class.append(seen.get(y, 0))
        seen[y] = rank_in_class[-1] + 1
    return sorted(range(len(labels)), key=lambda i: (rank_in_class[i], i))[:n]


def _normalised(*ops):  # PIL image -> ops -> float tensor, ImageNet-normalised
    return v2.Compose([*ops, v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(img_size: int):
    """Resize the short side to img_size*256/224 (bicubic), centre-crop img_size, normalise: DINO/MoCo eval."""
    return _normalised(v2.Resize(round(img_size * 256 / 224), interpolation=v2.InterpolationMode.BICUBIC),
                       v2.CenterCrop(img_size))


def linear_train_transform(img_size: int):
    """RandomResizedCrop (scale 0.08-1, bilinear as in DINO/MoCo v3 linear probes) + h-flip + normalise."""
    return _normalised(v2.RandomResizedCrop(img_size), v2.RandomHorizontalFlip())


def make_loader(dataset, batch_size, rank, world, num_workers, shuffle=False, seed=0, **kw):
    """One rank's loader over its shard of `dataset`, for every script but pretrain.py's training
    (pretrain.GlobalBatchSampler). Under several ranks DistributedSampler pads the shards to equal lengths,
    which the evaluations' gathers undo by sample index (linear_eval.gather_features, detect_eval.predict)."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), **kw)


# ---------------------------------------------------------------------- view recipes
@dataclass
class ViewSpec:
    """One view: its crop (in the workers) and its blur and solarize probabilities (on the device), per view
    as they make the BYOL/MoCo/BT/DINO recipes asymmetric; jitter and grayscale are the same on every view."""
    size: int  # output side in px: globals the run's img_size, locals 96/224 of it (DINO, SER 2+4)
    # RandomResizedCrop area fraction and aspect range. Raise scale[0] (crop_min) when training is short
    # or images small: tiny crops of 64 px images are mostly background.
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"  # DINO, BT, VICReg, BYOL; MoCo v3 'bilinear'
    p_flip: float = 0.5  # horizontal flip, 0.5 in every official recipe
    p_blur: float = 1.0
    p_solarize: float = 0.0
    name: str = "global0"  # 'global0', 'global1', 'local0'.., 'essl'


@dataclass
class ViewRecipe:
    """The views of one sample, globals first (the order of batch['images'])."""
    views: list[ViewSpec]
    img_size: int  # the global crop size; it also sets the pixel scale of the blur on every view
    plain_size: int | None = None  # EquiMod's un-augmented batch['plain']: resize to S*256/224, centre-crop S

    def photometric(self) -> list["PhotometricAugment"]:
        return [PhotometricAugment(p_blur=v.p_blur, p_solarize=v.p_solarize, img_size=self.img_size)
                for v in self.views]


# method: (interpolation, local crops' scale); facebookresearch/moco-v3, dino, barlowtwins recipes. MoCo v3's
# locals come from SER's 2+4 loader. The global crops' minimum scale is pretrain.py's --crop-min (METHOD_DEFAULTS).
_METHODS = {"mocov3": ("bilinear", (0.05, 0.25)), "dino": ("bicubic", (0.05, 0.4)),
            "barlowtwins": ("bicubic", (0.05, 0.25)), "vicreg": ("bicubic", (0.05, 0.25)),
            "byol": ("bicubic", (0.05, 0.25))}


def recipe_for(method: str, img_size: int, crop_min: float, n_local: int = 0, extra: str | None = None,
               patch_size: int | None = None) -> ViewRecipe:
    """The official view recipe of `method`: two global views in the asymmetric BYOL recipe, then n_local
    local crops (DINO multi-crop; SER's "2+4 views" is mocov3 with n_local=4). extra: None | 'equimod' (adds
    batch['plain']) | 'augself' (nothing to add: every view records its crop, flip and colour parameters) |
    'essl' (adds E-SSL's small crop). patch_size: round the local/E-SSL crop sides to whole patches."""
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r} for recipe_for; choose from {sorted(_METHODS)}")
    if extra not in (None, "equimod", "augself", "essl"):
        raise ValueError(f"unknown extra {extra!r}; choose from None, 'equimod', 'augself', 'essl'")
    interp, local_scale = _METHODS[method]
    unit = patch_size or 1  # local crops: 96/224 of img_size, in whole patches (at least one)
    g0 = ViewSpec(img_size, (crop_min, 1.0), interpolation=interp, p_blur=1.0, name="global0")
    views = [g0, replace(g0, p_blur=0.1, p_solarize=0.2, name="global1")]
    local = ViewSpec(unit * max(1, round(img_size * (96 / 224) / unit)), local_scale, interpolation=interp, p_blur=0.5)
    views += [replace(local, name=f"local{i}") for i in range(n_local)]
    if extra == "essl":  # E-SSL's own small crop and photometric: no solarize, blur 0.1
        views.append(replace(local, scale=(0.05, 0.14), p_blur=0.1, name="essl"))
    return ViewRecipe(views, img_size, plain_size=img_size if extra == "equimod" else None)


def _crop_box(height, width, scale, ratio, g):
    """RandomResizedCrop box (top, left, h, w) in pixels, drawn from generator g: torchvision's
    rejection sampling (10 tries, then the largest centred box of a clamped ratio)."""
    area, log_ratio = height * width, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=g).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
    w, h = min(width, round(height * ratio[1])), min(height, round(width / ratio[0]))  # the image's ratio, clamped
    return (height - h) // 2, (width - w) // 2, h, w


class MultiViewDataset(Dataset):
    """Wraps a dataset of (PIL image, label) and returns, per sample, a dict (collate with default_collate):

      'images': list over views of uint8 (3, size, size)
      'crop':   list over views of (4,) float [top/H, left/W, height/H, width/W] in the original image
      'flip':   list over views of () bool (flip applied after the crop)
      'plain':  uint8 (3, S, S) un-augmented view (only with recipe.plain_size, EquiMod)
      'label':  int (for monitoring only), 'index': int
    """

    def __init__(self, base: Dataset, recipe: ViewRecipe, seed: int = 0):
        self.base, self.recipe, self.seed = base, recipe, seed
        # In shared memory, so that set_epoch reaches workers already running (persistent_workers=True).
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def set_epoch(self, epoch: int):
        self._epoch.fill_(epoch)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        image, label = self.base[index]
        if not isinstance(image, Image.Image):
            raise TypeError("MultiViewDataset needs a base dataset without transform (PIL images); "
                            "build it with build_dataset(..., transform=None)")
        g = torch.Generator().manual_seed(seed_from("views", self.seed, int(self._epoch), index))
        width, height = image.size
        sample = {"images": [], "crop": [], "flip": [], "label": label, "index": index}
        for view in self.recipe.views:
            top, left, h, w = _crop_box(height, width, view.scale, view.ratio, g)
            flip = bool(torch.rand((), generator=g) < view.p_flip)
            # PIL's resize with a box crops and resamples in one antialiased pass.
            crop = image.resize((view.size, view.size), Image.Resampling[view.interpolation.upper()],
                                box=(left, top, left + w, top + h))
            if flip:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            sample["images"].append(v2.functional.pil_to_tensor(crop))  # (3, size, size)
            sample["crop"].append(torch.tensor([top / height, left / width, h / height, w / width]))
            sample["flip"].append(torch.tensor(flip))
        if s := self.recipe.plain_size:
            plain = v2.functional.resize(image, round(s * 256 / 224), interpolation=v2.InterpolationMode.BICUBIC)
            sample["plain"] = v2.functional.pil_to_tensor(v2.functional.center_crop(plain, s))
        return sample


# ---------------------------------------------------------------------- photometric augmentation on the device
@lru_cache(maxsize=None)
def _mean_std(device: torch.device):  # (1, 3, 1, 1) each, once per device: a per-call copy would wait for the GPU
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) or float in [0, 1] -> float32 ImageNet-normalised."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    mean, std = _mean_std(x.device)
    return (x - mean) / std


def _gray(x):  # (B, 3, H, W) -> (B, 1, H, W), ITU-R 601 luma as in torchvision
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def adjust_hue(x, factor):
    """Rotate the hue by factor (B,) in [-0.5, 0.5] turns through HSV, as torchvision's adjust_hue."""
    r, g, b = x.unbind(1)  # each (B, H, W)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    flat = delta == 0  # gray pixels: saturation 0, so every channel is v whatever the hue; avoid 0/0
    s = delta / torch.where(flat, 1.0, maxc)
    d = torch.where(flat, 1.0, delta)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2 + (b - r) / d, 4 + (r - g) / d))
    h = (h / 6 + factor.view(-1, 1, 1)).remainder(1.0)
    # HSV -> RGB without a sector lookup: channel n in {5, 3, 1} is v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) % 6
    n = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)  # [5, 3, 1], made on the device
    k = (n + 6 * h.unsqueeze(1)).remainder(6)
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return (maxc.unsqueeze(1) * (1 - s.unsqueeze(1) * ramp)).clamp(0, 1)


def blur_kernel_size(img_size: int) -> int:
    """Odd kernel side of about 9/224 of the image (9 at 224 as in SER's kornia blur; 3 at 64)."""
    return 2 * max(1, round(4 * img_size / 224)) + 1


def gaussian_blur(x, sigma, kernel_size):
    """Per-sample Gaussian blur, sigma (B,) in px (0 = off, exact identity), reflect padding as in
    torchvision. Separable: a grouped 1-D conv along each axis, one group per (sample, channel)."""
    B, C, H, W = x.shape
    half = kernel_size // 2
    pos = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)  # (k,)
    on = (sigma > 0).view(-1, 1)
    safe = torch.where(on, sigma.view(-1, 1), torch.ones_like(sigma).view(-1, 1))
    kernel = torch.exp(-0.5 * (pos / safe) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    kernel = torch.where(on, kernel, (pos == 0).to(x.dtype))  # (B, k); delta where off
    kernel = kernel.repeat_interleave(C, 0)  # (B*C, k)
    y = F.pad(x, (half, half, half, half), mode="reflect").reshape(1, B * C, H + 2 * half, W + 2 * half)
    y = F.conv2d(y, kernel.view(B * C, 1, 1, -1), groups=B * C)  # along W
    y = F.conv2d(y, kernel.view(B * C, 1, -1, 1), groups=B * C)  # along H
    return y.view(B, C, H, W)


def solarize(x, threshold=0.5):
    return torch.where(x >= threshold, 1 - x, x)


class PhotometricAugment:
    """BYOL-style colour augmentation on a batch, with per-sample parameters drawn on the CPU: colour jitter
    as torchvision's ColorJitter (its four ops in a random per-sample order), grayscale, blur, solarize.
    Blur: sigma ~ U[0.1, 2.0] * img_size/224 px, kernel blur_kernel_size(img_size): the 224-px recipe scaled to
    blur the same fraction of any image; img_size is the global crop size even for local crops, as in DINO, whose
    blur radius is in pixels. Solarize: threshold 0.5 (BYOL, MoCo v3, DINO); the SER release draws it in (0, 1)
    with kornia, flagged in its own comment as a departure."""

    def __init__(self, jitter=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=1.0, p_solarize=0.0, img_size=224):
        self.jitter, self.p_jitter, self.p_gray = tuple(jitter), p_jitter, p_gray
        self.p_blur, self.p_solarize = p_blur, p_solarize
        self.sigma = (0.1 * img_size / 224, 2.0 * img_size / 224)
        self.kernel_size = blur_kernel_size(img_size)

    def sample_params(self, batch_size: int, generator: torch.Generator) -> dict:
        """All per-sample parameters as CPU tensors. The number of draws does not depend on the
        probabilities, so changing one probability leaves the other parameters' stream intact."""
        B, g = batch_size, generator
        u = torch.rand(B, 8, generator=g)  # coin flips and magnitudes
        order = torch.rand(B, 4, generator=g).argsort(1)  # (B, 4) a random permutation per sample
        b, c, s, h = self.jitter
        lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
        hi = torch.tensor([1 + b, 1 + c, 1 + s, h])
        applied = u[:, 0] < self.p_jitter
        identity = torch.tensor([1.0, 1.0, 1.0, 0.0])
        factors = torch.where(applied[:, None], lo + (hi - lo) * u[:, 1:5], identity)  # (B, 4)
        order = torch.where(applied[:, None], order, torch.arange(4))
        blur = u[:, 6] < self.p_blur
        sigma = torch.where(blur, self.sigma[0] + (self.sigma[1] - self.sigma[0]) * torch.rand(B, generator=g), 0.0)
        return {"jitter": factors, "jitter_applied": applied.float(), "jitter_order": order,
                "gray": (u[:, 5] < self.p_gray).float(), "blur_sigma": sigma,
                "solarize": (u[:, 7] < self.p_solarize).float()}

    def apply(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """x float (B, 3, H, W) in [0, 1] on any device -> augmented float in [0, 1]; identity parameters give
        x back bit-exact. params are best left on the CPU (_on_rows). Call it outside autocast: the colour
        maths is meant in float32."""
        on_host = {k: v.cpu() for k, v in params.items()}  # no-op for CPU params
        p = {k: vit.to_device(v, x.device) for k, v in params.items()}
        applied = p["jitter_applied"] > 0
        hue_at = on_host["jitter_applied"].bool()[:, None] & (on_host["jitter_order"] == 3)  # (B, 4)
        for step in range(4):
            # Brightness, contrast and saturation are all torchvision's _blend f*x + (1-f)*other, with other =
            # black, the mean luma or the luma: one lerp per step serves whichever op each sample draws at this
            # step, with f = 1 (exact x) for samples drawing hue or no jitter.
            op = p["jitter_order"][:, step]  # (B,)
            factor = p["jitter"].gather(1, op[:, None]).squeeze(1)
            factor = torch.where(applied & (op < 3), factor, torch.ones_like(factor))
            luma = _gray(x)  # (B, 1, H, W)
            other = torch.where((op == 0).view(-1, 1, 1, 1), 0.0,
                                torch.where((op == 1).view(-1, 1, 1, 1), luma.mean((1, 2, 3), keepdim=True), luma))
            x = torch.lerp(other, x, factor.view(-1, 1, 1, 1)).clamp_(0, 1)  # fresh: the ops below write in place
            _on_rows(x, hue_at[:, step], lambda xs, i: adjust_hue(xs, p["jitter"][i, 3]))
        _on_rows(x, on_host["gray"] > 0, lambda xs, i: _gray(xs).expand(-1, 3, -1, -1))
        _on_rows(x, on_host["blur_sigma"] > 0, lambda xs, i: gaussian_blur(xs, p["blur_sigma"][i], self.kernel_size))
        return _on_rows(x, on_host["solarize"] > 0, lambda xs, i: solarize(xs))


def _on_rows(x, rows, op):
    """op(x[i], i) written into x at the samples i where the CPU mask `rows` is set: hue, grayscale, blur
    and solarize (hue the costliest) run only on the samples that draw them, known without a device sync."""
    idx = rows.nonzero().flatten()
    if len(idx):
        idx = vit.to_device(idx, x.device)
        x.index_copy_(0, idx, op(x.index_select(0, idx), idx))
    return x


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="augment.py", description="A preview of the built-in dataset")
    parser.add_argument("--out", default="samples.png", help="where to write the sample grid")
    parser.add_argument("--img-size", type=int, default=64, help="image side in pixels")
    args = parser.parse_args()
    check_ranges([("--img-size", args.img_size, lambda v: 8 <= v <= 1024, "in 8..1024 (48 images of that side)")])
    if os.path.splitext(args.out)[1].lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"):
        raise SystemExit(f"--out {args.out}: not an image file name; end it in .png or .jpg")
    data = SyntheticShapes("train", 10_000, args.img_size)
    rows = [np.concatenate([data.render(c + j * data.num_classes)[0] for j in range(8)], 1)
            for c in range(data.num_classes)]  # 8 images of class c in row c
    with vit.exit_on_write_error():  # its folder made as the scripts make --output-dir
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        vit.save_atomic(args.out, Image.fromarray(np.concatenate(rows, 0)))  # write-then-rename, as every output
    print(f"wrote {args.out}: rows are {data.classes}")

"""Frozen-backbone object detection: ViTDet simple feature pyramid + torchvision Faster R-CNN, COCO box mAP.

Only the pyramid (ViTDet: Li et al., ECCV 2022; detectron2 projects/ViTDet) and torchvision's RPN and RoI heads
train; the ViT stays frozen (eval mode, no gradients, checked unchanged at the end), so the score measures how
much localisable information its patch tokens carry. Every image is padded to one --max-size square, as ViTDet pads
to 1024 x 1024 (torchvision pads a batch to its largest image: a ViT, attending to the padding, would then detect an
image differently in other company); at --max-size 1333 that is 84 x 84 ViT-S/16 tokens, twice those of a 4:3 image
resized to 1066 x 800. Boxes are scored by a numpy re-implementation of pycocotools' COCOeval
(cocodataset/cocoapi cocoeval.py): the 12 standard stats, in its order.

    python detect_eval.py --random-init --arch vit_tiny     # built-in synthetic set, offline; CPU, a few minutes
    python detect_eval.py --pretrained runs/ser/backbone.pth --output-dir runs/det_ser
    torchrun --nproc_per_node=2 detect_eval.py --random-init --arch vit_tiny   # multi-process (gloo on CPU)

Real COCO (ROOT/annotations/instances_{train,val}2017.json, ROOT/{train,val}2017/*.jpg) at ViTDet/torchvision
sizes; train2017 holds 2 zero-height boxes, hence --allow-degenerate-boxes:

    torchrun --nproc_per_node=8 detect_eval.py --data /datasets/coco --allow-degenerate-boxes \
        --pretrained dino_deitsmall16_pretrain.pth --arch vit_small --patch-size 16 \
        --min-size 640 672 704 736 768 800 --max-size 1333 --anchor-sizes 32 64 128 256 512 \
        --out-channels 256 --box-head-dim 1024 --rpn-batch 256 --roi-batch 512 --proposals-train 2000 \
        --proposals-test 1000 --optimizer sgd --lr 0.02 --weight-decay 1e-4 --batch-size 2 --iters 90000 \
        --warmup-iters 1000 --eval-batch-size 4 --num-workers 8 --output-dir runs/det_coco
"""

import argparse
import functools
import hashlib
import json
import math
import os
import signal
import time
from collections import OrderedDict, defaultdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.transforms.functional import pil_to_tensor

import augment
import linear_eval
import losses
import vit

# ----------------------------------------------------------------------------- COCO-format data
BOX_TOLERANCE = 1.0  # px a box may overshoot its image (annotation rounding); clipped in the training targets
# A box narrower or lower than this inside its image counts as zero-size: in float32, after the resize and a flip,
# its sides could meet, which torchvision's training asserts against. (COCO's boxes have 0.01 px steps.)
MIN_BOX_EXTENT = 1e-3  # px
# Per section: the required keys, those of them that must be integers, and those that must be non-empty strings.
COCO_KEYS = {"images": (("id", "file_name", "width", "height"), ("id", "width", "height"), ("file_name",)),
             "annotations": (("id", "image_id", "category_id", "bbox", "area"), ("id", "image_id", "category_id"), ()),
             "categories": (("id", "name"), ("id",), ("name",))}


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # json parses NaN, Infinity


def clip_box(box, width, height):
    """xyxy of an xywh box clipped to its image: validate_coco allows BOX_TOLERANCE px outside."""
    x, y, w, h = box
    return max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)


def is_degenerate(box, width, height):
    """Whether a box has (almost) no extent inside its image: such boxes score as in pycocotools, never train."""
    x0, y0, x1, y1 = clip_box(box, width, height)
    return min(x1 - x0, y1 - y0) < MIN_BOX_EXTENT


def validate_coco(coco, source, allow_degenerate=False):
    """Check a COCO instances dict and fill the optional `iscrowd` (default 0). Boxes must be finite: an infinite
    box crashes torchvision's roi_align. Zero-size boxes (is_degenerate: also those on the image's edge), refused
    unless allow_degenerate, score as in pycocotools."""
    if not isinstance(coco, dict):
        raise ValueError(f"{source}: expected a JSON object with images/annotations/categories")
    for section, (keys, int_keys, str_keys) in COCO_KEYS.items():
        if not isinstance(coco.get(section), list):
            raise ValueError(f"{source}: missing top-level list {section!r}")
        for i, entry in enumerate(coco[section]):
            where = f"{source}: {section}[{i}]"
            missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise ValueError(f"{where} lacks key(s) {missing}")
            for k in int_keys:
                # type(), not isinstance: JSON true/false are ints to Python
                if type(entry[k]) is not int or (k in ("width", "height") and entry[k] < 1):
                    want = "a positive integer" if k in ("width", "height") else "an integer"
                    raise ValueError(f"{where} {k} must be {want}, got {entry[k]!r} ({type(entry[k]).__name__})")
            for k in str_keys:
                if not (isinstance(entry[k], str) and entry[k]):
                    raise ValueError(f"{where} {k} must be a non-empty string, got {entry[k]!r}")
        ids = [entry["id"] for entry in coco[section]]  # a repeated category id would add a class no target ever has
        if len(set(ids)) != len(ids):
            raise ValueError(f"{source}: duplicate ids in {section!r}")
    # One file under two ids trains twice as often, and in val the copy's detections all count as false positives.
    first = {}
    for im in coco["images"]:
        earlier = first.setdefault(os.path.normpath(im["file_name"]), im["id"])  # ids are unique by now
        if earlier != im["id"]:
            raise ValueError(f"{source}: images {earlier} and {im['id']} share file_name {im['file_name']!r}; "
                             "list each image once")
    # Train and val are matched by id and name: a name twice would make that match ambiguous.
    names = [c["name"] for c in coco["categories"]]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{source}: category name(s) {repeated[:5]} listed under more than one id; give each "
                         "category one id")
    cat_ids = {c["id"] for c in coco["categories"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    for a in coco["annotations"]:
        where = f"{source}: annotation {a['id']}"
        if a["image_id"] not in sizes:
            raise ValueError(f"{where} refers to image id {a['image_id']}, which is not in 'images'")
        if a["category_id"] not in cat_ids:
            raise ValueError(f"{where} has unknown category id {a['category_id']} (known: {sorted(cat_ids)})")
        box = a["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise ValueError(f"{where} bbox must be [x, y, w, h] of finite numbers, got {box!r}")
        x, y, w, h = box
        if w < 0 or h < 0 or (min(w, h) == 0 and not allow_degenerate):
            hint = "" if min(w, h) < 0 else " (pass --allow-degenerate-boxes to keep zero-size boxes)"
            raise ValueError(f"{where} has a box of non-positive size {box}{hint}")
        W, H = sizes[a["image_id"]]
        if min(x, y) < -BOX_TOLERANCE or max(x + w - W, y + h - H) > BOX_TOLERANCE:
            raise ValueError(f"{where} box {box} leaves its {W}x{H} image {a['image_id']} "
                             "(check the box and the image's width/height)")
        if is_degenerate(box, W, H) and not allow_degenerate:  # on the image's edge, or next to no width
            raise ValueError(f"{where} box {box} is under {MIN_BOX_EXTENT} px wide or high inside its {W}x{H} image "
                             f"{a['image_id']} (pass --allow-degenerate-boxes to keep zero-size boxes)")
        if not _is_number(a["area"]) or a["area"] < 0:
            raise ValueError(f"{where} area must be a finite number >= 0, got {a['area']!r}")
        # The area ranges read this field: one beyond the image (its box's tolerance aside) would leave every range.
        if a["area"] > (W + 2 * BOX_TOLERANCE) * (H + 2 * BOX_TOLERANCE):
            raise ValueError(f"{where} area {a['area']!r} exceeds the {W * H} px of its {W}x{H} image "
                             f"{a['image_id']}: check the area (pixels of the object in the image)")
        a.setdefault("iscrowd", 0)
        if a["iscrowd"] not in (0, 1) or isinstance(a["iscrowd"], float):
            raise ValueError(f"{where} iscrowd must be 0 or 1, got {a['iscrowd']!r}")
    if not any(not a["iscrowd"] and not is_degenerate(a["bbox"], *sizes[a["image_id"]]) for a in coco["annotations"]):
        raise ValueError(f"{source}: no annotated boxes (crowd regions and zero-size boxes aside): nothing to train "
                         "on or to score against")


def load_coco(ann_file, image_dir=None, allow_degenerate=False):
    """validate_coco on a JSON file; with image_dir, also each image file's presence and size (PIL reads the header)."""
    vit.refuse_special_file(ann_file, "an annotation file")
    try:
        with open(ann_file) as f:
            coco = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {ann_file}") from None
    except OSError as e:  # a folder, no permission
        raise ValueError(f"cannot read annotation file {ann_file}: {e.strerror}") from None
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8 (UnicodeDecodeError), nested beyond the stack
        raise ValueError(f"{ann_file} is not valid JSON: {e}") from None
    validate_coco(coco, ann_file, allow_degenerate)
    if image_dir is not None:
        outside = [im["file_name"] for im in coco["images"]
                   if os.path.isabs(im["file_name"]) or os.path.normpath(im["file_name"]).split(os.sep)[0] == ".."]
        if outside:  # e.g. val entries pointing into train/: the detector scored on its training images
            raise ValueError(f"{ann_file}: {len(outside)} file_name(s) outside {image_dir}, e.g. {outside[:3]}; give "
                             "names relative to the split's folder")
        paths = [os.path.join(image_dir, im["file_name"]) for im in coco["images"]]
        absent = [im["file_name"] for im, path in zip(coco["images"], paths) if not os.path.isfile(path)]
        if absent:
            raise ValueError(f"{ann_file}: {len(absent)} image file(s) missing from {image_dir}, e.g. {absent[:3]}")
        for im, path in zip(coco["images"], paths):
            try:
                with Image.open(path) as f:
                    size = f.size
                    augment.check_header(f)  # refused before training, not when the val pass reads it
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise ValueError(f"cannot read image file {path}: {e}") from None
            if size != (im["width"], im["height"]):
                raise ValueError(f"{ann_file}: image {im['id']} is {im['width']}x{im['height']} in the JSON but "
                                 f"{path} is {size[0]}x{size[1]}; its boxes would be misplaced")
    return coco


class CocoDetection(Dataset):
    """Images and Faster R-CNN targets of a validated COCO dict: labels 1..K in sorted category id order (0 is
    torchvision's background); crowd regions and zero-size boxes only count for scoring, not in the targets."""

    def __init__(self, coco, image_dir=None, render=None, ann_file=None):
        self.images = sorted(coco["images"], key=lambda im: im["id"])
        self.cat_ids = sorted(c["id"] for c in coco["categories"])
        label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
        self.targets = defaultdict(list)
        for a in coco["annotations"]:
            size = sizes[a["image_id"]]
            if not a["iscrowd"] and not is_degenerate(a["bbox"], *size):
                self.targets[a["image_id"]].append((*clip_box(a["bbox"], *size), label[a["category_id"]]))
        self.coco, self.image_dir, self.render, self.ann_file = coco, image_dir, render, ann_file

    @functools.cached_property
    def ann_digest(self):
        """The annotation file's fingerprint, for a resume; read in chunks on the first checkpoint written or resumed,
        so the ranks that do neither never hash COCO's 450 MB. The synthetic set is a function of its flags (None)."""
        if self.render is not None:
            return None
        h = hashlib.blake2b(digest_size=16)
        with open(self.ann_file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        info = self.images[i]
        if self.render is not None:
            img = self.render(info["id"])
        else:
            img = augment.load_rgb(os.path.join(self.image_dir, info["file_name"]))  # a bad file: one line naming it
        rows = torch.tensor(self.targets[info["id"]], dtype=torch.float32).reshape(-1, 5)
        target = {"boxes": rows[:, :4], "labels": rows[:, 4].long(), "image_id": info["id"]}  # (n, 4) xyxy, (n,)
        return pil_to_tensor(img), target  # uint8 (3, H, W): a quarter of the bytes to pin and copy


def collate(batch):
    return tuple(zip(*batch))  # images vary in size: torchvision batches them itself


# ----------------------------------------------------------------------------- synthetic detection set
SHAPES = ("circle", "triangle", "square", "star")


class SyntheticDetection:
    """SHAPES on textured images, a function of (seed, split, index). Objects do not overlap, so every box is the
    full visible extent of its shape. GT 'area' is the shape's own area (like COCO's segmentation area), not the
    box area. Sizes span COCO's small and medium buckets and reach large (> 96^2 px) at 160 px images."""

    def __init__(self, num_images, img_size=160, seed=0, split="train"):
        self.num_images, self.img_size, self.seed = num_images, img_size, seed
        self.split_code = {"train": 0, "val": 1}[split]

    def _rng(self, index, stream):
        return np.random.default_rng([self.seed, self.split_code, index, stream])

    def layout(self, index):
        """Objects of image `index`: dicts with category_id, bbox [x, y, w, h], area, color and polygon."""
        rng, S = self._rng(index, 0), self.img_size
        objects = []
        for _ in range(int(rng.integers(1, 6))):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            extent = float(np.exp(rng.uniform(np.log(12), np.log(0.75 * S))))  # log-uniform box side
            if shape == "circle":
                geometry = np.zeros((0, 2))
                w = h = extent
                area = math.pi * (extent / 2) ** 2
            else:  # n vertices on the unit circle, the star's odd ones at radius 0.45
                n, inner = {"triangle": (3, 1.0), "square": (4, 1.0), "star": (10, 0.45)}[shape]
                radius = np.where(np.arange(n) % 2, inner, 1.0)[:, None]
                theta = rng.uniform(0, 2 * np.pi)
                rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
                geometry = augment.regular_polygon(n, phase=0) * radius @ rot.T  # (V, 2)
                geometry = geometry - geometry.min(0)
                geometry = geometry * extent / geometry.max()  # longer box side == extent
                w, h = geometry.max(0)
                x, y = geometry[:, 0], geometry[:, 1]
                area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))  # shoelace
            x0, y0 = rng.uniform(0, S - w), rng.uniform(0, S - h)
            color = rng.integers(0, 256, 3)
            # A rejected placement has still drawn its numbers: the stream stays a function of the index.
            if any(x0 < o["bbox"][0] + o["bbox"][2] + 2 and o["bbox"][0] < x0 + w + 2 and
                   y0 < o["bbox"][1] + o["bbox"][3] + 2 and o["bbox"][1] < y0 + h + 2 for o in objects):
                continue
            objects.append({"category_id": SHAPES.index(shape) + 1, "bbox": [float(x0), float(y0), float(w), float(h)],
                            "area": float(area), "color": tuple(int(c) for c in color),
                            "polygon": [(float(px + x0), float(py + y0)) for px, py in geometry]})
        return objects

    def render(self, image_id):
        """PIL RGB image for COCO image id (index + 1)."""
        index, S = image_id - 1, self.img_size
        rng = self._rng(index, 1)
        # A smooth colour field, oriented stripes and pixel noise: edges and colours alone do not give the shapes away.
        coarse = Image.fromarray(rng.uniform(40, 215, (4, 4, 3)).astype(np.uint8)).resize((S, S), Image.BICUBIC)
        yy, xx = np.mgrid[0:S, 0:S]
        angle, freq = rng.uniform(0, np.pi), rng.uniform(0.1, 0.5)
        stripes = 20 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))[..., None]
        pixels = np.asarray(coarse, dtype=np.float32) + stripes + rng.normal(0, 8, (S, S, 3))
        img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for o in self.layout(index):
            if o["category_id"] == 1:  # circle
                x, y, w, h = o["bbox"]
                draw.ellipse([x, y, x + w, y + h], fill=o["color"])
            else:
                draw.polygon(o["polygon"], fill=o["color"])
        return img

    def coco(self):
        """The whole set's annotations as a COCO instances dict (image ids are index + 1)."""
        images, annotations = [], []
        for index in range(self.num_images):
            images.append({"id": index + 1, "file_name": f"{index:06d}.png", "width": self.img_size,
                           "height": self.img_size})
            for o in self.layout(index):
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "iscrowd": 0,
                                    **{k: o[k] for k in ("category_id", "bbox", "area")}})
        return {"images": images, "annotations": annotations,
                "categories": [{"id": i + 1, "name": s} for i, s in enumerate(SHAPES)]}


# ----------------------------------------------------------------------------- model
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ViTDet's "LN"), without a channels-last copy."""

    def forward(self, x):  # (B, C, H, W)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid on the frozen ViT's last token map (stride p = patch size): levels '0'..'3' and 'pool' at
    self.strides, each with out_channels, the OrderedDict torchvision's FPN-style RPN and MultiScaleRoIAlign expect."""

    def __init__(self, backbone, out_channels=256):
        super().__init__()
        D, p = backbone.embed_dim, backbone.patch_size
        if p < 4 or p & (p - 1):
            raise ValueError(f"patch size {p}: the pyramid needs a power of two >= 4 "
                             "(RoIAlign infers power-of-two level strides)")
        self.backbone = backbone.requires_grad_(False).eval()
        self.out_channels = out_channels
        self.strides = (p // 4, p // 2, p, 2 * p, 4 * p)

        def conv(cin, cout, k):  # no bias: the LN after it has one
            return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), LayerNorm2d(cout, eps=1e-6)]

        resample = [  # per level: from stride p to p/4, p/2, p, 2p, and the width it leaves
            ([nn.ConvTranspose2d(D, D // 2, 2, stride=2), LayerNorm2d(D // 2, eps=1e-6), nn.GELU(),
              nn.ConvTranspose2d(D // 2, D // 4, 2, stride=2)], D // 4),
            ([nn.ConvTranspose2d(D, D // 2, 2, stride=2)], D // 2),
            ([], D),
            ([nn.MaxPool2d(2, stride=2)], D),
        ]
        self.levels = nn.ModuleList(
            nn.Sequential(*layers, *conv(width, out_channels, 1), *conv(out_channels, out_channels, 3))
            for layers, width in resample)

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()  # frozen: no drop-path, whatever the detector's mode
        return self

    def forward(self, images):  # (B, 3, H, W), normalised and padded by the detector's transform
        # bf16 for the ViT and the pyramid only: the heads decode box coordinates, which bf16's 8-bit
        # mantissa would round to several pixels on 800-px images.
        with vit.autocast(images.device):  # bf16 where it is native (GPUs, AVX512_BF16/AMX CPUs), else fp32
            with torch.no_grad():
                out = self.backbone.forward_features(images)
            (h, w), tokens = out["grid"], out["patch"]  # tokens (B, h*w, D)
            # (B, D, H/p, W/p), made NCHW-contiguous: on the channels-last view the convolutions' weight gradients
            # would come channels-last, which DDP copies into its NCHW buckets with a warning
            x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w).contiguous()
            feats = [level(x).float() for level in self.levels]  # (B, C, H*4/p, W*4/p) ... (B, C, H/2p, W/2p)
        feats.append(F.max_pool2d(feats[-1], kernel_size=1, stride=2))  # p6: torchvision's LastLevelMaxPool
        return OrderedDict(zip(("0", "1", "2", "3", "pool"), feats))


def build_detector(backbone, num_classes, args):
    """Faster R-CNN with the pyramid as backbone; num_classes excludes the background."""
    pyramid = SimpleFeaturePyramid(backbone, args.out_channels)
    if len(args.anchor_sizes) != 5:
        raise ValueError(f"--anchor-sizes needs one size per pyramid level (5), got {args.anchor_sizes}")
    anchors = AnchorGenerator(tuple((s,) for s in args.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    multiple = max(32, 2 * backbone.patch_size)
    return FasterRCNN(
        pyramid, min_size=tuple(args.min_size), max_size=args.max_size,
        image_mean=augment.IMAGENET_MEAN, image_std=augment.IMAGENET_STD, rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=args.proposals_train, rpn_post_nms_top_n_train=args.proposals_train,
        rpn_pre_nms_top_n_test=args.proposals_test, rpn_post_nms_top_n_test=args.proposals_test,
        rpn_batch_size_per_image=args.rpn_batch, box_batch_size_per_image=args.roi_batch,
        box_head=TwoMLPHead(args.out_channels * 7 * 7, args.box_head_dim),  # on 7x7 RoIAlign crops
        box_predictor=FastRCNNPredictor(args.box_head_dim, num_classes + 1),
        box_detections_per_img=100,  # COCO's maxDets
        # Every image padded to one S x S square (see the module docstring), S = --max-size rounded up to a multiple
        # of 2p (the ViT input divisible by p, the stride-2p level exact): padded per batch, an image would get other
        # features in other company, and --eval-batch-size or the number of ranks would change the AP.
        size_divisible=math.ceil(args.max_size / multiple) * multiple)


# ----------------------------------------------------------------------------- COCO evaluation (numpy)
# pycocotools COCOeval, bbox, default Params (cocodataset/cocoapi cocoeval.py); the linspace calls match it bit for bit.
IOU_THRS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
REC_THRS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)
MAX_DETS = (1, 10, 100)
AREA_RANGES = ((0 ** 2, 1e5 ** 2), (0 ** 2, 32 ** 2), (32 ** 2, 96 ** 2), (96 ** 2, 1e5 ** 2))  # all, s, m, l
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def box_iou_xywh(dt, gt, crowd):
    """IoU of (D, 4) and (G, 4) xywh boxes, (D, G); for a crowd GT the union is the detection's area."""
    lo = np.maximum(dt[:, None, :2], gt[None, :, :2])  # (D, G, 2) top-left of the intersection
    hi = np.minimum(dt[:, None, :2] + dt[:, None, 2:], gt[None, :, :2] + gt[None, :, 2:])
    w, h = (hi - lo)[..., 0], (hi - lo)[..., 1]
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    area_dt, area_gt = dt[:, 2] * dt[:, 3], gt[:, 2] * gt[:, 3]
    union = np.where(crowd[None, :], area_dt[:, None], area_dt[:, None] + area_gt[None, :] - inter)
    return np.where(inter > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_image(ious, dt_area, gt_area, gt_crowd, area_range):
    """Greedy matching of one (image, category) and area range at every IoU threshold, on ious (D, G), detections in
    score order: dt_matched, dt_ignore (T, D) and gt_ignore (G,), GTs in pycocotools' order (non-ignored first)."""
    lo, hi = area_range
    gt_ignore = gt_crowd | (gt_area < lo) | (gt_area > hi)  # inclusive bounds
    order = np.argsort(gt_ignore, kind="mergesort")
    gt_ignore, gt_crowd, ious = gt_ignore[order], gt_crowd[order], ious[:, order]
    T, (D, G) = len(IOU_THRS), ious.shape
    dt_matched, dt_ignore = np.zeros((T, D), bool), np.zeros((T, D), bool)
    gt_taken = np.zeros((T, G), bool)
    thr = np.minimum(IOU_THRS, 1 - 1e-10)[:, None]  # (T, 1)
    rows = np.arange(T)
    # Detections in score order; all thresholds at once. Those overlapping no GT enough cannot match.
    for d in np.flatnonzero(ious.max(1, initial=0.0) >= thr.min()):
        ok = (~gt_taken | gt_crowd) & (ious[d] >= thr)  # (T, G); a crowd region absorbs any number
        m = np.full(T, -1)
        # pycocotools scans non-ignored GTs first and stops at the first ignored one once it has a
        # non-ignored match; within a group the best IoU wins, ties going to the later GT.
        for group in (~gt_ignore, gt_ignore):
            cand = ok & group & (m < 0)[:, None]
            last_best = G - 1 - np.argmax(np.where(cand, ious[d], -np.inf)[:, ::-1], axis=1)  # (T,)
            m = np.where(cand.any(1), last_best, m)
        hit = m >= 0
        dt_matched[hit, d], dt_ignore[hit, d], gt_taken[rows[hit], m[hit]] = True, gt_ignore[m[hit]], True
    dt_ignore |= ~dt_matched & ((dt_area < lo) | (dt_area > hi))[None]  # unmatched and out of range
    return dt_matched, dt_ignore, gt_ignore


def coco_evaluate(gt, detections):
    """pycocotools COCOeval(iouType='bbox') stats in STAT_NAMES order (-1 where a slice has no GT) of detections
    [{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}] against a GT dict.

    One deviation: pycocotools records a detection's match as the matched annotation's id and tests that id for
    truth, so a detection matched to an annotation with id 0 counts there as a false positive (or, outside the area
    range, is ignored); here it is a true positive, as a match to any other id."""
    img_ids = sorted({im["id"] for im in gt["images"]})
    cat_ids = sorted({c["id"] for c in gt["categories"]})
    unknown = {d["image_id"] for d in detections} - set(img_ids)
    if unknown:
        raise ValueError(f"detections refer to image ids not in the ground truth, e.g. {sorted(unknown)[:5]}")
    gts, dts = defaultdict(list), defaultdict(list)
    for table, entries in ((gts, gt["annotations"]), (dts, detections)):
        for x in entries:
            table[x["image_id"], x["category_id"]].append(x)

    T, R, K, A, M = len(IOU_THRS), len(REC_THRS), len(cat_ids), len(AREA_RANGES), len(MAX_DETS)
    precision, recall = -np.ones((T, R, K, A, M)), -np.ones((T, K, A, M))
    for k, cat in enumerate(cat_ids):
        per_area = [[] for _ in AREA_RANGES]  # per area: (scores (D,), matched (T, D), ignore (T, D), gt_ignore (G,))
        for img in img_ids:
            g, d = gts.get((img, cat), []), dts.get((img, cat), [])
            if not g and not d:
                continue
            d = sorted(d, key=lambda x: -x["score"])[:MAX_DETS[-1]]  # stable, like mergesort
            scores = np.array([x["score"] for x in d], float)
            dt_box = np.array([x["bbox"] for x in d], float).reshape(-1, 4)
            gt_box = np.array([x["bbox"] for x in g], float).reshape(-1, 4)
            gt_crowd = np.array([bool(x.get("iscrowd", 0)) for x in g], bool)
            gt_area = np.array([x["area"] for x in g], float)
            dt_area = dt_box[:, 2] * dt_box[:, 3]  # loadRes: a detection's area is its box's
            ious = box_iou_xywh(dt_box, gt_box, gt_crowd)  # (D, G)
            for a, rng in enumerate(AREA_RANGES):
                per_area[a].append((scores, *match_image(ious, dt_area, gt_area, gt_crowd, rng)))
        for a, images in enumerate(per_area):
            npig = sum(int((~gi).sum()) for *_, gi in images)
            if npig == 0:  # no image, or only ignored GTs: the slice stays -1
                continue
            for m, max_det in enumerate(MAX_DETS):
                scores = np.concatenate([s[:max_det] for s, *_ in images])
                order = np.argsort(-scores, kind="mergesort")
                matched = np.concatenate([mt[:, :max_det] for _, mt, _, _ in images], axis=1)[:, order]  # (T, D)
                ignore = np.concatenate([ig[:, :max_det] for _, _, ig, _ in images], axis=1)[:, order]
                tp = np.cumsum(matched & ~ignore, axis=1).astype(float)
                fp = np.cumsum(~matched & ~ignore, axis=1).astype(float)
                rc, pr, nd = tp / npig, tp / (fp + tp + np.spacing(1)), tp.shape[1]
                recall[:, k, a, m] = rc[:, -1] if nd else 0
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # precision envelope, non-increasing
                precision[:, :, k, a, m] = 0  # at recall thresholds never reached
                for t in range(T):
                    idx = np.searchsorted(rc[t], REC_THRS, side="left")
                    precision[t, idx < nd, k, a, m] = pr[t, idx[idx < nd]]

    def summarize(values):
        values = values[values > -1]
        return float(values.mean()) if values.size else -1.0

    t50, t75 = np.flatnonzero(IOU_THRS == .5), np.flatnonzero(IOU_THRS == .75)
    return [summarize(precision[:, :, :, 0, 2]), summarize(precision[t50, :, :, 0, 2]),
            summarize(precision[t75, :, :, 0, 2]), *(summarize(precision[:, :, :, a, 2]) for a in (1, 2, 3)),
            *(summarize(recall[:, :, 0, m]) for m in range(M)), *(summarize(recall[:, :, a, 2]) for a in (1, 2, 3))]


def format_stats(stats):
    """The 12 stats as pycocotools' COCOeval.summarize prints them."""
    kinds = ["Precision"] * 6 + ["Recall"] * 6
    ious = ["0.50:0.95", "0.50", "0.75"] + ["0.50:0.95"] * 9
    areas = (["all"] * 3 + ["small", "medium", "large"]) * 2
    max_dets = [100] * 6 + [1, 10, 100] + [100] * 3
    return "\n".join(f" Average {kind:<9} (A{kind[0]}) @[ IoU={iou:<9} | area={area:>6} | maxDets={md:>3} ] = {s:0.3f}"
                     for kind, iou, area, md, s in zip(kinds, ious, areas, max_dets, stats))


# ----------------------------------------------------------------------------- training utilities
def learning_rate(it, args):
    if it < args.warmup_iters:
        return args.lr * (0.001 + 0.999 * it / args.warmup_iters)
    if args.schedule == "cosine":
        progress = (it - args.warmup_iters) / max(1, args.iters - args.warmup_iters)
        return args.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * 0.1 ** sum(it >= f * args.iters for f in args.decay_at)


class IterationBatches(Sampler):
    """Batches for iterations start..total-1. Epoch e's order is the DistributedSampler's for epoch e,
    a pure function of (seed, e), so a resumed run draws exactly the batches it would have drawn."""

    def __init__(self, sampler, batch_size, start, total):
        self.sampler, self.batch_size, self.start, self.total = sampler, batch_size, start, total
        self.per_epoch = len(sampler) // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"--batch-size {batch_size} exceeds the {len(sampler)} training images per process")

    def __iter__(self):
        for it in range(self.start, self.total):
            epoch, b = divmod(it, self.per_epoch)
            if b == 0 or it == self.start:
                self.sampler.set_epoch(epoch)
                order = list(self.sampler)
            yield order[b * self.batch_size:(b + 1) * self.batch_size]


def hflip(image, target):
    """Horizontal flip of a (3, H, W) image and of its target's (n, 4) xyxy boxes."""
    W, b = image.shape[-1], target["boxes"]
    return image.flip(-1), {**target, "boxes": torch.stack([W - b[:, 2], b[:, 1], W - b[:, 0], b[:, 3]], dim=1)}


FROZEN = "backbone.backbone."  # the ViT inside the detector: it comes from --pretrained, checkpoints leave it out
# Options a resumed run may change: they do not change what the heads learn. --batch-size is per process: the global
# batch, checked on its own, must stay; --iters may grow only where the lr of the iterations trained stays the same.
# --pretrained may name the file another way (an absolute path, ./), or where it moved: its weights digest, checked
# on its own, tells whether the backbone is the one the heads were trained on.
RUNTIME_OPTIONS = {"output_dir", "num_workers", "log_every", "ckpt_every", "eval_batch_size", "iters", "val_split",
                   "synthetic_val", "batch_size", "pretrained"}


def save_checkpoint(path, model, optimizer, iteration, args, digest, train_set, **record):
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith(FROZEN)}  # pyramid, RPN, RoI heads
    if not all(torch.isfinite(v).all() for v in heads.values() if v.is_floating_point()):  # a resume refuses them
        raise SystemExit(f"detect_eval.py: non-finite weights by iteration {iteration}; lower --lr ({path} was not "
                         "replaced)")
    vit.save_atomic(path, {"model": heads, "optimizer": optimizer.state_dict(), "iteration": iteration,
                           "args": vars(args), "backbone_digest": digest, "cat_ids": train_set.cat_ids,
                           "train_ann_digest": train_set.ann_digest, "padding": "square", **record})


def load_checkpoint(path, model, optimizer, args, digest, train_set, world_size):
    ckpt = vit.load_resumable(path, args, ("model", "optimizer", "iteration"), "detect_eval.py", RUNTIME_OPTIONS)
    if ckpt.get("padding") != "square":  # heads that saw batch-padded images would go on, or be scored, on squares
        raise ValueError(f"{path} holds heads trained on images padded per batch, not to one --max-size square (an "
                         "earlier detect_eval.py); use another --output-dir")
    # An altered count would train extra iterations (below 0: at a negative warm-up lr) or fail on its type.
    if type(ckpt["iteration"]) is not int or ckpt["iteration"] < 0:
        raise ValueError(f"{path} holds iteration {ckpt['iteration']!r}, not a count of iterations trained: the file "
                         "was altered; move it away or use another --output-dir")
    if ckpt["iteration"] > args.iters:  # trained heads cannot be untrained: results would claim fewer iterations
        raise ValueError(f"{path} holds heads trained for {ckpt['iteration']} iterations, more than --iters "
                         f"{args.iters}; pass --iters {ckpt['iteration']} or more (as many only evaluates them), "
                         "or use another --output-dir")
    if ckpt.get("backbone_digest", digest) != digest:
        raise ValueError(f"{path} holds heads trained on other backbone weights than {args.pretrained} has now "
                         f"(they came from {ckpt['args'].get('pretrained')}, or the file changed since). Use another "
                         "--output-dir.")
    saved = argparse.Namespace(**ckpt["args"])  # --decay-at and the cosine are fractions of --iters
    if any(learning_rate(it, saved) != learning_rate(it, args) for it in range(ckpt["iteration"])):
        raise ValueError(f"{path}: --iters {args.iters} (was {saved.iters}) changes the lr of the {ckpt['iteration']} "
                         f"iterations already trained; pass --iters {saved.iters}, or use another --output-dir to "
                         f"train {args.iters} iterations from the start")
    # A checkpoint without it predates this check: --batch-size per process had to match, as it does here.
    global_batch = ckpt.get("global_batch", saved.batch_size * world_size)
    if global_batch != args.batch_size * world_size:
        raise ValueError(f"{path} holds heads trained at a global batch of {global_batch} images, this run's is "
                         f"{args.batch_size * world_size} (--batch-size {args.batch_size} per process x {world_size});"
                         f" resume at a global batch of {global_batch}, or use another --output-dir")
    # The same --data can hold other annotations since: the box head has one output per category.
    cat_ids = train_set.cat_ids
    if ckpt.get("cat_ids", cat_ids) != cat_ids:
        raise ValueError(f"{path} holds heads trained for {len(ckpt['cat_ids'])} categories (ids "
                         f"{ckpt['cat_ids'][:10]}), the annotations of --data {args.data} now list {len(cat_ids)} "
                         f"(ids {cat_ids[:10]}). Use another --output-dir.")
    # Or other boxes, labels or images: the heads would go on from another data set (absent: an older checkpoint).
    if ckpt.get("train_ann_digest", train_set.ann_digest) != train_set.ann_digest:
        raise ValueError(f"{path} holds heads trained on another {train_set.ann_file}: the file changed since the "
                         "checkpoint; use another --output-dir")
    mismatch = f"{path} does not match this detector (different flags?): "
    fix = "; move it away or use another --output-dir"
    try:
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    except (RuntimeError, TypeError, AttributeError) as e:  # load_state_dict's multi-line report, e.g. a shape
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "size mismatch" in line), lines[-1]).rstrip(".")
        raise ValueError(mismatch + reason + fix) from None
    frozen = {k for k in model.state_dict() if k.startswith(FROZEN)}
    if set(missing) != frozen or unexpected:
        raise ValueError(f"{mismatch}missing {sorted(set(missing) - frozen)[:5]}, unexpected {unexpected[:5]}{fix}")
    try:  # NaN heads would score AP 0.0, as if trained
        vit.refuse_non_finite(path, ckpt["model"])
    except ValueError as e:
        raise ValueError(f"{e}, or move it away or use another --output-dir to train again") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt


def check_resizable(coco, ann_file, args):
    """The detector resizes each side to floor(side x scale) px, scale = min(--min-size / short side, --max-size /
    long side): an image whose short side comes out 0 px would crash torch's interpolate, after all the training."""
    for im in coco["images"]:
        short, long = sorted((im["width"], im["height"]))
        if any(math.floor(short * min(s / short, args.max_size / long)) < 1 for s in args.min_size):
            enough = math.ceil(long / short)
            while math.floor(short * (enough / long)) < 1:  # float rounding at an exact ratio
                enough += 1
            raise ValueError(f"{ann_file}: image {im['id']} ({im['file_name']}) is {im['width']}x{im['height']}: "
                             f"--min-size {' '.join(map(str, args.min_size))} and --max-size {args.max_size} scale its "
                             f"short side to under 1 px; pass --max-size {enough} or more, or leave the image out")


def build_data(args):
    """Train and val datasets (their COCO dicts in .coco). The synthetic set is validated as a COCO file would be;
    main writes its synthetic_{split}.json once the run is accepted (a refused resume changes no file)."""
    datasets = []
    for split, name, n in (("train", args.train_split, args.synthetic_train),
                           ("val", args.val_split, args.synthetic_val)):
        if args.data == "synthetic":
            synth, source = SyntheticDetection(n, args.synthetic_size, args.data_seed, split), f"synthetic_{split}.json"
            coco = synth.coco()
            validate_coco(coco, source)
            datasets.append(CocoDetection(coco, render=synth.render, ann_file=source))
        else:
            source = os.path.join(args.data, "annotations", f"instances_{name}.json")
            coco = load_coco(source, os.path.join(args.data, name), args.allow_degenerate_boxes)
            datasets.append(CocoDetection(coco, os.path.join(args.data, name), ann_file=source))
    for dataset in datasets:
        check_resizable(dataset.coco, dataset.ann_file, args)
    train, val = datasets
    # The heads learn train's labels by id; val is scored by id: the same id must mean the same category in both.
    train_names, val_names = ({c["id"]: c["name"] for c in d.coco["categories"]} for d in (train, val))
    if train_names != val_names:
        differ = sorted(i for i in train_names.keys() | val_names.keys() if train_names.get(i) != val_names.get(i))
        shown = ", ".join(f"id {i}: " + " vs ".join(repr(n[i]) if i in n else "absent"
                                                    for n in (train_names, val_names)) for i in differ[:5])
        raise ValueError(f"train and val annotation files list different categories ({train.ann_file} vs "
                         f"{val.ann_file}: {shown}{', ...' if len(differ) > 5 else ''}); give both files the "
                         "same category ids and names")
    if args.data != "synthetic":
        # load_coco keeps file names inside their split's folder, but a link (the folder or an image) may still lead
        # into the other split's images: the detector would be scored on images it trained on.
        trained = {os.path.realpath(os.path.join(train.image_dir, im["file_name"])) for im in train.coco["images"]}
        for im in val.coco["images"]:
            path = os.path.realpath(os.path.join(val.image_dir, im["file_name"]))
            if path in trained:
                raise ValueError(f"{val.ann_file}: image {im['id']} ({im['file_name']}) is the file {path}, which "
                                 f"{train.ann_file} lists too: the detector would be scored on an image it trained "
                                 "on; give val images of its own")
    return train, val


@torch.no_grad()
def predict(model, dataset, args, device, rank, world_size):
    """COCO results for the whole val set, gathered on every rank (sampler padding removed by image id)."""
    model.eval()
    loader = augment.make_loader(dataset, args.eval_batch_size, rank, world_size, args.num_workers, collate_fn=collate)
    local = {}
    for images, targets in augment.progress(loader, len(loader), "evaluation: batch", losses.log):
        images = [img.to(device, non_blocking=True).float().div_(255) for img in images]
        for tgt, out in zip(targets, model(images)):  # boxes in original image coordinates, xyxy
            boxes = out["boxes"].cpu()
            boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
            local[tgt["image_id"]] = [
                {"image_id": tgt["image_id"], "category_id": dataset.cat_ids[label - 1], "bbox": box, "score": score}
                for box, label, score in zip(boxes.tolist(), out["labels"].tolist(), out["scores"].tolist())]
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, local)
        local = {k: v for part in gathered for k, v in part.items()}
    return [d for img_id in sorted(local) for d in local[img_id]]


# ----------------------------------------------------------------------------- main
def get_args_parser():
    p = argparse.ArgumentParser(prog="detect_eval.py", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", help="'synthetic' (built-in, offline) or a COCO root "
                   "with annotations/instances_{split}.json and {split}/ image folders")
    g.add_argument("--train-split", default="train2017", help="COCO: the training images' folder and annotation name")
    g.add_argument("--val-split", default="val2017", help="COCO: the evaluated images' folder and annotation name")
    g.add_argument("--allow-degenerate-boxes", action="store_true",
                   help="keep zero-size GT boxes for scoring (COCO train2017 has 2) instead of failing")
    g.add_argument("--synthetic-train", type=int, default=512, help="synthetic training images")
    g.add_argument("--synthetic-val", type=int, default=128, help="synthetic validation images")
    g.add_argument("--synthetic-size", type=int, default=128, help="synthetic image side in pixels")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic images")
    vit.add_backbone_flags(p)
    g = p.add_argument_group("detector")
    g.add_argument("--out-channels", type=int, default=128,
                   help="pyramid channels; ViTDet/COCO: 256 (128 keeps the CPU default run to minutes)")
    g.add_argument("--anchor-sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256],
                   help="one anchor size per level; COCO: 32 64 128 256 512")
    g.add_argument("--min-size", type=int, nargs="+", default=[128],
                   help="shorter side after resizing (several: random per image in training, the last at test); "
                        "COCO: 640..800. Equal to the synthetic size means no resizing")
    g.add_argument("--max-size", type=int, default=128, help="cap on the longer side, and the side of the square "
                   "every image is padded to; COCO: 1333 (ViTDet's 1024: 0.6x the ViT tokens)")
    g.add_argument("--rpn-batch", type=int, default=64, help="anchors sampled per image for the RPN loss; COCO: 256")
    g.add_argument("--roi-batch", type=int, default=64, help="proposals sampled per image for the box head; COCO: 512")
    g.add_argument("--proposals-train", type=int, default=512, help="RPN proposals kept per image; COCO: 2000")
    g.add_argument("--proposals-test", type=int, default=256, help="COCO: 1000")
    g.add_argument("--box-head-dim", type=int, default=256, help="TwoMLPHead width; COCO: 1024")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="SGD for the COCO recipe")
    g.add_argument("--lr", type=float, default=1e-3, help="peak lr; SGD on COCO: 0.02 at batch 16")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="on conv/linear weights only")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--batch-size", type=int, default=4, help="images per process per iteration")
    g.add_argument("--iters", type=int, default=300, help="training iterations (COCO 1x: 90000 at batch 16)")
    g.add_argument("--warmup-iters", type=int, default=30, help="linear lr warm-up from 0.001 x --lr")
    g.add_argument("--schedule", choices=("step", "cosine"), default="step",
                   help="after warm-up: x0.1 steps at --decay-at (detectron2), or a cosine to 0")
    g.add_argument("--decay-at", type=float, nargs="*", default=[0.67, 0.89],
                   help="step schedule: fractions of --iters where lr drops x0.1 (detectron2 1x: 60k, 80k of 90k)")
    g = p.add_argument_group("run")
    g.add_argument("--eval-batch-size", type=int, default=8, help="images per process per forward in the evaluation")
    g.add_argument("--num-workers", type=int, default=2, help="data-loading processes per training process")
    g.add_argument("--seed", type=int, default=0, help="seed of the heads' init, flips, scales and RPN/RoI sampling")
    g.add_argument("--log-every", type=int, default=20, help="iterations between loss lines")
    g.add_argument("--ckpt-every", type=int, default=100, help="iterations between checkpoints (also saved at the end "
                   "and on SIGTERM/SIGINT, which then stop the run: rerun the same command to resume)")
    g.add_argument("--output-dir", default="runs/detect", help="checkpoint.pth (resumed automatically), log.jsonl, "
                   "detect_results.json, detections_val.json (and synthetic_{train,val}.json with --data synthetic)")
    return p


def check_args(args):
    at_least_0 = ("weight_decay", "num_workers", "warmup_iters")
    at_least_1 = ("depth", "batch_size", "iters", "eval_batch_size", "log_every", "ckpt_every", "synthetic_train",
                  "synthetic_val", "patch_size", "anchor_sizes", "rpn_batch", "roi_batch", "proposals_train",
                  "proposals_test", "box_head_dim")
    ranges = [("--lr", args.lr, lambda v: v > 0, "positive"),
              ("--momentum", args.momentum, lambda v: 0 <= v <= 1, "in [0, 1]"),
              ("--decay-at", args.decay_at, lambda v: 0 < v < 1, "fractions in (0, 1)"),
              # SyntheticDetection.layout draws box sides from 12 px to 0.75 x the image side
              ("--synthetic-size", args.synthetic_size, lambda v: 16 <= v <= 8192, "in 16..8192"),
              ("--max-size", args.max_size, lambda v: 1 <= v <= 8192, "in 1..8192"),
              ("--min-size", args.min_size, lambda v: 1 <= v <= args.max_size, f"in 1..--max-size ({args.max_size})"),
              # LayerNorm2d over one channel subtracts each value from itself: a pyramid blind to the image
              ("--out-channels", args.out_channels, lambda v: v >= 2, "at least 2")]
    ranges += [("--" + k.replace("_", "-"), getattr(args, k), lambda v: v >= 0, ">= 0") for k in at_least_0]
    ranges += [(f"--{k.replace('_', '-')}", getattr(args, k), *augment.SEED_RANGE) for k in ("seed", "data_seed")]
    ranges += [("--" + k.replace("_", "-"), getattr(args, k), lambda v: v >= 1, "at least 1") for k in at_least_1]
    augment.check_ranges(ranges, prefix="detect_eval.py: ")
    if os.path.lexists(os.path.join(args.output_dir, "backbone.pth")):  # its log.jsonl would be replaced by ours
        raise SystemExit(f"detect_eval.py: --output-dir {args.output_dir} holds a pretraining run (backbone.pth); "
                         f"pass another, e.g. {os.path.join(args.output_dir, 'detect')}")
    if args.data != "synthetic" and not os.path.isdir(args.data):
        raise SystemExit(f"detect_eval.py: --data {args.data} is not a folder: pass a COCO root or 'synthetic'")
    synthetic = args.data == "synthetic"
    train_ann, val_ann = (os.path.realpath(os.path.join(args.data, "annotations", f"instances_{s}.json"))
                          for s in (args.train_split, args.val_split))
    if not synthetic and train_ann == val_ann:  # one folder with two annotation files is a fine split
        raise SystemExit(f"detect_eval.py: --train-split {args.train_split} and --val-split {args.val_split} read one "
                         "annotation file, so the detector would be scored on its training images; pass two splits")
    readers = [(k, not synthetic, "a COCO --data") for k in ("train_split", "val_split", "allow_degenerate_boxes")]
    readers += [(k, synthetic, "--data synthetic") for k in ("synthetic_train", "synthetic_val", "synthetic_size",
                                                             "data_seed")]
    readers += [("decay_at", args.schedule == "step", "--schedule step"),
                ("momentum", args.optimizer == "sgd", "--optimizer sgd"),
                ("checkpoint_key", not args.random_init, "--pretrained")]
    parser = get_args_parser()
    augment.refuse_ignored_flags(args, parser, readers, prefix="detect_eval.py: ")
    if args.warmup_iters >= args.iters:  # the lr would warm up throughout, never reaching --lr nor its decays
        default = " (the default)" if args.warmup_iters == parser.get_default("warmup_iters") else ""
        raise SystemExit(f"detect_eval.py: --warmup-iters {args.warmup_iters}{default} must be below --iters "
                         f"{args.iters}: pass a smaller --warmup-iters")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    check_args(args)
    rank, world_size, device = losses.init_distributed()
    # The fp32 heads (see SimpleFeaturePyramid.forward) may use TF32 tensor cores, as detectron2 does.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    sources = [vit.weights_source(args.pretrained, args.checkpoint_key) if args.pretrained
               else f"random init {args.arch}"]
    # the scored set: --val-split and --synthetic-val may change on a resume, which evaluates the heads on it anew
    data = (f"{vit.data_location(args.data)} --val-split {args.val_split}" if args.data != "synthetic" else
            f"synthetic --synthetic-val {args.synthetic_val} --synthetic-size {args.synthetic_size} "
            f"--data-seed {args.data_seed}")
    vit.make_output_dir(args.output_dir, prefix="detect_eval.py: ", outputs=(
        "checkpoint.pth", "log.jsonl", "detections_val.json", "synthetic_train.json", "synthetic_val.json",
        "detect_results.json"), sources=sources, lock=rank == 0, data=data)
    losses.barrier()  # the others read the folder once rank 0 holds it: a run ending meanwhile changes its checkpoint

    # ============ building the frozen backbone, the detector and the data ============
    torch.manual_seed(args.seed)  # not yet offset by rank: every rank must build the same networks
    backbone = vit.backbone_from_flags(args.pretrained, args.arch, args.patch_size, args.checkpoint_key,
                                       args.random_init, depth=args.depth, equiv_layer=args.equiv_layer,
                                       log=losses.log)
    try:  # bad data or flags, or a checkpoint of another run: one line naming the file
        train_set, val_set = build_data(args)
        model = build_detector(backbone, len(train_set.cat_ids), args).to(device)
        torch.manual_seed(args.seed + rank)
        reference, digest = linear_eval.snapshot(backbone), vit.weights_digest(backbone)

        # ============ preparing the optimizer ============
        # Norm parameters and biases get no weight decay (a decayed LN gain only shrinks features).
        params = [p for p in model.parameters() if p.requires_grad]
        decay, no_decay = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = (torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum) if args.optimizer == "sgd"
                     else torch.optim.AdamW(groups, lr=args.lr))
        n_frozen = sum(p.numel() for p in backbone.parameters())
        losses.log(f"backbone {args.pretrained or 'random init ' + args.arch}: {n_frozen / 1e6:.2f}M frozen params; "
                   f"trainable {sum(p.numel() for p in decay) / 1e6:.2f}M decayed + "
                   f"{sum(p.numel() for p in no_decay) / 1e3:.1f}K not; global batch {args.batch_size * world_size}, "
                   f"{len(train_set)} train / {len(val_set)} val images")

        # ============ optionally resuming, then the batches from there on ============
        ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
        ckpt = {"iteration": 0}
        if os.path.lexists(ckpt_path):  # a folder or a broken link there is an error, not a fresh start
            ckpt = load_checkpoint(ckpt_path, model, optimizer, args, digest, train_set, world_size)
            losses.log(f"resumed from {ckpt_path} at iteration {ckpt['iteration']}")
        losses.refuse_disagreement(ckpt["iteration"], "the iteration to resume from (--output-dir must be one folder "
                                   "every node sees)")
        # every invocation that trained these heads, in time and processes (which seed the flips and samplings)
        start, trained_s = ckpt["iteration"], ckpt.get("train_time_s", 0.0)
        world_sizes = sorted({*ckpt.get("world_sizes", []), *([world_size] if start < args.iters else [])})
        sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
        batches = IterationBatches(sampler, args.batch_size, start, args.iters)
        if rank == 0:  # records a crash wrote after the checkpoint, or a run before it, would stand beside the new ones
            with vit.exit_on_write_error("detect_eval.py: "):
                vit.restart_log(os.path.join(args.output_dir, "log.jsonl"), ckpt["iteration"], "iteration")
                if args.data == "synthetic":  # the sets scored, as COCO files for pycocotools
                    for split, dataset in (("train", train_set), ("val", val_set)):
                        vit.save_atomic(os.path.join(args.output_dir, f"synthetic_{split}.json"), dataset.coco,
                                        indent=None)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"detect_eval.py: {e}") from None

    # ============ training the pyramid and the heads ============
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else model
    loader = DataLoader(train_set, batch_sampler=batches, num_workers=args.num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", worker_init_fn=augment.ignore_stop_signals)
    model.train()
    t0, interrupt = time.time(), augment.Interrupt(world_size)  # SIGTERM/SIGINT: checkpoint, then stop
    for it, (images, targets) in enumerate(loader, start=start):
        # Reseeding from (seed, iteration, rank) makes flips, multi-scale sizes and the RPN/RoI
        # sampling a function of the iteration, so resuming replays the uninterrupted run.
        torch.manual_seed(args.seed + it * world_size + rank)
        lr = learning_rate(it, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        flips = (torch.rand(len(images)) < 0.5).tolist()
        images, targets = zip(*(hflip(img, t) if f else (img, t) for img, t, f in zip(images, targets, flips)))
        images = [img.to(device, non_blocking=True).float().div_(255) for img in images]  # (3, H, W) in [0, 1]
        targets = [{k: t[k].to(device, non_blocking=True) for k in ("boxes", "labels")} for t in targets]
        loss_terms = ddp(images, targets)  # RPN objectness/box + RoI classifier/box losses
        loss = sum(loss_terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        signum = interrupt.poll()

        if (it + 1) % args.log_every == 0 or it + 1 == args.iters:
            values = {k: v.item() for k, v in loss_terms.items()}  # sync only at log steps
            if not math.isfinite(loss.item()):
                raise SystemExit(f"detect_eval.py: non-finite loss by iteration {it + 1}: {values}; lower --lr")
            losses.log(f"it {it + 1}/{args.iters} lr {lr:.2e} loss {loss.item():.3f} "
                + " ".join(f"{k.replace('loss_', '')} {v:.3f}" for k, v in values.items())
                + f" ({time.time() - t0:.0f}s)")
            if rank == 0:
                with vit.exit_on_write_error("detect_eval.py: "):
                    vit.append_jsonl(os.path.join(args.output_dir, "log.jsonl"),
                                     {"iteration": it + 1, "lr": lr, **values})
        if rank == 0 and ((it + 1) % args.ckpt_every == 0 or it + 1 == args.iters or signum):
            with vit.exit_on_write_error("detect_eval.py: "):
                save_checkpoint(ckpt_path, model, optimizer, it + 1, args, digest, train_set,
                                global_batch=args.batch_size * world_size, world_sizes=world_sizes,
                                train_time_s=trained_s + time.time() - t0)
        if signum:  # checkpointed, not finished: a scheduler must not count it as done
            losses.log(f"stopped at iteration {it + 1} on {signal.Signals(signum).name}, exit status {128 + signum}; "
                       f"checkpoint saved to {ckpt_path}; rerun the same command to resume")
            losses.finish_distributed()
            raise SystemExit(128 + signum)
    interrupt.close()
    train_time = trained_s + time.time() - t0

    # ============ evaluating on the val split ============
    t0 = time.time()
    detections = predict(model, val_set, args, device, rank, world_size)
    results = None
    if rank == 0:
        stats = coco_evaluate(val_set.coco, detections)
        losses.log(format_stats(stats))
        results = {"stats": dict(zip(STAT_NAMES, stats)), "iterations": args.iters,
                   "backbone": args.pretrained or f"random init {args.arch}", "source": sources, "data": data,
                   "num_val_images": len(val_set), "num_detections": len(detections), "train_time_s": train_time,
                   "eval_time_s": time.time() - t0, "world_size": world_size, "train_world_sizes": world_sizes,
                   "global_batch_size": args.batch_size * world_size, "args": vars(args)}
        # each file replaced in one step, the results last; the detections in pycocotools' loadRes format
        with vit.exit_on_write_error("detect_eval.py: "):
            vit.save_atomic(os.path.join(args.output_dir, "detections_val.json"), detections, indent=None)
            vit.save_atomic(os.path.join(args.output_dir, "detect_results.json"), results)
        losses.log(f"AP {stats[0]:.4f} AP50 {stats[1]:.4f} -> {os.path.join(args.output_dir, 'detect_results.json')}")
    linear_eval.assert_unchanged(backbone, reference)  # MoCo v3's sanity check: the backbone stayed frozen
    losses.finish_distributed()
    return results


if __name__ == "__main__":
    augment.run_script(main)

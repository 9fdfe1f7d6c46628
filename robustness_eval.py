"""Robustness of a frozen backbone + linear probe: layer equivariance, geometry, ImageNet-C, ImageNet-P.

What it measures (ImageNet-C/-P: Hendrycks & Dietterich, ICLR 2019, hendrycks/robustness):
  * equivariance per block l, for the group elements g of geometry: mean cosine over tokens between f_l(g x) and
                rho_g f_l(x), relative error |f_l(gx) - rho_g f_l(x)|_F / |rho_g f_l(x)|_F, invariance error
                |f_l(gx) - f_l(x)| / |f_l(x)|, and the chance baseline: f_l(g x) against rho_g f_l(x') of an
                unrelated image x', the same one whatever the batching. Needs only a backbone: the layer trade-off
                behind SER (equivariant early, invariant late).
  * geometry    top-1 under 90/180/270-degree rotations, h/v flips and 0.75x / 1.25x rescaling (the ViT
                resamples its position embedding).
  * ImageNet-C  15 corruptions x 5 severities of ImageNet-C/create_c/make_imagenet_c.py, generated on the fly or
                read from the released JPEGs: top-1 error per corruption and severity, the mean top-1 over the
                15x5 (the SER paper's "ImageNet-C Top-1"), and on ImageNet mCE and relative mCE against AlexNet.
  * ImageNet-P  the 10 test sequences of ImageNet-P/create_p/make_imagenet_p.py, generated or read from frame
                folders: flip probability FP, top-5 distance T5D, top-1 over perturbed frames (the SER paper's
                "ImageNet-P Top-1"); mFR / mT5D only with --p-normalizers.

Run (the built-in synthetic val split, a probe written by linear_eval.py):
    python robustness_eval.py --probe runs/default/linear/linear_probe.pth --num-images 64 --p-frames 7  # quick CPU
    torchrun --nproc_per_node=8 robustness_eval.py --probe runs/default/linear/linear_probe.pth \
        --data /datasets/imagenet --imagenet-c-dir /datasets/ImageNet-C --output-dir runs/robustness_in1k
    python robustness_eval.py --equivariance-only --backbone runs/dino/backbone.pth runs/dino_ser/backbone.pth \
        --figures runs/figures                # no probe: one table and figure over several runs
Writes a table to stdout and <output-dir>/robustness.json.

Exactness against make_imagenet_c.py (each function says how): every corruption up to float error, motion blur
and snow's blurred layer bit for bit, elastic near-exact. DEVIATION: frost. Its photos are not in this repository;
without --frost-dir a procedural texture about half as strong replaces them, and every number it enters is marked
(FROST_NOTE). Regenerated data is never bit-identical to the released JPEGs (the original used the global
np.random): only --imagenet-c-dir is canonical. The originals assume 224x224: pixel-unit constants are kept,
hard-coded image sizes scale with the image. ImageNet-P ships as H.264 MP4s that need PyAV or OpenCV: extract
them to frame folders (--imagenet-p-dir) or use the generated sequences. Shorter sequences (--p-frames) keep the
per-frame step (frame_indices).
"""
import argparse
import io
import json
import math
import os
import re
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, Subset

import augment
import losses
import vit
from group_actions import GroupElement, apply_to_images, apply_to_token_map
from linear_eval import load_probe, predict
from losses import log


# ---------------------------------------------------------------------------------------------------
# Geometry and equivariance: does block l map g x to rho_g f_l(x)? Elements act on a whole batch (group_actions).

EQUIV_METRICS = ("cos", "rel_error", "inv_error", "chance_cos", "chance_rel_error")


def geometric_elements(batch_size, grid, scales=(0.75, 1.25)):
    """The elements by name. A rescaling acts on the token grid, so it is named by the scale it realises there:
    0.75 of a 14x14 grid is 10x10, 'scale0.7143'; of a 4x4 grid 3x3, 'scale0.75'."""
    yes = torch.ones(batch_size, dtype=torch.bool)
    elements = {"rot90": GroupElement(k=1), "rot180": GroupElement(k=2), "rot270": GroupElement(k=3),
                "hflip": GroupElement(flip=yes), "vflip": GroupElement(flip=yes, rot180=yes)}
    for s in scales:
        size = (max(1, round(grid[0] * s)), max(1, round(grid[1] * s)))
        elements[f"scale{size[0] / grid[0]:.4g}"] = GroupElement(size=size)
    return elements


@torch.no_grad()
def equivariance_scores(backbone, x, elements, autocast=nullcontext, x_other=None):
    """Per-image scores (E, L, M, B) for E elements, L blocks, M = EQUIV_METRICS (as in the module docstring),
    images x (B, 3, H, W). inv_error is NaN where g changes the grid (no identity map there); chance_* compares
    f_l(g x) with rho_g f_l(x') for x' the same row of x_other (NaN without it)."""
    def fro(t):
        return t.flatten(1).norm(dim=1)  # (B,)

    with autocast():
        maps = [m.float() for m in backbone.block_token_maps(x)]  # L x (B, D, h, w)
        # the unrelated image's clean maps: one forward, where f_l(g x') would take one per element
        others = None if x_other is None else [m.float() for m in backbone.block_token_maps(x_other)]
    out = torch.full((len(elements), len(maps), len(EQUIV_METRICS), x.shape[0]), float("nan"), device=x.device)
    for e, g in enumerate(elements.values()):
        with autocast():
            maps_g = [m.float() for m in backbone.block_token_maps(apply_to_images(x, g, backbone.patch_size))]
        for l, (m, mg) in enumerate(zip(maps, maps_g)):
            if mg.shape == m.shape:
                out[e, l, 2] = fro(mg - m) / fro(m)
            targets = [(0, m)] + ([(3, others[l])] if others else [])  # rho_g f_l(x), then rho_g f_l(x')
            for k, t in targets:
                target = apply_to_token_map(t, g)  # (B, D, h', w')
                out[e, l, k] = F.cosine_similarity(mg, target, dim=1).flatten(1).mean(1)
                out[e, l, k + 1] = fro(mg - target) / fro(target)
    return out


# ---------------------------------------------------------------------------------------------------
# Figures (--figures DIR): SER's idea made visible, and DINO-style [CLS] attention maps.

def pca_rgb(maps):
    """Token maps [(D, h_i, w_i)] -> RGB pictures [(3, h_i, w_i)] in [0, 1] in ONE shared basis: the
    three leading principal components of all their tokens together, each min-max scaled over all
    maps. Equal maps give equal pictures, so a difference between panels is a difference of features."""
    flat = torch.cat([m.flatten(1).T for m in maps]).double()  # (sum h*w, D)
    mean = flat.mean(0)
    basis = torch.linalg.svd(flat - mean, full_matrices=False).Vh[:3].T  # (D, <=3)
    proj = [((m.flatten(1).T.double() - mean) @ basis).T.reshape(-1, *m.shape[1:]) for m in maps]
    proj = [torch.cat([p, p.new_zeros(3 - len(p), *p.shape[1:])]) for p in proj]  # D < 3: pad channels
    lo = torch.stack([p.amin((1, 2)) for p in proj]).amin(0).view(3, 1, 1)
    hi = torch.stack([p.amax((1, 2)) for p in proj]).amax(0).view(3, 1, 1)
    return [((p - lo) / (hi - lo).clamp_min(1e-12)).float() for p in proj]


@torch.no_grad()
def equivariance_panels(backbone, x, g, layer):
    """The two sides of L_equiv at block `layer` as pictures: (f_L(g x), rho_g f_L(x)), each a list of B RGB maps
    (3, h', w'), one PCA basis per image shared by its two panels."""
    f_gx = backbone.block_token_maps(apply_to_images(x, g, backbone.patch_size))[layer - 1].float()
    rho_f_x = apply_to_token_map(backbone.block_token_maps(x)[layer - 1].float(), g)
    pairs = [pca_rgb([a, b]) for a, b in zip(f_gx, rho_f_x)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@torch.no_grad()
def cls_attention(backbone, x):
    """The last block's [CLS] -> patch attention per head, (B, heads, h, w), each map summing to <= 1."""
    _, maps = backbone.forward_with_attention(x)
    h, w = x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size
    return maps[-1][:, :, 0, 1:].reshape(x.shape[0], -1, h, w)


def _picture(t, size):
    """(3, h, w) or (h, w) in [0, 1] -> a PIL RGB tile of size x size (nearest: tokens stay visible)."""
    t = t.detach().float().cpu().clamp(0, 1)
    t = t.expand(3, -1, -1) if t.dim() == 2 else t
    u8 = (t.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(u8).resize((size, size), Image.NEAREST)


def _grid_image(rows, header, tile):
    """Rows of tiles under header lines, each a title per column; a title runs over the empty ones after it (a run's
    name over its two panels), cut to that width."""
    pad, line = 4, 12
    top = 2 + line * len(header)
    width = max(len(r) for r in rows) * (tile + pad) + pad
    # a grey page: a white tile (a uniform attention map at its maximum) stays visible
    out = Image.new("RGB", (width, top + len(rows) * (tile + pad) + pad), (200, 200, 200))
    draw = ImageDraw.Draw(out)
    for k, titles in enumerate(header):
        starts = [c for c, title in enumerate(titles) if title]
        for c, end in zip(starts, starts[1:] + [len(titles)]):
            title = titles[c]
            while draw.textlength(title) > (end - c) * (tile + pad) - pad:
                title = title[:-1]
            draw.text((pad + c * (tile + pad), 2 + line * k), title, fill="black")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            out.paste(im, (pad + c * (tile + pad), top + pad + r * (tile + pad)))
    return out


def write_figures(backbones, names, x, out_dir, layer, tile=64):
    """<out_dir>/equivariance.png, one row per (image, g): x, g x, then per backbone f_L(g x) | rho_g f_L(x) as
    PCA->RGB token maps. Where a backbone's two panels agree, its block L is equivariant to g (what SER's L_equiv
    asks for); an invariance-trained layer shows the content in the wrong place or in other colours.
    <out_dir>/attention_<name>.png, one row per image: the image, then the last block's [CLS] attention per head
    (DINO's), each scaled to its maximum. Returns their paths and the panels."""
    os.makedirs(out_dir, exist_ok=True)
    p = backbones[0].patch_size
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    elements = geometric_elements(len(x), grid, scales=(1.25,))
    upscale = list(elements)[-1]  # as its grid realises it: on a grid under 3x3 the identity, whose panels always agree
    element_names = ("rot90", "vflip") + ((upscale,) if elements[upscale].size != grid else ())
    panels = {n: {e: equivariance_panels(b, x, elements[e], layer) for e in element_names}
              for n, b in zip(names, backbones)}
    std, mean = torch.tensor(augment.IMAGENET_STD).view(3, 1, 1), torch.tensor(augment.IMAGENET_MEAN).view(3, 1, 1)
    inputs = {e: [_picture(t * std + mean, tile) for t in xs.cpu()]  # x and g x as pictures
              for e, xs in [("x", x)] + [(e, apply_to_images(x, elements[e], p)) for e in element_names]}
    rows = [[inputs["x"][i], inputs[e][i]]  # then f_L(g x), rho_g f_L(x) per backbone
            + [_picture(side[i], tile) for n in names for side in panels[n][e]]
            for i in range(len(x)) for e in element_names]
    header = [["", ""] + [t for n in names for t in (n, "")], ["x", "g x"] + ["f(gx)", "rho f(x)"] * len(names)]
    paths = [os.path.join(out_dir, "equivariance.png")]
    vit.save_atomic(paths[0], _grid_image(rows, header, tile))  # write-then-rename: a kill never leaves half a PNG
    for n, b in zip(names, backbones):
        attn = cls_attention(b, x)  # (B, H, h, w)
        attn = attn / attn.flatten(2).amax(-1).clamp_min(1e-12)[..., None, None]
        rows = [[inputs["x"][i]] + [_picture(a, tile) for a in attn[i]] for i in range(len(x))]
        paths.append(os.path.join(out_dir, f"attention_{n}.png"))
        vit.save_atomic(paths[-1], _grid_image(rows, [["image"] + [f"head {h}" for h in range(attn.shape[1])]], tile))
    return paths, panels


# ---------------------------------------------------------------------------------------------------
# ImageNet-C: the 15 corruptions of hendrycks/robustness ImageNet-C/create_c/make_imagenet_c.py. Each takes x:
# (H, W, 3) float64 in [0, 1] and c, its constants at the severity (CORRUPTION_FNS), and returns (H, W, 3) in [0, 255].

def corrupt(image, name, severity, rng=0, frost_images=None, jpeg_quality=None):
    """Apply ImageNet-C corruption `name` at `severity` (1..5) to a uint8 (H, W, 3) array, or to a float tensor
    (..., 3, H, W) in [0, 1] (quantised to 8 bits as the original; same shape and dtype back). rng: a seed or a
    np.random.Generator. jpeg_quality: re-encode the result (the released data is JPEG q85, optimize=True)."""
    if name not in CORRUPTION_FNS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be 1..5, got {severity}")
    rng = np.random.default_rng(rng)  # a Generator passes through unchanged
    if isinstance(image, torch.Tensor):
        if image.shape[-3] != 3:
            raise ValueError(f"expected (..., 3, H, W) images, got {tuple(image.shape)}")
        flat = image.detach().reshape(-1, *image.shape[-3:]).cpu()
        u8 = (flat.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
        out = np.stack([corrupt(u, name, severity, rng, frost_images, jpeg_quality) for u in u8])
        out = torch.from_numpy(out).permute(0, 3, 1, 2).to(image.dtype) / 255
        return out.reshape(image.shape).to(image.device)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) array, got {image.dtype} {image.shape}")
    fn, constants = CORRUPTION_FNS[name]
    out = fn(image / 255.0, constants[severity - 1], rng, frost_images=frost_images)
    out = np.clip(out, 0, 255).astype(np.uint8)  # the original's np.uint8: truncation, not rounding
    return _jpeg(out, jpeg_quality, optimize=True) if jpeg_quality else out


def glass_blur(x, c, rng, **_):
    sigma, delta, iters = c
    H, W = x.shape[:2]
    x = (gaussian_filter(x, sigma) * 255).astype(np.uint8)
    # The original loops h over range(224 - delta, delta, -1) (likewise w; here the image size). Its numpy-view swap
    # `x[h, w], x[h', w'] = x[h', w'], x[h, w]` COPIES x[h', w'] into x[h, w]: we copy too, in order, on pixel ids.
    hs, ws = range(H - delta, delta, -1), range(W - delta, delta, -1)
    ids = list(range(H * W))
    for _ in range(iters):
        offsets = rng.integers(-delta, delta, size=(len(hs), len(ws), 2)).tolist()  # (dx, dy), upper bound exclusive
        for a, h in enumerate(hs):
            for b, w in enumerate(ws):
                dx, dy = offsets[a][b]
                ids[h * W + w] = ids[(h + dy) * W + (w + dx)]
    x = x.reshape(H * W, 3)[ids].reshape(H, W, 3)
    return np.clip(gaussian_filter(x / 255.0, sigma), 0, 1) * 255


ZOOM_FACTORS = (np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
                np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03))  # float64 arange: 12, 16, 11, 13, 11 zooms


def zoom_blur(x, zooms, rng, **_):
    x = x.astype(np.float32)
    out = np.zeros_like(x)
    for z in zooms:
        out += clipped_zoom(x, z)
    return np.clip((x + out) / (len(zooms) + 1), 0, 1) * 255


def snow(x, c, rng, **_):
    mu, std, zoom, thr, radius, sigma, blend = c
    x = x.astype(np.float32)
    layer, white = _snow_layer(x, rng, mu, std, zoom, thr)
    return _snowfall(blend * x + (1 - blend) * white, layer, radius, sigma, rng.uniform(-135, -45))


def _snow_layer(x, rng, mu, std, zoom, thr):
    """Snow before its motion blur: the grey layer (H, W, 1) in 0..255 (the PNG handed to ImageMagick), and
    x whitened, max(x, 1.5 gray + 0.5) with gray as cv2 RGB2GRAY."""
    layer = clipped_zoom(rng.normal(size=x.shape[:2], loc=mu, scale=std)[..., None], zoom)
    layer[layer < thr] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8).astype(np.float64)
    gray = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]
    return layer, np.maximum(x, gray * 1.5 + 0.5)


def _snowfall(base, layer, radius, sigma, angle):
    moving = magick_motion_blur(layer, radius, sigma, angle) / 255
    return np.clip(base + moving + np.rot90(moving, k=2), 0, 1) * 255


def frost(x, c, rng, frost_images=None, **_):
    H, W = x.shape[:2]
    if frost_images is None:
        texture = procedural_frost(H, W, rng)
    else:
        photo = frost_images[rng.integers(5)]  # randint(5) over frost1..frost5, as the original
        # a 224x224 crop at 224 px; at other sizes the same field of view, resized to the image
        s = 224 / min(H, W)
        ch, cw = round(H * s), round(W * s)
        if photo.shape[0] <= ch or photo.shape[1] <= cw:
            up = max((ch + 1) / photo.shape[0], (cw + 1) / photo.shape[1])
            photo = np.asarray(Image.fromarray(photo).resize(
                (math.ceil(photo.shape[1] * up), math.ceil(photo.shape[0] * up)), Image.BILINEAR))
        top, left = rng.integers(0, photo.shape[0] - ch), rng.integers(0, photo.shape[1] - cw)
        crop = Image.fromarray(photo[top:top + ch, left:left + cw])
        texture = np.asarray(crop.resize((W, H), Image.BILINEAR), np.float64)  # a copy where (ch, cw) = (H, W)
    return np.clip(c[0] * x * 255 + c[1] * texture, 0, 255)


def fog(x, c, rng, **_):
    H, W = x.shape[:2]
    peak = x.max()
    x = x + c[0] * _plasma(H, W, c[1], rng)[..., None]
    return np.clip(x * peak / (peak + c[0]), 0, 1) * 255


def _value_shift(x, c):
    """skimage HSV value + c, clipped: (H, W, 3) in [0, 1] -> in [0, 255]."""
    hsv = rgb2hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return np.clip(hsv2rgb(hsv), 0, 1) * 255


def elastic_constants(severity, size):
    """(alpha, sigma, affine) in pixels. The original multiplies by 244 (a typo for 224, kept); we
    scale that factor with the image, so at size 224 these are exactly 244 * (...)."""
    k = 244 * size / 224
    a, s, f = ((2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02), (0.12, 0.01, 0.02))[severity - 1]
    return k * a, k * s, k * f


def elastic_transform(x, severity, rng, **_):
    H, W = x.shape[:2]
    alpha, sigma, affine = elastic_constants(severity, min(H, W))
    img = x.astype(np.float32)
    center = np.float32((H, W)) // 2  # the original builds the points from shape order, kept
    sq = min(H, W) // 3
    pts1 = np.float32([center + sq, [center[0] + sq, center[1] - sq], center - sq])
    pts2 = pts1 + rng.uniform(-affine, affine, size=pts1.shape).astype(np.float32)
    # cv2.getAffineTransform(pts1, pts2): the M with M @ [pts1, 1] = pts2
    A = np.concatenate([pts1.astype(np.float64), np.ones((3, 1))], 1)  # (3, 3)
    M = np.vstack([np.linalg.solve(A, pts2.astype(np.float64)).T, [0, 0, 1]])
    # cv2.warpAffine(img, M) samples the source at M^-1 (x, y), bilinear, BORDER_REFLECT_101 (in float:
    # OpenCV's 1/32-px fixed-point weights are why elastic is only near-exact)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    inv = np.linalg.inv(M)
    img = _bilinear(img, inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2], inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2],
                    "reflect101")
    dx = (gaussian_filter(rng.uniform(-1, 1, size=(H, W)), sigma, "symmetric", truncate=3) * alpha).astype(np.float32)
    dy = (gaussian_filter(rng.uniform(-1, 1, size=(H, W)), sigma, "symmetric", truncate=3) * alpha).astype(np.float32)
    # map_coordinates(order=1, mode='reflect') at (y + dy, x + dx), the same field for every channel
    return np.clip(_bilinear(img, ys + dy, xs + dx, "symmetric"), 0, 1) * 255


def pixelate_size(severity, width, height):
    """PIL BOX target of the original: int(224 * c) at 224 (134, 112, 89, 67, 56), int(side * c) otherwise."""
    c = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    return int(width * c), int(height * c)


def pixelate(x, severity, rng, **_):
    H, W = x.shape[:2]
    img = Image.fromarray((x * 255).round().astype(np.uint8))
    img = img.resize(pixelate_size(severity, W, H), Image.BOX).resize((W, H), Image.BOX)
    return np.asarray(img, np.float64)


def _jpeg(u8, quality, **save_kw):
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, "JPEG", quality=quality, **save_kw)
    return np.asarray(Image.open(buf).convert("RGB"))


# name: (corruption(x, c, rng, frost_images=None), c at severity 1..5): the constants of make_imagenet_c.py
CORRUPTION_FNS = {
    "gaussian_noise": (lambda x, c, rng, **_: np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255,
                       (0.08, 0.12, 0.18, 0.26, 0.38)),
    "shot_noise": (lambda x, c, rng, **_: np.clip(rng.poisson(x * c) / c, 0, 1) * 255, (60, 25, 12, 5, 3)),
    "impulse_noise": (lambda x, c, rng, **_: np.where(rng.random(x.shape) < c, rng.random(x.shape) < 0.5, x) * 255,
                      (0.03, 0.06, 0.09, 0.17, 0.27)),  # salt or pepper per element, channels apart, as skimage s&p
    "defocus_blur": (lambda x, c, rng, **_: np.clip(_correlate2d(x, disk_kernel(*c)), 0, 1) * 255,
                     ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))),
    "glass_blur": (glass_blur, ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))),
    "motion_blur": (lambda x, c, rng, **_: magick_motion_blur(np.round(x * 255), *c, rng.uniform(-45, 45)),
                    ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))),  # blurs the uint8 PNG of the image
    "zoom_blur": (zoom_blur, ZOOM_FACTORS),
    "snow": (snow, ((0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
                    (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55))),
    "frost": (frost, ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))),
    "fog": (fog, ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))),
    "brightness": (lambda x, c, rng, **_: _value_shift(x, c), (0.1, 0.2, 0.3, 0.4, 0.5)),
    "contrast": (lambda x, c, rng, **_: np.clip((x - x.mean((0, 1))) * c + x.mean((0, 1)), 0, 1) * 255,
                 (0.4, 0.3, 0.2, 0.1, 0.05)),  # about the per-channel means
    "elastic_transform": (elastic_transform, (1, 2, 3, 4, 5)),  # c: the severity, scaled by elastic_constants
    "pixelate": (pixelate, (1, 2, 3, 4, 5)),  # and by pixelate_size
    "jpeg_compression": (lambda x, c, rng, **_: _jpeg((x * 255).round().astype(np.uint8), c).astype(np.float64),
                         (25, 18, 15, 10, 7)),
}
CORRUPTIONS = tuple(CORRUPTION_FNS)
FROST_NOTE = ("frost used a procedural texture, not the ImageNet-C frost photos; it distorts about half as much, so "
              "numbers marked * are biased toward robustness and not comparable to ImageNet-C. Pass --frost-dir "
              "(the frost/ folder of the imagecorruptions or imagenet-c pip package)")


def load_frost_images(frost_dir):
    """The original frost1..frost5 photos from a directory, as RGB uint8 (cv2 BGR->RGB equivalent): the ones
    make_imagenet_c.py draws from (randint(5)); its frost6.jpg is never used, so it is not read."""
    if not os.path.isdir(frost_dir):
        raise SystemExit(f"--frost-dir {frost_dir}: no such folder; pass the frost/ folder of frost1..frost5")
    found = {}
    for name in sorted(os.listdir(frost_dir)):
        m = re.fullmatch(r"frost([1-5])\.(png|jpg|jpeg)", name, re.IGNORECASE)
        if m:
            found[int(m.group(1))] = photo = np.asarray(augment.load_rgb(os.path.join(frost_dir, name)))
            if min(photo.shape[:2]) < 224:  # frost() crops a 224x224 field of view: a smaller photo is no frost photo
                raise SystemExit(f"--frost-dir {frost_dir}: {name} is {photo.shape[1]}x{photo.shape[0]}, but frost "
                                 "crops 224x224 from each photo: pass the original (larger) frost photos")
    missing = [i for i in range(1, 6) if i not in found]
    if missing:
        raise SystemExit(f"--frost-dir {frost_dir}: missing frost{missing[0]}.png/.jpg "
                         f"(need frost1..frost5 from hendrycks/robustness ImageNet-C/create_c)")
    return [found[i] for i in range(1, 6)]


def procedural_frost(height, width, rng):
    """A stand-in for the frost photos, (H, W, 3) float in 0..255: a DEVIATION from ImageNet-C that only imitates
    their statistics. Hexagonal ice dendrites (needles with +-60-degree side branches) drawn at 2x and downsampled,
    a faint glow, over a plasma haze, tinted cold blue; sizes scale with the image."""
    size, ss = min(height, width), 2
    canvas = Image.new("L", (width * ss, height * ss), 0)
    draw = ImageDraw.Draw(canvas)
    line_w = max(1, round(ss * size / 224))

    def dendrite(x, y, angle, length, depth, value):
        x1, y1 = x + length * math.cos(angle), y + length * math.sin(angle)
        draw.line([(x, y), (x1, y1)], fill=value, width=line_w)
        if depth:
            for t in (0.3, 0.55, 0.8):
                bx, by = x + t * (x1 - x), y + t * (y1 - y)
                for side in (-1, 1):
                    dendrite(bx, by, angle + side * math.pi / 3, 0.45 * (1 - t) * length, depth - 1, int(value * 0.85))

    for _ in range(8 + int(60 * height * width / 224 ** 2)):
        dendrite(rng.uniform(0, width * ss), rng.uniform(0, height * ss), rng.uniform(0, 2 * math.pi),
                 rng.uniform(0.04, 0.2) * size * ss, 2, int(rng.integers(110, 256)))
    crystals = np.asarray(canvas.resize((width, height), Image.BILINEAR), np.float64) / 255  # (H, W)
    crystals = np.maximum(crystals, gaussian_filter(crystals, max(0.5, size / 224)) * 1.5)  # glow
    haze = _plasma(height, width, 2.0, rng)
    frost = np.clip(0.25 + 0.3 * haze + 0.75 * crystals, 0, 1)
    return frost[..., None] * np.array([0.86, 0.93, 1.0]) * 255


# ---------------------------------------------------------------------------------------------------
# ImageNet-C: numpy versions of the scipy / skimage / OpenCV / ImageMagick calls of the originals

def _fold(idx, n, mode):
    """Map out-of-range integer indices into [0, n) by a border rule, for any distance from the edge."""
    if mode == "nearest":  # skimage 'nearest', ImageMagick edge virtual pixels
        return np.clip(idx, 0, n - 1)
    if mode == "symmetric":  # scipy 'reflect' (d c b a | a b c d), period 2n
        m = np.mod(idx, 2 * n)
        return np.where(m >= n, 2 * n - 1 - m, m)
    if mode == "reflect101":  # OpenCV BORDER_REFLECT_101 (d c b | a b c d), period 2n - 2
        if n == 1:
            return np.zeros_like(idx)
        m = np.mod(idx, 2 * n - 2)
        return np.where(m >= n, 2 * n - 2 - m, m)
    raise ValueError(f"unknown border mode {mode!r}")


def gaussian_filter(x, sigma, mode="nearest", truncate=4.0):
    """skimage.filters.gaussian on the two spatial axes of (H, W) or (H, W, C): radius int(truncate*sigma + .5)."""
    r = int(truncate * sigma + 0.5)
    weights = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    weights /= weights.sum()
    x = np.asarray(x, np.float64)
    for axis in (0, 1):  # scipy.ndimage.correlate1d along each axis
        n = x.shape[axis]
        padded = np.moveaxis(np.take(x, _fold(np.arange(-r, n + r), n, mode), axis=axis), axis, 0)  # (n + 2r, ...)
        out = np.zeros((n,) + padded.shape[1:])
        for i, w in enumerate(weights):  # a sum of shifted copies: float64 and fast (torch's fp64 conv is not)
            out += w * padded[i:i + n]
        x = np.moveaxis(out, 0, axis)
    return x


def _correlate2d(x, kernel):
    """cv2.filter2D per channel of (H, W, C): correlation with the kernel centred, OpenCV borders."""
    kh, kw = kernel.shape
    H, W = x.shape[:2]
    rows = _fold(np.arange(-(kh // 2), H + kh // 2), H, "reflect101")
    cols = _fold(np.arange(-(kw // 2), W + kw // 2), W, "reflect101")
    padded = np.moveaxis(x[rows][:, cols], -1, 0)  # (C, H', W')
    # float64 FFT convolution with the flipped kernel, zero-padded: the circular wrap only reaches the discarded border
    size = [1 << math.ceil(math.log2(n)) for n in padded.shape[-2:]]
    spectrum = np.fft.rfft2(padded, s=size) * np.fft.rfft2(kernel[::-1, ::-1], s=size)
    full = np.fft.irfft2(spectrum, s=size)
    return np.moveaxis(full[:, kh - 1:kh - 1 + H, kw - 1:kw - 1 + W], 0, -1)  # (H, W, C)


def _bilinear(img, ys, xs, mode):
    """Bilinear gather from (H, W, C) at float coordinates (any shape S) -> (*S, C). mode 'constant' reads zeros
    outside (cv2 BORDER_CONSTANT); other modes fold the integer taps (scipy map_coordinates(order=1,
    mode='reflect') is 'symmetric', cv2's default 'reflect101')."""
    H, W = img.shape[:2]
    y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]

    def tap(yi, xi):
        if mode == "constant":
            inside = ((yi >= 0) & (yi < H) & (xi >= 0) & (xi < W))[..., None]
            return img[np.clip(yi, 0, H - 1), np.clip(xi, 0, W - 1)] * inside
        return img[_fold(yi, H, mode), _fold(xi, W, mode)]

    return ((1 - fy) * ((1 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1))
            + fy * ((1 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1)))


def clipped_zoom(img, zoom):
    """Zoom (H, W, C) about its centre by `zoom` >= 1 and crop back to (H, W), as make_imagenet_c: its
    scipy.ndimage.zoom(order=1) of the centre crop to round(side * zoom) is bilinear with corners aligned
    (grid_mode=False). The original assumes a square; we apply its rule per axis."""
    H, W = img.shape[:2]
    ch, cw = math.ceil(H / zoom), math.ceil(W / zoom)
    top, left = (H - ch) // 2, (W - cw) // 2
    crop = torch.from_numpy(np.ascontiguousarray(img[top:top + ch, left:left + cw], np.float64))
    out_hw = (int(round(ch * zoom)), int(round(cw * zoom)))  # Python round, as scipy 1.0
    up = F.interpolate(crop.permute(2, 0, 1)[None], size=out_hw, mode="bilinear", align_corners=True)
    up = up[0].permute(1, 2, 0).numpy()  # (h', w', C)
    tt, tl = (up.shape[0] - H) // 2, (up.shape[1] - W) // 2
    return up[tt:tt + H, tl:tl + W]


def rgb2hsv(rgb):
    """skimage.color.rgb2hsv on (..., 3) floats in [0, 1] (ties: blue beats green beats red)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(delta == 0, 0.0, delta / v)
        h = np.where(b == v, 4.0 + (r - g) / delta, np.where(g == v, 2.0 + (b - r) / delta, (g - b) / delta))
    h = np.where(delta == 0, 0.0, (h / 6.0) % 1.0)
    return np.stack([h, s, v], -1)


def hsv2rgb(hsv):
    """skimage.color.hsv2rgb on (..., 3)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    sector = (hi.astype(np.int64) % 6)[..., None]
    options = [np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    return np.choose(sector, options)


def magick_motion_blur(img, radius, sigma, angle):
    """ImageMagick MotionBlurImage on (H, W, C) in 0..255, re-quantised to 8 bits as the PNG round trip.

    One-sided Gaussian kernel of width 2*ceil(radius) + 1 starting at the pixel, taps at (ceil(i cos a - .5),
    ceil(i sin a - .5)) with y down, edge pixels replicated. As the Q16 build make_imagenet_c.py's Wand calls, the
    sum is rounded to a 16-bit quantum (8-bit v is 257 v) that the 8-bit PNG of make_blob truncates (floor(q / 257)):
    bit-exact against ImageMagick 6.9.11 Q16 / Wand 0.6.13 (the test's fixture)."""
    width = 2 * math.ceil(radius) + 1
    i = np.arange(width)
    k = np.exp(-(i ** 2) / (2.0 * sigma * sigma))
    k /= k.sum()
    theta = np.deg2rad(angle)
    off_x = np.ceil(i * np.cos(theta) - 0.5).astype(np.int64)
    off_y = np.ceil(i * np.sin(theta) - 0.5).astype(np.int64)
    H, W = img.shape[:2]
    rows, cols = np.arange(H), np.arange(W)
    out = np.zeros(img.shape, np.float64)
    for w, dx, dy in zip(k, off_x, off_y):
        out += w * img[np.clip(rows + dy, 0, H - 1)][:, np.clip(cols + dx, 0, W - 1)]
    return np.clip(np.floor(np.rint(out * 257) / 257), 0, 255)


def plasma_fractal(mapsize, decay, rng, normalise=True):
    """Diamond-square height map (mapsize, mapsize), mapsize a power of two, as make_imagenet_c's fog. Each new
    point is mean/4 + wibble * U(-wibble, wibble): the noise amplitude is wibble^2 = 1e4 at the first level, not
    wibble (a quirk of the original we keep, it sets the fog's spectrum)."""
    if mapsize < 2 or mapsize & (mapsize - 1):
        raise ValueError(f"plasma mapsize must be a power of two >= 2, got {mapsize}")
    m = np.zeros((mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def noisy_mean(sum4):
        return sum4 / 4 + wibble * rng.uniform(-wibble, wibble, sum4.shape)

    while step >= 2:
        half = step // 2
        corners = m[0::step, 0::step]  # a view; the writes below never touch these points
        square = corners + np.roll(corners, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        m[half::step, half::step] = noisy_mean(square)  # square centres
        centres = m[half::step, half::step]
        # diamond points on the corner rows, then on the corner columns (toroidal neighbours)
        m[0::step, half::step] = noisy_mean(centres + np.roll(centres, 1, axis=0) + corners
                                            + np.roll(corners, -1, axis=1))
        m[half::step, 0::step] = noisy_mean(centres + np.roll(centres, 1, axis=1) + corners
                                            + np.roll(corners, -1, axis=0))
        step //= 2
        wibble /= decay
    if not normalise:
        return m
    m -= m.min()
    return m / m.max()


def disk_kernel(radius, alias_blur):
    """make_imagenet_c's anti-aliased disk: 1[X^2 + Y^2 <= r^2] / sum, then cv2.GaussianBlur."""
    L = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    ksize = 3 if radius <= 8 else 5
    X, Y = np.meshgrid(L, L)
    disk = ((X ** 2 + Y ** 2) <= radius ** 2).astype(np.float32)
    disk /= disk.sum()
    x = np.arange(ksize) - (ksize - 1) / 2  # cv2.getGaussianKernel(ksize, alias_blur), alias_blur > 0
    g = np.exp(-(x ** 2) / (2 * alias_blur * alias_blur))
    g /= g.sum()
    return _correlate2d(disk[..., None], np.outer(g, g))[..., 0]


def _plasma(height, width, decay, rng):
    """The original's 256 map cropped to 224: plasma_fractal of the next power of two, cropped to the image."""
    return plasma_fractal(1 << max(1, math.ceil(math.log2(max(height, width)))), decay, rng)[:height, :width]


# ---------------------------------------------------------------------------------------------------
# ImageNet-P sequences (hendrycks/robustness ImageNet-P/create_p/make_imagenet_p.py). Input: the uint8
# image after the Resize(256) analogue (short side round(crop * 256 / 224)), NOT cropped: translate/
# rotate/tilt/scale/zoom act before the crop.

PERTURBATIONS = ("gaussian_noise", "shot_noise", "motion_blur", "zoom_blur", "snow", "brightness", "translate",
                 "rotate", "tilt", "scale")
_STARTS_CLEAN = ("gaussian_noise", "shot_noise", "zoom_blur")  # frame 0 is the clean crop


def frame_indices(name, num_frames=None):
    """The original frame parameters i to generate: all of them, or a shorter window with the same step."""
    full = 41 if name == "translate" else 31  # the original's sequence lengths
    T = full if num_frames is None else num_frames
    if not 2 <= T <= full:
        raise ValueError(f"--p-frames must be in 2..{full} for {name}, got {T}")
    start = 0 if name in _STARTS_CLEAN else (full - T) // 2  # keep the clean start / the centre
    return list(range(start, start + T))


def perturbation_sequence(image, name, crop_size, rng=0, difficulty=1, num_frames=None):
    """ImageNet-P frames of one image: uint8 (H, W, 3) (Resize(256) analogue) -> uint8 (T, crop, crop, 3)."""
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; choose from {', '.join(PERTURBATIONS)}")
    if difficulty not in (1, 2, 3):
        raise ValueError(f"difficulty must be 1..3, got {difficulty}")
    if min(image.shape[:2]) < crop_size:
        raise ValueError(f"image {image.shape[:2]} is smaller than the crop {crop_size}")
    rng = np.random.default_rng(rng)
    idx = frame_indices(name, num_frames)
    crop = _center_crop(image, crop_size)
    x = crop / 255.0
    bilinear = TF.InterpolationMode.BILINEAR
    if name == "zoom_blur":
        # frame i: running mean of the clean crop and the crops of bilinear zooms by 1 + 0.004 j, j <= i
        frames, total = [crop], x.copy()
        for i in range(1, idx[-1] + 1):
            total += _center_crop(_pil_affine(image, scale=1 + 0.004 * i, interpolation=bilinear), crop_size) / 255.0
            if i in idx:
                frames.append((total / (i + 1) * 255).astype(np.uint8))
        return np.stack(frames)
    if name == "snow":  # one fixed snow layer, blurred along a turning direction
        layer, white = _snow_layer(x, rng, 0.05, 0.3, 3, 0.5)
    sigma, lam = (0.03, 0.05, 0.08)[difficulty - 1], (300, 120, 60)[difficulty - 1]
    frame = {  # parameter i -> a frame in 0..255, truncated to uint8 as ToPILImage's mul(255).byte()
        "gaussian_noise": lambda i: np.clip(x + sigma * rng.standard_normal(x.shape), 0, 1) * 255,
        "shot_noise": lambda i: 255 * np.clip(rng.poisson(x * lam) / lam, 0, 1),
        "motion_blur": lambda i: magick_motion_blur(crop.astype(np.float64), 10, 3, (i - 30) * 4),
        "snow": lambda i: _snowfall(0.85 * x + 0.15 * white, layer, 14, 4, i * 4 - 150),
        "brightness": lambda i: _value_shift(x, (i - 15) * 2 / 100.0),
        "translate": lambda i: _pil_affine(image, translate=(i - 20, 0)),  # nearest: whole pixels
        "rotate": lambda i: _pil_affine(image, angle=float(i - 15), interpolation=bilinear),
        "tilt": lambda i: _tilt(image, i - 15),
        "scale": lambda i: _pil_affine(image, scale=(i * 2.5 + 40) / 100.0, interpolation=bilinear)}[name]
    frames = [crop if i == 0 and name in _STARTS_CLEAN else frame(i) for i in idx]
    return np.stack([_center_crop(f, crop_size).astype(np.uint8) for f in frames])  # (T, crop, crop, 3)


def _center_crop(u8, size):
    top, left = (u8.shape[0] - size) // 2, (u8.shape[1] - size) // 2
    return u8[top:top + size, left:left + size]


def _pil_affine(u8, **kw):
    """torchvision's PIL affine about the image centre (the original's trn_F.affine on a PIL image)."""
    kw = {"angle": 0.0, "translate": (0, 0), "scale": 1.0, "shear": 0.0, **kw}
    return np.asarray(TF.affine(Image.fromarray(u8), **kw))


def _tilt(u8, degrees):
    """cv2.warpPerspective of the original's tilt matrix (phi = theta), bilinear, zeros outside."""
    h, w = u8.shape[:2]
    phi = theta = np.deg2rad(degrees)
    f = np.sqrt(w ** 2 + h ** 2)
    P1 = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1], [0, 0, 1]])
    RX = np.array([[1, 0, 0, 0], [0, np.cos(theta), -np.sin(theta), 0], [0, np.sin(theta), np.cos(theta), 0],
                   [0, 0, 0, 1]])
    RY = np.array([[np.cos(phi), 0, -np.sin(phi), 0], [0, 1, 0, 0], [np.sin(phi), 0, np.cos(phi), 0], [0, 0, 0, 1]])
    T = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, f], [0, 0, 0, 1]])
    P2 = np.array([[f, 0, w / 2, 0], [0, f, h / 2, 0], [0, 0, 1, 0]])
    inv = np.linalg.inv(P2 @ T @ RX @ RY @ P1)  # (3, 3): destination pixel -> source pixel
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    src = np.einsum("ij,jhw->ihw", inv, np.stack([xs, ys, np.ones_like(xs)]))
    out = _bilinear(u8.astype(np.float64), src[1] / src[2], src[0] / src[2], "constant")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# Metrics (hendrycks/robustness ImageNet-C/test.py, ImageNet-P/test.py)

# Top-1 error of AlexNet per severity 1..5 (UCSC-VLAA/RobustCNN; the means are augmix ALEXNET_ERR).
ALEXNET_ERR = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.9487, 0.9872, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.5843, 0.70048, 0.82108, 0.8975, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.9187, 0.94952),
    "frost": (0.6139, 0.79734, 0.8879, 0.89942, 0.9343),
    "fog": (0.67474, 0.7605, 0.84378, 0.8726, 0.945),
    "brightness": (0.4514, 0.48502, 0.54048, 0.62166, 0.7244),
    "contrast": (0.64548, 0.7615, 0.88874, 0.9776, 0.9927),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.5462, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
}
ALEXNET_CLEAN_ERR = 0.43478  # torchvision alexnet-owt-4df8aa71: acc@1 56.522


def corruption_errors(errors, clean_error=None):
    """mCE and relative mCE (in %) from {corruption: [error at severity 1..5]} over the 15 benchmark ones:
    CE_c = sum_s E_sc / sum_s E^AlexNet_sc; relative CE_c = sum_s (E_sc - E_clean) / sum_s (E^A_sc - E^A_clean)."""
    missing = [c for c in CORRUPTIONS if c not in errors]
    if missing:
        raise ValueError(f"mCE needs all 15 corruptions; missing {', '.join(missing)}")
    ce = {c: sum(errors[c]) / sum(ALEXNET_ERR[c]) for c in CORRUPTIONS}
    out = {"ce": {c: 100 * v for c, v in ce.items()}, "mce": 100 * float(np.mean(list(ce.values())))}
    if clean_error is not None:
        rel = {c: sum(e - clean_error for e in errors[c]) / sum(a - ALEXNET_CLEAN_ERR for a in ALEXNET_ERR[c])
               for c in CORRUPTIONS}
        out["relative_ce"] = {c: 100 * v for c, v in rel.items()}
        out["relative_mce"] = 100 * float(np.mean(list(rel.values())))
    return out


def _reference_pairs(num_frames, noise, difficulty):
    """(reference, frame) index pairs of ImageNet-P/test.py: noise against frame 0, else consecutive
    frames within each of the d interleaved walks x_i, x_{i+d}, x_{i+2d}, ..."""
    if noise:
        return [(0, j) for j in range(1, num_frames)]
    return [(a, b) for i in range(difficulty) for a, b in zip(range(i, num_frames, difficulty),
                                                             range(i + difficulty, num_frames, difficulty))]


def flip_probability(preds, noise, difficulty=1):
    """Per-video FP (V,) from predicted classes (V, T): the mean of 1[f(x_ref) != f(x_j)] over the pairs."""
    ref, cur = map(list, zip(*_reference_pairs(preds.shape[1], noise, difficulty)))
    return (preds[:, ref] != preds[:, cur]).float().mean(1)


def top5_distance(logits, noise, difficulty=1):
    """Per-video T5D (V,) from logits (V, T, C): d = sum_{i=1..5} |i - min(sigma(i), 6)|, sigma(i) the
    rank in the frame of the class ranked i in the reference (ordinal ranks, ties by class index)."""
    ref, cur = map(list, zip(*_reference_pairs(logits.shape[1], noise, difficulty)))
    order_ref = torch.argsort(-logits[:, ref].float(), dim=-1, stable=True)[..., :5]  # (V, P, 5) top classes
    rank_cur = torch.argsort(torch.argsort(-logits[:, cur].float(), dim=-1, stable=True), dim=-1) + 1  # (V, P, C)
    sigma = torch.gather(rank_cur, -1, order_ref)  # (V, P, 5)
    i = torch.arange(1, sigma.shape[-1] + 1, device=logits.device)  # 1..5, or 1..C for fewer classes
    return (i - sigma.clamp(max=6)).abs().sum(-1).float().mean(1)


# ---------------------------------------------------------------------------------------------------
# Datasets: generated from the val images, or read from the released files

class _Items(Dataset):
    """Item i is (normalised input (..., 3, H, W), label, i), from self.load(self.items[i]) -> (uint8 (..., H, W, 3),
    label); self.entry[i] names the corruption / severity (an index into the caller's list) that item i belongs to."""

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        u8, label = self.load(self.items[i])
        x = torch.from_numpy(np.array(u8)).movedim(-1, -3)  # a copy: PIL arrays are read-only
        return augment.normalize(x.unsqueeze(0)).squeeze(0), label, i  # (1, ..., 3, H, W): one image or a video


class Generated(_Items):
    """Every (job, image) pair: val image n through the originals' Resize(256) (scaled, bilinear), then
    make(u8, rng=rng) of its job (key, make), rng seeded by (seed, key, n): the same data on any workers and ranks."""

    def __init__(self, base, img_size, jobs, seed=0):
        self.base, self.img_size, self.jobs, self.seed = base, img_size, jobs, seed
        self.items = [(j, n) for j in range(len(jobs)) for n in range(len(base))]
        self.entry = np.repeat(np.arange(len(jobs)), len(base))

    def load(self, item):
        j, n = item
        key, make = self.jobs[j]
        pil, label = self.base[n]
        u8 = np.asarray(TF.resize(pil.convert("RGB"), round(self.img_size * 256 / 224),
                                  interpolation=TF.InterpolationMode.BILINEAR))
        return make(u8, rng=np.random.default_rng((self.seed, key, n))), label


class WithPartner(Dataset):
    """Item i of `dataset`, its image stacked on that of image (i + N // 2) % N: a fixed other image whatever the
    batch size and number of processes, half the set away, so mostly of another class in class-sorted folders."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y, _ = self.dataset[i]
        return torch.stack([x, self.dataset[(i + len(self) // 2) % len(self)][0]]), y, i


def corrupted_crop(u8, rng, crop, name, severity, frost_images=None, jpeg_quality=None):
    """ImageNet-C's input: the centre crop (Resize(256)+CenterCrop(224) scaled), then the corruption."""
    u8 = _center_crop(u8, crop)
    return u8 if name == "clean" else corrupt(u8, name, severity, rng, frost_images, jpeg_quality)


class Released(_Items):
    """Released data, items (path, label): an ImageNet-C image, its short side resized to `crop` (not at all where it
    is `crop`), or an ImageNet-P video extracted to a folder of crop x crop frames."""

    def __init__(self, items, entry, crop, videos=False):
        self.items, self.entry, self.crop, self.videos = items, np.array(entry), crop, videos

    def load(self, item):
        path, label = item
        if self.videos:  # not os.path.isdir: a stray folder among ImageNet-C images is no video
            return np.stack([self._image(f, exact=True) for f in _image_files(path)]), label
        return self._image(path), label

    def _image(self, path, exact=False):
        image = augment.load_rgb(path)
        w, h = image.size
        if min(h, w) < self.crop or exact and max(h, w) > self.crop:
            raise augment.UnreadableImage(f"image file {path} is {w}x{h}; --img-size {self.crop} needs "
                                          f"{'exactly' if exact else 'at least'} {self.crop}x{self.crop}")
        if not exact and min(h, w) > self.crop:
            # The released images are already the eval crops (Resize(256) + CenterCrop(224) of each val image), read
            # by the original test.py with a CenterCrop(224) that leaves them whole: a model at another size sees the
            # whole image resized, as in generated ImageNet-C, not a central part of it.
            image = TF.resize(image, self.crop, interpolation=TF.InterpolationMode.BILINEAR)
        return _center_crop(np.asarray(image), self.crop)


def released_corruptions(root, entries, img_size, num_classes, classes=None):
    """The released ImageNet-C JPEGs: <root>/<c>/<s>/<wnid>/* or <root>/<family>/<c>/<s>/<wnid>/*; every severity
    folder with the same class folders, the probe's `classes` where it records them."""
    items, entry, source, first, starts = [], [], "the probe", None, []
    for e, (name, severity) in enumerate(entries):
        layouts = [os.path.join(root, fam, name) for fam in ("", "noise", "blur", "weather", "digital")]
        found = [f for f in layouts if os.path.isdir(f)]
        if len(found) > 1:  # else severities missing from one copy would be read from the other
            raise SystemExit(f"--imagenet-c-dir {root}: {name} is in both {found[0]} and {found[1]}; keep one layout "
                             "(flat or per family)")
        folder = os.path.join(found[0], str(severity)) if found else ""
        if not os.path.isdir(folder):
            raise SystemExit(f"--imagenet-c-dir {root}: no folder {name}/{severity} (flat or per family)")
        classes, source = _class_folders(folder, "--imagenet-c-dir", num_classes, classes, source), folder
        start, names = len(items), {}
        starts.append(start)
        for label, wnid in enumerate(classes):
            files = _image_files(os.path.join(folder, wnid))
            if not files:  # its error would be NaN
                raise SystemExit(f"--imagenet-c-dir: {os.path.join(folder, wnid)} holds no .jpeg/.jpg/.png images")
            items += [(path, label) for path in files]
            entry += [e] * len(files)
            names[wnid] = [os.path.basename(path) for path in files]
        count = len(items) - start
        # the release holds every val image at every severity: a partial folder would be averaged as a whole one
        if first is not None and count != first[1]:
            raise SystemExit(f"--imagenet-c-dir: {folder} holds {count} images but {first[0]} holds {first[1]}; "
                             "every corruption and severity needs the same images: complete the download")
        if first is not None and names != first[2]:  # as many, but of another class mix: an error over other images
            _same_images(folder, names, first[0], first[2])
        first = first or (folder, count, names)
    released = Released(items, entry, img_size)
    for start in starts:  # one image of each set against --img-size before any work (the others when read)
        released.load(items[start])
    return released


def _same_images(folder, names, first, first_names):
    """Refuses, naming the first class whose image files in `folder` differ from those of the `first` severity."""
    wnid = next(w for w in names if names[w] != first_names[w])
    here, there = os.path.join(folder, wnid), os.path.join(first, wnid)
    a, b = names[wnid], first_names[wnid]
    if len(a) != len(b):
        how = f"{here} holds {len(a)} images but {there} holds {len(b)}"
    else:
        how = f"{here} lacks {min(set(b) - set(a))} of {there} and holds {min(set(a) - set(b))} instead"
    raise SystemExit(f"--imagenet-c-dir: {how}; every corruption and severity needs the same images (the release has "
                     "the same file names in every severity): complete the download")


def released_sequences(root, name, difficulty, img_size, num_classes, classes=None):
    """ImageNet-P extracted to frames: <root>/<perturbation>[_<d> for noise]/<wnid>/<video>/<frame images> ->
    (the videos, frames per video): as many, at least 2, in every video; the probe's `classes` where it records them."""
    folder = os.path.join(root, name if difficulty == 1 or "noise" not in name else f"{name}_{difficulty}")
    if not os.path.isdir(folder):
        raise SystemExit(f"--imagenet-p-dir {root}: no folder {os.path.basename(folder)} "
                         f"(extract the MP4s to one frame folder per video)")
    videos = []
    for label, wnid in enumerate(_class_folders(folder, "--imagenet-p-dir", num_classes, classes)):
        found = [os.path.join(folder, wnid, v) for v in sorted(os.listdir(os.path.join(folder, wnid)))
                 if os.path.isdir(os.path.join(folder, wnid, v))]
        if not found:  # as ImageNet-C: a class left out would be scored as absent, not as failed
            raise SystemExit(f"--imagenet-p-dir: {os.path.join(folder, wnid)} holds no per-video frame folders "
                             "(extract its MP4s to one frame folder per video)")
        videos += [(v, label) for v in found]
    counts = []
    for v, _ in videos:
        seen = {}
        for f in map(os.path.basename, _image_files(v)):
            stem = os.path.splitext(f)[0]
            if stem in seen:  # e.g. 1.jpg..5.jpg beside 1.png..5.png: else one video of their frames interleaved
                raise SystemExit(f"--imagenet-p-dir: {v} holds frame {stem} twice ({seen[stem]} and {f}); keep one "
                                 "file per frame")
            seen[stem] = f
        counts.append(len(seen))
    bad = next((i for i, n in enumerate(counts) if n < 2 or n != counts[0]), None)
    if bad is not None:  # a batch stacks videos, and a video of one frame has no pair to compare
        raise SystemExit(f"--imagenet-p-dir: {videos[bad][0]} has {counts[bad]} frame(s) but " + (
            "a video needs at least 2" if counts[bad] < 2 else f"{videos[0][0]} has {counts[0]}; all need as many"))
    released = Released(videos, [0] * len(videos), img_size, videos=True)
    released.load(videos[0])  # its frame size against --img-size before any work
    return released, counts[0]


def _image_files(folder):
    files = [e.path for e in os.scandir(folder)  # is_file: a folder named like an image is none (no extra stat)
             if e.name.lower().endswith((".jpeg", ".jpg", ".png")) and e.is_file()]
    return sorted(files, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)])  # 10 after 9


def _class_folders(folder, flag, num_classes, classes=None, source="the probe"):
    """folder's class (wnid) sub-folders, in label order: the names of `classes` (which `source` has) where known,
    in its order whatever the folders' (the built-in classes are not alphabetical), else num_classes many, sorted."""
    found = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not found:
        raise SystemExit(f"{flag}: {folder} has no class (wnid) sub-folders")
    if classes is not None and found == sorted(classes):
        return list(classes)  # labels by name
    if classes is not None:
        a, b = found + ["(none)"], sorted(classes) + ["(none)"]
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        raise SystemExit(f"{flag}: {folder}: class folder {i} is {a[i]} but {source}'s is {b[i]}; labels are class "
                         "positions, so the class folders must be the same")
    if len(found) != num_classes:
        raise SystemExit(f"{flag}: {folder} has {len(found)} class folders, the probe {num_classes} classes")
    return found


# ---------------------------------------------------------------------------------------------------
# Evaluation loops. Each rank takes every world-th item and writes its results into full-size buffers
# by dataset index; one all-reduce (sum) then gives every rank the exact totals.

class Evaluator:
    def __init__(self, args, backbone, classifier, meta, device, rank, world, source):
        self.args, self.backbone, self.classifier, self.meta = args, backbone, classifier, meta
        self.device, self.rank, self.world = device, rank, world
        self.source = source  # the flag and file the backbone came from, for errors
        self.autocast = lambda: vit.autocast(device)  # bf16 where it is native, else fp32
        self.non_finite = torch.zeros((), dtype=torch.bool, device=device)

    def refuse_non_finite(self, t):
        """Finite weights can still overflow: an argmax or mean of NaN is a made-up number, as linear_eval refuses.
        Flagged on the device (a check per batch would wait for the GPU), read by check_finite with a task's sums."""
        self.non_finite |= ~torch.isfinite(t).all()

    def check_finite(self):
        if losses.all_reduce_sum(self.non_finite.float()).item():  # every rank stops together
            raise SystemExit(f"{self.source}: the backbone gives non-finite features (NaN or inf); it cannot be "
                             "evaluated: pass another checkpoint")

    def loader(self, dataset, batch_size, label):
        """This rank's batches, with progress and ETA (a pass over ImageNet-C takes minutes to hours)."""
        shard = Subset(dataset, range(self.rank, len(dataset), self.world))  # every item once, no padding
        loader = DataLoader(shard, batch_size=batch_size, num_workers=self.args.num_workers,
                            pin_memory=self.device.type == "cuda")
        for x, y, idx in augment.progress(loader, len(loader), f"{label}: batch", log):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), idx.to(self.device)

    @torch.no_grad()
    def logits(self, x):
        """Every task's logits pass here: a backbone of non-finite features stops at the run's first batch."""
        with self.autocast():
            logits = predict(self.backbone, self.classifier, x, self.meta["n_last_blocks"], self.meta["avgpool"])
        self.refuse_non_finite(logits)
        return logits.float()

    def hits(self, x, y):
        return (self.logits(x).argmax(1) == y).float()

    @torch.no_grad()
    def clean_pass(self, dataset, img_size, geometry, equivariance):
        """In one pass: element names, hits (1 + E, N), clean then per element, and the per-block image means
        {element: {metric: [per block]}} of the equivariance scores."""
        grid = (img_size // self.backbone.patch_size,) * 2
        names = list(geometric_elements(1, grid, self.args.scales))
        correct = torch.zeros(1 + len(names), len(dataset), device=self.device)  # row 0: identity
        scores = torch.zeros(len(names), self.backbone.depth, len(EQUIV_METRICS), len(dataset), device=self.device)
        paired = equivariance and len(dataset) > 1  # the chance baseline's unrelated image, loaded with each image
        if equivariance and not paired:
            log("note: one image has no unrelated image to pair with: the chance baseline is NaN; raise --num-images")
        for x, y, idx in self.loader(WithPartner(dataset) if paired else dataset, self.args.batch_size, "clean pass"):
            x, x_other = (x[:, 0].contiguous(), x[:, 1].contiguous()) if paired else (x, None)
            elements = geometric_elements(len(x), grid, self.args.scales)
            if self.classifier is not None:
                correct[0, idx] = self.hits(x, y)
                for e, g in enumerate(elements.values() if geometry else (), start=1):
                    correct[e, idx] = self.hits(apply_to_images(x, g, self.backbone.patch_size), y)
            if equivariance:
                scores[..., idx] = equivariance_scores(self.backbone, x, elements, self.autocast, x_other)
                self.refuse_non_finite(scores[:, :, 0, idx])  # cos is always defined: NaN only from the token maps
        self.check_finite()
        correct, scores = losses.all_reduce_sum(correct).cpu(), losses.all_reduce_sum(scores).cpu().nanmean(-1)
        return names, correct, {n: {m: scores[e, :, k].tolist() for k, m in enumerate(EQUIV_METRICS)}
                                for e, n in enumerate(names)}


# ---------------------------------------------------------------------------------------------------
# Command line: one function per task, main() dispatches

TASKS = ("clean", "c", "p", "geometry", "equivariance")
# robustness.json's result sections: per task, and the comparison table of several --backbone
SECTIONS = {"clean": "clean", "c": "imagenet_c", "p": "imagenet_p", "geometry": "geometry",
            "equivariance": "equivariance", "table": "runs"}


def get_args_parser():
    p = argparse.ArgumentParser(prog="robustness_eval.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--probe", default=None, help="linear_eval.py output <dir>/linear_probe.pth (backbone + head)")
    g.add_argument("--backbone", nargs="+", default=None, help="backbone checkpoint(s) for --equivariance-only; "
                   "several give one comparison table (and figure) over the runs")
    g.add_argument("--checkpoint-key", default=None, help="with --backbone: the network of a full checkpoint "
                   "(default: the one its method evaluates, DINO's teacher)")
    g.add_argument("--arch", default=None, choices=sorted(vit.ARCHS), help="with --backbone for released weights")
    g.add_argument("--patch-size", type=int, default=None, help="with --arch only (default 16)")
    g.add_argument("--depth", type=int, default=None, help="with --arch only (default 12)")
    g.add_argument("--equiv-layer", type=int, default=None, help="with --arch, for SER release weights: the block "
                   "after which their [CLS] joins (3 in their runs)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", help="val split of 'synthetic' (built in) or an ImageFolder root "
                   "(ImageNet: enables mCE); clean images and the source of generated C/P")
    g.add_argument("--num-images", type=int, default=None, help="first N val images (all; 200 of 'synthetic')")
    g.add_argument("--img-size", type=int, default=None, help="default: the probe's img_size (or the backbone's)")
    g.add_argument("--imagenet-c-dir", default=None, help="read the released ImageNet-C instead of generating it")
    g.add_argument("--imagenet-p-dir", default=None, help="read ImageNet-P frame folders instead of generating them")
    g.add_argument("--frost-dir", default=None, help="the original frost1..frost5 photos, .png or .jpg (the frost/ "
                   "folder of the imagecorruptions or imagenet-c pip package; frost6 is never drawn, as in "
                   "make_imagenet_c.py); without it a weaker procedural texture, marked *")
    g = p.add_argument_group("what to run")
    g.add_argument("--tasks", default=None, help="comma list of " + ", ".join(TASKS) + " (default: all)")
    g.add_argument("--equivariance-only", action="store_true", help="per-block equivariance only: --backbone will do")
    g.add_argument("--corruptions", default=",".join(CORRUPTIONS), help="comma list (mCE needs all 15)")
    g.add_argument("--perturbations", default=",".join(PERTURBATIONS), help="comma list (mFR needs all 10)")
    g.add_argument("--c-jpeg", action="store_true", help="re-encode generated images as JPEG q85 like the release")
    g.add_argument("--p-frames", type=int, default=None, help="frames per sequence (31, translate 41)")
    g.add_argument("--p-difficulty", type=int, default=1, choices=(1, 2, 3), help="noise strength / frame step d")
    g.add_argument("--p-normalizers", default=None, metavar="FILE", help='a JSON file {"fp": {pert: AlexNet FP}, '
                   '"t5d": {pert: AlexNet T5D}} for mFR/mT5D')
    g.add_argument("--mce", default="auto", choices=("auto", "on", "off"), help="auto: when the data has 1000 classes")
    g.add_argument("--scales", type=float, nargs="+", default=[0.75, 1.25],
                   help="input rescalings, each in (0, 4] (geometry, equivariance)")
    g.add_argument("--figures", default=None, metavar="DIR", help="also write PNG figures there: equivariance.png "
                   "(f_L(g x) next to rho_g f_L(x) per backbone), attention_<run>.png ([CLS] attention per head) and "
                   "figures.json (their sources; a run of other weights is refused there)")
    g.add_argument("--figure-layer", type=int, default=None, help="block L of the figures and of the comparison "
                   "table (default: the SER split block of the first backbone that has one, else 3 as in the paper)")
    g.add_argument("--figure-images", type=int, default=4, help="val images shown in the figures")
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=64, help="images per rank per forward")
    g.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="loader processes per rank")
    g.add_argument("--seed", type=int, default=0, help="corruption / perturbation randomness")
    g.add_argument("--output-dir", default="runs/robustness", help="robustness.json goes here")
    return p


def check_args(args):
    at_least_1, non_negative = (lambda v: v >= 1, "at least 1"), (lambda v: v >= 0, ">= 0")
    ranges = {"num_images": at_least_1, "img_size": at_least_1, "batch_size": at_least_1, "num_workers": non_negative,
              "p_frames": (lambda v: v >= 2, "at least 2"),
              "scales": (lambda v: 0 < v <= 4, "in (0, 4]"),  # 100: 3200 px images
              "seed": augment.SEED_RANGE, "patch_size": at_least_1, "depth": at_least_1, "figure_layer": at_least_1,
              "figure_images": at_least_1}
    augment.check_ranges([("--" + k.replace("_", "-"), getattr(args, k), *rule) for k, rule in ranges.items()])
    for k in ("probe", "imagenet_c_dir", "imagenet_p_dir", "frost_dir", "p_normalizers", "figures"):
        if getattr(args, k) == "":  # e.g. an unset shell variable: read as not given, the run would ignore it
            raise SystemExit(f"--{k.replace('_', '-')} is empty: pass a path, or drop the flag")
    for flag, path in (("--output-dir", args.output_dir), ("--figures", args.figures)):
        if path:
            augment.refuse_output_in_data(args.data, path, flag)


def check_scales(scales, grid):
    """--scales on this token grid: each must change it, and to a grid of its own, else its row is labelled with
    a rescaling that never happened (4 * 1.1 rounds to 4: the identity, perfectly equivariant). A scale the grid
    realises only roughly is named by what it realises (geometric_elements), and said."""
    seen = {}
    for s in scales:
        name, g = list(geometric_elements(1, grid, [s]).items())[-1]
        effective = f"{g.size[0]}x{g.size[1]} (effective scale {g.size[0] / grid[0]:.4g})"
        if g.size == tuple(grid):
            raise SystemExit(f"--scales {s:g}: on the {grid[0]}x{grid[1]} token grid it gives {effective}, the "
                             "identity; choose a scale that changes the grid")
        if g.size in seen:
            raise SystemExit(f"--scales {seen[g.size]:g} and {s:g}: on the {grid[0]}x{grid[1]} token grid both give "
                             f"{effective}; keep one")
        seen[g.size] = s
        if name != f"scale{s:.4g}":
            log(f"note: --scales {s:g} gives the {grid[0]}x{grid[1]} token grid {effective}: its rows are {name}")


def refuse_ignored_flags(args, tasks, table=False):
    """The flags these tasks do not read, refused if given. table: several --backbone's table (reads --figure-layer)."""
    c, p = "c" in tasks, "p" in tasks
    generated_c, generated_p = c and not args.imagenet_c_dir, p and not args.imagenet_p_dir
    readers = [  # (flag, whether this run reads it, what reads it)
        *[(k, c, "the ImageNet-C task (c in --tasks)") for k in ("corruptions", "imagenet_c_dir", "mce")],
        ("c_jpeg", generated_c, "generated ImageNet-C (c in --tasks, no --imagenet-c-dir)"),
        ("frost_dir", generated_c and "frost" in args.corruptions.split(","),
         "generated ImageNet-C frost (c in --tasks, frost in --corruptions, no --imagenet-c-dir)"),
        *[(k, p, "the ImageNet-P task (p in --tasks)")
          for k in ("perturbations", "imagenet_p_dir", "p_difficulty", "p_normalizers")],
        ("p_frames", generated_p, "generated ImageNet-P (p in --tasks, no --imagenet-p-dir)"),
        ("seed", generated_c or generated_p, "generated ImageNet-C or -P"),
        ("scales", {"geometry", "equivariance"} & set(tasks), "the geometry and equivariance tasks"),
        ("figure_layer", args.figures or table, "--figures or the table of several --backbone"),
        ("figure_images", args.figures, "--figures"),
        *[(k, args.backbone, "--backbone (a --probe records its own)")
          for k in ("checkpoint_key", "arch", "patch_size", "depth", "equiv_layer")]]
    augment.refuse_ignored_flags(args, get_args_parser(), readers)


def _choices(text, allowed, flag):
    items = list(dict.fromkeys(t for t in text.split(",") if t))  # a duplicate would be run and counted twice
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        what = f"unknown {', '.join(map(repr, bad))}" if bad else "none given"  # quoted: ' c' of "clean, c"
        raise SystemExit(f"{flag}: {what}; choose from {', '.join(allowed)}")
    return items


def _mean(values):
    return float(np.mean(values)) if len(values) else float("nan")


def load_backbone(args, path):
    return vit.backbone_from_flags(path, args.arch, args.patch_size, key=args.checkpoint_key, depth=args.depth,
                                   flag="--backbone", equiv_layer=args.equiv_layer, log=log)  # errors name the path


def load_model(args):
    """(backbone, classifier or None, meta) on the CPU."""
    if args.probe:
        try:
            backbone, classifier, meta = load_probe(args.probe)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--probe: {e}") from None
        if meta.get("backbone_unfinished"):  # as backbone_from_flags notes a --backbone's
            step, total = meta["backbone_unfinished"]
            log(f"note: {args.probe}: its backbone is of step {step} of {total}: its run has not finished")
        return backbone, classifier, meta
    if not args.equivariance_only:
        raise SystemExit("--probe is required (linear_eval.py's linear_probe.pth), or --equivariance-only --backbone")
    if not args.backbone:
        raise SystemExit("--equivariance-only needs --backbone (or --probe)")
    backbone = load_backbone(args, args.backbone[0])
    return backbone, None, {"img_size": backbone.arch.get("img_size", 224)}


def run_names(paths):
    """Short names for checkpoints: their folder (runs/dino_ser/backbone.pth -> dino_ser), else the file stem."""
    names = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    if len(set(names)) < len(names):
        names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return names if len(set(names)) == len(names) else [f"run{i}" for i in range(len(paths))]


def probe_name(path):
    """The probe's run, named as run_names does: linear_eval.py's <run>/linear/linear_probe.pth -> run."""
    folder = os.path.dirname(os.path.abspath(path))
    return run_names([folder if os.path.basename(folder) == "linear" else path])[0]


def val_images(args, img_size, default=None):
    """--num-images (else `default`, else all) val images of --data, classes in turn: (images, classes, clean set)."""
    try:
        base = augment.build_dataset(args.data, "val", transform=None, img_size=img_size)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    n = args.num_images or default
    if args.num_images and args.num_images > len(base):
        log(f"note: --num-images {args.num_images}, but --data {args.data} has {len(base)} val images: all are used")
    images = Subset(base, augment.class_balanced_prefix(base, n)) if n else base
    if len(images) < len(base.classes):
        log(f"note: {len(images)} val images cover {len(images)} of {len(base.classes)} classes; raise --num-images")
    clean = Generated(images, img_size, [(0, partial(corrupted_crop, crop=img_size, name="clean", severity=0))])
    return images, list(base.classes), clean


def figure_layer(args, backbones):
    # Runs without SER are scored where SER acts (block 3 in the paper), so that base and SER rows compare one block.
    depth = min(b.depth for b in backbones)
    split = next((b.cls_after_block for b in backbones if b.cls_after_block), None)
    layer = args.figure_layer or split or min(3, depth)
    if not 1 <= layer <= depth:
        given = "" if args.figure_layer else " (the default: the first SER backbone's split block)"
        raise SystemExit(f"--figure-layer {layer}{given} must be in 1..{depth}, the shallowest backbone's depth: "
                         "pass --figure-layer")
    return layer


def results_source(args):
    """What robustness.json is of: the probe, or the backbones."""
    if args.probe:
        return [vit.weights_source(args.probe)]
    return [vit.weights_source(p, args.checkpoint_key) for p in args.backbone or []]


def make_output_dirs(args, rank, names, written):
    """--output-dir and --figures (for the runs `names`), created and tried before any work: results that cannot be
    written are lost, and so would be the sections of robustness.json other than those `written` (hours of
    ImageNet-C under a rerun of -P alone). The figures' folder records their sources and --data in figures.json, so
    that another run's figures (equivariance.png is one for all) are never replaced."""
    if rank == 0:
        sources = results_source(args)
        vit.make_output_dir(args.output_dir, outputs=("robustness.json",), sources=sources, lock=True, data=args.data,
                            drops=[s for s in SECTIONS.values() if s not in written])
        if args.figures:  # the lock is taken once per folder: --figures may be --output-dir
            vit.make_output_dir(args.figures, flag="--figures", sources=sources, lock=True, data=args.data,
                                outputs=("equivariance.png", *(f"attention_{n}.png" for n in names), "figures.json"))
            unrecorded = os.path.join(args.figures, "equivariance.png")  # an earlier version's, or not ours
            if os.path.lexists(unrecorded) and not os.path.lexists(os.path.join(args.figures, "figures.json")):
                raise SystemExit(f"--figures {args.figures} holds an equivariance.png that no figures.json records, "
                                 "which this run would replace: move it away or choose another --figures")


def figures(args, backbones, names, clean_set, layer, device):
    if args.figure_images > len(clean_set):
        log(f"note: --figure-images {args.figure_images}, but the run has {len(clean_set)} images: all are shown")
    x = torch.stack([clean_set[i][0] for i in range(min(args.figure_images, len(clean_set)))]).to(device)
    with vit.exit_on_write_error():  # the record first: a kill between them leaves no figures of unrecorded sources
        record = {"source": results_source(args), "data": vit.data_location(args.data)}
        vit.save_atomic(os.path.join(args.figures, "figures.json"), record)
        paths, _ = write_figures(backbones, names, x, args.figures, layer)
    log("figures: " + ", ".join(paths))


def clean_tasks(ev, clean_set, img_size, tasks, results):
    """Clean and geometry top-1 and the per-block equivariance, in one pass, into results; the clean error or None."""
    names, correct, equivariance = ev.clean_pass(clean_set, img_size, "geometry" in tasks, "equivariance" in tasks)
    clean_error = None
    if ev.classifier is not None:
        clean_error = 1 - correct[0].mean().item()
        results["clean"] = {"top1": 100 * (1 - clean_error)}
        log(f"\nclean top-1 {100 * (1 - clean_error):.2f}")
    if "geometry" in tasks:
        results["geometry"] = {n: 100 * correct[e + 1].mean().item() for e, n in enumerate(names)}
        log("\ngeometry top-1  " + "  ".join(f"{n} {v:.2f}" for n, v in results["geometry"].items()))
    if "equivariance" in tasks:
        results["equivariance"] = equivariance
        log("\nequivariance per block l = 1..%d: cos(f(gx), rho_g f(x)) / relative error [chance rel. error]"
            % ev.backbone.depth)
        for n, v in results["equivariance"].items():
            log(f"  {n:9s} " + "  ".join(f"{c:.3f}/{r:.3f} [{x:.2f}]" for c, r, x in
                                         zip(v["cos"], v["rel_error"], v["chance_rel_error"])))
    return clean_error


def corruption_set(args, base, img_size, corruptions, num_classes, classes):
    """ImageNet-C as one dataset, entry e the e-th (corruption, severity): the released JPEGs, their folders checked
    now, or generated from base, with the frost photos read only when frost is generated."""
    entries = [(c, s) for c in corruptions for s in range(1, 6)]
    if args.imagenet_c_dir:
        return released_corruptions(args.imagenet_c_dir, entries, img_size, num_classes, classes)
    frost_images = load_frost_images(args.frost_dir) if args.frost_dir and "frost" in corruptions else None
    # Each (corruption, severity) draws from its own key, whatever else --corruptions lists: a subset run gives the
    # full run's rows (the default list keeps its keys 0..74)
    return Generated(base, img_size, [(CORRUPTIONS.index(c) * 5 + s - 1, partial(
        corrupted_crop, crop=img_size, name=c, severity=s, frost_images=frost_images,
        jpeg_quality=85 if args.c_jpeg else None)) for c, s in entries], args.seed)


def corruption_task(ev, c_set, num_classes, corruptions, clean_error, clean_count):
    """ImageNet-C top-1 error per corruption and severity, its means and, on ImageNet, mCE; relative mCE only where
    the clean error is of as many images (the released sets hold all of theirs, whatever --num-images says)."""
    args = ev.args
    entries = [(c, s) for c in corruptions for s in range(1, 6)]
    if clean_error is not None and len(c_set) // len(entries) != clean_count:
        log(f"note: the released ImageNet-C holds {len(c_set) // len(entries)} images a set, the clean error is of "
            f"{clean_count} images of --data: relative mCE is left out (it subtracts one from the other)")
        clean_error = None
    correct = torch.zeros(len(c_set), device=ev.device)
    for x, y, idx in ev.loader(c_set, args.batch_size, f"ImageNet-C ({len(entries)} sets)"):
        correct[idx] = ev.hits(x, y)
    ev.check_finite()
    correct = losses.all_reduce_sum(correct).cpu()
    errors = {c: [1 - correct[c_set.entry == entries.index((c, s))].mean().item() for s in range(1, 6)]
              for c in corruptions}
    mean_error = _mean([e for v in errors.values() for e in v])
    res = {"source": "released" if args.imagenet_c_dir else "generated", "num_images": len(c_set) // len(entries),
           "top1": 100 * (1 - mean_error),
           "mean_error": 100 * mean_error, "errors": {c: [100 * e for e in v] for c, v in errors.items()},
           "top1_per_corruption": {c: 100 * (1 - _mean(v)) for c, v in errors.items()},
           "error_per_severity": {s: 100 * _mean([errors[c][s - 1] for c in corruptions]) for s in range(1, 6)}}
    if args.mce == "on" or (args.mce == "auto" and num_classes == 1000):
        if len(corruptions) == 15:
            res.update(corruption_errors(errors, clean_error))
        else:
            log("mCE skipped: it needs all 15 corruptions")
    mark = "*" if not args.imagenet_c_dir and "frost" in corruptions and not args.frost_dir else ""
    if mark:
        res["deviation"] = FROST_NOTE
        res.update({f"{key}_frost": "procedural substitute (see 'deviation')"
                    for key in ("top1", "mean_error", "mce", "relative_mce", "top1_per_corruption", "errors",
                                "error_per_severity") if key in res})
    log(f"\nImageNet-C ({res['source']}): top-1 error per severity 1..5, %")
    for c in corruptions:
        log(f"  {c:18s} " + " ".join(f"{100 * e:6.2f}" for e in errors[c])
            + f"   top-1 {res['top1_per_corruption'][c]:.2f}{mark if c == 'frost' else ''}")
    mce = f"   mCE {res['mce']:.2f}{mark}" if "mce" in res else ""
    mce += f"  relative mCE {res['relative_mce']:.2f}{mark}" if "relative_mce" in res else ""
    log(f"  mean top-1 over {len(corruptions)}x5: {res['top1']:.2f}{mark}" + mce)
    if mark:
        log(f"  * {FROST_NOTE}")
    return res


def load_normalizers(path, perturbations):
    """--p-normalizers: AlexNet's FP and T5D per perturbation, {'fp': {pert: value}, 't5d': {...}}."""
    def number(v):
        if isinstance(v, bool):  # float(True) is 1.0
            raise TypeError(f"{v!r} is no number")
        return float(v)
    try:
        vit.refuse_special_file(path, "a JSON file")
    except ValueError as e:
        raise SystemExit(f"--p-normalizers: {e}") from None
    try:
        with open(path) as f:
            normalizers = json.load(f)
        normalizers = {k: {p: number(normalizers[k][p]) for p in perturbations} for k in ("fp", "t5d")}
    except OSError as e:  # also the JSON itself passed inline
        raise SystemExit(f"--p-normalizers {path}: cannot read it ({e.strerror or e}); pass the path of a JSON file "
                         "{'fp': {pert: value}, 't5d': {...}}") from None
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
        raise SystemExit(f"--p-normalizers {path}: need {{'fp': {{pert: value}}, "
                         f"'t5d': {{...}}}} for every perturbation run ({e!r})") from None
    augment.check_ranges([(f"{k} {p}", v, lambda v: v > 0, "positive") for k, vs in normalizers.items()
                          for p, v in vs.items()], prefix=f"--p-normalizers {path}: ")  # they divide
    augment.check_ranges([(f"fp {p}", v, lambda v: v <= 1, "at most 1 (FP is a probability, not a percent)")
                          for p, v in normalizers["fp"].items()], prefix=f"--p-normalizers {path}: ")
    return normalizers


def perturbation_sets(args, base, img_size, perturbations, num_classes, classes):
    """{perturbation: (its videos, frames per video)}, all checked before any work: the frame folders or --p-frames,
    and that each video has frames --p-difficulty apart to compare."""
    d, sets = args.p_difficulty, {}
    for name in perturbations:
        if args.imagenet_p_dir:
            seq, T = released_sequences(args.imagenet_p_dir, name, d, img_size, num_classes, classes)
        else:
            try:
                T = len(frame_indices(name, args.p_frames))
            except ValueError as e:
                raise SystemExit(str(e)) from None
            make = partial(perturbation_sequence, name=name, crop_size=img_size, difficulty=d, num_frames=args.p_frames)
            seq = Generated(base, img_size, [(PERTURBATIONS.index(name), make)], args.seed)
        if "noise" not in name and T <= d:  # no pair of frames to compare
            raise SystemExit(f"--p-difficulty {d} compares frames {d} apart, but {name} has {T} frames per video: "
                             + ("lower it" if args.imagenet_p_dir else f"lower it or pass --p-frames {d + 1} or more"))
        sets[name] = seq, T
    return sets


def perturbation_task(ev, sets, normalizers):
    """ImageNet-P flip probability, top-5 distance and top-1 per perturbation; mFR / mT5D with --p-normalizers."""
    args, d = ev.args, ev.args.p_difficulty
    res = {"source": "frames" if args.imagenet_p_dir else "generated (no H.264 artifacts)",
           "difficulty": d, "per_perturbation": {}}
    per = res["per_perturbation"]
    for name, (seq, T) in sets.items():
        noise, first = "noise" in name, 1 if name in _STARTS_CLEAN else 0  # a clean frame 0 is no perturbed frame
        scores = torch.zeros(3, len(seq), device=ev.device)  # per video: FP, T5D, top-1 over the perturbed frames
        for frames, y, idx in ev.loader(seq, max(1, args.batch_size // T), f"ImageNet-P {name}"):
            logits = ev.logits(frames.flatten(0, 1)).view(*frames.shape[:2], -1)  # (B, T, C)
            preds = logits.argmax(-1)
            scores[0, idx] = flip_probability(preds, noise, d)
            scores[1, idx] = top5_distance(logits, noise, d)
            scores[2, idx] = (preds[:, first:] == y[:, None]).float().mean(1)
        ev.check_finite()
        fp, t5d, top1 = losses.all_reduce_sum(scores).cpu().mean(1).tolist()
        per[name] = {"fp": 100 * fp, "t5d": t5d, "top1": 100 * top1, "frames": T, "num_videos": len(seq)}
    for key, field in (("top1", "top1"), ("mean_fp", "fp"), ("mean_t5d", "t5d")):
        res[key] = _mean([v[field] for v in per.values()])
    if normalizers:  # all 10 perturbations (evaluate)
        res["mfr"] = 100 * _mean([per[p]["fp"] / 100 / normalizers["fp"][p] for p in per])
        res["mt5d"] = 100 * _mean([per[p]["t5d"] / normalizers["t5d"][p] for p in per])
    log(f"\nImageNet-P ({res['source']}, difficulty {d}): FP %, T5D, top-1 % over perturbed frames")
    for name, v in per.items():
        log(f"  {name:15s} FP {v['fp']:6.2f}  T5D {v['t5d']:6.3f}  top-1 {v['top1']:6.2f}  ({v['frames']} frames)")
    log(f"  mean top-1 {res['top1']:.2f}  mean FP {res['mean_fp']:.2f}" +
        (f"  mFR {res['mfr']:.2f}  mT5D {res['mt5d']:.2f}" if normalizers else "  (mFR/mT5D need --p-normalizers)"))
    return res


def evaluate(args, device, rank, world):
    """--tasks for one probe (or, with --equivariance-only, one backbone)."""
    tasks = ["equivariance"] if args.equivariance_only else _choices(
        ",".join(TASKS) if args.tasks is None else args.tasks, TASKS, "--tasks")
    corruptions = _choices(args.corruptions, CORRUPTIONS, "--corruptions")
    perturbations = _choices(args.perturbations, PERTURBATIONS, "--perturbations")
    refuse_ignored_flags(args, tasks)
    if args.mce == "on" and len(corruptions) < len(CORRUPTIONS) and "c" in tasks:
        raise SystemExit("--mce on needs all 15 corruptions: drop --corruptions, or use --mce auto")
    released = [f for f, t, d in (("--imagenet-c-dir", "c", args.imagenet_c_dir),
                                  ("--imagenet-p-dir", "p", args.imagenet_p_dir)) if d and t in tasks]
    if args.num_images and released:  # else the clean error and the C/P errors would be over other images
        raise SystemExit(f"--num-images with {released[0]}: the released folders fix the images: drop --num-images")
    backbone, classifier, meta = load_model(args)
    backbone.to(device).eval()
    # --equivariance-only takes a probe's backbone, not its head; without it the tasks are equivariance only
    classifier = None if args.equivariance_only else classifier.to(device).eval()
    img_size = args.img_size or meta["img_size"]
    if img_size % backbone.patch_size:
        raise SystemExit(f"--img-size {img_size} is not a multiple of the patch size {backbone.patch_size}")
    if {"geometry", "equivariance"} & set(tasks):
        check_scales(args.scales, (img_size // backbone.patch_size,) * 2)
    if args.num_images is None and args.data == "synthetic" and not released:
        args.num_images = 200  # the whole val split x (75 corruptions + 10 sequences) takes hours on a CPU
    base, classes, clean_set = val_images(args, img_size)
    if classifier is not None and meta["num_classes"] != len(classes):
        raise SystemExit(f"--data {args.data} has {len(classes)} classes but the probe predicts {meta['num_classes']}")
    if classifier is not None and meta.get("classes", classes) != classes:  # older probes record no names
        only_data, only_probe = sorted(set(classes) - set(meta["classes"])), sorted(set(meta["classes"]) - set(classes))
        detail = (f"only in --data: {only_data[:5]}, only in the probe: {only_probe[:5]}" if only_data or only_probe
                  else "same names in another order")
        raise SystemExit(f"--data {args.data}: its classes differ from the probe's ({detail}); labels are class "
                         "positions, so pass the data the probe was trained on")
    unnamed = classifier is not None and "classes" not in meta  # an older probe: its labels are positions only
    if unnamed and vit.data_location(meta["data"]) != vit.data_location(args.data):
        raise SystemExit(f"--data {args.data}: the probe was trained on {meta['data']} (as written where "
                         "linear_eval.py ran) and records no class names to match its labels by; pass that data, or "
                         "rerun linear_eval.py on this one")
    # the released data's folders, the frost photos, --p-normalizers and the outputs are checked before any work
    known = len(classes), meta.get("classes")  # the probe's number of classes and their names if it records them
    c_set = corruption_set(args, base, img_size, corruptions, *known) if "c" in tasks else None
    p_sets = perturbation_sets(args, base, img_size, perturbations, *known) if "p" in tasks else None
    normalizers = load_normalizers(args.p_normalizers, perturbations) if "p" in tasks and args.p_normalizers else None
    if normalizers and len(perturbations) < len(PERTURBATIONS):  # as mCE: a mean over a subset is another benchmark
        raise SystemExit("--p-normalizers: mFR and mT5D need all 10 perturbations; drop it or --perturbations")
    layer = figure_layer(args, [backbone]) if args.figures else None  # its range checked now, not after the work
    names = [probe_name(args.probe)] if args.probe else run_names(args.backbone)
    clean = ["clean"] if classifier is not None and tasks != ["p"] else []  # clean_tasks writes it for the others
    make_output_dirs(args, rank, names, [SECTIONS[t] for t in tasks + clean])
    source = f"--probe {args.probe}" if args.probe else f"--backbone {args.backbone[0]}"
    ev = Evaluator(args, backbone, classifier, meta, device, rank, world, source)
    results = {"num_images": len(base), "img_size": img_size, "num_classes": len(classes), "world_size": world,
               "backbone_unfinished": meta.get("backbone_unfinished") if args.probe else backbone.unfinished}
    log(f"robustness_eval: {len(base)} images of {args.data} at {img_size}px, tasks {','.join(tasks)}, "
        f"{world} process(es) on {device}")
    clean_error = None if tasks == ["p"] else clean_tasks(ev, clean_set, img_size, tasks, results)  # all others read it
    if "c" in tasks:
        results["imagenet_c"] = corruption_task(ev, c_set, len(classes), corruptions, clean_error, len(clean_set))
    if "p" in tasks:
        results["imagenet_p"] = perturbation_task(ev, p_sets, normalizers)
    return results, args.figures and partial(figures, args, [backbone], names, clean_set, layer, device)


def linear_numbers(json_path, path, backbone, data, img_size):
    """{'linear_top1', 'knn_top1'} of linear_eval.py's json_path if it was computed on backbone (loaded from path) as it
    is now, on `data` at img_size, else {} with a line saying why: a checkpoint trained on since keeps its name."""
    def empty(why, fix=""):  # the note for each reason the cells stay empty
        log(f"note: {json_path} {why}; the table leaves its cells empty{fix}")
        return {}

    if not os.path.isfile(json_path):
        return {}
    try:
        with open(json_path) as f:
            lin = json.load(f)
        top1 = {"linear_top1": lin["linear"]["top1"], "knn_top1": lin.get("knn", {}).get("top1")}
        if not all(isinstance(v, (int, float)) for v in top1.values() if v is not None):
            raise TypeError("top1 is not a number")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        return empty(f"is not a readable linear_eval.py result ({type(e).__name__}: {e})")
    if lin.get("backbone_digest") != vit.weights_digest(backbone):  # an older linear_eval.py records none
        return empty(f"was not computed on {path} as it is now (stale)", ": rerun linear_eval.py on it")
    if (vit.data_location(lin.get("data")), lin.get("img_size")) != (vit.data_location(data), img_size):
        return empty(f"was computed on --data {lin.get('data')} at {lin.get('img_size')} px, this table on {data} at "
                     f"{img_size} px")
    settings = lin["args"] if isinstance(lin.get("args"), dict) else {}
    protocol = {k: lin.get(k) for k in ("num_fit", "num_holdout", "num_val")}  # compare_backbones compares them
    protocol.update({k: settings.get(k) for k in ("cached", "epochs", "lrs", "batch_size", "n_last_blocks", "avgpool",
                                                  "knn_k", "knn_temperature")})
    return {**top1, "linear_protocol": protocol}


def compare_backbones(args, device, rank, world):
    """--equivariance-only with several --backbone: one table of, per run and group element, the mean cosine between
    f_l(g x) and rho_g f_l(x) at block L (--figure-layer: SER's split block) and at the last block, plus linear /
    k-NN top-1 from the run's <run>/linear/linear_eval.json when linear_eval.py wrote one on these weights."""
    refuse_ignored_flags(args, ["equivariance"], table=True)
    backbones, names = [load_backbone(args, p) for p in args.backbone], run_names(args.backbone)
    sizes = {p: b.arch.get("img_size", 224) for p, b in zip(args.backbone, backbones)}
    if not args.img_size and len(set(sizes.values())) > 1:  # one table, one input size: say which
        raise SystemExit("--backbone: trained at different sizes (" + ", ".join(f"{p} {v} px" for p, v in sizes.items())
                         + "); pass --img-size to compare them at one")
    img_size = args.img_size or sizes[args.backbone[0]]
    for path, b in zip(args.backbone, backbones):
        if img_size % b.patch_size:
            raise SystemExit(f"--img-size {img_size} is not a multiple of the patch size {b.patch_size} of {path}")
    if args.figures and len({b.patch_size for b in backbones}) > 1:  # the figure's scalings act on one token grid
        raise SystemExit("--figures needs backbones of one patch size, got "
                         + ", ".join(f"{p} ({b.patch_size})" for p, b in zip(args.backbone, backbones)))
    for b in backbones:
        check_scales(args.scales, (img_size // b.patch_size,) * 2)
    base, _, clean_set = val_images(args, img_size, default=200 if args.data == "synthetic" else None)
    layer = figure_layer(args, backbones)
    make_output_dirs(args, rank, names, [SECTIONS["table"]])
    results = {"num_images": len(base), "img_size": img_size, "layer": layer, "runs": {}}
    for name, path, backbone in zip(names, args.backbone, backbones):
        ev = Evaluator(args, backbone.to(device).eval(), None, {}, device, rank, world, f"--backbone {path}")
        run = {"backbone": path, "backbone_unfinished": backbone.unfinished,
               "depth": backbone.depth, "cls_after_block": backbone.cls_after_block,
               "equivariance": ev.clean_pass(clean_set, img_size, False, True)[2]}
        run.update(linear_numbers(os.path.join(os.path.dirname(path), "linear", "linear_eval.json"), path, backbone,
                                  args.data, img_size))
        results["runs"][name] = run
    protocols = [run["linear_protocol"] for run in results["runs"].values() if "linear_protocol" in run]
    differ = [k for k in protocols[0] if len({json.dumps(p[k]) for p in protocols}) > 1] if protocols else []
    if differ:  # numbers of other protocols side by side would read as one comparison
        log(f"note: the runs' linear_eval.py settings differ ({', '.join(differ)}): their linear and k-NN columns are "
            "not one protocol; rerun linear_eval.py alike on each to compare them")
    common = [e for e in results["runs"][names[0]]["equivariance"]  # scales realised alike on every grid
              if all(e in run["equivariance"] for run in results["runs"].values())]
    scales = sorted((float(e[len("scale"):]), e) for e in common if e.startswith("scale"))  # the upscale, as figures
    shown = [e for e in common if e in ("rot90", "vflip")] + [e for s, e in scales if s > 1][:1]
    log(f"\nequivariance cos(f_l(g x), rho_g f_l(x)) at block {layer} / at the last block; linear, k-NN top-1")
    log(f"  {'run':24s} " + " ".join(f"{e:>13s}" for e in shown) + "   linear   k-NN")
    for name, run in results["runs"].items():
        cos = [run["equivariance"][e]["cos"] for e in shown]
        acc = [run.get("linear_top1"), run.get("knn_top1")]
        log(f"  {name:24s} " + " ".join(f"{c[layer - 1]:6.3f}/{c[-1]:6.3f}" for c in cos) + "   "
            + " ".join(f"{a:6.2f}" if a is not None else "     -" for a in acc))
    return results, args.figures and partial(figures, args, backbones, names, clean_set, layer, device)


def main(args):
    t0 = time.time()
    check_args(args)
    if args.probe and args.backbone or args.equivariance_only and args.tasks is not None:  # one would be ignored
        raise SystemExit("--probe holds its backbone: pass it or --backbone" if args.probe and args.backbone
                         else "--equivariance-only runs the equivariance task only: drop --tasks")
    named = {}  # real path -> as given
    for path in args.backbone or []:
        if os.path.realpath(path) in named:  # two rows of one run's numbers
            raise SystemExit(f"--backbone names {named[os.path.realpath(path)]} twice (again as {path}): give each "
                             "run once")
        named[os.path.realpath(path)] = path
    rank, world, device = losses.init_distributed()
    several = args.backbone and (len(args.backbone) > 1 or args.figures and not args.probe)
    if several and not args.equivariance_only:
        raise SystemExit("several --backbone (or --figures without --probe) need --equivariance-only")
    task = compare_backbones if several else evaluate
    numbers, draw = task(args, device, rank, world)
    results = {"args": vars(args), "source": results_source(args), "data": vit.data_location(args.data), **numbers}
    results["seconds"] = time.time() - t0
    if rank == 0:
        path = os.path.join(args.output_dir, "robustness.json")
        with vit.exit_on_write_error():
            vit.save_atomic(path, results)  # write-then-rename: a kill never leaves half a JSON
        log(f"\nwrote {path} in {results['seconds']:.0f}s")
    if draw:  # after the numbers: a figure that cannot be written loses only itself
        draw()
    losses.finish_distributed()
    return results


if __name__ == "__main__":
    augment.run_script(lambda: main(get_args_parser().parse_args()))

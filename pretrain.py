"""Self-supervised ViT pretraining: MoCo v3, DINO, Barlow Twins, VICReg, SimCLR or BYOL, with one
add-on: SER (soft equivariance regularisation), EquiMod, AugSelf or E-SSL.

    python pretrain.py --method dino --ser                   # built-in synthetic data, CPU, minutes
    torchrun --nproc_per_node 2 pretrain.py --method dino --ser
    torchrun --nproc_per_node 8 pretrain.py --method mocov3 --ser --data /datasets/imagenet \
        --output-dir runs/mocov3_ser                          # ViT-S/16, 224 px, the official recipe
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 pretrain.py ...
    python pretrain.py --method mocov3 --ser --benchmark 20  # images/s, data wait, memory, FLOPs, MFU

SER: the global batch is split into b1 (the method's standard views) and b2, the last `--ser-ratio` of
every `--ser-chunk` images, one group per chunk (the release: 3 of each GPU's 256). Both b2 views come
from the same crop, with independent colour jitter, and each gets its own group element (90-degree
rotation, flip, rescale to a random token grid), one per group. Both sub-batches
enter the invariance loss; only b2 enters L_equiv, which acts on the token map after block
`--equiv-layer`, where the [CLS] token joins the network:  L = L_inv(b1 + b2) + lambda * L_equiv.

The run resumes automatically from <output-dir>/checkpoint.pth. Outputs: config.json, log.jsonl (one
JSON line per logging step and per epoch), checkpoint.pth (all state, every epoch and on SIGTERM/SIGINT)
and backbone.pth (the evaluated backbone in bare timm key format, with its architecture), which
linear_eval.py, robustness_eval.py and detect_eval.py load.
"""

import argparse
import ctypes
import json
import math
import os
import signal
import sys
import time
from copy import deepcopy
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

import augment
import group_actions
import losses
import vit
from linear_eval import WithIndex, knn_eval  # linear_eval owns the k-NN protocol (DINO eval_knn)

EMA_METHODS = ("mocov3", "dino", "byol")  # methods with a momentum teacher / target network
ADDONS = ("ser", "equimod", "augself", "essl")
# Options a resumed run may change: they do not affect what is computed.
RUNTIME_OPTIONS = {"output_dir", "num_workers", "log_every", "knn_every", "knn_train_size", "knn_val_size",
                   "stop_at_step", "benchmark", "peak_tflops", "count_flops", "compile", "grad_checkpointing",
                   "no_keep_freed_memory"}

# Base-method defaults: each method's official ViT-S/16 recipe at 224 px on ImageNet (facebookresearch/moco-v3 CONFIG.md, facebookresearch/dino README.md).
# lr and min_lr are per 256 images (scaled by global batch / 256); momentum is the EMA start (cosine
# to 1). VICReg, SimCLR and BYOL have no official ViT recipe: they reuse MoCo v3's AdamW settings.
# Barlow Twins' ViT settings are SER's (aitrics-chris/SER run_pretrain.sh), the only ViT recipe for it.
# SER's own ViT-S runs differ from these in places; to reproduce them pass (aitrics-chris/SER run_pretrain.sh):
#   DINO: --lr 1e-4 --min-lr 1e-5 --momentum 0.982 --clip-grad 0.3 --crop-min 0.25 --teacher-temp 0.07
#         --warmup-teacher-temp-epochs 10;  MoCo v3: --lr 3e-4;  Barlow Twins: --clip-grad 0.3;  all: --batch-size 2048
METHOD_DEFAULTS = {
    "mocov3": dict(lr=1.5e-4, min_lr=0.0, weight_decay=0.1, weight_decay_end=0.1, momentum=0.99,
                   clip_grad=0.0, drop_path=0.0, crop_min=0.08, temperature=0.2),
    "dino": dict(lr=5e-4, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4, momentum=0.996,
                 clip_grad=3.0, drop_path=0.1, crop_min=0.4, temperature=None),
    "barlowtwins": dict(lr=1e-4, min_lr=1e-7, weight_decay=0.1, weight_decay_end=0.1, momentum=None,
                        clip_grad=0.0, drop_path=0.0, crop_min=0.08, temperature=None),
    "vicreg": dict(lr=1.5e-4, min_lr=0.0, weight_decay=0.1, weight_decay_end=0.1, momentum=None,
                   clip_grad=0.0, drop_path=0.0, crop_min=0.08, temperature=None),
    "simclr": dict(lr=1.5e-4, min_lr=0.0, weight_decay=0.1, weight_decay_end=0.1, momentum=None,
                   clip_grad=0.0, drop_path=0.0, crop_min=0.08, temperature=0.1),
    "byol": dict(lr=1.5e-4, min_lr=0.0, weight_decay=0.1, weight_decay_end=0.1, momentum=0.99,
                 clip_grad=0.0, drop_path=0.0, crop_min=0.08, temperature=None),
}
# Add-on (lambda, tau). SER: the release's launch values (aitrics-chris/SER run_pretrain.sh; the paper's tau differ: 0.3 MoCo/BT,
# 0.5 DINO). The release has none for VICReg, SimCLR and BYOL: we use 1.0 and 0.4. EquiMod: lambda 1,
# tau 0.2; AugSelf: weight 1 on its 0.5 crop + 0.5 colour terms; E-SSL: lambda 0.4.
SER_DEFAULTS = {"mocov3": (1.0, 0.5), "dino": (0.3, 0.4), "barlowtwins": (1.0, 0.4),
                "vicreg": (1.0, 0.4), "simclr": (1.0, 0.4), "byol": (1.0, 0.4)}
ADDON_DEFAULTS = {"equimod": (1.0, 0.2), "augself": (1.0, None), "essl": (0.4, None), None: (0.0, None)}
# The real-data run: ViT-S/16 at 224 px, SER's 100-epoch schedule (the paper's runs use batch 2048).
REAL_DEFAULTS = dict(arch="vit_small", depth=None, patch_size=16, img_size=224, epochs=100, warmup_epochs=10,
                     batch_size=1024, head_hidden=None, head_out=None, knn_train_size=20000, knn_val_size=10000,
                     weight_init=None, use_bn_in_head=False, freeze_last_layer=1)
# The built-in dataset on a 2-core CPU, where the run must finish in minutes: a 4-block ViT-Ti on 32 px
# images with 8 px patches (a 4x4 token grid, enough for SER's rescaled 3x3..5x5 grids), MoCo v3's
# initialisation for every method (Xavier weights, fixed sin-cos positions: with timm's trunc-normal(0.02)
# a ViT this small does not leave chance within a few hundred steps even when trained supervised,
# README), narrower heads, and for every method a higher lr, a faster EMA (the teacher must move within
# a few hundred steps), no stochastic depth and a larger minimum crop.
SYNTHETIC_DEFAULTS = dict(arch="vit_tiny", depth=4, patch_size=8, img_size=32, epochs=10, warmup_epochs=1,
                          batch_size=64, head_hidden=1024, head_out=256, knn_train_size=2000, knn_val_size=1000,
                          lr=1.5e-3, min_lr=1e-6, momentum=0.99, drop_path=0.0, crop_min=0.25, weight_init="moco",
                          use_bn_in_head=False, freeze_last_layer=1, synthetic_length=3200)
# DINO at this scale: its teacher starts out uniform and needs a sharper start (BatchNorm in the head,
# the official --use_bn_in_head; the last layer trained from step 0; an EMA of 0.96; lr 5e-3 per 256).
SYNTHETIC_METHOD_DEFAULTS = {"dino": dict(lr=5e-3, momentum=0.96, use_bn_in_head=True, freeze_last_layer=0)}

# For schedulers: after a signal the run is checkpointed but not finished, so it exits 128 + the signal number.
EXIT_CODES = ("exit status: 0 finished or stopped at --stop-at-step; 1 an error; 143 (SIGTERM) or 130 (SIGINT) after "
              "a signal made the run save checkpoint.pth and stop: rerun the same command to resume")


def get_args_parser():
    p = argparse.ArgumentParser(prog="pretrain.py", description=__doc__, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # Method and add-on. Unset values (None) resolve to the method's recipe, see resolve_config.
    a("--method", default="dino", choices=list(METHOD_DEFAULTS), help="base invariance method")
    a("--ser", action="store_true", help="add SER's L_equiv on the token map after --equiv-layer")
    a("--equimod", action="store_true", help="add EquiMod (3 views: an un-augmented one plus the two)")
    a("--augself", action="store_true", help="add AugSelf (predict crop and colour differences)")
    a("--essl", action="store_true", help="add E-SSL (4-way rotation prediction on a small extra crop)")
    a("--equiv-layer", type=int, default=None,
      help="SER: the block after which [CLS] joins and L_equiv acts (paper: 3 of 12). EquiMod/AugSelf/E-SSL: "
           "the block whose [CLS] the add-on reads (default: the final representation; 3 gives the paper's "
           "layer-decoupled variants)")
    a("--equiv-lambda", type=float, default=None, help="add-on loss weight (SER: the release's value per method, "
                                                        "see SER_DEFAULTS; EquiMod 1.0, AugSelf 1.0, E-SSL 0.4)")
    a("--equiv-tau", type=float, default=None, help="SER token NT-Xent temperature (EquiMod: 0.2)")
    a("--ser-ratio", type=float, default=0.01,
      help="fraction of each --ser-chunk that forms a b2 group (release: 0.01, i.e. 3 of 256 images)")
    a("--ser-min-images", type=int, default=2,
      help="floor on the images of a b2 group; at least 2 so that every token has other images as negatives")
    a("--ser-chunk", type=int, default=256,
      help="images of the global batch per b2 group, each group with its own group elements (the release's "
           "per-GPU batch: --batch-size 2048 gives 8 groups of 3 on any number of ranks)")
    a("--ser-scale", type=float, nargs=2, default=(0.7, 1.3), help="b2 token-grid area range, relative to the crop's")
    # Data.
    a("--data", default="synthetic", help="'synthetic' (built in), an ImageFolder root with train/ (and val/), "
                                          "'cifar10:<dir>' or 'stl10:<dir>'")
    a("--synthetic-length", type=int, default=None, help="images per epoch of the built-in dataset (3200)")
    a("--img-size", type=int, default=None, help="global crop size in px (224 real, 64 synthetic)")
    a("--n-local-crops", type=int, default=0,
      help="multi-crop: local crops per image. DINO (official ViT-S: 8-10; SER's DINO runs: 0) and MoCo v3 "
           "(SER's '2+4 views': 4)")
    a("--crop-min", type=float, default=None, help="RandomResizedCrop minimum scale of the global crops")
    a("--num-workers", type=int, default=None, help="DataLoader workers per rank (default: CPU count / ranks)")
    # Model.
    a("--arch", default=None, choices=list(vit.ARCHS), help="ViT size (vit_small for real data)")
    a("--depth", type=int, default=None, help="override the number of blocks (the synthetic default uses 6)")
    a("--patch-size", type=int, default=None, help="ViT patch side in px (16 real, 8 synthetic)")
    a("--drop-path", type=float, default=None, help="stochastic depth of the student (DINO: 0.1)")
    a("--head-hidden", type=int, default=None, help="override the projector's hidden width (recipe: 4096/2048/8192)")
    a("--head-out", type=int, default=None, help="override the projector's output width (DINO: 65536)")
    a("--weight-init", default=None, choices=["trunc_normal", "moco"],
      help="ViT initialisation: each method's own on real data (MoCo v3: moco = Xavier + sin-cos positions; "
           "others: timm's trunc_normal), moco on the built-in data")
    a("--use-bn-in-head", action=argparse.BooleanOptionalAction, default=None,
      help="DINO: BatchNorm in the projection head (official flag; off on real data, on for the built-in data)")
    a("--norm-last-layer", action="store_true",
      help="DINO: weight-normalise the head's last layer with a fixed norm (ViT-B recipe; ViT-S: off)")
    a("--grad-checkpointing", action="store_true", help="recompute block activations: large per-GPU batches")
    a("--compile", action="store_true", help="torch.compile the backbone (checkpoints stay prefix-free)")
    a("--no-keep-freed-memory", action="store_true",
      help="CPU runs: leave glibc's malloc at its defaults (see keep_freed_host_memory); set it when the "
           "process must give memory back to the system during the run")
    # Optimisation.
    a("--epochs", type=int, default=None, help="training epochs (100 real, 4 synthetic)")
    a("--warmup-epochs", type=int, default=None, help="linear lr warm-up (10 in the 100-epoch recipes)")
    a("--batch-size", type=int, default=None, help="GLOBAL batch over all ranks (SER's runs: 2048)")
    a("--lr", type=float, default=None, help="peak lr per 256 images; the run uses lr * batch / 256")
    a("--min-lr", type=float, default=None, help="lr at the end of the cosine, per 256 images like --lr")
    a("--weight-decay", type=float, default=None, help="AdamW weight decay at the start (cosine to --weight-decay-end)")
    a("--weight-decay-end", type=float, default=None, help="cosine weight-decay target (DINO: 0.04 -> 0.4)")
    a("--momentum", type=float, default=None, help="EMA start of the teacher/target (cosine to 1); "
                                                   "DINO README: 0.9995 for batch 256")
    a("--clip-grad", type=float, default=None, help="DINO clips each parameter's gradient norm (3.0); 0 = off")
    a("--temperature", type=float, default=None, help="MoCo v3 / SimCLR temperature")
    a("--teacher-temp", type=float, default=0.04, help="DINO teacher temperature after warm-up; above 0.07 is "
                                                       "often unstable; the boosted ViT-S run uses 0.07")
    a("--warmup-teacher-temp", type=float, default=0.04, help="DINO teacher temperature at the start of its warm-up")
    a("--warmup-teacher-temp-epochs", type=int, default=0,
      help="DINO: epochs of linear teacher-temperature warm-up to --teacher-temp (0 = none)")
    a("--freeze-last-layer", type=int, default=None, help="DINO: epochs with the head's last layer frozen (1; "
                                                          "0 on the built-in data)")
    a("--precision", default="auto", choices=vit.PRECISIONS,
      help="autocast dtype; auto: bf16 on GPUs and on CPUs with native bf16 (AVX512_BF16 or AMX), else fp32")
    # Runtime.
    a("--output-dir", default="runs/default", help="checkpoints, logs; an existing checkpoint is resumed")
    a("--seed", type=int, default=0, help="seed of the initial weights, the data order and every augmentation")
    a("--log-every", type=int, default=10, help="steps between progress lines (and after the first step); "
                                                 "raise it when steps are fast and the log too long")
    a("--knn-every", type=int, default=1, help="epochs between k-NN monitors (0 = off)")
    a("--knn-train-size", type=int, default=None, help="train images in the k-NN monitor's memory bank")
    a("--knn-val-size", type=int, default=None, help="val images the k-NN monitor classifies")
    a("--stop-at-step", type=int, default=None,
      help="save and exit at this global step (time-limited or preemptible jobs); rerun to resume")
    a("--benchmark", type=int, default=0, metavar="STEPS", help="measure STEPS training steps from initialisation, then exit "
                                                                 "(a checkpoint in --output-dir is neither resumed nor changed); "
                                                                 "as many bare-compute steps give the floor")
    a("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (H100 SXM bf16 dense: 989)")
    a("--count-flops", action="store_true",
      help="print the training FLOPs per image of this configuration (and of its base method without the "
           "add-on), counted on the meta device without computing anything, then exit")
    return p


def resolve_config(args):
    """Fill unset options from the method's recipe and the data's scale; refuse bad combinations."""
    addons = [name for name in ADDONS if getattr(args, name)]
    if len(addons) > 1:
        raise SystemExit(f"error: one add-on at a time, got --{' --'.join(addons)}")
    args.addon = addons[0] if addons else None
    synthetic = args.data == "synthetic"
    defaults = {**METHOD_DEFAULTS[args.method], **(SYNTHETIC_DEFAULTS if synthetic else REAL_DEFAULTS),
                **(SYNTHETIC_METHOD_DEFAULTS.get(args.method, {}) if synthetic else {})}
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    lam, tau = SER_DEFAULTS[args.method] if args.addon == "ser" else ADDON_DEFAULTS[args.addon]
    args.equiv_lambda = lam if args.equiv_lambda is None else args.equiv_lambda
    args.equiv_tau = tau if args.equiv_tau is None else args.equiv_tau
    for flag, value in (("--batch-size", args.batch_size), ("--epochs", args.epochs), ("--img-size", args.img_size),
                        ("--patch-size", args.patch_size)):
        if value < 1:
            raise SystemExit(f"error: {flag} must be positive, got {value}")
    # Ranges of the numeric options; None means "unset" and is checked after the recipe filled it in.
    ranges = [
        ("--lr", args.lr, lambda v: v > 0, "positive"),
        ("--min-lr", args.min_lr, lambda v: v >= 0, ">= 0"),
        ("--weight-decay", args.weight_decay, lambda v: v >= 0, ">= 0"),
        ("--weight-decay-end", args.weight_decay_end, lambda v: v >= 0, ">= 0"),
        ("--momentum", args.momentum, lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("--clip-grad", args.clip_grad, lambda v: v >= 0, ">= 0 (0 = off)"),
        ("--drop-path", args.drop_path, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("--crop-min", args.crop_min, lambda v: 0 < v <= 1, "in (0, 1]"),
        ("--temperature", args.temperature, lambda v: v > 0, "positive"),
        ("--teacher-temp", args.teacher_temp, lambda v: v > 0, "positive"),
        ("--warmup-teacher-temp", args.warmup_teacher_temp, lambda v: v > 0, "positive"),
        ("--equiv-lambda", args.equiv_lambda, lambda v: v >= 0, ">= 0"),
        ("--equiv-tau", args.equiv_tau, lambda v: v > 0, "positive"),
        ("--peak-tflops", args.peak_tflops, lambda v: v > 0, "positive"),
        ("--synthetic-length", args.synthetic_length, lambda v: v >= 1, "at least 1"),
        ("--depth", args.depth, lambda v: v >= 1, "at least 1 block"),
        ("--head-hidden", args.head_hidden, lambda v: v >= 1, "at least 1"),
        ("--head-out", args.head_out, lambda v: v >= 1, "at least 1"),
        ("--num-workers", args.num_workers, lambda v: v >= 0, ">= 0"),
        ("--n-local-crops", args.n_local_crops, lambda v: v >= 0, ">= 0"),
        ("--warmup-teacher-temp-epochs", args.warmup_teacher_temp_epochs, lambda v: v >= 0, ">= 0"),
        ("--freeze-last-layer", args.freeze_last_layer, lambda v: v >= 0, ">= 0"),
        ("--knn-every", args.knn_every, lambda v: v >= 0, ">= 0 (0 = off)"),
        ("--knn-train-size", args.knn_train_size, lambda v: v >= 1, "at least 1"),
        ("--knn-val-size", args.knn_val_size, lambda v: v >= 1, "at least 1"),
        ("--benchmark", args.benchmark, lambda v: v >= 0, ">= 0"),
        ("--stop-at-step", args.stop_at_step, lambda v: v >= 1, "at least 1"),
    ]
    augment.check_ranges(ranges, prefix="error: ")
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise SystemExit(f"error: --warmup-epochs {args.warmup_epochs} must be in 0..--epochs ({args.epochs})")
    if args.ser_min_images < 2:
        raise SystemExit(f"error: --ser-min-images must be at least 2 (a b2 image needs other images as "
                         f"negatives), got {args.ser_min_images}")
    if not (all(map(math.isfinite, args.ser_scale)) and 0 < args.ser_scale[0] <= args.ser_scale[1]):
        raise SystemExit(f"error: --ser-scale needs 0 < min <= max, got {args.ser_scale}")
    depth = args.depth or 12
    if args.equiv_layer is None:
        args.equiv_layer = 3 if args.addon == "ser" else depth
    if not 1 <= args.equiv_layer <= depth or (args.addon == "ser" and args.equiv_layer == depth):
        raise SystemExit(f"error: --equiv-layer must be in 1..{depth - (args.addon == 'ser')} for a depth-{depth} "
                         f"ViT, got {args.equiv_layer}")
    if args.n_local_crops and args.method not in ("dino", "mocov3"):
        raise SystemExit(f"error: --n-local-crops: multi-crop is not part of the official {args.method} recipe "
                         "(only DINO's and SER's MoCo v3 '2+4 views' use it)")
    if args.n_local_crops and args.method == "mocov3" and args.addon in ("equimod", "augself"):
        raise SystemExit(f"error: --{args.addon} with MoCo v3 multi-crop is not supported; use --n-local-crops 0")
    if args.addon == "ser" and args.method == "mocov3" and args.n_local_crops % 2:
        raise SystemExit(f"error: --n-local-crops {args.n_local_crops}: SER's MoCo v3 multi-crop takes its b2 pairs "
                         "from every other local crop (#0, #2, ..), each view joining one local stream; use an even number")
    if args.ser_chunk < 1:
        raise SystemExit(f"error: --ser-chunk must be positive, got {args.ser_chunk}")
    if args.addon in ("equimod", "augself", "essl") and args.method == "dino" and args.n_local_crops:
        raise SystemExit(f"error: --{args.addon} with DINO multi-crop is not supported; use --n-local-crops 0")
    if args.img_size % args.patch_size:
        raise SystemExit(f"error: --img-size {args.img_size} is not divisible by --patch-size {args.patch_size}")
    if args.log_every < 1:
        raise SystemExit(f"error: --log-every must be at least 1 step, got {args.log_every}")
    if not 0 < args.ser_ratio < 1:
        raise SystemExit(f"error: --ser-ratio must be in (0, 1), got {args.ser_ratio}")
    return args


# ---------------------------------------------------------------------------- schedules
# Pure functions of the global step, so a resumed run needs nothing but the step.

def cosine_schedule(step, total_steps, peak, final, warmup_steps=0):
    """Linear warm-up from 0 to `peak` over warmup_steps, then half-cosine to `final` at total_steps.
    (DINO's array version repeats the peak once and stops one step short of `final`.)"""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * min(1.0, progress)))


def ema_momentum(step, total_steps, base):
    """MoCo v3 / BYOL / DINO: 1 - (1 - base) * (cos(pi * step / total) + 1) / 2, from base to 1."""
    return 1 - (1 - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


# ---------------------------------------------------------------------------- distributed


def keep_freed_host_memory():
    """CPU training: make glibc keep freed memory in the process instead of returning it to the kernel.

    glibc serves large blocks with mmap and unmaps them on free, so every step faults its activations
    back in, page by page, zero-filled: about 300k minor faults per step at the synthetic default, and
    more with SER, whose b2 grids change shape every step and defeat glibc's adaptive threshold. With
    mmap off and the heap never trimmed, a step's buffers are reused by the next one: no faults, and
    the step is 7-17% faster (README, "Fast paths on CPU"). The price is resident memory: the peak is
    unchanged, but freed memory stays reserved (2.6 instead of 2.0 GiB at the synthetic default).
    glibc only; returns whether it applied.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter is linked against
    except (OSError, AttributeError, TypeError):  # no mallopt (macOS) or no CDLL(None) (Windows)
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def local_batch_size(global_batch, world):
    if global_batch % world:
        raise SystemExit(f"error: --batch-size {global_batch} is the global batch and must divide over the "
                         f"{world} ranks; use a multiple of {world}")
    return global_batch // world


class GlobalBatchSampler(Sampler):
    """Per-rank batches such that rank r holds the r-th slice of each global batch.

    The union of the ranks' batches at a step is exactly the single-process global batch, so a run
    on W ranks sees the same images per step as one process (and per-sample randomness drawn for the
    global batch can be sliced by rank). One permutation per epoch from (seed, epoch); the tail that
    does not fill a global batch is dropped (DistributedSampler with drop_last=True does the same).
    `start_step` skips the batches an interrupted epoch already trained on.
    """

    def __init__(self, dataset_len, global_batch, rank, world, seed):
        self.n, self.global_batch, self.rank, self.world, self.seed = dataset_len, global_batch, rank, world, seed
        self.local_batch = global_batch // world
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return self.n // self.global_batch - self.start_step

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        for s in range(self.start_step, self.n // self.global_batch):
            start = s * self.global_batch + self.rank * self.local_batch
            yield perm[start:start + self.local_batch].tolist()


# ---------------------------------------------------------------------------- model
class Student(nn.Module):
    """Backbone + the method's heads + the add-on head: everything that trains, behind one forward
    (so DDP sees every parameter used in the step)."""

    def __init__(self, backbone, projector, predictor=None, addon=None, addon_head=None, addon_layer=None):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor
        self.addon, self.addon_head = addon, addon_head
        self.addon_layer = addon_layer  # None: the add-on reads the final [CLS]; l: the raw [CLS] of block l
        self.stochastic_depth = any(isinstance(m, vit.DropPath) and m.p > 0 for m in backbone.modules())

    def _represent(self, out):
        return out["cls"] if self.addon_layer is None else out["cls_at_layer"]

    def _features(self, batch, call, x, positions, n_sets=1, layer=None, eager=False):
        """One backbone call on rows that are images `positions` of the global batch, the k-th copy of
        each in row block k (n_sets copies). Stochastic depth draws its keep flags for every row of the
        global call from torch's generator seeded by (seed, step, call) and keeps ours, so the masks do
        not depend on the number of ranks. eager: the class's own method even under --compile (SER's b2
        grids change every step and would recompile every step)."""
        if self.stochastic_depth:
            torch.manual_seed(augment.seed_from("drop-path", *batch.key, call))
            n = batch.batch_size
            ids = torch.cat([k * n + positions for k in range(n_sets)])
            self.backbone.drop_path_rows = (ids, n_sets * n)
        try:
            if eager:
                return vit.VisionTransformer.forward_features(self.backbone, x, layer=layer)
            return self.backbone.forward_features(x, layer=layer)
        finally:
            self.backbone.drop_path_rows = None

    def forward(self, batch):
        """batch: a StepBatch. Returns {'proj': per stream (N_v, d), 'pred', and the add-on's outputs:
        'ser': per b2 pair, the list of its losses.SERGroup on this rank; 'equimod': (y_t, y_hat_t);
        'augself': predictions; 'essl': rotation logits}. Stream v's rows are its plain rows
        (batch.streams[v]), then the [CLS] of the b2 views that join it, group by group."""
        globals_, locals_ = batch.streams[:2], batch.streams[2:]
        sizes = [v.shape[0] for v in globals_]
        # One call per resolution: EquiMod's un-augmented view has the global size, so it joins the views.
        # Every global stream holds the same rows here except with SER (b1 only in the paired streams).
        x = torch.cat(globals_ if batch.plain is None else [*globals_, batch.plain])
        out = self._features(batch, "global", x, batch.stream_positions[0],
                             n_sets=len(globals_) + (batch.plain is not None), layer=self.addon_layer)
        n_views = sum(sizes)
        cls = list(out["cls"][:n_views].split(sizes))  # per view (N_v, D)
        represent = self._represent(out)  # what EquiMod/AugSelf read, ((2 [+1]) * B, D)
        if locals_:
            out_local = self._features(batch, "local", torch.cat(locals_), batch.stream_positions[2],
                                       n_sets=len(locals_))
            cls += list(out_local["cls"].split([v.shape[0] for v in locals_]))
        res = {}
        if self.addon == "ser":
            cls, res["ser"] = self._b2(batch, cls)
        # Heads run per view, so BatchNorm statistics are per view as in MoCo v3 and BYOL.
        res["proj"] = [self.projector(c) for c in cls]
        if self.predictor is not None:
            res["pred"] = [self.predictor(z) for z in res["proj"]]
        if self.addon == "equimod":
            res["equimod"] = self.addon_head(represent[n_views:], represent[:n_views], batch.equimod_params)
        elif self.addon == "augself":
            res["augself"] = self.addon_head(*represent[:n_views].split(sizes))
        elif self.addon == "essl":
            out_essl = self._features(batch, "essl", batch.essl, batch.stream_positions[0], n_sets=4,
                                      layer=self.addon_layer)
            res["essl"] = self.addon_head(self._represent(out_essl))
        return res

    def _b2(self, batch, cls):
        """SER's b2 views: two backbone calls per pair of each group on this rank, each with the group's
        own element (the grids differ). Their [CLS] join the invariance streams, their token maps after
        block --equiv-layer go through SER's projector into losses.SERGroup, one list per pair."""
        layer = self.backbone.cls_after_block
        extra = [[] for _ in cls]  # per stream: the b2 [CLS] rows, group by group
        pairs = [[] for _ in batch.ser_pairs]
        for group in batch.b2:
            for k, pair in enumerate(group.pairs):
                maps = []
                for j, (x, stream) in enumerate(zip((pair.x1, pair.x2), pair.streams)):
                    out = self._features(batch, ("ser", group.index, k, j), x, group.positions, layer=layer, eager=True)
                    extra[stream].append(out["cls"])
                    maps.append(self.addon_head(out["token_map"]))  # (n, C, h_j, w_j)
                pairs[k].append(losses.SERGroup(*maps, pair.g1, pair.g2, pair.base_grid, group.positions))
        if not batch.b2:
            # No b2 image on this rank: an empty call per pair keeps SER's parameters in the step (DDP
            # expects a gradient for each, zero here) and ser_loss's collectives in step with the ranks.
            for k, (base_grid, _) in enumerate(batch.ser_pairs):
                side = [g * self.backbone.patch_size for g in base_grid]
                x = batch.streams[0].new_zeros(0, 3, *side)
                z = self.addon_head(vit.VisionTransformer.forward_features(self.backbone, x, layer=layer)["token_map"])
                pairs[k].append(losses.SERGroup(z, z, None, None, base_grid, torch.zeros(0, dtype=torch.long)))
        return [torch.cat([c, *e]) for c, e in zip(cls, extra)], pairs


class Teacher(nn.Module):
    """EMA copy of backbone + projector (MoCo v3 momentum encoder, DINO teacher, BYOL target): the global
    streams, b1 rows and then the b2 views that join them, as in Student.forward."""

    def __init__(self, backbone, projector):
        super().__init__()
        self.backbone, self.projector = backbone, projector

    @torch.no_grad()
    def forward(self, batch):
        globals_ = batch.streams[:2]
        cls = [[c] for c in self.backbone(torch.cat(globals_)).split([v.shape[0] for v in globals_])]
        eager = vit.VisionTransformer.forward_features  # as in Student._b2
        for group in batch.b2:
            for pair in group.pairs:
                for x, stream in zip((pair.x1, pair.x2), pair.streams):
                    if stream < len(cls):
                        cls[stream].append(eager(self.backbone, x)["cls"])
        return [self.projector(torch.cat(c)) for c in cls]


def build_models(args):
    arch = dict(name=args.arch, img_size=args.img_size, patch_size=args.patch_size, drop_path_rate=args.drop_path,
                cls_after_block=args.equiv_layer if args.addon == "ser" else 0)
    if args.depth:
        arch["depth"] = args.depth
    if args.method == "mocov3":  # MoCo v3's ViT recipe: fixed sin-cos positions, frozen random patch projection
        arch.update(pos_embed="sincos", stop_grad_conv1=True, weight_init="moco")
    if args.weight_init == "moco":
        arch.update(pos_embed="sincos", weight_init="moco")
    elif args.weight_init == "trunc_normal":
        arch.update(pos_embed="learned", weight_init="trunc_normal")
    backbone = vit.build_vit(arch)
    if args.grad_checkpointing:
        backbone.grad_checkpointing = True
    D = backbone.embed_dim
    head_kw = dict(norm_last_layer=args.norm_last_layer, use_bn=args.use_bn_in_head) if args.method == "dino" else {}
    projector, predictor = losses.build_heads(args.method, D, hidden_dim=args.head_hidden, out_dim=args.head_out,
                                              **head_kw)
    depth = backbone.depth
    addon_layer = None if args.addon in (None, "ser") or args.equiv_layer == depth else args.equiv_layer
    decoupled = addon_layer is not None
    addon_head = None
    if args.addon == "ser":
        addon_head = losses.SERProjector(D)
    elif args.addon == "equimod":
        addon_head = losses.EquiModHead(D, input_norm=decoupled)
    elif args.addon == "augself":
        addon_head = losses.AugSelfHead(D, input_norm=decoupled)
    elif args.addon == "essl":
        addon_head = losses.ESSLHead(D, input_norm=decoupled)
    student = Student(backbone, projector, predictor, args.addon, addon_head, addon_layer)
    teacher = None
    if args.method in EMA_METHODS:
        # The teacher starts as a copy of the student, without stochastic depth (DINO). BYOL's
        # official target starts from its own random init; a copy is the MoCo/DINO convention.
        teacher_backbone = vit.build_vit({**backbone.arch, "drop_path_rate": 0.0})
        teacher_backbone.load_state_dict(backbone.state_dict())
        teacher = Teacher(teacher_backbone, deepcopy(projector))
        teacher.requires_grad_(False)
    return student, teacher


def param_groups(student, method):
    """AdamW groups. DINO's rule everywhere (no decay on biases and 1-D tensors; pos_embed and cls_token
    are decayed), except MoCo v3, whose ViT recipe decays every parameter."""
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if method != "mocov3" and (p.ndim <= 1 or name.endswith(".bias")) else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False}]


# ---------------------------------------------------------------------------- views on the device
def build_recipe(args):
    # SimCLR has no entry: it uses the asymmetric BYOL recipe, as MoCo v3's ViT comparisons do.
    return augment.recipe_for(args.method if args.method != "simclr" else "byol", img_size=args.img_size,
                              n_local=args.n_local_crops, extra=args.addon if args.addon != "ser" else None,
                              crop_min=args.crop_min, patch_size=args.patch_size)


def ser_groups(global_batch, chunk, ratio, min_images):
    """SER's b2 groups: [start, stop) ranges of positions in the global batch, one per chunk.

    The global batch is cut into G = max(1, round(B / chunk)) chunks, chunk g covering positions
    [round(g B / G), round((g + 1) B / G)); its b2 group is its last max(min_images, round(ratio * len))
    positions. Each group gets its own pair of group elements and colour parameters (make_step_inputs),
    as each GPU's 3 images do in the release (aitrics-chris/SER main_moco.py: 1% of the per-GPU batch),
    but the groups are defined
    on the global batch: which images form b2, and how they are transformed, does not depend on the
    number of ranks. --batch-size 2048 --ser-chunk 256 --ser-ratio 0.01: 8 groups of 3 images.
    """
    n_chunks = max(1, round(global_batch / chunk))
    groups = []
    for g in range(n_chunks):
        lo, hi = round(g * global_batch / n_chunks), round((g + 1) * global_batch / n_chunks)
        n = max(min_images, round(ratio * (hi - lo)))
        if n >= hi - lo:
            raise SystemExit(f"error: a b2 group would take {n} of the {hi - lo} images of its chunk; lower "
                             "--ser-ratio/--ser-min-images or raise --batch-size/--ser-chunk")
        groups.append((hi - n, hi))
    return groups


def ser_pair_sources(args, photometric):
    """SER's b2 pairs of one image: (crop view, colour augmentation of each view, invariance streams
    the two views join). Two views: one pair from global crop 0, view i with global view i's colour
    recipe, joining streams 0 and 1 (aitrics-chris/SER builder/moco.py train_erl). MoCo v3 multi-crop
    ("2+4 views", train_erl_local4): global crop 0 and local crops #0, #2, .., each duplicated with the
    local crops' colour recipe (the release's `etc` for all six), joining streams (0, 1), (2, 3), (4, 5)."""
    if args.method == "mocov3" and args.n_local_crops:
        local_aug = photometric[2]
        return [(0, (local_aug, local_aug), (0, 1))] + [(2 + i, (local_aug, local_aug), (2 + i, 3 + i))
                                                        for i in range(0, args.n_local_crops, 2)]
    return [(0, (photometric[0], photometric[1]), (0, 1))]


@dataclass
class SERPair:
    """One pair of b2 views of a group's rows on this rank: x_j = g_j(colour_j(crop))."""
    x1: torch.Tensor  # (n, 3, h1 * p, w1 * p)
    x2: torch.Tensor  # (n, 3, h2 * p, w2 * p)
    g1: group_actions.GroupElement  # restricted to the rows on this rank
    g2: group_actions.GroupElement
    base_grid: tuple  # the crop's token grid (h, w), relative to which the grids were drawn
    streams: tuple  # the invariance streams the two views' [CLS] join


@dataclass
class SERGroupRows:
    """The rows of one b2 group that this rank holds (all of them, or part of a group that straddles ranks)."""
    index: int  # g, the group's index in the global batch
    positions: torch.Tensor  # (n,) long, CPU: the images' positions in the global batch
    pairs: list  # SERPair per pair source (ser_pair_sources)


@dataclass
class StepBatch:
    """Everything the student and teacher see at one step on this rank, plus what the losses need.

    Streams are the invariance views: the 2 global views, then the local ones (DINO, MoCo v3 2+N).
    streams[v] holds its plain rows, images stream_positions[v] of the global batch; with SER, a stream
    that a b2 pair joins holds the b1 rows only, the b2 views follow group by group (Student._b2).
    """
    key: tuple  # (seed, step): seeds the per-call stochastic depth (Student._features)
    batch_size: int  # B, the global batch
    streams: list  # per stream (N_v, 3, s, s), normalised
    stream_positions: list  # per stream (N_v,) long, CPU
    view_params: list  # per recipe view: crop box, flip and colour parameters of every row of this rank
    b2: list = field(default_factory=list)  # SERGroupRows of the groups on this rank
    ser_pairs: list = field(default_factory=list)  # per pair source: (base_grid, streams)
    plain: torch.Tensor | None = None  # EquiMod's un-augmented view (B_r, 3, H, W)
    equimod_params: torch.Tensor | None = None  # (2 B_r, 18): the two views' parameter vectors
    essl: torch.Tensor | None = None  # E-SSL's rotated crops (4 B_r, 3, s, s), rotation-major
    essl_labels: torch.Tensor | None = None  # (4 B_r,)


def photometric_views(batch, photometric, step, args, rank, world, device):
    """Colour augmentation of every crop on the device. Parameters are drawn for the whole global batch
    from (seed, step, view) and sliced by rank, so W ranks augment exactly as one process would."""
    views, params = [], []
    for v, (crops, aug) in enumerate(zip(batch["images"], photometric)):
        n = crops.shape[0]
        p = aug.sample_params(n * world, augment.device_generator(args.seed, step, 0, v))
        p = {k: t[rank * n:(rank + 1) * n] for k, t in p.items()}  # CPU: apply() reads them without a sync
        x = crops.to(device, non_blocking=True).float() / 255
        views.append(augment.normalize(aug.apply(x, p)))
        params.append({k: augment.to_device(t, device) for k, t in p.items()})
    return views, params


def make_step_inputs(batch, photometric, step, args, rank, world, device):
    """The StepBatch of one step on this rank. Every random choice is a function of (seed, step) and of
    global image positions, never of the rank: nothing a step computes depends on the number of ranks
    except float rounding (README)."""
    views, params = photometric_views(batch, photometric, step, args, rank, world, device)
    n_rank = views[0].shape[0]
    start = rank * n_rank
    positions = torch.arange(start, start + n_rank)  # this rank's slice of the global batch (GlobalBatchSampler)
    # Views in recipe order: the 2 globals, the locals, then E-SSL's small crop.
    n_streams = 2 + args.n_local_crops
    streams = views[:n_streams]
    # Crop box and flip come from the workers, colour parameters from the device: the add-ons want both.
    view_params = [{**p, "crop": batch["crop"][v].to(device, non_blocking=True),
                    "flip": batch["flip"][v].to(device, non_blocking=True).float()} for v, p in enumerate(params)]
    out = StepBatch(key=(args.seed, step), batch_size=n_rank * world, streams=streams,
                    stream_positions=[positions] * n_streams, view_params=view_params)
    if args.addon == "ser":
        sources = ser_pair_sources(args, photometric)
        out.ser_pairs = [((batch["images"][v].shape[-1] // args.patch_size,) * 2, s) for v, _, s in sources]
        is_b2 = torch.zeros(n_rank, dtype=torch.bool)
        for g, (lo, hi) in enumerate(ser_groups(n_rank * world, args.ser_chunk, args.ser_ratio, args.ser_min_images)):
            a, b = max(lo, start), min(hi, start + n_rank)
            if a >= b:
                continue  # no image of this group on this rank
            is_b2[a - start:b - start] = True
            # Everything of group g is drawn for all its images from (seed, step, g), then restricted to ours.
            gen = torch.Generator().manual_seed(augment.seed_from("ser", args.seed, step, g))
            ours, rows = slice(a - lo, b - lo), slice(a - start, b - start)
            pairs = []
            for (view, augs, stream_pair), (base_grid, _) in zip(sources, out.ser_pairs):
                elements = group_actions.sample_view_pair(hi - lo, gen, base_grid=base_grid, scale=tuple(args.ser_scale))
                colours = [aug.sample_params(hi - lo, gen) for aug in augs]
                crop = batch["images"][view][rows].to(device, non_blocking=True).float() / 255  # the common crop
                xs, gs = [], []
                for g_j, aug, p in zip(elements, augs, colours):
                    g_j = group_actions.select_samples(g_j, ours)
                    x = augment.normalize(aug.apply(crop, {k: t[ours] for k, t in p.items()}))
                    xs.append(group_actions.apply_to_images(x, g_j, args.patch_size))
                    gs.append(g_j)
                pairs.append(SERPair(*xs, *gs, base_grid, stream_pair))
            out.b2.append(SERGroupRows(g, torch.arange(a, b), pairs))
        b1 = (~is_b2).nonzero().flatten()
        order = torch.cat([b1, is_b2.nonzero().flatten()])  # b1 rows, then b2 rows group by group
        paired = {s for _, _, pair in sources for s in pair}
        rows_of = [b1 if v in paired else order for v in range(n_streams)]
        out.streams = [x[augment.to_device(r, device)] for x, r in zip(streams, rows_of)]
        out.stream_positions = [positions[r] for r in rows_of]
    if args.addon == "equimod":
        out.plain = augment.normalize(batch["plain"].to(device, non_blocking=True))
        out.equimod_params = torch.cat([losses.equimod_param_vector(p) for p in view_params[:2]])
    if args.addon == "essl":
        out.essl, out.essl_labels = losses.essl_rotations(views[-1])
    return out


# ---------------------------------------------------------------------------- losses
def compute_losses(args, student_out, teacher_out, batch, dino_loss, epoch):
    """{'inv': invariance loss, 'equiv': add-on loss (unweighted)}, float32."""
    m = args.method
    proj = student_out["proj"]
    if m == "mocov3":
        inv = losses.mocov3_multicrop_loss(student_out["pred"], teacher_out, args.temperature)
    elif m == "dino":
        temp = losses.teacher_temp_schedule(epoch, args.warmup_teacher_temp, args.teacher_temp,
                                            args.warmup_teacher_temp_epochs)
        inv = dino_loss(torch.cat(proj), torch.cat(teacher_out), ncrops=len(proj), teacher_temp=temp)
    elif m == "barlowtwins":
        inv = losses.barlow_twins_loss(proj[0], proj[1])
    elif m == "vicreg":
        inv = losses.vicreg_loss(proj[0], proj[1])
    elif m == "simclr":
        inv = losses.simclr_loss(proj[0], proj[1], args.temperature)
    else:  # byol
        p1, p2 = student_out["pred"][:2]
        inv = losses.byol_loss(p1, p2, teacher_out[0], teacher_out[1])
    out = {"inv": inv}
    if args.addon == "ser":
        # One NT-Xent per pair over all its groups, summed over the pairs (one pair with two views,
        # three in MoCo v3's 2+4: aitrics-chris/SER builder/moco.py MoCo.erl_local4). erl_local4 divides
        # each pair's sum by twice the per-GPU *image* count and slices its (2T, 2T) token similarity
        # matrix at that count where the token count T is meant; ser_loss is the intended loss, the mean
        # over all 2T anchors of the pair.
        out["equiv"] = sum(losses.ser_loss(groups, args.equiv_tau) for groups in student_out["ser"])
    elif args.addon == "equimod":
        out["equiv"] = losses.equimod_loss(*student_out["equimod"], args.equiv_tau)
    elif args.addon == "augself":
        out["equiv"] = losses.augself_loss(student_out["augself"], losses.augself_targets(*batch.view_params[:2]))
    elif args.addon == "essl":
        out["equiv"] = losses.essl_loss(student_out["essl"], batch.essl_labels)
    return out


# ---------------------------------------------------------------------------- state
def export_backbone(path, state):
    """The backbone the evaluations use, in bare timm key format with its architecture, cut out of a
    checkpoint's state, so that backbone.pth always holds the weights of checkpoint.pth: DINO evaluates
    its teacher, MoCo v3 and the others their online encoder (state['eval_key'])."""
    network = state[state["eval_key"]]
    backbone = {k[len("backbone."):]: v for k, v in network.items() if k.startswith("backbone.")}
    vit.save_atomic(path, {"arch": state["arch"], "backbone": backbone, "method": state["args"]["method"],
                           "addon": state["args"]["addon"]})


def weights_finite(state):
    """Whether every floating-point weight of the student and teacher is finite: one host sync."""
    tensors = [v for part in ("student", "teacher") if state[part] is not None
               for v in state[part].values() if v.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def knn_monitor(backbone, args, rank, world, device):
    """k-NN top-1 on held-out data: the built-in val split, the user's val/ folder, or a slice of train."""
    transform = augment.eval_transform(args.img_size)
    length = dict(length=args.synthetic_length) if args.data == "synthetic" else {}
    train = augment.build_dataset(args.data, "train", transform, img_size=args.img_size, **length)
    # Fixed random subsets: ImageFolder is sorted by class and the synthetic labels cycle with the index,
    # so a prefix or a stride would keep only some of the classes.
    def subset(n, size, exclude=()):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
        return sorted([i for i in perm if i not in exclude][:size])
    try:
        val = augment.build_dataset(args.data, "val", transform, img_size=args.img_size, **length)
        train_idx, val_idx = subset(len(train), args.knn_train_size), subset(len(val), args.knn_val_size)
    except (FileNotFoundError, ValueError):
        val = train  # no val split on disk: hold out train images the bank does not hold
        train_idx = subset(len(train), min(args.knn_train_size, len(train) // 2))
        val_idx = subset(len(train), args.knn_val_size, exclude=set(train_idx))
    try:
        augment.check_same_classes(train, val, args.data)  # labels are class positions in both splits
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    loaders = []
    for ds, idx in ((train, train_idx), (val, val_idx)):
        part = WithIndex(torch.utils.data.Subset(ds, idx))
        sampler = torch.utils.data.DistributedSampler(part, world, rank, shuffle=False) if world > 1 else None
        loaders.append(DataLoader(part, batch_size=256, sampler=sampler, num_workers=args.num_workers,
                                  pin_memory=device.type == "cuda"))
    return knn_eval(backbone, loaders[0], loaders[1], train.num_classes, device)


def run_summary(log_path, backbone_path, seconds):
    """The end of a run in two lines: what the k-NN monitor saw (first and last entry of log.jsonl, so
    a resumed run reports its whole history) and the command to run next."""
    knn = []
    if os.path.exists(log_path):
        with open(log_path) as f:
            knn = [r["knn_top1"] for r in map(json.loads, f) if "knn_top1" in r]
    seen = (f"k-NN top-1 {knn[0]:.1f} -> {knn[-1]:.1f} ({knn[-1] - knn[0]:+.1f})" if len(knn) > 1
            else "k-NN monitor off")
    out = os.path.dirname(backbone_path)
    return (f"done: {seen} in {seconds / 60:.1f} min; backbone: {backbone_path}\n"
            f"next: python linear_eval.py --pretrained {backbone_path} --cached --output-dir {os.path.join(out, 'linear')}")


def ignore_stop_signals(worker_id):
    """DataLoader workers ignore SIGTERM/SIGINT: a scheduler signals the whole process group, and a worker
    killed mid-step would crash the main process before it saves. Workers exit when the main process does."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Interrupt:
    """SIGTERM/SIGINT (preemption, Ctrl-C) ask the loop to save a checkpoint and stop at the next step;
    the process then exits with 128 + the signal number (EXIT_CODES), so a scheduler sees it did not finish."""

    def __init__(self):
        self.signum = 0  # the signal received, 0 while none
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    @property
    def requested(self):
        return self.signum != 0

    def _handler(self, signum, frame):
        self.signum = signum


def clip_grad_per_param(params, max_norm):
    """DINO's clipping: each parameter's gradient separately scaled to norm <= max_norm (not a global
    norm). Fused over tensors and free of host syncs."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        norms = torch.stack(torch._foreach_norm(grads))  # (P,): the scales in 2 ops, not 3 per parameter
        torch._foreach_mul_(grads, (max_norm / (norms + 1e-6)).clamp_(max=1.0).unbind())


def count_flops_per_image(args, local_batch):
    """FLOPs of one training step per image: student forward + backward, teacher forward and the losses,
    as torch.utils.flop_counter counts them (matmuls, convolutions, attention). It runs on the meta
    device, so nothing is computed and the paper's ViT-S/16 224-px setting counts in seconds on a laptop."""
    from torch.utils.flop_counter import FlopCounterMode
    meta = torch.device("meta")
    args = argparse.Namespace(**{**vars(args), "grad_checkpointing": False})  # recomputation is not model FLOPs
    with meta, losses.local_only():  # a one-rank count, even inside a torchrun job
        student, teacher = build_models(args)
        dino_loss = losses.DINOLoss(args.head_out or 65536) if args.method == "dino" else None
    recipe = build_recipe(args)
    batch = {"images": [torch.zeros(local_batch, 3, v.size, v.size, dtype=torch.uint8, device=meta) for v in recipe.views],
             "crop": [torch.zeros(local_batch, 4)] * len(recipe.views),
             "flip": [torch.zeros(local_batch, dtype=torch.bool)] * len(recipe.views)}
    if recipe.plain_size:
        batch["plain"] = torch.zeros(local_batch, 3, recipe.plain_size, recipe.plain_size, dtype=torch.uint8, device=meta)
    with FlopCounterMode(display=False) as counter, losses.local_only():
        step_batch = make_step_inputs(batch, recipe.photometric(), 0, args, 0, 1, meta)
        teacher_out = teacher(step_batch) if teacher is not None else None
        terms = compute_losses(args, student(step_batch), teacher_out, step_batch, dino_loss, 0)
        (terms["inv"] + terms.get("equiv", 0)).backward()
    return counter.get_total_flops() / local_batch


def matmul_peak_tflops(device, precision):
    """The best rate of a large square torch.mm at the run's precision, in TFLOP/s: the MFU denominator
    when --peak-tflops is not given (on a CPU there is no spec-sheet number to trust)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # CPU: 1024 runs as fast as 2048 (oneDNN/MKL) and fits many tries into the time budget.
    n = 8192 if device.type == "cuda" else 1024
    if device.type == "cpu" and precision == "bf16" and not vit.cpu_has_native_bf16():
        n = 256  # emulated bf16 runs at ~1 GFLOP/s: a 1024 matmul would take 2 s
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    best, tries, end = math.inf, 0, time.perf_counter() + 1.0
    while tries < 5 or time.perf_counter() < end:  # the best of 1 s of tries is the least disturbed by other jobs
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best, tries = min(best, time.perf_counter() - t0), tries + 1
    return 2 * n ** 3 / best / 1e12


def benchmark(args, run_step, compute_step, photometric, precision, loader, sampler, dataset, device, local_batch,
              rank, world):
    """--benchmark STEPS: time the real training step and report images/s, data wait vs compute, peak
    memory, FLOPs per image (count_flops_per_image), MFU, and the step's distance to its compute floor:
    the same compute_step on inputs already on the device, without data loading or augmentation."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dataset.set_epoch(0)
    sampler.set_epoch(0)
    # The input pipeline alone, in this process: decode + crop + flip per image, i.e. one worker's rate.
    # Measured first, while no DataLoader worker competes for the cores.
    n_pipe, t0 = 0, time.perf_counter()
    for i, batch in enumerate(DataLoader(dataset, batch_sampler=sampler, num_workers=0)):
        n_pipe += len(batch["index"])
        if i == 2:
            break
    pipe_rate = n_pipe / (time.perf_counter() - t0)
    flops_per_image = count_flops_per_image(args, local_batch)
    peak_tflops = args.peak_tflops or matmul_peak_tflops(device, precision)

    # The floor, also before the workers start: each step's views are made from the batch above before
    # the clock starts (the same shapes, SER's b2 grids included), then only compute_step is timed.
    floor = 0.0
    for step in range(3 + args.benchmark):  # 3 warm-up steps, as below
        step_batch = make_step_inputs(batch, photometric, step, args, rank, world, device)
        sync()
        t0 = time.perf_counter()
        compute_step(step, step_batch)
        sync()
        floor += (time.perf_counter() - t0) if step >= 3 else 0.0
    floor_time = floor / args.benchmark

    batches = iter(loader)

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    for step in (0, 1, 2):  # warm-up: allocator, autotuning, compilation
        run_step(step, next_batch())
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wait = compute = 0.0
    for step in range(3, 3 + args.benchmark):
        t0 = time.perf_counter()
        batch = next_batch()
        t1 = time.perf_counter()
        run_step(step, batch)
        sync()  # benchmark only: the training loop itself never waits for the device
        wait, compute = wait + t1 - t0, compute + time.perf_counter() - t1
    step_time = (wait + compute) / args.benchmark
    if device.type == "cuda":
        peak_mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (GPU, allocated)"
    else:
        import resource
        per_gib = 2**30 if sys.platform == "darwin" else 2**20  # ru_maxrss: bytes on macOS, KiB on Linux
        peak_mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_gib:.2f} GiB (process max RSS)"
    result = {"method": args.method, "addon": args.addon, "arch": args.arch, "img_size": args.img_size,
              "global_batch": args.batch_size, "world_size": world, "device": str(device), "precision": precision,
              "images_per_s": args.batch_size / step_time, "step_ms": 1000 * step_time,
              "data_wait_ms": 1000 * wait / args.benchmark, "compute_ms": 1000 * compute / args.benchmark,
              "floor_ms": 1000 * floor_time, "step_over_floor": step_time / floor_time,
              "gflops_per_image": flops_per_image / 1e9, "achieved_tflops_per_rank": flops_per_image * local_batch
              / (compute / args.benchmark) / 1e12, "peak_memory": peak_mem,
              "pipeline_images_per_s_per_worker": pipe_rate, "num_workers": args.num_workers,
              "peak_tflops": peak_tflops, "peak_source": "--peak-tflops" if args.peak_tflops else
              f"measured: the best torch.mm at {precision} in 1 s"}
    # Model FLOPs over compute time (data wait excluded), and over the whole step.
    result["mfu_compute"] = result["achieved_tflops_per_rank"] / peak_tflops
    result["mfu_step"] = flops_per_image * local_batch / step_time / 1e12 / peak_tflops
    if rank == 0:
        print(json.dumps(result, indent=1))
        print(f"step / floor: {result['step_over_floor']:.3f} ({result['step_ms']:.1f} ms per step, "
              f"{result['floor_ms']:.1f} ms of bare compute)")
        with open(os.path.join(args.output_dir, "benchmark.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


def compile_backbone(backbone):
    """--compile: torch.compile the backbone's training calls with static shapes; they all have fixed
    sizes (global, local and E-SSL crops). SER's b2 views, whose grid changes every step, call the
    eager method directly (Student, Teacher), and eval mode (the k-NN monitor) stays eager, so nothing
    recompiles during the run. Compiling the bound method, not wrapping the module, keeps the
    state-dict keys free of '_orig_mod.'."""
    eager = backbone.forward_features
    compiled = torch.compile(eager, dynamic=False)

    def forward_features(x, layer=None):
        return (compiled if backbone.training else eager)(x, layer=layer)

    backbone.forward_features = forward_features


# ---------------------------------------------------------------------------- training
def train(args):
    rank, world, device = losses.init_distributed()
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    local_batch = local_batch_size(args.batch_size, world)
    if args.addon == "ser":
        ser_groups(args.batch_size, args.ser_chunk, args.ser_ratio, args.ser_min_images)  # refuse a bad split now
    if device.type == "cpu" and not args.no_keep_freed_memory:
        keep_freed_host_memory()  # before the DataLoader forks, so its workers inherit it
    if args.num_workers is None:
        args.num_workers = min(8, max(1, (os.cpu_count() or 2) // world))
    torch.manual_seed(augment.seed_from("init", args.seed))  # same initial weights on every rank
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- data
    recipe = build_recipe(args)
    length = dict(length=args.synthetic_length) if args.data == "synthetic" else {}
    base = augment.build_dataset(args.data, "train", None, img_size=args.img_size, **length)
    dataset = augment.MultiViewDataset(base, recipe, seed=args.seed)
    if len(dataset) < args.batch_size:
        raise SystemExit(f"error: {args.data} has {len(dataset)} training images, fewer than --batch-size {args.batch_size}")
    sampler = GlobalBatchSampler(len(dataset), args.batch_size, rank, world, args.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.num_workers > 0, worker_init_fn=ignore_stop_signals)
    photometric = recipe.photometric()
    steps_per_epoch = len(dataset) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = args.warmup_epochs * steps_per_epoch

    # ---- model, optimiser, loss state
    student, teacher = build_models(args)
    student.to(device)
    if teacher is not None:
        teacher.to(device)
    dino_loss = losses.DINOLoss(args.head_out or 65536).to(device) if args.method == "dino" else None
    # fused: one kernel per tensor on GPUs and CPUs (torch >= 2.4); on CPU the default for-loop AdamW
    # took 5-10x longer for ViT-Ti/16 with DINO's 65536-dim head
    optimizer = torch.optim.AdamW(param_groups(student, args.method), lr=0.0, weight_decay=0.0, fused=True)
    try:
        precision = vit.resolve_precision(device, args.precision)
    except ValueError as e:
        raise SystemExit(f"error: --precision {args.precision}: {e}")
    if precision == "bf16" and device.type == "cpu" and not vit.cpu_has_native_bf16():
        log("warning: --precision bf16 on a CPU without AVX512_BF16 or AMX: bf16 is emulated, matmuls run "
            "~100x slower than in fp32; use --precision fp32")
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    peak_lr = args.lr * args.batch_size / 256

    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    backbone_path = os.path.join(args.output_dir, "backbone.pth")
    start_step, saved_step = 0, None  # saved_step: the step of the checkpoint on disk, None while there is none
    if os.path.exists(ckpt_path) and not args.benchmark:  # a benchmark neither resumes nor touches a run
        try:
            ckpt = vit.load_checkpoint(ckpt_path, map_location=device)  # tensors and plain values only
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        if not (isinstance(ckpt, dict) and {"args", "step", "student", "optimizer"} <= set(ckpt)):
            raise SystemExit(f"error: {ckpt_path} is not a pretrain.py checkpoint; move it away or use another --output-dir")
        changed = {k: (v, getattr(args, k, None)) for k, v in ckpt["args"].items()
                   if k not in RUNTIME_OPTIONS and v != getattr(args, k, None)}
        if changed:
            raise SystemExit(f"error: {ckpt_path} was written with different settings: "
                             + ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in changed.items())
                             + ". Use another --output-dir, or rerun with the saved settings.")
        student.load_state_dict(ckpt["student"])
        if teacher is not None:
            teacher.load_state_dict(ckpt["teacher"])
        if dino_loss is not None:
            dino_loss.load_state_dict(ckpt["dino_loss"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_step = saved_step = ckpt["step"]
        log(f"resumed from {ckpt_path} at step {start_step}")
        if start_step >= total_steps and is_main:
            # A finished run: a kill between the final checkpoint and backbone writes left backbone.pth
            # stale or missing, so export it again from the checkpoint.
            export_backbone(backbone_path, ckpt)
            log(f"the run had finished; {backbone_path} exported again from {ckpt_path}")
    if args.stop_at_step is not None and args.stop_at_step <= start_step:
        raise SystemExit(f"error: --stop-at-step {args.stop_at_step} is not after the resumed step {start_step}")

    raw_student = student
    if args.compile:
        for backbone in (raw_student.backbone, teacher.backbone if teacher is not None else None):
            if backbone is not None:
                compile_backbone(backbone)
    if world > 1:
        student = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)

    if is_main:
        log(f"{args.method}{' + ' + args.addon if args.addon else ''} on {args.data}: {world} rank(s) on {device}, "
            f"{precision}, global batch {args.batch_size} ({local_batch} per rank), "
            f"lr {peak_lr:.3g} (= {args.lr:g} x batch / 256), {steps_per_epoch} steps/epoch, {total_steps} steps")
        n_params = sum(p.numel() for p in raw_student.parameters() if p.requires_grad)
        log(f"trainable parameters: {n_params / 1e6:.2f}M; weight decay on {len(optimizer.param_groups[0]['params'])} "
            f"tensors, none on {len(optimizer.param_groups[1]['params'])}")
        if not args.benchmark:
            vit.save_atomic(os.path.join(args.output_dir, "config.json"), {"argv": sys.argv, "world_size": world, **vars(args)})
        log(json.dumps(vars(args)))

    trainable = [p for p in raw_student.parameters() if p.requires_grad]
    last_layer = [p for n, p in raw_student.projector.named_parameters() if "last_layer" in n]
    ema_pairs = None
    if teacher is not None:
        s_params = list(raw_student.backbone.parameters()) + list(raw_student.projector.parameters())
        t_params = list(teacher.backbone.parameters()) + list(teacher.projector.parameters())
        ema_pairs = (t_params, s_params)

    def run_step(step, batch):
        """One optimisation step. Returns the detached loss terms (no host sync)."""
        lr = cosine_schedule(step, total_steps, peak_lr, args.min_lr * args.batch_size / 256, warmup_steps)
        wd = cosine_schedule(step, total_steps, args.weight_decay, args.weight_decay_end)
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = lr, wd if group["apply_wd"] else 0.0
        # Every random choice of the step comes from (seed, step) and global positions: the views, SER's
        # groups (make_step_inputs) and stochastic depth (Student._features); none from the rank.
        return compute_step(step, make_step_inputs(batch, photometric, step, args, rank, world, device)), lr, wd

    def compute_step(step, step_batch):
        """The step's compute on inputs already on the device: student forward and backward, teacher
        forward, losses, optimiser and EMA (what --benchmark's floor times alone)."""
        epoch = step // steps_per_epoch
        with vit.autocast(device, precision):
            student_out = student(step_batch)
            teacher_out = teacher(step_batch) if teacher is not None else None
        terms = compute_losses(args, student_out, teacher_out, step_batch, dino_loss, epoch)
        loss = terms["inv"] + args.equiv_lambda * terms["equiv"] if "equiv" in terms else terms["inv"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if args.clip_grad:
            clip_grad_per_param(trainable, args.clip_grad)
        if args.method == "dino" and epoch < args.freeze_last_layer:
            for p in last_layer:  # DINO: the head's last layer stays fixed during the first epoch
                p.grad = None
        scaler.step(optimizer)
        scaler.update()
        if ema_pairs is not None:
            with torch.no_grad():
                m = ema_momentum(step, total_steps, args.momentum)
                # teacher = m * teacher + (1 - m) * student, as one pass over both (mul + add took two)
                torch._foreach_lerp_(ema_pairs[0], ema_pairs[1], 1 - m)
        return {k: v.detach() for k, v in {"loss": loss, **terms}.items()}

    if args.benchmark:
        result = benchmark(args, run_step, compute_step, photometric, precision, loader, sampler, dataset, device,
                           local_batch, rank, world)
        if world > 1:
            dist.barrier()  # as at the end of training
            dist.destroy_process_group()
        return result

    log_path = os.path.join(args.output_dir, "log.jsonl")

    def log_knn(step, epoch):
        evaluated = teacher.backbone if (teacher is not None and args.method == "dino") else raw_student.backbone
        acc = knn_monitor(evaluated, args, rank, world, device)
        log(f"{'initialisation' if step == 0 else f'epoch {epoch}'}: k-NN top-1 {acc['top1']:.2f} top-5 {acc['top5']:.2f}")
        if is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, "knn_top1": acc["top1"], "knn_top5": acc["top5"]}) + "\n")

    if start_step == 0 and args.knn_every:
        log_knn(0, -1)  # the same network at initialisation: the baseline the epochs are compared with
    def checkpoint_note():  # what is on disk, said truthfully in every error that stops the run
        return (f"the last checkpoint, at step {saved_step}, in {ckpt_path} is intact" if saved_step is not None
                else f"no checkpoint was written to {args.output_dir}")

    interrupt = Interrupt()  # from here on, SIGTERM/SIGINT mean "checkpoint, then stop"
    step, t_last, t_start, imgs_since = start_step, time.time(), time.time(), 0
    sums, n_sums, stopping, vote, stop_signal = {}, 0, False, None, 0
    while step < total_steps and not stopping:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, start_step=in_epoch)
        for batch in loader:
            terms, lr, wd = run_step(step, batch)
            step += 1
            imgs_since += args.batch_size
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            n_sums += 1
            signalled = interrupt.signum
            if world > 1:
                # Ranks may see a signal at different steps but must stop at the same one: the signal number
                # is max-reduced on the host-side group without waiting, and read one step later (so at the
                # first step no rank stops on its own flag).
                signalled = 0
                if vote is not None:
                    vote[1].wait()
                    signalled = int(vote[0].item())
                flag = torch.tensor([interrupt.signum])
                vote = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=losses.cpu_group(), async_op=True))
            stop_signal = stop_signal or signalled
            stopping = bool(signalled) or step == args.stop_at_step
            now = time.time()
            if step % args.log_every == 0 or step == start_step + 1 or step % steps_per_epoch == 0 or stopping:
                # Log steps are step counts, never times, so they are the same on every rank: the terms are
                # averaged over ranks, and a non-finite loss stops every rank at the same step.
                mean = torch.stack(list(sums.values())) / n_sums
                if world > 1:
                    dist.all_reduce(mean)
                    mean /= world
                values = dict(zip(sums, mean.tolist()))  # waits for the device: log steps only
                if not all(math.isfinite(v) for v in values.values()):
                    raise SystemExit(f"error: non-finite loss at step {step} ({values}); {checkpoint_note()}. "
                                     "Try --precision fp32, a lower --lr or --clip-grad.")
                rate = imgs_since / (now - t_last)
                eta = (total_steps - step) * args.batch_size / max(rate, 1e-9)
                log(f"epoch {epoch} step {step}/{total_steps} " + " ".join(f"{k} {v:.4f}" for k, v in values.items())
                    + f" lr {lr:.3g} {rate:.1f} img/s ETA {eta / 60:.1f} min")
                if is_main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": step, "epoch": epoch, "lr": lr, "wd": wd, "img_per_s": rate,
                                            **values}) + "\n")
                sums, n_sums, t_last, imgs_since = {}, 0, now, 0
            if stopping:
                break
        if step % steps_per_epoch == 0 or stopping:
            state = {"args": vars(args), "arch": raw_student.backbone.arch, "step": step,
                     "eval_key": "teacher" if args.method == "dino" else "student",
                     "student": raw_student.state_dict(), "teacher": teacher.state_dict() if teacher else None,
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "dino_loss": dino_loss.state_dict() if dino_loss is not None else None}
            # Never write non-finite weights: a loss is checked only at log steps, and the one logged is from
            # before the last update. Every rank checks (their weights are equal), so all stop together.
            if not weights_finite(state):
                raise SystemExit(f"error: non-finite weights at step {step}; {checkpoint_note()}. "
                                 "Try --precision fp32, a lower --lr or --clip-grad.")
            if is_main:
                try:  # the checkpoint first: a kill before the export is repaired by a rerun (see the resume)
                    vit.save_atomic(ckpt_path, state)
                    export_backbone(backbone_path, state)
                except OSError as e:
                    raise SystemExit(f"error: {e}") from None
            saved_step = step
            if stopping:
                why = f" on {signal.Signals(stop_signal).name}, exit status {128 + stop_signal}" if stop_signal else ""
                log(f"stopped at step {step}{why}; checkpoint saved to {ckpt_path}; rerun the same command to resume")
            elif args.knn_every and (step // steps_per_epoch) % args.knn_every == 0:
                log_knn(step, epoch)
    if vote is not None:
        vote[1].wait()
    if step >= total_steps:
        log(run_summary(log_path, os.path.join(args.output_dir, "backbone.pth"), time.time() - t_start))
    if world > 1:
        # Tear down together: a gloo rank that exits while rank 0 still writes the checkpoint could abort
        # ("terminate called without an active exception", seen once in 10 two-rank test runs).
        dist.barrier()
        dist.destroy_process_group()
    if stop_signal:
        sys.exit(128 + stop_signal)  # checkpointed, but not finished: a scheduler must not count it as done


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = resolve_config(get_args_parser().parse_args(argv))
    if args.count_flops:
        return report_flops(args, argv)
    return train(args)


def report_flops(args, argv):
    """--count-flops: FLOPs per image with and without the add-on, e.g. SER's overhead at the paper's
    setting:  python pretrain.py --method mocov3 --ser --data imagenet --batch-size 256 --count-flops"""
    local_batch = args.batch_size  # one rank's view of the step
    with_addon = count_flops_per_image(args, local_batch)
    base_argv = [a for a in argv if a not in ("--ser", "--equimod", "--augself", "--essl")]
    base = count_flops_per_image(resolve_config(get_args_parser().parse_args(base_argv)), local_batch)
    result = {"method": args.method, "addon": args.addon, "arch": args.arch, "img_size": args.img_size,
              "batch_per_rank": local_batch, "gflops_per_image": with_addon / 1e9,
              "base_gflops_per_image": base / 1e9, "ratio": with_addon / base}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

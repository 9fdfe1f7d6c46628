r"""Self-supervised ViT pretraining: MoCo v3, DINO, Barlow Twins, VICReg, SimCLR or BYOL, with one
add-on: SER (soft equivariance regularisation), EquiMod, AugSelf or E-SSL.

    python pretrain.py --method dino --ser                   # built-in synthetic data, CPU, minutes
    torchrun --nproc_per_node 2 pretrain.py --method dino --ser
    torchrun --nproc_per_node 8 pretrain.py --method mocov3 --ser --data /datasets/imagenet \
        --output-dir runs/mocov3_ser                          # ViT-S/16, 224 px, the official recipe
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 pretrain.py ...
    python pretrain.py --method mocov3 --ser --benchmark 20  # images/s, data wait, memory, FLOPs, MFU

SER: the last `--ser-ratio` of every `--ser-chunk` images of the global batch form b2 (the release: 3 of each GPU's
256): two views of one crop, each with its own colours and group element (rot90, flip, rescale to a random token
grid). Both sub-batches enter the invariance loss; only b2 enters L_equiv, on the token map after block
`--equiv-layer`, where [CLS] joins the network:  L = L_inv(b1 + b2) + lambda * L_equiv.

Reading order: train() builds the run in phases and calls train_step() once per step on a StepBatch
(make_step_inputs: the views, augment.py, and SER's b2 groups); Student and Teacher run the ViT (vit.py, SER's
split); compute_losses calls losses.py, whose ser_loss aligns token maps with group_actions.py. Measurement
(--benchmark, --count-flops) is the last section.

Outputs, in --output-dir (an existing checkpoint.pth is resumed): config.json, log.jsonl (a JSON line per log step
and per epoch, cut back to the checkpoint on resume), checkpoint.pth (all state; every epoch and on SIGTERM/SIGINT)
and backbone.pth (the evaluated backbone: bare timm keys, its architecture and step), which linear_eval.py,
robustness_eval.py and detect_eval.py load.
"""

import argparse
import functools
import hashlib
import itertools
import json
import math
import os
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler, Subset, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

try:
    import resource  # --benchmark's peak memory on CPU; Unix only
except ImportError:
    resource = None

import augment
import group_actions
import losses
import vit
from linear_eval import WithIndex, knn_eval, top5_text  # linear_eval owns the k-NN protocol (DINO eval_knn)

EMA_METHODS = ("mocov3", "dino", "byol")  # methods with a momentum teacher / target network
JOINT_HEAD_METHODS = ("dino", "simclr")  # heads called once on all views (run_head)
ADDONS = ("ser", "equimod", "augself", "essl")
# Options a resumed run may change: they do not affect what is computed (precision: compared as resolved; not
# --compile, whose graphs draw drop-path masks from Inductor's generator).
RUNTIME_OPTIONS = {"output_dir", "num_workers", "log_every", "knn_every", "knn_train_size", "knn_val_size",
                   "stop_at_step", "benchmark", "peak_tflops", "count_flops", "grad_checkpointing", "precision"}

# Base-method defaults: each method's official ViT-S/16 recipe at 224 px on ImageNet (facebookresearch/moco-v3
# CONFIG.md, facebookresearch/dino README.md); lr and min_lr per 256 images. Barlow Twins: SER's, its only ViT
# recipe. VICReg, SimCLR and BYOL have no official ViT recipe: they reuse MoCo v3's AdamW settings.
# SER's own ViT-S runs differ from these in places; to reproduce them pass (aitrics-chris/SER run_pretrain.sh):
#   DINO: --lr 1e-4 --min-lr 1e-5 --momentum 0.982 --clip-grad 0.3 --crop-min 0.25 --teacher-temp 0.07
#         --warmup-teacher-temp-epochs 10;  MoCo v3: --lr 3e-4;  Barlow Twins: --clip-grad 0.3;  all: --batch-size 2048
MOCOV3_ADAMW = dict(lr=1.5e-4, min_lr=0.0, weight_decay=0.1, weight_decay_end=0.1, momentum=None,
                    clip_grad=0.0, drop_path=0.0, crop_min=0.08, temperature=None)
METHOD_DEFAULTS = {
    "mocov3": {**MOCOV3_ADAMW, "momentum": 0.99, "temperature": 0.2},
    "dino": dict(lr=5e-4, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4, momentum=0.996,
                 clip_grad=3.0, drop_path=0.1, crop_min=0.4, temperature=None, teacher_temp=0.04,
                 warmup_teacher_temp=0.04),
    "barlowtwins": {**MOCOV3_ADAMW, "lr": 1e-4, "min_lr": 1e-7},
    "vicreg": MOCOV3_ADAMW,
    "simclr": {**MOCOV3_ADAMW, "temperature": 0.1},
    "byol": {**MOCOV3_ADAMW, "momentum": 0.99},
}
# Add-on (lambda, tau). SER: the release's launch values (aitrics-chris/SER run_pretrain.sh; the paper's tau
# differ: 0.3 MoCo/BT, 0.5 DINO). The release has none for VICReg, SimCLR and BYOL: we use 1.0 and 0.4. EquiMod:
# lambda 1, tau 0.2; AugSelf: weight 1 on its 0.5 crop + 0.5 colour terms; E-SSL: lambda 0.4.
SER_DEFAULTS = {"mocov3": (1.0, 0.5), "dino": (0.3, 0.4), "barlowtwins": (1.0, 0.4),
                "vicreg": (1.0, 0.4), "simclr": (1.0, 0.4), "byol": (1.0, 0.4)}
ADDON_DEFAULTS = {"equimod": (1.0, 0.2), "augself": (1.0, None), "essl": (0.4, None), None: (0.0, None)}
# The real-data run: ViT-S/16 at 224 px, SER's 100-epoch schedule (the paper's runs use batch 2048).
REAL_DEFAULTS = dict(arch="vit_small", depth=None, patch_size=16, img_size=224, epochs=100, warmup_epochs=10,
                     batch_size=1024, head_hidden=None, head_out=None, knn_train_size=20000, knn_val_size=10000,
                     weight_init=None, use_bn_in_head=False, freeze_last_layer=1, knn_every=1)
# The built-in data on a 2-core CPU, in minutes: a 4-block ViT-Ti, 32 px images, 8 px patches (a 4x4 token grid,
# enough for SER's rescaled 3x3..5x5 grids); MoCo v3's init for every method (with timm's trunc-normal(0.02) a ViT
# this small stays at chance for hundreds of steps even when trained supervised); narrower heads, a higher lr, a
# faster EMA (the teacher must move within a few hundred steps), no stochastic depth, a larger minimum crop.
SYNTHETIC_DEFAULTS = dict(arch="vit_tiny", depth=4, patch_size=8, img_size=32, epochs=10, warmup_epochs=1,
                          batch_size=64, head_hidden=1024, head_out=256, knn_train_size=2000, knn_val_size=1000,
                          lr=1.5e-3, min_lr=1e-6, momentum=0.99, drop_path=0.0, crop_min=0.25, weight_init="moco",
                          use_bn_in_head=False, freeze_last_layer=1, synthetic_length=3200, knn_every=2)
# DINO at this scale: its teacher starts nearly uniform (BatchNorm in the head, the official --use_bn_in_head,
# sharpens it; the last layer trains from step 0), and weight decay rising to 0.4 undoes in a run's second half
# what the first learnt: MoCo v3's constant 0.1 instead. Each entry below beat its alternative in every seed of a
# 3-seed k-NN screen: 16 epochs (12: DINO + SER +15.4 against +21.1, DINO +4.3 against +9.3), b2 a quarter of the
# batch (the release's 1%, 2 images: 6.3-18.9 points less), teacher temperature 0.01 (0.04: 2.8-7.6 less) and
# BYOL's EMA 0.96 (0.99: 0.7-3.1 less; fp32, 2-core AMD EPYC Zen 3).
SYNTHETIC_METHOD_DEFAULTS = {"dino": dict(weight_decay=0.1, weight_decay_end=0.1, use_bn_in_head=True,
                                          freeze_last_layer=0, ser_ratio=0.25, teacher_temp=0.01,
                                          warmup_teacher_temp=0.01, epochs=16),
                             "byol": dict(momentum=0.96)}

EXIT_CODES = ("exit status: 0 finished or stopped at --stop-at-step; 1 an error; 143 (SIGTERM) or 130 (SIGINT) after "
              "a signal made the run save checkpoint.pth and stop: rerun the same command to resume")

# The advice of every non-finite stop: a resume keeps its run's settings, so a changed one starts anew elsewhere.
DIVERGED = "Try --precision fp32, a lower --lr or --clip-grad, with another --output-dir."


# Ranges of the numeric options: option -> (ok(v), what the error asks for); None (unset) is not checked.
RANGES = {
    **dict.fromkeys(("epochs", "img_size", "patch_size", "lr", "temperature", "teacher_temp",
                     "warmup_teacher_temp", "equiv_tau", "ser_chunk", "peak_tflops"), (lambda v: v > 0, "positive")),
    **dict.fromkeys(("min_lr", "weight_decay", "weight_decay_end", "equiv_lambda", "num_workers", "n_local_crops",
                     "warmup_teacher_temp_epochs", "freeze_last_layer", "benchmark"), (lambda v: v >= 0, ">= 0")),
    **dict.fromkeys(("head_hidden", "head_out", "knn_train_size", "knn_val_size", "stop_at_step"),
                    (lambda v: v >= 1, "at least 1")),
    "synthetic_length": (lambda v: 1 <= v < 2**31, "in 1..2^31-1"),
    "seed": augment.SEED_RANGE,
    "batch_size": (lambda v: 2 <= v <= 2**24, "at least 2 (BatchNorm heads and negatives need two images a rank) "
                   "and at most 2^24 (SER's groups are listed up front)"),
    "momentum": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "clip_grad": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "drop_path": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "crop_min": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "ser_ratio": (lambda v: 0 < v < 1, "in (0, 1)"),
    "ser_min_images": (lambda v: v >= 2, "at least 2 (a b2 image needs other images as negatives)"),
    "depth": (lambda v: v >= 1, "at least 1 block"),
    "log_every": (lambda v: v >= 1, "at least 1 step"),
    "knn_every": (lambda v: v >= 0, ">= 0 (0 = off)"),
}
# Options of one method, add-on or mode: a run without it would ignore them silently, so it refuses them.
ONLY_FOR = {
    **dict.fromkeys(("teacher_temp", "warmup_teacher_temp_epochs", "freeze_last_layer", "norm_last_layer",
                     "use_bn_in_head"), ("--method dino", lambda a: a.method == "dino")),
    "warmup_teacher_temp": ("--method dino with --warmup-teacher-temp-epochs above 0",
                            lambda a: a.method == "dino" and a.warmup_teacher_temp_epochs > 0),
    "temperature": ("--method mocov3 or simclr", lambda a: a.method in ("mocov3", "simclr")),
    "momentum": ("an EMA teacher (--method mocov3, dino or byol)", lambda a: a.method in EMA_METHODS),
    **dict.fromkeys(("equiv_layer", "equiv_lambda"), ("an add-on", lambda a: a.addon is not None)),
    "equiv_tau": ("--ser or --equimod", lambda a: a.addon in ("ser", "equimod")),
    **dict.fromkeys(("ser_ratio", "ser_min_images", "ser_chunk", "ser_scale"), ("--ser", lambda a: a.addon == "ser")),
    **dict.fromkeys(("compile", "grad_checkpointing", "precision"), ("a training run, not --count-flops",
                                                        lambda a: not a.count_flops)),
    **dict.fromkeys(("stop_at_step", "log_every"), ("a training run, not --benchmark or --count-flops",
                                                    lambda a: not a.benchmark and not a.count_flops)),
    "knn_every": ("a training run, not --benchmark or --count-flops",  # 0 asks for what they do anyway
                  lambda a: not a.benchmark and not a.count_flops or a.knn_every == 0),
    **dict.fromkeys(("knn_train_size", "knn_val_size"), ("the k-NN monitor (--knn-every above 0, a training run)",
                                                         lambda a: a.knn_every != 0 and not a.benchmark
                                                         and not a.count_flops)),
    "peak_tflops": ("--benchmark", lambda a: bool(a.benchmark)),
    "output_dir": ("a training run or --benchmark (--count-flops prints its numbers)", lambda a: not a.count_flops),
}


def get_args_parser():
    p = argparse.ArgumentParser(prog="pretrain.py", description=__doc__, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # Method and add-on. Unset values (None) resolve to the method's recipe and the data's scale (resolve_config).
    a("--method", default="dino", choices=list(METHOD_DEFAULTS), help="base invariance method")
    a("--ser", action="store_true", help="add SER's L_equiv on the token map after --equiv-layer")
    a("--equimod", action="store_true", help="add EquiMod (3 views: an un-augmented one plus the two)")
    a("--augself", action="store_true", help="add AugSelf (predict crop and colour differences)")
    a("--essl", action="store_true", help="add E-SSL (4-way rotation prediction on a small extra crop)")
    a("--equiv-layer", type=int, default=None,
      help="SER: the block after which [CLS] joins and L_equiv acts (paper: 3 of 12). Other add-ons: the block "
           "whose [CLS] they read (default: the last; 3 gives the paper's layer-decoupled variants)")
    a("--equiv-lambda", type=float, default=None,
      help="add-on loss weight (SER: the release's value per method, SER_DEFAULTS; EquiMod 1, AugSelf 1, E-SSL 0.4)")
    a("--equiv-tau", type=float, default=None, help="SER token NT-Xent temperature (EquiMod: 0.2)")
    a("--ser-ratio", type=float, default=None,
      help="fraction of each --ser-chunk in its b2 group (release: 3 of 256, ~0.01; DINO on the built-in data: 0.25)")
    a("--ser-min-images", type=int, default=2,
      help="floor on the images of a b2 group; at least 2 so that every token has other images as negatives")
    a("--ser-chunk", type=int, default=256,
      help="images of the global batch per b2 group (the release's per-GPU batch: 8 groups in a batch of 2048)")
    a("--ser-scale", type=float, nargs=2, default=(0.7, 1.3),
      help="b2 token-grid area range, relative to the crop's (at most 4)")
    # Data.
    a("--data", default="synthetic",
      help="'synthetic' (built in), an ImageFolder root with train/ (and val/), 'cifar10:<dir>' or 'stl10:<dir>'")
    a("--synthetic-length", type=int, default=None, help="images per epoch of the built-in dataset")
    a("--img-size", type=int, default=None, help="global crop size in px (224 on real data)")
    a("--n-local-crops", type=int, default=0,
      help="multi-crop: local crops per image; DINO (official ViT-S: 8-10) or MoCo v3 (SER's '2+4 views': 4)")
    a("--crop-min", type=float, default=None, help="RandomResizedCrop minimum scale of the global crops")
    a("--num-workers", type=int, default=None,
      help="DataLoader workers per rank (default: CPU count / ranks, at most 8; 0 on a CPU with <= 2 cores per rank)")
    # Model.
    a("--arch", default=None, choices=list(vit.ARCHS), help="ViT size (vit_small on real data)")
    a("--depth", type=int, default=None, help="override the number of blocks (fewer on the built-in data)")
    a("--patch-size", type=int, default=None, help="ViT patch side in px (16 on real data)")
    a("--drop-path", type=float, default=None, help="stochastic depth of the student (DINO: 0.1)")
    a("--head-hidden", type=int, default=None, help="override the projector's hidden width (recipe: 4096/2048/8192)")
    a("--head-out", type=int, default=None, help="override the projector's output width (DINO: 65536)")
    a("--weight-init", default=None, choices=["trunc_normal", "moco"],
      help="ViT init: the method's own on real data (MoCo v3: moco = Xavier + sin-cos positions; others: timm's "
           "trunc_normal), moco on the built-in data")
    a("--use-bn-in-head", action=argparse.BooleanOptionalAction, default=None,
      help="DINO: BatchNorm in the projection head (official flag; off on real data, on for the built-in data)")
    a("--norm-last-layer", action="store_true", help="DINO: weight-normalised head output layer (ViT-B recipe)")
    a("--grad-checkpointing", action="store_true", help="recompute block activations: large per-GPU batches")
    a("--compile", action="store_true", help="torch.compile the backbone (checkpoints stay prefix-free)")
    # Optimisation.
    a("--epochs", type=int, default=None, help="training epochs (100 on real data)")
    a("--warmup-epochs", type=int, default=None, help="linear lr warm-up (10 in the 100-epoch recipes)")
    a("--batch-size", type=int, default=None, help="GLOBAL batch over all ranks (SER's runs: 2048)")
    a("--lr", type=float, default=None, help="peak lr per 256 images; the run uses lr * batch / 256")
    a("--min-lr", type=float, default=None, help="lr at the end of the cosine, per 256 images like --lr")
    a("--weight-decay", type=float, default=None, help="AdamW weight decay at the start (cosine to --weight-decay-end)")
    a("--weight-decay-end", type=float, default=None, help="cosine weight-decay target (DINO: 0.04 -> 0.4)")
    a("--momentum", type=float, default=None, help="EMA start (cosine to 1); DINO README: 0.9995 for batch 256")
    a("--clip-grad", type=float, default=None, help="DINO clips each parameter's gradient norm (3.0); 0 = off")
    a("--temperature", type=float, default=None, help="MoCo v3 / SimCLR temperature")
    a("--teacher-temp", type=float, default=None, help="DINO teacher temperature after warm-up (0.04; built-in data "
      "0.01); above 0.07 is often unstable; the boosted ViT-S run uses 0.07")
    a("--warmup-teacher-temp", type=float, default=None, help="DINO teacher temperature at the start of its warm-up")
    a("--warmup-teacher-temp-epochs", type=int, default=0,
      help="DINO: epochs of linear warm-up to --teacher-temp (0 = none; SER's DINO runs: 10)")
    a("--freeze-last-layer", type=int, default=None,
      help="DINO: epochs with the head's last layer frozen (1; 0 on the built-in data)")
    a("--precision", default="auto", choices=vit.PRECISIONS,
      help="autocast dtype; auto: bf16 on GPUs and on CPUs with native bf16 (AVX512_BF16 or AMX), else fp32")
    # Runtime.
    a("--output-dir", default="runs/default", help="checkpoints, logs; an existing checkpoint is resumed")
    a("--seed", type=int, default=0, help="seed of the initial weights, the data order and every augmentation")
    a("--log-every", type=int, default=10, help="steps between progress lines; raise it when steps are fast")
    a("--knn-every", type=int, default=None,
      help="epochs between k-NN monitors, and the last epoch (0 = off; 1 on real data, 2 on the built-in data)")
    a("--knn-train-size", type=int, default=None, help="train images in the k-NN monitor's memory bank")
    a("--knn-val-size", type=int, default=None, help="val images the k-NN monitor classifies")
    a("--stop-at-step", type=int, default=None,
      help="save and exit at this step (time-limited jobs); rerun without it, or with a later one, to resume")
    a("--benchmark", type=int, default=0, metavar="STEPS",
      help="time STEPS steps from initialisation (and as many of bare compute, the floor), then exit; a "
           "checkpoint in --output-dir is neither resumed nor changed")
    a("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (H100 SXM bf16 dense: 989)")
    a("--count-flops", action="store_true",
      help="print the FLOPs per image of a training step, with and without the add-on (meta device), then exit")
    return p


def resolve_config(args):
    """Fill unset options from the method's recipe and the data's scale; refuse bad combinations."""
    addons = [name for name in ADDONS if getattr(args, name)]
    if len(addons) > 1:
        raise SystemExit(f"error: one add-on at a time, got --{' --'.join(addons)}")
    args.addon = addons[0] if addons else None
    augment.refuse_ignored_flags(args, get_args_parser(), [(k, used(args), by) for k, (by, used) in ONLY_FOR.items()],
                                 prefix="error: ")
    given = {k for k, v in vars(args).items() if v is not None}  # the rest come from the recipe: said in errors

    def shown(k):
        return f"--{k.replace('_', '-')} {getattr(args, k):g}" + ("" if k in given else " (the default here)")
    args.data = vit.data_location(args.data)  # recorded where it is: a resume from another folder reads the same data
    synthetic = args.data == "synthetic"
    lam, tau = SER_DEFAULTS[args.method] if args.addon == "ser" else ADDON_DEFAULTS[args.addon]
    cores = max(1, (os.cpu_count() or 2) // losses.launch_env()[1])  # this rank's share
    # With 2 cores or fewer per rank a loader worker takes the step's own cores (README, Cost).
    workers = min(8, cores) if torch.cuda.is_available() or cores > 2 else 0
    defaults = {"ser_ratio": 0.01, **METHOD_DEFAULTS[args.method],  # SER's b2 share: the release's 3 of 256
                **(SYNTHETIC_DEFAULTS if synthetic else REAL_DEFAULTS),
                **(SYNTHETIC_METHOD_DEFAULTS.get(args.method, {}) if synthetic else {}),
                "equiv_lambda": lam, "equiv_tau": tau, "num_workers": workers}
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    augment.check_ranges([(f"--{k.replace('_', '-')}", getattr(args, k), ok, want) for k, (ok, want) in RANGES.items()],
                         prefix="error: ")
    augment.refuse_output_in_data(args.data, args.output_dir, prefix="error: ")
    depth = args.depth or 12
    ser = args.addon == "ser"  # L_equiv acts before the last block: --equiv-layer up to depth - 1
    if args.equiv_layer is None:
        args.equiv_layer = 3 if ser else depth
    multicrop = "DINO" if args.method == "dino" else "MoCo v3"
    refusals = [  # in this order
        (args.count_flops and args.benchmark, "--count-flops and --benchmark each end the run; pass one"),
        (args.count_flops and losses.launch_env()[1] > 1,
         "--count-flops counts one process's step (set its --batch-size); run it without torchrun"),
        (args.synthetic_length and not synthetic,
         f"--synthetic-length sets the built-in data's size, not that of --data {args.data}"),
        # else the warm-up never ends, or the last layer never trains (a default of 1 stays allowed for --epochs 1)
        *[((args.method == "dino" or k == "warmup_epochs") and not 0 <= getattr(args, k) <= most,
           f"{shown(k)} must be in 0..{most} (--epochs {args.epochs})")
          for k, most in (("warmup_epochs", args.epochs), ("warmup_teacher_temp_epochs", args.epochs),
                          ("freeze_last_layer", args.epochs - ("freeze_last_layer" in given)))],
        (args.min_lr > args.lr, f"{shown('min_lr')} must not exceed {shown('lr')}"),  # the cosine would climb
        (not (all(map(math.isfinite, args.ser_scale)) and 0 < args.ser_scale[0] <= args.ser_scale[1] <= 4),
         f"--ser-scale needs 0 < min <= max <= 4 (b2 grids up to twice the crop's side), got {args.ser_scale}"),
        (ser and depth < 2, f"--ser needs at least 2 blocks (L_equiv acts before the last), got --depth {depth}"),
        (not 1 <= args.equiv_layer <= depth - ser,
         f"--equiv-layer must be in 1..{depth - ser} for a depth-{depth} ViT, got {args.equiv_layer}"
         + ("" if "equiv_layer" in given else " (the default with --ser)")),
        (args.n_local_crops and args.method not in ("dino", "mocov3"),
         f"--n-local-crops: multi-crop is not part of the official {args.method} recipe (only DINO's and SER's "
         "MoCo v3 '2+4 views' use it)"),
        (args.n_local_crops and args.addon in ("equimod", "augself") + (("essl",) if args.method == "dino" else ()),
         f"--{args.addon} with {multicrop} multi-crop is not supported; use --n-local-crops 0"),
        (ser and args.method == "mocov3" and args.n_local_crops % 2,
         f"--n-local-crops {args.n_local_crops}: SER's MoCo v3 multi-crop takes its b2 pairs from every other "
         "local crop (#0, #2, ..), each view joining one local stream; use an even number"),
        (args.img_size % args.patch_size,
         f"--img-size {args.img_size} is not divisible by --patch-size {args.patch_size}"),
    ]
    for refused, message in refusals:
        if refused:
            raise SystemExit(f"error: {message}")
    if ser:
        check_ser_split(args, build_recipe(args))
    return args


# ============ the step: a StepBatch of views -> student and teacher -> losses -> update ============

def build_recipe(args):
    # SimCLR has no entry: it uses the asymmetric BYOL recipe, as MoCo v3's ViT comparisons do.
    return augment.recipe_for(args.method if args.method != "simclr" else "byol", img_size=args.img_size,
                              n_local=args.n_local_crops, extra=args.addon if args.addon != "ser" else None,
                              crop_min=args.crop_min, patch_size=args.patch_size)


def ser_groups(global_batch, chunk, ratio, min_images):
    """SER's b2 groups, [start, stop) in the global batch: the tail of each near-equal chunk, as the release's 3
    images of each GPU's 256 (aitrics-chris/SER main_moco.py), on any number of ranks."""
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


def check_ser_split(args, recipe):
    """SER's b2 groups and token grids, refused or described before the ranks meet (said once, by rank 0)."""
    groups = ser_groups(args.batch_size, args.ser_chunk, args.ser_ratio, args.ser_min_images)
    if args.ser_chunk < args.batch_size and args.batch_size % args.ser_chunk and losses.launch_env()[0] == 0:
        print(f"note: --ser-chunk {args.ser_chunk} does not divide --batch-size {args.batch_size}: the b2 groups "
              f"come from chunks of {args.batch_size / len(groups):.3g} images ({len(groups)} of them)")
    grid = min(recipe.views[v].size // args.patch_size for v, _, _ in ser_pair_sources(args, recipe.photometric()))
    if grid < 2 or grid ** 2 * args.ser_scale[0] < 1:  # sample_element would round the grid up to one token
        raise SystemExit(f"error: --ser-scale {args.ser_scale[0]:g}: SER's {grid}x{grid}-token b2 crops would shrink "
                         "below one token" + (f"; pass at least {1 / grid ** 2:.3g}" if grid > 1 else
                                              "; pass a larger --img-size or a smaller --patch-size"))


def ser_pair_sources(args, photometric):
    """SER's b2 pairs of one image: (crop view, colour augmentation of each view, the streams the views
    join). Two views: global crop 0 with the global views' colours, streams 0 and 1 (aitrics-chris/SER
    builder/moco.py train_erl). MoCo v3 "2+4 views" (train_erl_local4): global crop 0 and local crops #0,
    #2, .. with the local crops' colours (the release's `etc`), streams (0, 1), (2, 3), (4, 5)."""
    if args.method == "mocov3" and args.n_local_crops:
        augs = (photometric[2],) * 2  # the local crops' colours
        return [(0, augs, (0, 1))] + [(2 + i, augs, (2 + i, 3 + i)) for i in range(0, args.n_local_crops, 2)]
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
    """What the student and teacher see at one step on this rank, and what the losses need. Streams:
    the invariance views, 2 global then the local ones; with SER, a stream that a b2 pair joins holds
    the b1 rows only (the b2 views follow in Student._b2)."""
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


def make_step_inputs(batch, photometric, step, args, rank, world, device):
    """The StepBatch of one step on this rank. Every random choice is a function of (seed, step) and of
    global image positions, never of the rank, so the number of ranks changes only float rounding."""
    # Colour on the device, drawn for the global batch and sliced; crop box and flip come from the workers.
    n_rank = batch["images"][0].shape[0]
    start = rank * n_rank
    views, view_params = [], []
    for v, (crops, aug) in enumerate(zip(batch["images"], photometric)):
        p = aug.sample_params(n_rank * world, augment.device_generator(args.seed, step, 0, v))
        p = {k: t[start:start + n_rank] for k, t in p.items()}  # CPU: apply() reads them without a sync
        views.append(augment.normalize(aug.apply(crops.to(device, non_blocking=True).float() / 255, p)))
        view_params.append({**{k: vit.to_device(t, device) for k, t in p.items()},
                            "crop": batch["crop"][v].to(device, non_blocking=True),
                            "flip": batch["flip"][v].to(device, non_blocking=True).float()})
    positions = torch.arange(start, start + n_rank)  # this rank's slice of the global batch (GlobalBatchSampler)
    n_streams = 2 + args.n_local_crops  # views in recipe order: the 2 globals, the locals, then E-SSL's small crop
    out = StepBatch(key=(args.seed, step), batch_size=n_rank * world, streams=views[:n_streams],
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
                gs = group_actions.sample_view_pair(hi - lo, gen, base_grid=base_grid, scale=tuple(args.ser_scale))
                colours = [{k: t[ours] for k, t in aug.sample_params(hi - lo, gen).items()} for aug in augs]
                crop = batch["images"][view][rows].to(device, non_blocking=True).float() / 255  # the common crop
                gs = [group_actions.select_samples(g_j, ours) for g_j in gs]
                xs = [augment.normalize(aug.apply(crop, p)) for aug, p in zip(augs, colours)]
                xs = [group_actions.apply_to_images(x, g_j, args.patch_size) for x, g_j in zip(xs, gs)]
                pairs.append(SERPair(*xs, *gs, base_grid, stream_pair))
            out.b2.append(SERGroupRows(g, torch.arange(a, b), pairs))
        b1 = (~is_b2).nonzero().flatten()
        order = torch.cat([b1, is_b2.nonzero().flatten()])  # b1 rows, then b2 rows group by group
        paired = {s for _, _, pair in sources for s in pair}
        rows_of = [b1 if v in paired else order for v in range(n_streams)]
        out.streams = [x[vit.to_device(r, device)] for x, r in zip(out.streams, rows_of)]
        out.stream_positions = [positions[r] for r in rows_of]
    if args.addon == "equimod":
        out.plain = augment.normalize(batch["plain"].to(device, non_blocking=True))
        out.equimod_params = torch.cat([losses.equimod_param_vector(p) for p in view_params[:2]])
    if args.addon == "essl":
        out.essl, out.essl_labels = losses.essl_rotations(views[-1])
    return out


def run_head(head, views, joint):
    """head on each view's (N_v, D) rows. joint: one call on all views, so a head's BatchNorm normalises them
    together, as DINO's MultiCropWrapper (facebookresearch/dino utils.py) and SimCLR's release (google-research/
    simclr model.py: the views concatenated along the batch) do; MoCo v3, BYOL, Barlow Twins and VICReg call theirs
    per view."""
    if joint:
        return list(head(torch.cat(views)).split([v.shape[0] for v in views]))
    return [head(v) for v in views]


class Student(nn.Module):
    """Backbone + the method's heads + the add-on head: everything that trains, behind one forward
    (so DDP sees every parameter used in the step)."""

    def __init__(self, backbone, projector, predictor=None, addon=None, addon_head=None, addon_layer=None,
                 joint_head=False):
        super().__init__()
        self.backbone, self.projector, self.predictor, self.joint_head = backbone, projector, predictor, joint_head
        self.addon, self.addon_head = addon, addon_head
        self.addon_layer = addon_layer  # None: the add-on reads the final [CLS]; l: the raw [CLS] of block l
        self.addon_key = "cls" if addon_layer is None else "cls_at_layer"
        self.stochastic_depth = any(isinstance(m, vit.DropPath) and m.p > 0 for m in backbone.modules())

    def _features(self, batch, call, x, positions, n_sets=1, layer=None):
        """One backbone call on rows that are images `positions` of the global batch, the k-th copy of
        each in row block k. Stochastic depth draws its keep flags for every row of the global call from
        (seed, step, call) and keeps ours, so the masks do not depend on the number of ranks."""
        if self.stochastic_depth:
            torch.manual_seed(augment.seed_from("drop-path", *batch.key, call))
            n = batch.batch_size
            self.backbone.drop_path_rows = (torch.cat([k * n + positions for k in range(n_sets)]), n_sets * n)
        try:
            return self.backbone.forward_features(x, layer=layer)
        finally:
            self.backbone.drop_path_rows = None

    def forward(self, batch):
        """batch: a StepBatch. Returns {'proj': per stream (N_v, d), 'pred', and the add-on's: 'ser': per b2 pair,
        its losses.SERGroup list; 'equimod': (y_t, y_hat_t); 'augself': predictions; 'essl': rotation logits}."""
        globals_, locals_ = batch.streams[:2], batch.streams[2:]
        sizes = [v.shape[0] for v in globals_]
        # One call per resolution: EquiMod's un-augmented view has the global size, so it joins the views.
        # Every global stream holds the same rows here except with SER (b1 only in the paired streams).
        x = torch.cat(globals_ if batch.plain is None else [*globals_, batch.plain])
        out = self._features(batch, "global", x, batch.stream_positions[0],
                             n_sets=len(globals_) + (batch.plain is not None), layer=self.addon_layer)
        n_views = sum(sizes)
        cls = list(out["cls"][:n_views].split(sizes))  # per view (N_v, D)
        represent = out[self.addon_key]  # what EquiMod/AugSelf read, ((2 [+1]) * B, D)
        if locals_:
            out = self._features(batch, "local", torch.cat(locals_), batch.stream_positions[2], n_sets=len(locals_))
            cls += list(out["cls"].split([v.shape[0] for v in locals_]))
        res = {}
        if self.addon == "ser":
            cls, res["ser"] = self._b2(batch, cls)
        res["proj"] = run_head(self.projector, cls, self.joint_head)
        if self.predictor is not None:
            res["pred"] = [self.predictor(z) for z in res["proj"]]
        if self.addon == "equimod":
            res["equimod"] = self.addon_head(represent[n_views:], represent[:n_views], batch.equimod_params)
        elif self.addon == "augself":
            res["augself"] = self.addon_head(*represent[:n_views].split(sizes))
        elif self.addon == "essl":
            out = self._features(batch, "essl", batch.essl, batch.stream_positions[0], n_sets=4, layer=self.addon_layer)
            res["essl"] = self.addon_head(out[self.addon_key])
        return res

    def _b2(self, batch, cls):
        """SER's b2 views, one backbone call each (the grids differ): their [CLS] rows join the invariance streams
        after the b1 rows, their token maps go through SER's projector into losses.SERGroup, one list per pair."""
        layer = self.backbone.cls_after_block
        extra = [[] for _ in cls]  # per stream: the b2 [CLS] rows, group by group
        pairs = [[] for _ in batch.ser_pairs]
        for group in batch.b2:
            for k, pair in enumerate(group.pairs):
                maps = []
                for j, (x, stream) in enumerate(zip((pair.x1, pair.x2), pair.streams)):
                    out = self._features(batch, ("ser", group.index, k, j), x, group.positions, layer=layer)
                    extra[stream].append(out["cls"])
                    maps.append(self.addon_head(out["token_map"]))  # (n, C, h_j, w_j)
                pairs[k].append(losses.SERGroup(*maps, pair.g1, pair.g2, pair.base_grid, group.positions))
        if not batch.b2:
            # No b2 image on this rank: an empty call per pair keeps SER's parameters in the step (DDP
            # expects a gradient for each, zero here) and ser_loss's collectives in step with the ranks.
            for k, (base_grid, _) in enumerate(batch.ser_pairs):
                x = batch.streams[0].new_zeros(0, 3, *(g * self.backbone.patch_size for g in base_grid))
                z = self.addon_head(self.backbone.forward_features(x, layer=layer)["token_map"])
                pairs[k].append(losses.SERGroup(z, z, None, None, base_grid, torch.zeros(0, dtype=torch.long)))
        return [torch.cat([c, *e]) for c, e in zip(cls, extra)], pairs


class Teacher(nn.Module):
    """EMA copy of backbone + projector (MoCo v3 momentum encoder, DINO teacher, BYOL target), on Student's streams."""

    def __init__(self, backbone, projector, joint_head=False):
        super().__init__()
        self.backbone, self.projector, self.joint_head = backbone, projector, joint_head

    @torch.no_grad()
    def forward(self, batch):
        globals_ = batch.streams[:2]
        cls = [[c] for c in self.backbone(torch.cat(globals_)).split([v.shape[0] for v in globals_])]
        layer = self.backbone.cls_after_block  # b2 calls ask for SER's token map, as Student._b2 (compile_backbones)
        for group in batch.b2:
            for pair in group.pairs:
                for x, stream in zip((pair.x1, pair.x2), pair.streams):
                    if stream < len(cls):
                        cls[stream].append(self.backbone.forward_features(x, layer=layer)["cls"])
        return run_head(self.projector, [torch.cat(c) for c in cls], self.joint_head)


def build_models(args):
    arch = dict(name=args.arch, img_size=args.img_size, patch_size=args.patch_size, drop_path_rate=args.drop_path,
                cls_after_block=args.equiv_layer if args.addon == "ser" else 0)
    if args.depth:
        arch["depth"] = args.depth
    if args.method == "mocov3":  # MoCo v3's ViT recipe: fixed sin-cos positions, frozen random patch projection
        arch.update(pos_embed="sincos", stop_grad_conv1=True, weight_init="moco")
    if args.weight_init:
        arch.update(pos_embed="sincos" if args.weight_init == "moco" else "learned", weight_init=args.weight_init)
    backbone = vit.build_vit(arch)
    backbone.grad_checkpointing = args.grad_checkpointing
    D = backbone.embed_dim
    head_kw = dict(norm_last_layer=args.norm_last_layer, use_bn=args.use_bn_in_head) if args.method == "dino" else {}
    projector, predictor = losses.build_heads(args.method, D, hidden_dim=args.head_hidden, out_dim=args.head_out,
                                              **head_kw)
    addon_layer = None if args.addon in (None, "ser") or args.equiv_layer == backbone.depth else args.equiv_layer
    addon_head = losses.SERProjector(D) if args.addon == "ser" else None
    if args.addon in ("equimod", "augself", "essl"):
        head = {"equimod": losses.EquiModHead, "augself": losses.AugSelfHead, "essl": losses.ESSLHead}[args.addon]
        addon_head = head(D, input_norm=addon_layer is not None)  # a decoupled layer's [CLS] is not normalised yet
    joint = args.method in JOINT_HEAD_METHODS
    student = Student(backbone, projector, predictor, args.addon, addon_head, addon_layer, joint)
    teacher = None
    if args.method in EMA_METHODS:
        # The teacher starts as a copy of the student, without stochastic depth (DINO). BYOL's
        # official target starts from its own random init; a copy is the MoCo/DINO convention.
        teacher_backbone = vit.build_vit({**backbone.arch, "drop_path_rate": 0.0})
        teacher_backbone.load_state_dict(backbone.state_dict())
        teacher = Teacher(teacher_backbone, deepcopy(projector), joint).requires_grad_(False)
    return student, teacher


def param_groups(student, method):
    """AdamW groups. DINO's rule everywhere (no decay on biases and 1-D tensors; pos_embed and cls_token
    are decayed), except MoCo v3, whose ViT recipe decays every parameter."""
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if p.requires_grad:
            (no_decay if method != "mocov3" and (p.ndim <= 1 or name.endswith(".bias")) else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False}]


def compute_losses(args, student_out, teacher_out, batch, dino_loss, epoch):
    """{'inv': invariance loss, 'equiv': add-on loss (unweighted)}, float32."""
    m, proj = args.method, student_out["proj"]
    if m == "mocov3":
        inv = losses.mocov3_loss(student_out["pred"], teacher_out, args.temperature)
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
        inv = losses.byol_loss(*student_out["pred"][:2], teacher_out[0], teacher_out[1])
    out = {"inv": inv}
    if args.addon == "ser":
        # One NT-Xent per pair over all its groups, summed over the pairs (three in MoCo v3's 2+4). The
        # release's erl_local4 (aitrics-chris/SER builder/moco.py) divides by and slices its (2T, 2T) token
        # similarities at the per-GPU *image* count where the token count T is meant; ser_loss is the mean
        # over all 2T anchors of the pair, the intended loss.
        out["equiv"] = sum(losses.ser_loss(groups, args.equiv_tau) for groups in student_out["ser"])
    elif args.addon == "equimod":
        out["equiv"] = losses.equimod_loss(*student_out["equimod"], args.equiv_tau)
    elif args.addon == "augself":
        out["equiv"] = losses.augself_loss(student_out["augself"], losses.augself_targets(*batch.view_params[:2]))
    elif args.addon == "essl":
        out["equiv"] = losses.essl_loss(student_out["essl"], batch.essl_labels)
    return out


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


def clip_grad_per_param(params, max_norm):
    """DINO's clipping: each parameter's gradient separately scaled to norm <= max_norm (not a global
    norm). Fused over tensors and free of host syncs."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        norms = torch.stack(torch._foreach_norm(grads))  # (P,): the scales in 2 ops, not 3 per parameter
        torch._foreach_mul_(grads, (max_norm / (norms + 1e-6)).clamp_(max=1.0).unbind())


def train_step(batch, step, steps_per_epoch, student, teacher, dino_loss, optimizer, scaler, args, precision):
    """One optimisation step on a StepBatch (`student` may be wrapped in DDP): L_inv + lambda * L_equiv,
    DINO's clipping and frozen last layer, AdamW, the EMA. The detached loss terms, without a host sync."""
    epoch = step // steps_per_epoch
    total, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    # lr and min_lr are per 256 images; pure functions of the step, so a resumed run needs nothing but the step
    lr = cosine_schedule(step, total, args.lr * args.batch_size / 256, args.min_lr * args.batch_size / 256, warmup)
    wd = cosine_schedule(step, total, args.weight_decay, args.weight_decay_end)
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = lr, wd if group["apply_wd"] else 0.0
    with vit.autocast(batch.streams[0].device, precision):
        student_out = student(batch)
        teacher_out = teacher(batch) if teacher is not None else None
    terms = compute_losses(args, student_out, teacher_out, batch, dino_loss, epoch)
    loss = terms["inv"] + args.equiv_lambda * terms["equiv"] if "equiv" in terms else terms["inv"]
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if args.clip_grad:
        clip_grad_per_param([p for group in optimizer.param_groups for p in group["params"]], args.clip_grad)
    raw = getattr(student, "module", student)  # the Student inside DDP
    if args.method == "dino" and epoch < args.freeze_last_layer:
        for p in raw.projector.last_layer.parameters():  # DINO: the head's last layer stays fixed at first
            p.grad = None
    scaler.step(optimizer)
    scaler.update()
    if teacher is not None:
        with torch.no_grad():  # teacher = m * teacher + (1 - m) * student, as one pass over both (mul + add took two)
            m = ema_momentum(step, total, args.momentum)
            torch._foreach_lerp_(list(teacher.parameters()), [*raw.backbone.parameters(), *raw.projector.parameters()],
                                 1 - m)
    return {k: v.detach() for k, v in {"loss": loss, **terms}.items()}


# ============ the run around the step: data order, checkpoints, logs, signals ============

class GlobalBatchSampler(Sampler):
    """Rank r's batch is the r-th slice of the single-process global batch, one permutation per epoch from
    (seed, epoch), the tail dropped (DistributedSampler, drop_last=True); `start_step` resumes an epoch."""

    def __init__(self, dataset_len, global_batch, rank, world, seed):
        if global_batch % world or global_batch < 2 * world:
            raise SystemExit(f"error: --batch-size {global_batch} is the global batch and must divide over the "
                             f"{world} ranks, at least 2 images each; use a multiple of {world}")
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


@contextmanager
def exit_on_value_error():
    """A ValueError of the helpers (a bad checkpoint or data) ends the run with its message: one line, no traceback."""
    try:
        yield
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def resume(args, saved, total_steps, train_images, precision, device):
    """The step of <output-dir>/checkpoint.pth, its state loaded into `saved` (name -> object, as DINO's
    restart_from_checkpoint), and log.jsonl cut back to it; 0 without one (log.jsonl emptied), and in a
    benchmark, which leaves a run's files alone."""
    path = os.path.join(args.output_dir, "checkpoint.pth")
    if args.benchmark:
        return 0
    if not os.path.lexists(path) and os.path.lexists(os.path.join(args.output_dir, "backbone.pth")):
        raise SystemExit(f"error: {args.output_dir} holds a backbone.pth but no checkpoint.pth: another run's result, "
                         "which this run would overwrite; use another --output-dir or move backbone.pth away")
    step = 0
    if os.path.lexists(path):  # lexists: a link to a missing file is an error, not a new run
        step = load_run_state(path, args, saved, total_steps, train_images, precision, device)
    write_on_rank0(vit.restart_log, os.path.join(args.output_dir, "log.jsonl"), step)
    return step


def load_run_state(path, args, saved, total_steps, train_images, precision, device):
    with exit_on_value_error():
        ckpt = vit.load_resumable(path, args, ("step", *saved), "pretrain.py", RUNTIME_OPTIONS, map_location=device)
    refuse_altered_values(path, ckpt, {"train_images": (lambda v: type(v) is int, "a count of images")})
    if ckpt.get("train_images", train_images) != train_images:  # the data order and the schedule depend on it
        raise SystemExit(f"error: --data {args.data} holds {train_images} training images, {ckpt['train_images']} "
                         f"when {path} was written: the run cannot continue on it; use another --output-dir")
    refuse_altered_values(path, ckpt, {
        "step": (lambda v: type(v) is int and 0 <= v <= total_steps, f"a step of this run (0..{total_steps})"),
        "total_steps": (lambda v: type(v) is int and v == total_steps, f"this run's {total_steps}"),
        "precision": (lambda v: v in vit.PRECISIONS[1:], " or ".join(vit.PRECISIONS[1:])),  # as resolved
        "joint_heads": (lambda v: type(v) is bool, "True or False")})
    # --precision auto resolves per machine: the precision computed in is compared (older checkpoints: the flag)
    before, now = (ckpt["precision"], precision) if "precision" in ckpt else (ckpt["args"]["precision"], args.precision)
    if before != now:
        raise SystemExit(f"error: {path} was trained in {before}, this run would use {now} (--precision "
                         f"{args.precision}); pass --precision {before} to continue, or use another --output-dir")
    if ckpt.get("joint_heads", False) != (args.method in JOINT_HEAD_METHODS):  # older checkpoints: per view
        raise SystemExit(f"error: {path} was trained with the head called on each view apart, which --method "
                         f"{args.method} no longer does (run_head): the run cannot continue; use another --output-dir")
    refuse_unusable_weights(path, ckpt, saved)
    for name, obj in saved.items():
        if obj is not None:
            try:
                obj.load_state_dict(ckpt[name])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:  # e.g. written by another version
                raise SystemExit(f"error: {path}: its {name} does not fit this run ({type(e).__name__}); move it "
                                 "away or use another --output-dir") from None
    optimizer = saved["optimizer"]  # a moment of another shape would crash the fused AdamW step outright
    if any(torch.is_tensor(s) and s.dim() and s.shape != p.shape for group in optimizer.param_groups
           for p in group["params"] for s in optimizer.state.get(p, {}).values()):
        raise SystemExit(f"error: {path}: its optimizer state does not fit this run's parameters; move it away or "
                         "use another --output-dir")
    # Every step fills AdamW's state, except steps that fp16's loss scaler skips (non-finite gradients).
    if ckpt["step"] and not optimizer.state and not saved["scaler"].is_enabled():
        raise SystemExit(f"error: {path}: its optimizer state is empty at step {ckpt['step']} (AdamW's moments would "
                         "start again from zero); move it away or use another --output-dir")
    losses.log(f"resumed from {path} at step {ckpt['step']}")
    if ckpt["step"] >= total_steps:
        # A finished run: a kill between its last two writes left backbone.pth stale or missing. Cut out of the
        # weights as loaded (checked), with this run's architecture and evaluated network, as save_checkpoint does.
        state = checkpoint_state(args, ckpt["step"], total_steps, saved, train_images, precision)
        write_on_rank0(export_backbone, os.path.join(args.output_dir, "backbone.pth"), state)
        losses.log(f"the run had finished; backbone.pth exported again from {path}")
    if args.stop_at_step is not None and args.stop_at_step <= ckpt["step"] < total_steps:  # finished: nothing to do
        raise SystemExit(f"error: --stop-at-step {args.stop_at_step} is not after the resumed step {ckpt['step']}")
    return ckpt["step"]


def refuse_altered_values(path, ckpt, expected):
    """Values save_checkpoint never writes (an altered file), which would resume wrongly or stop in a traceback later.
    expected: key -> (ok(value), what it must be); a key the checkpoint lacks (an older version) is not checked."""
    for key, (ok, want) in expected.items():
        value = ckpt.get(key)
        if key in ckpt and not (isinstance(value, (bool, int, str)) and ok(value)):  # a tensor would compare per item
            plain = value is None or type(value) in (bool, int, float, str)
            raise SystemExit(f"error: {path}: its {key} is {repr(value) if plain else 'a ' + type(value).__name__}, "
                             f"not {want}; move it away or use another --output-dir")


def refuse_unusable_weights(path, ckpt, saved):
    """Weights that save_checkpoint never writes: non-finite ones (it refuses them; every rerun would stop again)
    or of another dtype (load_state_dict would cast them, and the resumed run would no longer replay the run)."""
    for part in ("student", "teacher"):
        if saved[part] is None or not isinstance(ckpt[part], dict):
            continue  # load_state_dict reports what does not fit
        own = saved[part].state_dict()
        other = [k for k, v in ckpt[part].items() if k in own and torch.is_tensor(v) and v.dtype != own[k].dtype]
        if other:
            raise SystemExit(f"error: {path}: its {part} holds {ckpt[part][other[0]].dtype} weights where this run "
                             f"keeps {own[other[0]].dtype} ({other[0]}); move it away or use another --output-dir")
        with exit_on_value_error():
            vit.refuse_non_finite(path, ckpt[part])


def checkpoint_note(args, saved_step):
    """What is on disk, said truthfully in every error that stops the run."""
    return (f"the last checkpoint, at step {saved_step}, in {args.output_dir}/checkpoint.pth is intact"
            if saved_step is not None else f"no checkpoint was written to {args.output_dir}")


def checkpoint_state(args, step, total_steps, saved, train_images, precision):
    """Everything a resume reads, and what backbone.pth is cut from (eval_key: the network the method evaluates)."""
    return {"args": vars(args), "arch": saved["student"].backbone.arch, "step": step, "total_steps": total_steps,
            "train_images": train_images, "precision": precision, "joint_heads": args.method in JOINT_HEAD_METHODS,
            "eval_key": "teacher" if args.method == "dino" else "student",
            **{name: obj.state_dict() if obj is not None else None for name, obj in saved.items()}}


def save_checkpoint(args, step, total_steps, saved, train_images, precision, note):
    """checkpoint.pth with every object of `saved`, then backbone.pth cut out of it. Non-finite weights
    are never written (a loss is checked only at log steps, the one logged is from before the last
    update); every rank checks its equal weights, so all stop together."""
    state = checkpoint_state(args, step, total_steps, saved, train_images, precision)
    weights = [v for part in ("student", "teacher") if state[part] is not None
               for v in state[part].values() if v.is_floating_point()]
    if not bool(torch.stack([torch.isfinite(t).all() for t in weights]).all()):  # one host sync
        raise SystemExit(f"error: non-finite weights at step {step}; {note}. {DIVERGED}")
    write_on_rank0(vit.save_atomic, os.path.join(args.output_dir, "checkpoint.pth"), state)
    write_on_rank0(export_backbone, os.path.join(args.output_dir, "backbone.pth"), state)


def export_backbone(path, state):
    """A checkpoint state's evaluated backbone (state['eval_key']), in bare timm key format with its architecture."""
    backbone = {k[len("backbone."):]: v for k, v in state[state["eval_key"]].items() if k.startswith("backbone.")}
    vit.save_atomic(path, {"arch": state["arch"], "backbone": backbone, "method": state["args"]["method"],
                           "addon": state["args"]["addon"], "step": state["step"],
                           "total_steps": state.get("total_steps")})  # the evaluations note an unfinished run


def write_on_rank0(write, *args):
    """write(*args) on rank 0 alone; a failed write ends the run with one line naming the file."""
    if losses.rank() == 0:
        with vit.exit_on_write_error("error: "):
            write(*args)


class Meter:
    """The loss terms between two log steps, averaged over steps and ranks: one line, one log.jsonl record.
    Log steps are step counts, never times, so a non-finite loss stops every rank at the same step."""

    def __init__(self, path, batch_size):
        self.path, self.batch_size, self.sums, self.steps, self.since = path, batch_size, {}, 0, time.time()
        self.warm = False  # the first write's steps include warm-up (allocator, autotuning, --compile)

    def add(self, terms):
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def write(self, step, epoch, total_steps, optimizer, note):
        mean = losses.all_reduce_sum(torch.stack(list(self.sums.values())) / self.steps) / losses.world_size()
        values = dict(zip(self.sums, mean.tolist()))  # waits for the device: log steps only
        if not all(math.isfinite(v) for v in values.values()):
            raise SystemExit(f"error: non-finite loss at step {step} ({values}); {note}. {DIVERGED}")
        now = time.time()
        rate = self.steps * self.batch_size / (now - self.since)
        lr, wd = optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"]  # the decayed group
        eta = (total_steps - step) * self.batch_size / max(rate, 1e-9)
        speed = f"{rate:.1f} img/s ETA {eta / 60:.1f} min" if self.warm else f"{rate:.1f} img/s with warm-up"
        losses.log(f"epoch {epoch} step {step}/{total_steps} " + " ".join(f"{k} {v:.4f}" for k, v in values.items())
                   + f" lr {lr:.3g} {speed}")
        self.warm = True
        write_on_rank0(vit.append_jsonl, self.path,
                       {"step": step, "epoch": epoch, "lr": lr, "wd": wd, "img_per_s": rate, **values})
        self.sums, self.steps, self.since = {}, 0, now


def load_split(args, split, transform):
    return augment.build_dataset(args.data, split, transform, img_size=args.img_size, length=args.synthetic_length)


def build_data(args, recipe, rank, world, device):
    """The training views of --data (their crops and flips made in the loader workers), batched by rank."""
    with exit_on_value_error():
        dataset = augment.MultiViewDataset(load_split(args, "train", None), recipe, seed=args.seed)
    if len(dataset) < args.batch_size:
        raise SystemExit(f"error: {args.data} has {len(dataset)} training images, fewer than --batch-size "
                         f"{args.batch_size}")
    sampler = GlobalBatchSampler(len(dataset), args.batch_size, rank, world, args.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.num_workers > 0, worker_init_fn=augment.ignore_stop_signals)
    return dataset, sampler, loader


KNN_KEEP_BYTES = 2 ** 30  # the largest built-in k-NN split kept in memory as float32 images


def knn_data(args, rank, world):
    """The k-NN monitor's bank and val loaders, built once per run: the built-in val split, the user's val/
    folder, or a slice of train. The built-in images are rendered once and kept (37 MB at the defaults):
    each evaluation then only runs the backbone, in less than half the time."""
    transform = augment.eval_transform(args.img_size)
    with exit_on_value_error():  # the tree may have changed since build_data read it
        train = load_split(args, "train", transform)
    # Fixed random subsets: ImageFolder is sorted by class and the synthetic labels cycle with the index,
    # so a prefix or a stride would keep only some of the classes.
    def subset(n, size, exclude=()):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
        return sorted([i for i in perm if i not in exclude][:size])
    try:
        val = load_split(args, "val", transform)
        train_idx, val_idx = subset(len(train), args.knn_train_size), subset(len(val), args.knn_val_size)
    except (FileNotFoundError, ValueError) as e:
        if os.path.lexists(os.path.join(args.data, "val")):  # a val/ that cannot be read is an error, not absent
            raise SystemExit(f"error: {e}") from None
        val = train  # no val split on disk: hold out train images the bank does not hold
        train_idx = subset(len(train), min(args.knn_train_size, len(train) // 2))
        val_idx = subset(len(train), args.knn_val_size, exclude=set(train_idx))
        losses.log(f"k-NN monitor: --data {args.data} has no val/; it classifies {len(val_idx)} held-out train images")
    with exit_on_value_error():
        augment.check_same_classes(train, val, args.data)  # labels are class positions in both splits
    if train.num_classes < 2:  # one class: a k-NN top-1 of 100% that says nothing
        raise SystemExit(f"error: --data {args.data} has one class; the k-NN monitor needs two: pass --knn-every 0")
    def loader(dataset, idx):
        part, workers = Subset(dataset, idx), args.num_workers
        if args.data == "synthetic" and len(idx) * 3 * args.img_size ** 2 * 4 <= KNN_KEEP_BYTES:
            images, labels = zip(*(part[i] for i in range(len(part))))
            part, workers = TensorDataset(torch.stack(images), torch.tensor(labels)), 0
        return augment.make_loader(WithIndex(part), 256, rank, world, workers)
    if len(train_idx) < args.knn_train_size or len(val_idx) < args.knn_val_size:  # k-NN numbers depend on both
        losses.log(f"note: the k-NN monitor has {len(train_idx)} bank and {len(val_idx)} val images, fewer than "
                   f"--knn-train-size {args.knn_train_size} / --knn-val-size {args.knn_val_size}: --data has no more")
    return loader(train, train_idx), loader(val, val_idx), train.num_classes


def log_knn(args, backbone, knn, step, epoch, device):
    acc = knn_eval(backbone, *knn, device)
    losses.log(f"{'initialisation' if step == 0 else f'epoch {epoch}'}: k-NN top-1 {acc['top1']:.2f} "
               f"{top5_text(acc['top5'])}")
    write_on_rank0(vit.append_jsonl, os.path.join(args.output_dir, "log.jsonl"),
                   {"step": step, "epoch": epoch, "knn_top1": acc["top1"], "knn_top5": acc["top5"],
                    "knn_images": [len(knn[0].dataset), len(knn[1].dataset)]})  # bank, val: a resume may change them


def compile_backbones(student, teacher):
    """--compile: the training calls of both backbones, with static shapes. SER's b2 calls (a new grid every
    step, the only calls asking for SER's split) and eval mode run eagerly, so nothing recompiles.
    Compiling the bound method keeps the state-dict keys bare."""
    for backbone in [student.backbone] + ([teacher.backbone] if teacher is not None else []):
        eager, compiled = backbone.forward_features, torch.compile(backbone.forward_features, dynamic=False)

        def forward_features(x, layer=None, backbone=backbone, eager=eager, compiled=compiled):
            b2 = backbone.cls_after_block and layer == backbone.cls_after_block
            return (compiled if backbone.training and not b2 else eager)(x, layer=layer)

        backbone.forward_features = forward_features


def resolve_precision(requested, device):
    try:
        precision = vit.resolve_precision(device, requested)
    except ValueError as e:
        raise SystemExit(f"error: --precision {requested}: {e}") from None
    if precision == "bf16" and device.type == "cpu" and not vit.cpu_has_native_bf16():
        losses.log("warning: --precision bf16 on a CPU without AVX512_BF16 or AMX: bf16 is emulated, matmuls run "
                   "~100x slower than in fp32; use --precision fp32")
    return precision


def knn_history(output_dir):
    """{step: (k-NN top-1, [bank, val] images)} of the monitor's records in log.jsonl, in the order written (a resumed
    run's included)."""
    knn, log_path = {}, os.path.join(output_dir, "log.jsonl")
    if os.path.exists(log_path):
        with open(log_path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                    knn[record["step"]] = (float(record["knn_top1"]), record.get("knn_images"))
                except (ValueError, KeyError, TypeError, RecursionError):  # another record, a line cut short
                    pass
    return knn


def knn_due(args, step, steps_per_epoch, total_steps):
    """The monitor runs at the end of every --knn-every-th epoch and of the last one."""
    epoch, in_epoch = divmod(step, steps_per_epoch)
    return bool(args.knn_every) and in_epoch == 0 and (epoch % args.knn_every == 0 or step == total_steps)


def run_summary(output_dir, seconds, resumed_at=0, total_steps=None):
    """The end of a run in two lines: what the k-NN monitor saw (first and last entry of log.jsonl with the last's
    bank and val sizes, so a resumed run reports its whole history, and the step of the last when it is not the
    run's last: a resume may turn the monitor off) and the command to run next."""
    backbone, linear = (shlex.quote(os.path.join(output_dir, f)) for f in ("backbone.pth", "linear"))  # to paste
    history = knn_history(output_dir)
    sizes = list(history.values())[-1][1] if history else None
    knn = {step: top1 for step, (top1, images) in history.items() if images == sizes}  # comparable to the last
    steps, seen = list(knn), "k-NN monitor off"
    other = " (before it, the monitor had other --knn-train-size / --knn-val-size)" if len(knn) < len(history) else ""
    of_total = f" of {total_steps}" if steps and total_steps is not None and steps[-1] != total_steps else ""
    if len(steps) > 1:
        a, b = knn[steps[0]], knn[steps[-1]]
        # from a later step than 0: a log cut short or lost before the resume, or the monitor's sizes changed
        start = f" since step {steps[0]}{other}" if steps[0] or other else ""
        seen = (f"k-NN top-1 {a:.1f} -> {b:.1f} ({b - a:+.1f}){start}"
                + (f", last measured at step {steps[-1]}{of_total}" if of_total else ""))
    elif steps:
        seen = f"k-NN top-1 {knn[steps[0]]:.1f} at step {steps[0]}{of_total}{other}"
    since = f" since the resume at step {resumed_at}" if resumed_at else ""
    return (f"done: {seen} in {seconds / 60:.1f} min{since}; backbone: {backbone}\n"
            f"next: python linear_eval.py --pretrained {backbone} --cached --output-dir {linear}")


# ============ training ============

def train(args, measure=None, measured_source=None):
    """Pretrain as configured; measure: --benchmark's timing of this run's step instead of the loop, its results
    recorded as of measured_source."""
    # ============ preparing the run ============
    rank, world, device = losses.init_distributed()
    torch.manual_seed(augment.seed_from("init", args.seed))  # same initial weights on every rank
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ============ preparing data ============
    recipe = build_recipe(args)
    dataset, sampler, loader = build_data(args, recipe, rank, world, device)
    photometric = recipe.photometric()
    steps_per_epoch = len(dataset) // args.batch_size
    total_steps = args.epochs * steps_per_epoch

    # ============ building student and teacher networks ============
    student, teacher = build_models(args)
    student, teacher = student.to(device), teacher.to(device) if teacher is not None else None
    dino_loss = losses.DINOLoss(args.head_out or 65536).to(device) if args.method == "dino" else None

    # ============ preparing the optimizer and the precision ============
    # fused (torch >= 2.4, GPUs and CPUs): on CPU the for-loop AdamW took 5-10x longer (ViT-Ti/16, DINO's head)
    optimizer = torch.optim.AdamW(param_groups(student, args.method), lr=0.0, weight_decay=0.0, fused=True)
    precision = resolve_precision(args.precision, device)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    # ============ optionally resuming training ============
    written = ("benchmark.json",) if args.benchmark else ("config.json", "log.jsonl", "checkpoint.pth", "backbone.pth")
    vit.make_output_dir(args.output_dir, prefix="error: ", outputs=written, lock=rank == 0,
                        sources=[measured_source] if measured_source else None)
    losses.barrier()  # the others read the folder once rank 0 holds it: a run ending meanwhile changes its checkpoint
    saved = dict(student=student, teacher=teacher, dino_loss=dino_loss, optimizer=optimizer, scaler=scaler)
    start_step = resume(args, saved, total_steps, len(dataset), precision, device)
    losses.refuse_disagreement(total_steps, "the total steps (pass the same flags to every node)")
    losses.refuse_disagreement(start_step, "the step to resume from (--output-dir must be one folder every node sees)")

    # ============ compiling, describing the run, wrapping the student for DDP ============
    if args.compile:
        compile_backbones(student, teacher)
    losses.log(f"{args.method}{' + ' + args.addon if args.addon else ''} on {args.data} ({len(dataset)} images): "
               f"{world} rank(s) on {device}, {precision}, global batch {args.batch_size} ({sampler.local_batch} per "
               f"rank), lr {args.lr * args.batch_size / 256:.3g} (= {args.lr:g} x batch / 256), {steps_per_epoch} "
               f"steps/epoch, {total_steps} steps")
    losses.log(f"trainable parameters: {sum(p.numel() for p in student.parameters() if p.requires_grad) / 1e6:.2f}M; "
               f"weight decay on {len(optimizer.param_groups[0]['params'])} tensors, "
               f"none on {len(optimizer.param_groups[1]['params'])}")
    if not args.benchmark and start_step < total_steps:  # a finished run's rerun computes nothing: its config stays
        write_on_rank0(vit.save_atomic, os.path.join(args.output_dir, "config.json"),
                       {"argv": sys.argv, "world_size": world, "precision_used": precision, **vars(args)})
    losses.log(json.dumps(vars(args)))
    ddp_student = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else student
    step_fn = functools.partial(train_step, steps_per_epoch=steps_per_epoch, student=ddp_student, teacher=teacher,
                                dino_loss=dino_loss, optimizer=optimizer, scaler=scaler, args=args, precision=precision)
    if measure is not None:
        return measure(args, step_fn, photometric, loader, sampler, dataset, device, precision, rank, world)

    # ============ training loop ============
    evaluated = (teacher if args.method == "dino" else student).backbone  # what backbone.pth holds
    knn = knn_data(args, rank, world) if args.knn_every else None
    if start_step == 0 and args.knn_every:
        log_knn(args, evaluated, knn, 0, -1, device)  # the network at initialisation: the baseline
    elif knn_due(args, start_step, steps_per_epoch, total_steps) and start_step not in knn_history(args.output_dir):
        # A signal stopped the run where the monitor was due (every rank reads the log, as it read the checkpoint).
        log_knn(args, evaluated, knn, start_step, start_step // steps_per_epoch - 1, device)
    interrupt, meter = augment.Interrupt(world), Meter(os.path.join(args.output_dir, "log.jsonl"), args.batch_size)
    step, saved_step, signum, stop, t_start = start_step, start_step or None, 0, False, time.time()
    while step < total_steps and not stop:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, start_step=in_epoch)
        for batch in loader:
            meter.add(step_fn(make_step_inputs(batch, photometric, step, args, rank, world, device), step))
            step += 1
            signum = interrupt.poll()
            stop = bool(signum) or step == args.stop_at_step
            if step % args.log_every == 0 or step == start_step + 1 or step % steps_per_epoch == 0 or stop:
                meter.write(step, epoch, total_steps, optimizer, checkpoint_note(args, saved_step))
            if stop:
                break
        if step % steps_per_epoch == 0 or stop:
            save_checkpoint(args, step, total_steps, saved, len(dataset), precision, checkpoint_note(args, saved_step))
            saved_step = step
            if knn_due(args, step, steps_per_epoch, total_steps) and not signum:  # a signal's grace time is short
                log_knn(args, evaluated, knn, step, epoch, device)
            if signum or step < total_steps and stop:
                why = f" on {signal.Signals(signum).name}, exit status {128 + signum}" if signum else ""
                how = "rerun the same command" if signum else "rerun without --stop-at-step (or with a later one)"
                losses.log(f"stopped at step {step}{why}; checkpoint saved to {args.output_dir}/checkpoint.pth; "
                           f"{how} to resume")
    interrupt.close()
    if step >= total_steps and not signum:
        losses.log(run_summary(args.output_dir, time.time() - t_start, start_step, total_steps))
    losses.finish_distributed()
    if signum:
        sys.exit(128 + signum)  # checkpointed, but not finished: a scheduler must not count it as done


def main(argv=None):
    args = resolve_config(get_args_parser().parse_args(argv))
    if args.count_flops:
        return report_flops(args)
    return benchmark(args) if args.benchmark else train(args)


# =====================================================================================================
# Measurement: --benchmark and --count-flops. Nothing above depends on this section.
# =====================================================================================================

def benchmark(args):
    """--benchmark STEPS: images/s, data wait and compute, peak memory, FLOPs per image, MFU, and the step
    over its floor (train_step alone, on inputs already on the device)."""
    local_batch = args.batch_size // losses.launch_env()[1]
    flops_per_image = count_flops_per_image(args, local_batch)  # before train() starts the process group
    return train(args, measure=functools.partial(measure_steps, flops_per_image=flops_per_image),
                 measured_source=benchmark_source(args))


def timed(fn, device):
    """Seconds that fn() takes on `device`, waiting for the device before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def measure_steps(args, step_fn, photometric, loader, sampler, dataset, device, precision, rank, world,
                  flops_per_image):
    local_batch, n = args.batch_size // world, args.benchmark
    inputs = functools.partial(make_step_inputs, photometric=photometric, args=args, rank=rank, world=world,
                               device=device)
    dataset.set_epoch(0)
    sampler.set_epoch(0)
    base = dataset.base  # a long run renders each built-in image once; forked workers inherit what is kept here
    if isinstance(base, augment.SyntheticShapes) and base.keeps(args.num_workers):
        for i in range(len(base)):
            base[i]
    # Before any worker competes for the cores: the pipeline alone (one worker's rate). Warm-up: allocator,
    # autotuning, compilation, and with SER every b2 grid shape of the timed steps 3..n+2 (a long run has met
    # them all; on a GPU the first call of a new sequence length plans its cuDNN attention kernels, ~100 ms).
    t0 = time.perf_counter()
    batches = list(itertools.islice(DataLoader(dataset, batch_sampler=sampler, num_workers=0), 3))
    pipe_rate = sum(len(b["index"]) for b in batches) / (time.perf_counter() - t0)
    peak_tflops = args.peak_tflops or matmul_peak_tflops(device, precision)
    for step in range(3 + n if args.addon == "ser" else 3):
        step_fn(inputs(batches[-1], step=step), step)

    def floor_step(step):  # train_step alone, on views made before the clock starts
        step_batch = inputs(batches[-1], step=step)
        return timed(lambda: step_fn(step_batch, step), device)
    # With the images made in the main process, each step is followed by its floor step, so that a shared
    # machine's drift (15% and more from minute to minute on 2 cores) reaches both alike. Loader workers would
    # prefetch during interleaved floor steps and hide their wait: then the floor is timed first.
    interleave = args.num_workers == 0
    floor = 0.0 if interleave else sum(floor_step(step) for step in range(3, 3 + n))
    loader_batches = (batch for _ in itertools.count() for batch in loader)  # the loader, epoch after epoch
    wait = compute = 0.0
    for step in range(3 + n):
        if step == 3 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        batch = next(loader_batches)
        t1 = time.perf_counter()
        seconds = timed(lambda: step_fn(inputs(batch, step=step), step), device)  # the training loop never syncs
        if step >= 3:
            wait, compute, floor = wait + t1 - t0, compute + seconds, floor + (floor_step(step) if interleave else 0)
    step_time = (wait + compute) / n
    if device.type == "cuda":
        peak_mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (GPU, allocated)"
    elif resource is not None:
        per_gib = 2**30 if sys.platform == "darwin" else 2**20  # ru_maxrss: bytes on macOS, KiB on Linux
        peak_mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_gib:.2f} GiB (process max RSS)"
    else:
        peak_mem = "unknown (no resource module)"
    achieved = flops_per_image * local_batch / (compute / n) / 1e12
    result = {"source": [benchmark_source(args)], "method": args.method, "addon": args.addon, "arch": args.arch,
              "img_size": args.img_size, "global_batch": args.batch_size, "world_size": world, "device": str(device),
              "precision": precision,
              "images_per_s": args.batch_size / step_time, "step_ms": 1000 * step_time,
              "data_wait_ms": 1000 * wait / n, "compute_ms": 1000 * compute / n,
              "floor_ms": 1000 * floor / n, "step_over_floor": step_time / (floor / n),
              "gflops_per_image": flops_per_image / 1e9, "achieved_tflops_per_rank": achieved, "peak_memory": peak_mem,
              "pipeline_images_per_s_per_worker": pipe_rate, "num_workers": args.num_workers,
              "peak_tflops": peak_tflops, "peak_source": "--peak-tflops" if args.peak_tflops
              else f"measured: the best torch.mm at {precision} in 1 s",
              # Model FLOPs over compute time (data wait excluded), and over the whole step.
              "mfu_compute": achieved / peak_tflops,
              "mfu_step": flops_per_image * local_batch / step_time / 1e12 / peak_tflops}
    if rank == 0:
        print(json.dumps(result, indent=1))
        print(f"step / floor: {result['step_over_floor']:.3f} ({result['step_ms']:.1f} ms per step, "
              f"{result['floor_ms']:.1f} ms of bare compute)")
        with vit.exit_on_write_error("error: "):
            vit.save_atomic(os.path.join(args.output_dir, "benchmark.json"), result)
    losses.finish_distributed()
    return result


def benchmark_source(args):
    """What a benchmark.json is of, for make_output_dir: every setting, so that another configuration's is kept."""
    settings = json.dumps({k: v for k, v in sorted(vars(args).items()) if k != "output_dir"}, default=str)
    addon = f" --{args.addon}" if args.addon else ""
    return f"--method {args.method}{addon} (settings {hashlib.blake2b(settings.encode(), digest_size=6).hexdigest()})"


def count_flops_per_image(args, n_rank, **overrides):
    """FLOPs per image of one training step as torch.utils.flop_counter counts them, on the meta device
    (nothing computed: ViT-S/16 at 224 px counts in seconds). One rank's count: call it outside any
    process group, where the losses' collectives are the identity."""
    meta = torch.device("meta")
    # Recomputation is not model FLOPs.
    args = argparse.Namespace(**{**vars(args), "grad_checkpointing": False, **overrides})
    with meta:
        student, teacher = build_models(args)
        dino_loss = losses.DINOLoss(args.head_out or 65536) if args.method == "dino" else None
    recipe = build_recipe(args)
    batch = {"images": [torch.zeros(n_rank, 3, v.size, v.size, dtype=torch.uint8, device=meta) for v in recipe.views],
             "crop": [torch.zeros(n_rank, 4)] * len(recipe.views),
             "flip": [torch.zeros(n_rank, dtype=torch.bool)] * len(recipe.views)}
    if recipe.plain_size:
        batch["plain"] = torch.zeros(n_rank, 3, recipe.plain_size, recipe.plain_size, dtype=torch.uint8, device=meta)
    with FlopCounterMode(display=False) as counter:
        step_batch = make_step_inputs(batch, recipe.photometric(), 0, args, 0, 1, meta)
        teacher_out = teacher(step_batch) if teacher is not None else None
        terms = compute_losses(args, student(step_batch), teacher_out, step_batch, dino_loss, 0)
        (terms["inv"] + terms.get("equiv", 0)).backward()
    return counter.get_total_flops() / n_rank


def matmul_peak_tflops(device, precision):
    """The best rate of a large square torch.mm at the run's precision, in TFLOP/s: the MFU denominator
    when --peak-tflops is not given (on a CPU there is no spec-sheet number to trust)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    # CPU: 1024 runs as fast as 2048 (oneDNN/MKL) and fits many tries into the time budget.
    n = 8192 if device.type == "cuda" else 1024
    if device.type == "cpu" and precision == "bf16" and not vit.cpu_has_native_bf16():
        n = 256  # emulated bf16 runs at ~1 GFLOP/s: a 1024 matmul would take 2 s
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    best, tries, end = math.inf, 0, time.perf_counter() + 1.0
    while tries < 5 or time.perf_counter() < end:  # the best of 1 s of tries is the least disturbed by other jobs
        best, tries = min(best, timed(lambda: torch.mm(a, b), device)), tries + 1
    return 2 * n ** 3 / best / 1e12


def report_flops(args):
    """--count-flops: FLOPs per image with and without the add-on, e.g. SER's overhead at the paper's
    setting:  python pretrain.py --method mocov3 --ser --data imagenet --batch-size 256 --count-flops"""
    local_batch = args.batch_size  # one rank's view of the step
    with_addon, base = count_flops_per_image(args, local_batch), count_flops_per_image(args, local_batch, addon=None)
    result = {"method": args.method, "addon": args.addon, "arch": args.arch, "img_size": args.img_size,
              "batch_per_rank": local_batch, "gflops_per_image": with_addon / 1e9,
              "base_gflops_per_image": base / 1e9, "ratio": with_addon / base}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    augment.run_script(main)

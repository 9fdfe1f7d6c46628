"""Linear probe and k-NN evaluation of a frozen ViT (DINO protocol, SER's held-out lr selection).

Features as in DINO's eval_linear.py: the final-norm [CLS] of each of the last n blocks (n = 4 for ViT-S; n = 1
alone is MoCo v3's protocol), then with --avgpool the last block's mean patch token (DINO's ViT-B, n = 1). One
head per lr trains on them; the best on a held-out part of the train split is reported on val, like SER's sweep
on its imagenet_eval split. k-NN as in DINO's eval_knn.py (k = 20, T = 0.07), on the last block's [CLS].

    # pretrain.py's export (or its checkpoint.pth); --cached trains on cached features, fast on CPU
    python linear_eval.py --pretrained runs/default/backbone.pth --cached --output-dir runs/default/linear
    # an untrained baseline of the shape of pretrain.py's built-in runs (timm's initialisation, not MoCo v3's)
    python linear_eval.py --random-init --arch vit_tiny --depth 4 --patch-size 8 --img-size 32 --cached \
        --output-dir runs/random_init/linear
    # released DINO ViT-S/16 on ImageNet, DINO's augmented protocol, 8 GPUs (ViT-B: --n-last-blocks 1 --avgpool)
    torchrun --nproc_per_node=8 linear_eval.py --pretrained dino_deitsmall16_pretrain.pth --arch vit_small \
        --data /datasets/imagenet --batch-size 1024 --holdout-fraction 0.01 --output-dir runs/dino_vits16/linear
"""

import argparse
import math
import os
import reprlib
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset

import augment
import losses
import vit

PROBE_KEYS = ("arch", "backbone", "classifier", "n_last_blocks", "avgpool", "num_classes", "img_size", "data")


# ---------------------------------------------------------------------- features and heads
def extract_features(backbone, x, n_last_blocks=4, avgpool=False):
    """Linear-probe features (B, n*D [+ D]) of normalised images (B, 3, H, W), [CLS] of block L-n+1 first.
    DINO interleaves the [CLS] and avgpool channels for ViT-B; a linear head is indifferent to the order."""
    blocks = backbone.get_intermediate_layers(x, n_last_blocks)  # n x (B, 1+N, D), final norm applied
    feats = [tokens[:, 0] for tokens in blocks]  # n x (B, D)
    if avgpool:
        feats.append(blocks[-1][:, 1:].mean(dim=1))  # (B, D)
    return torch.cat(feats, dim=-1)


class LinearClassifier(nn.Module):
    """Linear head on frozen features; N(0, 0.01) weights and zero bias as in DINO and MoCo v3."""

    def __init__(self, in_dim, num_classes):
        super().__init__()
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return self.linear(x.flatten(1))  # (B, F) -> (B, C)


class LinearSweep(nn.Module):
    """One LinearClassifier per learning rate, all fed the same features. The heads share no parameters,
    so summing their losses gives each exactly its own gradient."""

    def __init__(self, in_dim, num_classes, num_heads):
        super().__init__()
        self.heads = nn.ModuleList(LinearClassifier(in_dim, num_classes) for _ in range(num_heads))

    def forward(self, x):
        return torch.stack([head(x) for head in self.heads])  # (K, B, C)


@torch.no_grad()
def predict(backbone, classifier, x, n_last_blocks, avgpool):
    """Logits (B, C) of normalised images (B, 3, H, W), no gradients; attacks call classifier(extract_features())."""
    return classifier(extract_features(backbone, x, n_last_blocks, avgpool))


def save_probe(path, backbone, classifier, n_last_blocks, avgpool, num_classes, img_size, data, **extra):
    """The selected head with the exact backbone it was trained on, so that robustness_eval.py needs one file."""
    vit.save_atomic(path, {"arch": backbone.arch,
                           "backbone": {k: v.cpu() for k, v in backbone.state_dict().items()},
                           "classifier": {k: v.cpu() for k, v in classifier.state_dict().items()},
                           "n_last_blocks": n_last_blocks, "avgpool": avgpool, "num_classes": num_classes,
                           "img_size": img_size, "data": data, **extra})


def load_probe(path):
    """(backbone, classifier, meta) of a linear_probe.pth, both in eval mode; meta: the other entries."""
    try:
        ckpt = vit.load_checkpoint(path)  # tensors and plain values only
    except FileNotFoundError:
        raise FileNotFoundError(f"probe checkpoint not found: {path} "
                                "(linear_eval.py writes <output-dir>/linear_probe.pth)") from None
    missing = [k for k in PROBE_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(PROBE_KEYS)
    if missing:
        raise ValueError(f"{path} is not a linear_eval.py probe checkpoint: missing {missing}")
    try:
        backbone = vit.build_vit(ckpt["arch"])
        backbone.load_state_dict(ckpt["backbone"])
        num_classes, in_dim = ckpt["classifier"]["linear.weight"].shape
        classifier = LinearClassifier(in_dim, num_classes)
        classifier.load_state_dict(ckpt["classifier"])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:  # load_state_dict's multi-line report
        raise ValueError(f"{path}: its backbone or head does not match its recorded architecture "
                         f"({str(e).splitlines()[0]}); rerun linear_eval.py to write it again") from None
    for sd in (backbone.state_dict(), classifier.state_dict()):
        vit.refuse_non_finite(path, sd)
    sizes = {k: ckpt[k] for k in ("n_last_blocks", "num_classes", "img_size")}
    bad = [f"{k} {v!r}" for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    bad += [f"avgpool {ckpt['avgpool']!r}"] if not isinstance(ckpt["avgpool"], bool) else []
    if bad:
        raise ValueError(f"{path}: its metadata has {', '.join(bad)} (n_last_blocks, num_classes and img_size are "
                         "positive integers, avgpool True or False); rerun linear_eval.py to write it again")
    max_blocks = backbone.depth - backbone.cls_after_block  # SER: no [CLS] before it joins
    if ckpt["n_last_blocks"] > max_blocks:
        raise ValueError(f"{path}: its n_last_blocks {ckpt['n_last_blocks']} is more than its backbone's blocks that "
                         f"carry [CLS] ({max_blocks}); rerun linear_eval.py to write it again")
    if ckpt["img_size"] % backbone.patch_size:
        raise ValueError(f"{path}: its img_size {ckpt['img_size']} is not a multiple of its backbone's patch size "
                         f"{backbone.patch_size}; rerun linear_eval.py to write it again")
    if num_classes != ckpt["num_classes"]:  # robustness_eval matches --data against num_classes, not the head
        raise ValueError(f"{path}: the head predicts {num_classes} classes but its metadata says num_classes "
                         f"{ckpt['num_classes']}; rerun linear_eval.py to write it again")
    classes, unfinished = ckpt.get("classes"), ckpt.get("backbone_unfinished")  # older probes record neither
    if "classes" in ckpt and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)
                                  and len(set(classes)) == len(classes) == num_classes):
        raise ValueError(f"{path}: its classes {reprlib.repr(classes)} are not a list of its {num_classes} "
                         "distinct class names; rerun linear_eval.py to write it again")  # matched to --data
    if unfinished is not None and not (isinstance(unfinished, (list, tuple)) and len(unfinished) == 2
                                       and all(type(s) is int for s in unfinished)):
        raise ValueError(f"{path}: its backbone_unfinished {reprlib.repr(unfinished)} is not [step, total steps] of "
                         "its backbone's run; rerun linear_eval.py to write it again")
    expected = backbone.embed_dim * (ckpt["n_last_blocks"] + bool(ckpt["avgpool"]))
    if in_dim != expected:
        raise ValueError(f"{path}: the head reads {in_dim} features but its backbone gives {expected} "
                         f"({ckpt['n_last_blocks']} x {backbone.embed_dim}{' + avgpool' if ckpt['avgpool'] else ''}): "
                         "the backbone was replaced after training; rerun linear_eval.py on the backbone you want")
    meta = {k: v for k, v in ckpt.items() if k not in ("arch", "backbone", "classifier")}
    return backbone.eval(), classifier.eval(), meta


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(backbone, reference):
    """MoCo v3's sanity check: a frozen backbone must leave the probe bit-identical (eval-mode BN/LN, no grads)."""
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v, reference[k])]
    if changed:
        raise RuntimeError(f"the frozen backbone changed during evaluation: {changed}")


# ---------------------------------------------------------------------- distributed feature gathering
class WithIndex(Dataset):
    """Adds the sample's index to (image, label) so distributed features can be written back in order."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], i)  # (image, label, index)


@torch.no_grad()
def gather_features(feature_fn, loader, device, label=None, log=print):
    """Features (N, F) float32 and labels (N,) of all N samples of loader.dataset (a WithIndex), on every rank. Each
    rank's shard is all-gathered with its dataset indices and written with index_copy_: the order is the dataset's,
    and a sample a DistributedSampler repeats to pad its shards rewrites its row with the same values."""
    n = len(loader.dataset)
    features = labels = None
    for images, target, index in (augment.progress(loader, len(loader), label, log) if label else loader):
        with vit.autocast(device):  # bf16 where it is native (GPUs, AVX512_BF16/AMX CPUs), else fp32
            f = feature_fn(images.to(device, non_blocking=True)).float()  # (b, F)
        target, index = target.to(device, non_blocking=True).long(), index.to(device, non_blocking=True)
        f, target, index = (losses.all_gather_rows(t)[0] for t in (f, target, index))  # every rank's shard
        if features is None:
            features = torch.zeros(n, f.shape[1], device=device)
            labels = torch.full((n,), -1, dtype=torch.long, device=device)
        features.index_copy_(0, index, f)
        labels.index_copy_(0, index, target)
    if features is None or (labels < 0).any():
        raise ValueError("the loader did not cover its dataset (drop_last=True or a partial sampler?)")
    return features, labels


# ---------------------------------------------------------------------- k-NN (DINO eval_knn)
@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, num_classes, k=20, T=0.07, chunk_size=256):
    """Weighted k-NN (Wu et al. 2018) on features (N, D) and (M, D), L2-normalised here: class rankings
    (M, min(5, C)), best first. Vote ties go to the smaller class index (stable sort), so classes without votes
    fill the top-5 in index order, as in DINO where any 5 sorted classes count."""
    train = F.normalize(train_features.float(), dim=1)  # (N, D)
    k = min(k, len(train))
    ranked = []
    for test in F.normalize(test_features.float(), dim=1).split(chunk_size):  # chunks bound the (c, N) matrix
        sims, neighbours = (test @ train.T).topk(k, dim=1)  # (c, k)
        votes = torch.zeros(len(test), num_classes, device=test.device)
        votes.scatter_add_(1, train_labels[neighbours], (sims / T).exp())  # (c, C)
        bad = ~torch.isfinite(votes).all(1)  # exp(1/T) or a sum beyond float32: those rows' votes, scaled per row
        if bad.any():
            weights = ((sims[bad] - sims[bad, :1]) / T).exp()
            votes[bad] = torch.zeros_like(votes[bad]).scatter_add_(1, train_labels[neighbours[bad]], weights)
        ranked.append(votes.sort(dim=1, descending=True, stable=True).indices[:, :min(5, num_classes)])
    return torch.cat(ranked)


def topk_accuracy(ranked, labels, num_classes):
    """Top-1 / top-5 accuracy in % from class rankings (M, >= 1), best first. Top-5 is None with <= 5 classes:
    any 5 of them hold the true one, so its 100% would say nothing."""
    hits = ranked[:, :5] == labels[:, None]  # (M, <=5)
    n = len(labels)  # counts, not float32 means, so the JSON holds clean percentages
    top5 = 100.0 * hits.any(dim=1).sum().item() / n if num_classes > 5 else None
    return {"top1": 100.0 * hits[:, 0].sum().item() / n, "top5": top5}


def top5_text(top5, spec=".2f"):
    """'top-5 <top5>' for a log line, or why there is none (topk_accuracy)."""
    return "top-5 n/a (<= 5 classes)" if top5 is None else f"top-5 {top5:{spec}}"


@torch.no_grad()
def knn_eval(backbone, train_loader, val_loader, num_classes, device, k=20, T=0.07):
    """k-NN top-1/top-5 (%) of backbone(x) as in DINO eval_knn.py, for pretrain.py's monitor: WithIndex loaders
    of eval transforms, one shard per rank (augment.make_loader). Pass the bare module, not the DDP wrapper."""
    was_training = backbone.training
    backbone.eval()
    try:
        train_f, train_y = gather_features(backbone, train_loader, device)  # (N, D)
        val_f, val_y = gather_features(backbone, val_loader, device)  # (M, D)
    finally:
        backbone.train(was_training)
    return topk_accuracy(knn_classify(train_f, train_y, val_f, num_classes, k, T), val_y, num_classes)


# ---------------------------------------------------------------------- linear training
def holdout_split(n, fraction):
    """(fit, holdout) sorted index lists over the train split, seeded with a constant rather than --seed:
    every run and every checkpoint is compared on the same split."""
    n_holdout = round(n * fraction)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    return sorted(perm[n_holdout:]), sorted(perm[:n_holdout])


class FeatureLoader:
    """This rank's part of every global batch of cached features (N, F): one permutation per epoch from seed + epoch
    (DistributedSampler's), each global batch split over the ranks without padding, so the heads train as in one
    process (train_sweep weighs a rank's rows by their share). Sliced whole from the (maybe GPU) tensors: a
    DataLoader's per-sample indexing and collation would dominate a cached probe."""

    def __init__(self, features, labels, batch_size, rank, world, seed=0):
        self.features, self.labels, self.batch_size = features, labels, batch_size * world  # per rank -> global
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0
        self.sampler = self  # train_sweep calls loader.sampler.set_epoch, as on a DataLoader
        self.share = 1.0  # of the batch last yielded: its rows x world / the global batch's rows

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for batch in order.to(self.features.device).split(self.batch_size):
            lo, hi = (len(batch) * r // self.world for r in (self.rank, self.rank + 1))
            self.share = (hi - lo) * self.world / len(batch)  # exactly 1 in one process
            yield self.features[batch[lo:hi]], self.labels[batch[lo:hi]]


def train_sweep(sweep, loader, lrs, epochs, device, backbone=None, n_last_blocks=4, avgpool=False, log=print):
    """Head k at lrs[k]; the last epoch's loss per head. The loader yields features when backbone is None (cached)."""
    optimizer = torch.optim.SGD([{"params": head.parameters(), "lr": lr} for head, lr in zip(sweep.heads, lrs)],
                                momentum=0.9, weight_decay=0.0)
    total_steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    model = DistributedDataParallel(sweep) if losses.world_size() > 1 else sweep  # averages grads over the global batch
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        loss_sum = torch.zeros(len(lrs), device=device)  # synced once per epoch, not per step
        for inputs, labels in loader:
            inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if backbone is not None:
                with torch.no_grad(), vit.autocast(device):
                    inputs = extract_features(backbone, inputs, n_last_blocks, avgpool)  # (B, F)
            logits = model(inputs.float())  # (K, B, C)
            # Ranks may hold unequal parts of a global batch (FeatureLoader): weighing each rank's mean by its share
            # makes DDP's average of the ranks' gradients the global batch's. A DataLoader's padded shards are equal.
            share = getattr(loader, "share", 1.0)
            reduction = "mean" if len(labels) else "sum"  # a rank without rows adds 0: a mean of nothing is NaN
            per_head = torch.stack([F.cross_entropy(head_logits, labels, reduction=reduction) * share
                                    for head_logits in logits])  # (K,)
            optimizer.zero_grad(set_to_none=True)
            per_head.sum().backward()
            optimizer.step()
            schedule.step()
            loss_sum += per_head.detach()
        loss_per_head = (losses.all_reduce_sum(loss_sum) / losses.world_size() / len(loader)).tolist()
        if epoch == 0 or (epoch + 1) % max(1, epochs // 10) == 0:  # ~10 lines per run
            log(f"epoch {epoch + 1}/{epochs}  loss per lr: " + " ".join(f"{l:.3f}" for l in loss_per_head))
    return loss_per_head


@torch.no_grad()
def evaluate_sweep(sweep, features, labels, chunk_size=1024):
    """[{'top1', 'top5', 'finite'}] per head on cached features (M, F); top5 None with <= 5 classes (topk_accuracy);
    finite: whether all its logits are (non-finite weights give non-finite logits, and finite ones may overflow)."""
    logits = torch.cat([sweep(f) for f in features.split(chunk_size)], dim=1)  # (K, M, C)
    return [{**topk_accuracy(l.topk(min(5, l.shape[-1]), dim=1).indices, labels, l.shape[-1]),
             "finite": bool(torch.isfinite(l).all())} for l in logits]


# ---------------------------------------------------------------------- script
def get_args_parser():
    p = argparse.ArgumentParser(prog="linear_eval.py", description=__doc__.split("\n\n")[0])
    vit.add_backbone_flags(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", help="'synthetic' (built in), an ImageFolder root with "
                   "train/ and val/ (ImageNet), 'cifar10:<dir>' or 'stl10:<dir>'")
    g.add_argument("--img-size", type=int, default=None, help="eval crop size; default: the backbone's training "
                   "resolution (224 for released weights and --random-init)")
    g.add_argument("--train-length", type=int, default=None, help="train images: the synthetic split's size "
                   "(default: augment.py's 10k), or an evenly strided subset of real data for quick checks")
    g.add_argument("--val-length", type=int, default=None, help="val images, as --train-length (synthetic default 2k)")
    g.add_argument("--holdout-fraction", type=float, default=0.1, help="share of the train split held out to pick "
                   "the lr (a fixed split; 0.01 is plenty on ImageNet); 0 selects on val (DINO's optimistic choice)")
    g = p.add_argument_group("features")
    g.add_argument("--n-last-blocks", type=int, default=None, help="[CLS] of the last n blocks: default 4 (DINO, "
                   "SER; fewer if fewer blocks follow SER's [CLS] insertion), 1 for ViT-B (with --avgpool) and MoCo v3")
    g.add_argument("--avgpool", action="store_true", help="append the mean patch token of the last block (DINO ViT-B)")
    g = p.add_argument_group("linear training")
    g.add_argument("--cached", action="store_true", help="train on cached center-crop features (one backbone pass, "
                   "fast on CPU) instead of DINO's RandomResizedCrop + flip every epoch; use for quick comparisons")
    g.add_argument("--epochs", type=int, default=100, help="DINO 100, MoCo v3 90, SER 50; fewer suffice with --cached")
    g.add_argument("--batch-size", type=int, default=256, help="global batch, split over ranks (DINO used 1024)")
    g.add_argument("--lrs", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
                   help="base lrs, each x batch/256, all trained at once; widen if the best is at an end")
    g.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data-loading processes per rank (default: min(4, CPUs)); raise to ~8-10 on ImageNet")
    g.add_argument("--seed", type=int, default=0, help="change to measure seed variance")
    g = p.add_argument_group("k-NN")
    g.add_argument("--knn-k", type=int, default=20, help="neighbours (DINO: 20 usually works best); 0 skips k-NN")
    g.add_argument("--knn-temperature", type=float, default=0.07, help="vote temperature T (DINO: not tuned)")
    p.add_argument("--output-dir", default="runs/linear", help="where linear_eval.json and linear_probe.pth go; "
                   "one per evaluated checkpoint, e.g. <pretrain output-dir>/linear")
    return p


def check_args(args, world):
    at_least_1 = ("epochs", "batch_size", "patch_size", "depth", "img_size", "n_last_blocks")
    ranges = [("--" + k.replace("_", "-"), getattr(args, k), lambda v: v >= 1, "at least 1") for k in at_least_1]
    ranges += [(f"--{k}-length", getattr(args, f"{k}_length"), lambda v: 1 <= v < 2**31, "in 1..2^31-1")
               for k in ("train", "val")]
    largest_lr = torch.finfo(torch.float32).max * 256 / max(1, args.batch_size)  # --batch-size 0: refused below
    ranges += [("--lrs", args.lrs, lambda v: v > 0, "positive"),
               ("--knn-k", args.knn_k, lambda v: v >= 0, ">= 0 (0 skips k-NN)"),
               ("--lrs", args.lrs, lambda v: v < largest_lr, f"below {largest_lr:.3g} (times --batch-size/256, the "
                "lr must be a float32)"),
               ("--knn-temperature", args.knn_temperature, lambda v: v > 0, "positive"),
               ("--num-workers", args.num_workers, lambda v: v >= 0, ">= 0"),
               ("--holdout-fraction", args.holdout_fraction, lambda v: 0 <= v < 1, "in [0, 1)"),
               ("--batch-size", args.batch_size, lambda v: v % world == 0, f"divisible by the world size {world}"),
               ("--seed", args.seed, *augment.SEED_RANGE)]
    augment.check_ranges(ranges)
    augment.refuse_output_in_data(args.data, args.output_dir)
    readers = [("knn_temperature", args.knn_k > 0, "--knn-k above 0"), ("checkpoint_key", not args.random_init,
                                                                          "--pretrained")]
    augment.refuse_ignored_flags(args, get_args_parser(), readers)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    check_args(args, losses.launch_env()[1])  # before the ranks meet: a flag error is said once
    rank, world, device = losses.init_distributed()
    start, log = time.time(), losses.log
    torch.manual_seed(args.seed)  # before the per-rank offset: every rank must build the same network
    backbone = vit.backbone_from_flags(args.pretrained, args.arch, args.patch_size, args.checkpoint_key,
                                       args.random_init, args.img_size or 224, args.depth,
                                       equiv_layer=args.equiv_layer, log=log)
    backbone.requires_grad_(False).to(device)  # in place, as every Module.to
    reference = snapshot(backbone)
    max_blocks = backbone.depth - backbone.cls_after_block  # SER: no [CLS] before it joins
    args.n_last_blocks = args.n_last_blocks or min(4, max_blocks)  # 0 was refused by check_args
    if not 1 <= args.n_last_blocks <= max_blocks:
        raise SystemExit(f"--n-last-blocks must be in 1..{max_blocks} for this backbone, got {args.n_last_blocks}")
    torch.manual_seed(args.seed + rank)  # dataloader workers (augmentations) differ per rank
    img_size = args.img_size or backbone.arch["img_size"]
    if img_size % backbone.patch_size:
        raise SystemExit(f"--img-size {img_size} is not a multiple of the backbone's patch size {backbone.patch_size}")
    per_rank_batch = args.batch_size // world

    try:
        eval_tf = augment.eval_transform(img_size)
        train_eval_set = augment.build_dataset(args.data, "train", eval_tf, img_size, args.train_length)
        val_set = augment.build_dataset(args.data, "val", eval_tf, img_size, args.val_length)
        augment.check_same_classes(train_eval_set, val_set, args.data)  # labels are class positions
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e) if str(e).startswith("--data") else f"--data {args.data}: {e}") from None
    # build_dataset keeps a real split whole at a larger length, which the results would record as its size
    for split, dataset, length in (("train", train_eval_set, args.train_length), ("val", val_set, args.val_length)):
        if length is not None and length > len(dataset):
            raise SystemExit(f"--{split}-length {length} exceeds the {len(dataset)} images of --data {args.data}'s "
                             f"{split} split: pass at most {len(dataset)}, or drop it for all of them")
    num_classes = train_eval_set.num_classes
    if num_classes < 2:
        raise SystemExit(f"--data {args.data} has one class: every accuracy would be 100%; pass labelled data")
    fit_idx, holdout_idx = holdout_split(len(train_eval_set), args.holdout_fraction)
    if not fit_idx or (args.holdout_fraction > 0 and not holdout_idx):
        raise SystemExit(f"--holdout-fraction {args.holdout_fraction} leaves an empty split "
                         f"of {len(train_eval_set)} train images")
    if args.batch_size > len(fit_idx):  # one step an epoch, its lr scaled for images that are not there
        raise SystemExit(f"--batch-size {args.batch_size} exceeds the {len(fit_idx)} images the heads train on: pass "
                         f"at most {len(fit_idx)}")
    log(f"backbone: {args.pretrained or 'random init ' + args.arch}  arch: {backbone.arch}"
        + (f"  (dropped heads and pretraining-only keys: {backbone.dropped_keys})"
           if getattr(backbone, "dropped_keys", None) else ""))
    log(f"data: {args.data} at {img_size} px, {num_classes} classes; fit {len(fit_idx)}, "
        f"holdout {len(holdout_idx)}, val {len(val_set)}; world {world}, batch {args.batch_size} "
        f"({per_rank_batch} per rank)")

    def features_of(dataset, label):
        loader = augment.make_loader(WithIndex(dataset), per_rank_batch, rank, world, args.num_workers)
        f, y = gather_features(lambda x: extract_features(backbone, x, args.n_last_blocks, args.avgpool),
                               loader, device, label=f"features of {label}: batch", log=log)
        if not torch.isfinite(f).all():  # finite weights can still overflow; argmax of NaN is made up
            raise SystemExit(f"--pretrained {args.pretrained}: the backbone gives non-finite features on {label}; "
                             "it cannot be evaluated")
        return f, y

    digest = vit.weights_digest(backbone)  # the frozen weights (assert_unchanged): robustness_eval's table reads it
    # A random init by its weights: baselines of another --depth or --seed are other results
    sources = [vit.weights_source(args.pretrained, args.checkpoint_key) if args.pretrained
               else f"random init {args.arch} (weights {digest[:12]})"]
    if rank == 0:  # after the cheap checks, before the features: a bad flag leaves no folder behind
        vit.make_output_dir(args.output_dir, outputs=("linear_probe.pth", "linear_eval.json"), sources=sources,
                            lock=True, data=args.data, drops=[] if args.knn_k else ["knn"])
    val_f, val_y = features_of(val_set, "val")  # (M, F)
    if args.cached or args.knn_k > 0:
        train_f, train_y = features_of(train_eval_set, "train")  # (N, F)
        select_f, select_y = train_f[holdout_idx], train_y[holdout_idx]
    elif holdout_idx:
        select_f, select_y = features_of(Subset(train_eval_set, holdout_idx), "the held-out split")
    if not holdout_idx:
        select_f, select_y = val_f, val_y
    in_dim = val_f.shape[1]
    blocks = "block" if args.n_last_blocks == 1 else f"{args.n_last_blocks} blocks"
    log(f"features: [CLS] of the last {blocks}" + (" + avgpool" if args.avgpool else "")
        + f" -> {in_dim}-d ({time.time() - start:.0f}s)")

    if args.cached:
        fit_loader = FeatureLoader(train_f[fit_idx], train_y[fit_idx], per_rank_batch, rank, world, seed=args.seed)
    else:  # DINO's protocol: an augmented view of every image, every epoch
        fit_set = Subset(augment.build_dataset(args.data, "train", augment.linear_train_transform(img_size),
                                               img_size, args.train_length), fit_idx)
        fit_loader = augment.make_loader(fit_set, per_rank_batch, rank, world, args.num_workers, shuffle=True,
                                         seed=args.seed, persistent_workers=args.num_workers > 0)
    torch.manual_seed(args.seed)  # identical head init on every rank (DDP would broadcast rank 0's anyway)
    sweep = LinearSweep(in_dim, num_classes, len(args.lrs)).to(device)
    lrs = [lr * args.batch_size / 256 for lr in args.lrs]
    log(f"training {len(lrs)} heads for {args.epochs} epochs, lrs x {args.batch_size}/256 = "
        + " ".join(f"{lr:g}" for lr in lrs))
    final_loss = train_sweep(sweep, fit_loader, lrs, args.epochs, device, None if args.cached else backbone,
                             args.n_last_blocks, args.avgpool, log)

    select_acc, val_acc = evaluate_sweep(sweep, select_f, select_y), evaluate_sweep(sweep, val_f, val_y)
    finite = [i for i in range(len(lrs)) if select_acc[i]["finite"] and val_acc[i]["finite"]]
    if not finite:  # an argmax of NaN logits is a made-up accuracy
        raise SystemExit(f"--lrs {' '.join(f'{lr:g}' for lr in args.lrs)}: every head diverged (non-finite weights "
                         "or logits); lower the lrs")
    if len(finite) < len(lrs):
        log(f"note: lr {', '.join(f'{lr:g}' for i, lr in enumerate(args.lrs) if i not in finite)} diverged "
            "(non-finite weights or logits); left out of the selection")
    best = max(finite, key=lambda i: (select_acc[i]["top1"], -i))  # ties: the earlier of --lrs
    if len(lrs) > 1 and args.lrs[best] in (min(args.lrs), max(args.lrs)):
        log(f"note: the selected lr {args.lrs[best]:g} is at the edge of --lrs; widen the sweep")
    selected_on = "holdout" if holdout_idx else "val"
    results = {"linear": {"top1": val_acc[best]["top1"], "top5": val_acc[best]["top5"], "lr": args.lrs[best],
                          "scaled_lr": lrs[best], f"{selected_on}_top1": select_acc[best]["top1"]},
               "sweep": [{"lr": lr, "scaled_lr": slr, "final_loss": loss, f"{selected_on}_top1": s["top1"],
                          f"{selected_on}_top5": s["top5"], "val_top1": v["top1"], "val_top5": v["top5"]}
                         for lr, slr, loss, s, v in zip(args.lrs, lrs, final_loss, select_acc, val_acc)]}
    for row in results["sweep"]:  # without a holdout, selection is on val: its column once
        selection = f"holdout top-1 {row['holdout_top1']:6.2f}   " if holdout_idx else ""
        log(f"  lr {row['lr']:<6g} {selection}val top-1 {row['val_top1']:6.2f}  {top5_text(row['val_top5'], '6.2f')}")
    log(f"linear: top-1 {val_acc[best]['top1']:.2f}  {top5_text(val_acc[best]['top5'])}  "
        f"(lr {args.lrs[best]:g} selected on {selected_on})")

    if args.knn_k > 0:
        d = backbone.embed_dim  # backbone(x), the final-norm [CLS] of the last block, is this slice of the features
        cls_slice = slice((args.n_last_blocks - 1) * d, args.n_last_blocks * d)
        k = min(args.knn_k, len(train_y))  # as knn_classify: at most the whole bank
        ranked = knn_classify(train_f[:, cls_slice], train_y, val_f[:, cls_slice], num_classes, k, args.knn_temperature)
        results["knn"] = {**topk_accuracy(ranked, val_y, num_classes), "k": k, "T": args.knn_temperature}
        log(f"k-NN (k={k}{'' if k == args.knn_k else f', --knn-k {args.knn_k} capped at the bank'}, "
            f"T={args.knn_temperature:g}): top-1 {results['knn']['top1']:.2f}  {top5_text(results['knn']['top5'])}")

    assert_unchanged(backbone, reference)
    results.update(backbone=args.pretrained or f"random init {args.arch}", source=sources, arch=backbone.arch,
                   backbone_unfinished=getattr(backbone, "unfinished", None),
                   data=vit.data_location(args.data),  # resolved: a rerun from another folder compares it
                   backbone_digest=digest,
                   img_size=img_size, num_classes=num_classes, num_features=in_dim, num_fit=len(fit_idx),
                   num_holdout=len(holdout_idx), num_val=len(val_set), world_size=world,
                   time_s=round(time.time() - start, 1), args=vars(args))
    if rank == 0:
        with vit.exit_on_write_error():  # each file replaced in one step, the results last: never a probe not on disk
            save_probe(os.path.join(args.output_dir, "linear_probe.pth"), backbone, sweep.heads[best],
                       args.n_last_blocks, args.avgpool, num_classes, img_size, args.data,
                       classes=list(train_eval_set.classes),  # robustness_eval.py compares them with its --data
                       backbone_unfinished=getattr(backbone, "unfinished", None),  # robustness_eval notes it
                       lr=args.lrs[best], top1=val_acc[best]["top1"], top5=val_acc[best]["top5"])
            vit.save_atomic(os.path.join(args.output_dir, "linear_eval.json"), results)
        log(f"wrote {args.output_dir}/linear_eval.json and linear_probe.pth ({results['time_s']:.0f}s)")
    losses.finish_distributed()
    return results


if __name__ == "__main__":
    augment.run_script(main)

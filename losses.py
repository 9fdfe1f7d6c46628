"""SSL losses and heads: MoCo v3, DINO, Barlow Twins, VICReg, SimCLR, BYOL, and the add-ons SER (L_equiv), EquiMod,
AugSelf and E-SSL, on the head outputs (pretrain.compute_losses), in float32 at least. Each loss states its convention
relative to the official code, naming the official file.

Every loss is exact under DDP: with W ranks, the DDP-averaged gradient equals that of the same loss on the concatenated
global batch in one process. Collectives on tensors with gradients are autograd-aware (their backward sums every rank's
gradient for our rows) and each local loss is scaled so that the ranks' losses add up to W * (global loss), which DDP's
mean cancels; statistics without gradient (DINO centre, MoCo keys) use no-grad collectives, heads with BatchNorm
`GlobalBatchNorm1d`. Ranks may hold unequal shares (SER's b2 groups; a rank may hold none): counts come from the
gathers, and the means the official code takes per rank (BYOL, DINO, VICReg's MSE, AugSelf, E-SSL) are global means here
(`_global_mean_of_sum`), the official value for equal shares.
"""

import os
import sys
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import group_actions
import vit


# ---------------------------------------------------------------------- distributed helpers
# All of them are the identity without a process group.
def launch_env():
    """(rank, world size, local rank) from torchrun's environment, (0, 1, 0) without it; readable before the process
    group exists, so that a flag error can be said once. A partial or malformed environment is refused: read
    partly, it would run one process that believes it is one of several, or fail inside init_process_group."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    if not any(n in os.environ for n in names[:3]):
        return 0, 1, 0
    try:
        rank, world, local_rank, port = (int(os.environ[n]) for n in names if n != "MASTER_ADDR")
        if not (os.environ["MASTER_ADDR"] and 0 <= rank < world and 0 <= local_rank <= rank and 0 < port < 65536):
            raise ValueError
    except (KeyError, ValueError):
        raise SystemExit("error: " + ", ".join(names) + " = " + ", ".join(repr(os.environ.get(n)) for n in names)
                         + ": launch with torchrun, which sets them all, or unset them for one process") from None
    return rank, world, local_rank


def init_distributed():
    """Every script's launch: under torchrun NCCL on GPUs, gloo on CPU; otherwise, and for a world of one, one plain
    process (every collective is the identity without a process group, and a rendezvous with no one could only wait:
    on an unreachable MASTER_ADDR, for half an hour)."""
    rank, world, local_rank = launch_env()
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available() and local_rank >= torch.cuda.device_count():
        _stop(f"error: LOCAL_RANK {local_rank}, but this machine has {torch.cuda.device_count()} GPUs: "
              f"launch at most {torch.cuda.device_count()} processes per node")
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if local_rank == 0:  # one line per node: a rank started alone would otherwise wait without a word
        print(f"rank {rank}: waiting for the other {world - 1} of {world} ranks at {address} (torchrun variables)",
              flush=True)
    try:
        if not torch.cuda.is_available():
            dist.init_process_group("gloo")
            return rank, world, torch.device("cpu")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
        return rank, world, device
    except (dist.DistNetworkError, dist.DistStoreError) as e:  # the store: a port taken, a master never reached
        first = (str(e).strip().splitlines() or [""])[0]
        what = ("choose a free MASTER_PORT" if "EADDRINUSE" in str(e) or "in use" in str(e) else
                "check that every rank was started with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE")
        _stop(f"error: cannot start the process group at {address} ({first}); {what}")


def _stop(line):
    # Printed here, not raised as SystemExit(line): run_script keeps only rank 0's line of an error met before the
    # ranks meet, since a flag error is the same on every rank, but this one is this rank's own.
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(1)


def finish_distributed():
    """Every script's end: the ranks leave the process group together (a gloo rank that exits while rank 0
    still writes a checkpoint could abort it: "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size():
    return dist.get_world_size() if _distributed() else 1


def rank():
    return dist.get_rank() if _distributed() else 0


def log(*args, **kwargs):
    """Every script's progress lines: printed by rank 0 only, since every rank runs the same script."""
    if rank() == 0:
        print(*args, **kwargs)


def _upcast(x):
    # Softmaxes and normalisations in fp16/bf16 lose too much; float64 (tests) stays float64.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


_CPU_GROUPS = {}


def cpu_group():
    """A gloo group for host-side integers (row counts, stop flags). Exchanging them through it never
    waits for the GPU, where a count tensor on an NCCL device would cost a host-device sync."""
    default = dist.group.WORLD
    if default not in _CPU_GROUPS:
        _CPU_GROUPS[default] = default if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _CPU_GROUPS[default]


def barrier():
    """The ranks wait for each other, host-side (an NCCL barrier would need the GPU)."""
    if world_size() > 1:
        dist.barrier(group=cpu_group())


def refuse_disagreement(value, what):
    """Every rank stops in one line where the ranks hold different ints for `what` (a resume step read from
    node-local disks, a flag given per node): each would wait for the others' collectives for good."""
    values = _gather_counts(value) if world_size() > 1 else [value]
    if len(set(values)) > 1:
        raise SystemExit(f"error: the ranks disagree on {what}: " + ", ".join(f"rank {r} {v}" for r, v in
                                                                             enumerate(values)))


def _gather_counts(n):
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([n], dtype=torch.long), group=cpu_group())
    return [int(c) for c in counts]


class _AllGather(torch.autograd.Function):
    """all_gather whose backward gives each rank the sum over ranks of the gradients for its rows, as
    facebookresearch/vicreg main_vicreg.py FullGatherLayer (every rank's loss reads every row)."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        grad = torch.stack(grads)
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


class _AllReduceSum(torch.autograd.Function):
    """SUM all-reduce whose backward is again a SUM all-reduce: d(sum_r x_r)/dx_r = 1 for every rank's output."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad)


def all_gather_rows(x):
    """Every rank's `x` (N_r, ...) concatenated along dim 0 -> (sum_r N_r, ...), and the counts. Autograd-aware,
    for variable counts; gather a detached tensor for statistics only."""
    if not _distributed():
        return x, [x.shape[0]]
    counts = _gather_counts(x.shape[0])
    padded = torch.cat([x, x.new_zeros((max(counts) - x.shape[0], *x.shape[1:]))])
    return torch.cat([buf[:n] for buf, n in zip(_AllGather.apply(padded), counts)]), counts


def all_reduce_sum(x):
    return _AllReduceSum.apply(x) if _distributed() else x


def global_count(n):
    """Rows in the global batch, given this rank's n (a plain int, no gradient; exchanged on the host)."""
    return sum(_gather_counts(n)) if _distributed() else n


def _global_mean_of_sum(local_sum, global_count_):  # the ranks' losses add up to W * (global mean)
    return local_sum * world_size() / global_count_


def _global_standardize(x, eps=1e-5):
    """BatchNorm1d(affine=False) in train mode on (N, C) over the global batch, with gradients, and its mean (C,),
    biased variance (C,) and N_global. Two passes: E[x^2] - E[x]^2 cancels badly in float32 for large means."""
    n = global_count(x.shape[0])
    mean = all_reduce_sum(x.sum(0)) / n
    var = all_reduce_sum((x - mean).pow(2).sum(0)) / n
    return (x - mean) * torch.rsqrt(var + eps), mean, var, n


# ---------------------------------------------------------------------- heads
class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d on (N, C) whose training statistics span the global batch (autograd-aware all_reduce, on
    CPU/gloo too, unlike torch.nn.SyncBatchNorm); exactly nn.BatchNorm1d, keys included, without a process
    group or in eval mode. All ranks call it in train mode together; convert_sync_batchnorm would replace it."""

    def _check_input_dim(self, x):
        if x.dim() != 2:
            raise ValueError(f"GlobalBatchNorm1d expects (N, C) input, got shape {tuple(x.shape)}")

    def forward(self, x):
        self._check_input_dim(x)
        if not (self.training and _distributed()):
            return super().forward(x)
        y, mean, var, n = _global_standardize(_upcast(x), self.eps)  # (N, C)
        if n < 2:
            raise ValueError("GlobalBatchNorm1d needs more than 1 sample in the global batch when training")
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked += 1
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def build_mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn=True, bias=False, last_bias=False):
    """MoCo v3 `_build_mlp`: [Linear -> BN -> ReLU] x (num_layers-1) -> Linear [-> BN(affine=False)].
    `bias`: on the hidden Linears (VICReg, BYOL); `last_bias`: on the output one (AugSelf's predictors)."""
    dims = [in_dim] + [hidden_dim] * (num_layers - 1)
    layers = []
    for d_in, d_out in zip(dims, dims[1:]):
        layers += [nn.Linear(d_in, d_out, bias=bias), GlobalBatchNorm1d(d_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-1], out_dim, bias=last_bias))
    if last_bn:
        layers.append(GlobalBatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight = g * v / ||v|| per output row, with the parameters of torch's
    (deprecated) weight_norm(Linear) that DINO uses ('weight_g' (out, 1), 'weight_v' (out, in)), so DINO
    head checkpoints load; unlike the hook version, it deep-copies cleanly for the EMA teacher."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach())  # torch's init, as DINO
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x):
        return F.linear(x, self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True)))


class DINOHead(nn.Module):
    """DINO head: 3-layer MLP (GELU) -> L2 normalise -> weight-normalised Linear to out_dim logits, with
    the official parameter names ('mlp.0', 'mlp.2', 'mlp.4' without BN, 'last_layer.weight_g/_v').
    norm_last_layer freezes the norm g at 1 (official default; the ViT-S recipe sets it False)."""

    def __init__(self, in_dim, out_dim=65536, use_bn=False, norm_last_layer=True, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        layers = []
        for d_in, d_out in ((in_dim, hidden_dim), (hidden_dim, hidden_dim)):
            layers += [nn.Linear(d_in, d_out), *([GlobalBatchNorm1d(d_out)] if use_bn else []), nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    def forward(self, x):  # (N, in_dim) -> (N, out_dim)
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def build_heads(method, embed_dim, hidden_dim=None, out_dim=None, **kw):
    """(projector, predictor or None) for a base method, official ViT-recipe sizes unless overridden.
    The projector is part of the encoder (EMA-copied for the MoCo/BYOL target and the DINO teacher).
    Extra keywords go to DINOHead (bottleneck_dim, use_bn, norm_last_layer: default False, as ViT-S)."""
    if kw and method != "dino":
        raise ValueError(f"build_heads({method!r}) got unexpected options {sorted(kw)}")
    h, o = hidden_dim, out_dim
    if method == "mocov3":  # D -> 4096 -> 4096 -> 256 (last BN), predictor 256 -> 4096 -> 256 (last BN)
        o = o or 256
        return build_mlp(3, embed_dim, h or 4096, o), build_mlp(2, o, h or 4096, o)
    if method == "dino":
        return DINOHead(embed_dim, o or 65536, hidden_dim=h or 2048, **{"norm_last_layer": False, **kw}), None
    if method == "barlowtwins":  # 8192-8192-8192, the loss brings its own affine-free BN
        return build_mlp(3, embed_dim, h or 8192, o or 8192, last_bn=False), None
    if method == "vicreg":  # 8192-8192-8192, biases on the hidden Linears
        return build_mlp(3, embed_dim, h or 8192, o or 8192, last_bn=False, bias=True), None
    if method == "simclr":
        # SimCLR v2: hidden = input width, out 128, BN on every layer; deviation: the last BN has no scale here
        return build_mlp(3, embed_dim, h or embed_dim, o or 128), None
    if method == "byol":  # Linear(4096, bias) -> BN -> ReLU -> Linear(256, no bias), for projector and predictor
        o = o or 256
        return (build_mlp(2, embed_dim, h or 4096, o, last_bn=False, bias=True),
                build_mlp(2, o, h or 4096, o, last_bn=False, bias=True))
    raise ValueError(f"unknown method {method!r}; choose one of mocov3, dino, barlowtwins, vicreg, simclr, byol")


# ---------------------------------------------------------------------- base losses
def _moco_direction(q, k, temperature):
    q = F.normalize(_upcast(q), dim=1)  # (N, d)
    k_all, counts = all_gather_rows(F.normalize(_upcast(k.detach()), dim=1))  # (N_global, d), stop-grad keys
    logits = q @ k_all.T / temperature  # (N, N_global)
    labels = sum(counts[: rank()]) + torch.arange(q.shape[0], device=q.device)
    per_query = F.cross_entropy(logits, labels, reduction="none")
    return _global_mean_of_sum(per_query.sum(), sum(counts)) * (2 * temperature)


def mocov3_loss(qs, ks, temperature=0.2):
    """MoCo v3: sum over student views i and momentum views j != i of ctr(q_i, k_j), ctr = InfoNCE against
    the keys of all ranks, x 2T. qs: (N, d) predictor outputs, the 2 global views then the local ones; ks:
    (N, d) momentum projections (detached here) of the global views; row n is the same image in all. Two views:
    ctr(q1, k2) + ctr(q2, k1), the official `contrastive_loss` (facebookresearch/moco-v3 moco/builder.py);
    2 + 4 views, SER's multi-crop (aitrics-chris/SER builder/moco.py MoCo.erl_local4): 6 * 2 - 2 = 10 terms."""
    if not 1 <= len(ks) <= len(qs):
        raise ValueError(f"mocov3_loss needs 1..{len(qs)} momentum views, got {len(ks)}")
    return sum(_moco_direction(q, k, temperature) for i, q in enumerate(qs) for j, k in enumerate(ks) if i != j)


class DINOLoss(nn.Module):
    """DINO cross-entropy between the centred, sharpened teacher and the student over all crop pairs but
    same-view ones, averaged over the n_teacher * ncrops - n_teacher terms; then C <- m C + (1 - m)
    mean(teacher), the raw outputs' global-batch mean. Convention: the official DINOLoss (facebookresearch/dino
    main_dino.py), but the teacher temperature is passed in (teacher_temp_schedule), the number of teacher
    views is read from the shapes instead of fixed at 2, and the mean over images is global."""

    def __init__(self, out_dim, center_momentum=0.9, student_temp=0.1):
        super().__init__()
        self.center_momentum = center_momentum
        self.student_temp = student_temp
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out, teacher_out, ncrops, teacher_temp):
        """student_out: (ncrops*B, K) crop-major; teacher_out: (n_teacher*B, K), the first
        n_teacher crops (the global views), which are the student's crops 0..n_teacher-1."""
        batch = student_out.shape[0] // ncrops
        n_teacher = teacher_out.shape[0] // max(batch, 1)
        whole = batch * ncrops == student_out.shape[0] and n_teacher * batch == teacher_out.shape[0]
        if not whole or not 1 <= n_teacher <= ncrops:
            raise ValueError(f"DINOLoss: {student_out.shape[0]} student and {teacher_out.shape[0]} teacher rows are "
                             f"not ncrops={ncrops} views and 1..ncrops views of one batch")
        student_logp = F.log_softmax(_upcast(student_out) / self.student_temp, dim=-1).chunk(ncrops)
        teacher = _upcast(teacher_out.detach())
        teacher_p = F.softmax((teacher - self.center) / teacher_temp, dim=-1).chunk(n_teacher)
        terms = [(-(p * logp).sum(-1)).sum() for t_view, p in enumerate(teacher_p)
                 for s_view, logp in enumerate(student_logp) if s_view != t_view]
        self.update_center(teacher)
        return _global_mean_of_sum(sum(terms), global_count(batch)) / len(terms)

    @torch.no_grad()
    def update_center(self, teacher_out):
        batch_center = all_reduce_sum(teacher_out.sum(0, keepdim=True)) / global_count(teacher_out.shape[0])  # (1, K)
        self.center.mul_(self.center_momentum).add_(batch_center.to(self.center.dtype), alpha=1 - self.center_momentum)


def teacher_temp_schedule(epoch, warmup_teacher_temp, teacher_temp, warmup_epochs):
    """DINO's teacher temperature at an (integer) epoch: linspace(warmup, final, warmup_epochs),
    endpoint included, then constant. ViT-S recipe: (e, 0.04, 0.07, 30); SER's DINO: 10 epochs."""
    if epoch >= warmup_epochs:
        return teacher_temp
    # max(., 1): a one-epoch warm-up is epoch 0 at the warm-up value
    return warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * epoch / max(warmup_epochs - 1, 1)


def _off_diagonal(m):
    # (n, n) -> (n*n - n,): drop the diagonal by viewing the flat matrix with stride n + 1
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow_twins_loss(z1, z2, lambd=0.0051):
    """Barlow Twins: sum_i (1 - c_ii)^2 + lambd * sum_{i!=j} c_ij^2, c the cross-correlation of the two
    views (N, D) standardised over the global batch, divided by the global batch size. Convention: the
    official value (facebookresearch/barlowtwins main.py) with the true gradient under DDP, where the
    official one is 1/W of it (its `dist.all_reduce(c)` is not autograd-aware); x 1/W reproduces it."""
    y1, _, _, n = _global_standardize(_upcast(z1))
    c = all_reduce_sum(y1.T @ _global_standardize(_upcast(z2))[0] / n)  # (D, D)
    return (torch.diagonal(c) - 1).pow(2).sum() + lambd * _off_diagonal(c).pow(2).sum()


def vicreg_loss(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """VICReg on the (N, D) expander outputs. Convention: the official forward (facebookresearch/vicreg main_vicreg.py)
    with a global-mean MSE; variance and covariance over the global batch, gathered with gradients (FullGatherLayer)."""
    z1, z2 = _upcast(z1), _upcast(z2)
    repr_loss = _global_mean_of_sum((z1 - z2).pow(2).sum(), global_count(z1.shape[0]) * z1.shape[1])
    std_loss, cov_loss = 0.0, 0.0
    for z in (z1, z2):
        x, _ = all_gather_rows(z)  # (N_global, D)
        x = x - x.mean(0)
        n, d = x.shape
        std_loss = std_loss + F.relu(1 - torch.sqrt(x.var(0) + 1e-4)).mean() / 2
        cov_loss = cov_loss + _off_diagonal(x.T @ x / (n - 1)).pow(2).sum() / d  # cov: (D, D)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


def nt_xent(a, b, temperature, ids=None):
    """NT-Xent over the pairs a_k <-> b_k of (N, d) rows (not necessarily normalised): every row is an
    anchor, its partner the positive, the rows of every other image in the global {a, b} (gathered with
    gradients) the negatives; averaged over the 2 N_global anchors. ids: (N,) each row's image when an
    image has several rows (SER's tokens: no negatives from the anchor's own image); None: one row each."""
    a, b = F.normalize(_upcast(a), dim=1), F.normalize(_upcast(b), dim=1)
    a_all, counts = all_gather_rows(a)  # (M, d); the counts differ per rank with SER's groups
    b_all, _ = all_gather_rows(b)
    m, n = a_all.shape[0], a.shape[0]
    idx = sum(counts[: rank()]) + torch.arange(n, device=a.device)  # our rows in the gathered set
    ids_all = torch.arange(m, device=a.device) if ids is None else all_gather_rows(ids)[0]  # (M,) image ids
    ids = idx if ids is None else ids
    logits = torch.cat([a, b]) @ torch.cat([a_all, b_all]).T / temperature  # (2n, 2M)
    positives = torch.cat([idx + m, idx])
    same_image = ids.repeat(2)[:, None] == ids_all.repeat(2)[None, :]  # (2n, 2M): the anchor itself among them
    same_image.scatter_(1, positives[:, None], False)  # (an index_put_ of a Python False waits for the GPU)
    per_anchor = F.cross_entropy(logits.masked_fill(same_image, float("-inf")), positives, reduction="none")
    return _global_mean_of_sum(per_anchor.sum(), 2 * m)


def simclr_loss(z1, z2, temperature=0.1):
    """SimCLR: `nt_xent` of the two views. Convention: the standard NT-Xent (lightly, solo-learn, EquiMod)
    = 1/2 of the official TF2 loss (google-research/simclr tf2/objective.py: loss_a + loss_b, two means over N)."""
    return nt_xent(z1, z2, temperature)


def byol_loss(p1, p2, z1, z2):
    """BYOL: mean_b[(2 - 2 cos(p1, z2)) + (2 - 2 cos(p2, z1))], range 0..8, of the online predictions
    p_i and the target projections z_i (detached here) of view i, all (N, d). Convention: DeepMind's
    (directions summed; AugSelf's version is this - 4), the mean taken over the global batch."""
    def direction(p, z):
        p = F.normalize(_upcast(p), dim=-1)
        z = F.normalize(_upcast(z.detach()), dim=-1)
        return 2 - 2 * (p * z).sum(-1)  # (N,)

    return _global_mean_of_sum((direction(p1, z2) + direction(p2, z1)).sum(), global_count(p1.shape[0]))


# ---------------------------------------------------------------------- SER: equivariance loss on the layer-L token map
class SERProjector(nn.Module):
    """Conv1x1(D -> 512) -> GELU -> Conv1x1(512 -> 512), bias-free, on a (B, D, h, w) map: the release's
    `projector_equiv`. Pointwise, so it commutes with rho_g's token permutations (aligned after it, as released)."""

    def __init__(self, in_dim, hidden_dim=512, out_dim=512):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1, bias=False), nn.GELU(),
                                 nn.Conv2d(hidden_dim, out_dim, 1, bias=False))
        # The token map arrives channels-last (ViT._to_map), and at training sizes so do the weight gradients: weights
        # of that layout (for 1x1 kernels the same memory) take them as they come, where DDP would copy them and warn.
        self.net.to(memory_format=torch.channels_last)

    def forward(self, x):  # (B, D, h, w) -> (B, out_dim, h, w)
        return self.net(x)


class SERGroup(NamedTuple):
    """One b2 group's pair of views on this rank: z_i (n, C, h_i, w_i), the SERProjector output of view
    i = g_i(x)'s layer-L token map, x the common crop with token grid `base_size` (h, w); ids (n,) the
    images' positions in the global batch (None: numbered here, unique over ranks). A rank without b2
    images passes n = 0 and g1 = g2 = None: its collectives still run."""
    z1: torch.Tensor
    z2: torch.Tensor
    g1: "group_actions.GroupElement | None"
    g2: "group_actions.GroupElement | None"
    base_size: tuple
    ids: "torch.Tensor | None" = None


def _tokens(m):  # (n, C, h, w) -> (n*h*w, C), image-major
    return m.flatten(2).transpose(1, 2).reshape(-1, m.shape[1])


def ser_loss(groups, temperature):
    """SER's L_equiv, symmetric: 0.5 * [NTX(rho_g z1, z2) + NTX(z1, rho_{g^-1} z2)] over this rank's SERGroups of one
    pair, g = relative_action(g1, g2, base_size) carrying view 1 onto view 2's grid. The aligned tokens of all groups
    and ranks form one NT-Xent, averaged over all anchors. Conventions vs the release (aitrics-chris/SER builder/moco.py
    `MoCo.equiv`, builder/dino.py): the paper's negatives, the other images' tokens in both views (the release:
    cross-view only), and gradients into both views (the release gathers under no_grad: its L_equiv has none)."""
    if not groups:
        raise ValueError("ser_loss needs at least one group (an empty SERGroup on a rank without b2 images)")
    fwd, bwd, offset = [], [], 0  # per direction, one (anchor tokens, partner tokens, image ids) per group
    for z1, z2, g1, g2, base_size, ids in groups:
        n = z1.shape[0]
        if ids is None:  # local numbering made unique over ranks without an extra collective
            ids = (offset + torch.arange(n, device=z1.device)) * world_size() + rank()
            offset += n
        else:
            ids = vit.to_device(torch.as_tensor(ids), z1.device)
        z1_on_2, z2_on_1 = z1, z2  # n = 0: no group elements, nothing to align
        if n:  # view 1 carried onto view 2's grid by g, view 2 back onto view 1's by g1 g2^-1 = (g2 g1^-1)^-1
            z1_on_2 = group_actions.apply_to_token_map(z1, group_actions.relative_action(g1, g2, base_size))
            z2_on_1 = group_actions.apply_to_token_map(z2, group_actions.relative_action(g2, g1, base_size))
        for out, (a, b) in ((fwd, (z1_on_2, z2)), (bwd, (z1, z2_on_1))):
            if a.shape != b.shape:
                raise ValueError(f"token maps are not aligned: {tuple(a.shape)} vs {tuple(b.shape)}")
            out.append((_tokens(a), _tokens(b), ids.repeat_interleave(a.shape[-2] * a.shape[-1])))  # (n*h*w, ...)
    (a1, b1, i1), (a2, b2, i2) = ([torch.cat(part) for part in zip(*rows)] for rows in (fwd, bwd))  # all groups
    return 0.5 * (nt_xent(a1, b1, temperature, i1) + nt_xent(a2, b2, temperature, i2))


# ---------------------------------------------------------------------- add-on baselines: EquiMod, AugSelf, E-SSL
# A head can read the final [CLS] or block L's raw one (the paper's layer decoupling), LayerNormed by `input_norm=True`.
def equimod_param_vector(params):
    """(B, 18) augmentation-parameter vector from a view-parameter dict of augment.py: [crop top, left,
    height, width, flip | jitter applied, order/3 x4, brightness, contrast, saturation, hue, gray |
    blur applied, sigma | solarize]. As EquiMod, a view without jitter has order (0, 1, 2, 3) and
    factors (1, 1, 1, 0). Deviation: crop in fractions of the image and order / 3, O(1) on any dataset,
    where EquiMod standardises raw pixels and integers with hard-coded ImageNet statistics."""
    missing = {"crop", "flip", "jitter", "jitter_applied", "jitter_order", "gray", "blur_sigma",
               "solarize"} - set(params)
    if missing:
        raise ValueError(f"view-parameter dict lacks {sorted(missing)}")
    crop = params["crop"]
    dtype = crop.dtype if crop.is_floating_point() else torch.float32

    def col(t):  # (B,) -> (B, 1)
        return t.to(dtype).reshape(-1, 1)

    applied = col(params["jitter_applied"])
    order = torch.where(applied.bool(), params["jitter_order"].to(dtype),
                        torch.arange(4, dtype=dtype, device=crop.device)) / 3
    identity = (torch.arange(4, device=crop.device) < 3).to(dtype)  # factors (1, 1, 1, 0), made on the device
    factors = torch.where(applied.bool(), params["jitter"].to(dtype), identity)
    sigma = col(params["blur_sigma"])
    return torch.cat([crop.to(dtype), col(params["flip"]), applied, order, factors, col(params["gray"]),
                      (sigma > 0).to(dtype), sigma, col(params["solarize"])], dim=1)


class EquiModHead(nn.Module):
    """EquiMod's equivariant branch on a (B, D) representation: projector D-D-D-out_dim with BN, the last
    affine-free (SER's ViT version; EquiMod's ResNet one has hidden 2048); param_embed Linear(18 -> out_dim)
    + BN; predictor from [y_original, param_embed(p)] to the augmented view's embedding."""

    def __init__(self, in_dim, hidden_dim=None, out_dim=128, input_norm=False):
        super().__init__()
        self.input_norm = nn.LayerNorm(in_dim) if input_norm else nn.Identity()
        self.projector = build_mlp(3, in_dim, hidden_dim or in_dim, out_dim, last_bn=True)
        self.param_embed = nn.Sequential(nn.Linear(18, out_dim, bias=False), GlobalBatchNorm1d(out_dim))
        self.predictor = build_mlp(1, 2 * out_dim, out_dim, out_dim)  # Linear + BN(affine=False)

    def forward(self, h_orig, h_views, params):
        """h_orig: (B, D) un-augmented image; h_views: (V*B, D) augmented views, view-major;
        params: (V*B, 18). Returns (y_t, y_hat_t), both (V*B, out_dim)."""
        batch = h_orig.shape[0]
        if h_views.shape[0] % batch or params.shape[0] != h_views.shape[0]:
            raise ValueError(f"EquiModHead: {h_views.shape[0]} view rows and {params.shape[0]} parameter "
                             f"rows for a batch of {batch}")
        # One projector pass over all 3B rows, as EquiMod, so BN statistics cover the original too.
        y = self.projector(self.input_norm(torch.cat([h_orig, h_views])))  # ((1+V)B, out)
        y_orig = y[:batch].repeat(h_views.shape[0] // batch, 1)  # (V*B, out)
        return y[batch:], self.predictor(torch.cat([y_orig, self.param_embed(params)], dim=1))


def equimod_loss(y_t, y_hat_t, temperature=0.2):
    """EquiMod's L_equiv: NT-Xent over the pairs y_t,k <-> y_hat_t,k with gradients through both sides; the
    other view of the same image and its prediction are negatives. Convention: the official value (its x W
    cancels DDP's mean, as our gather's backward does); SER's re-implementation uses a MoCo-style
    0.5 * (InfoNCE(y_t, y_hat) + InfoNCE(y_hat, y_t)) instead."""
    return nt_xent(y_t, y_hat_t, temperature)


def augself_targets(params1, params2, jitter_strength=(0.4, 0.4, 0.2, 0.1)):
    """AugSelf targets for the rows [h1||h2; h2||h1]: {'crop': (2B, 4), 'color': (2B, 4)}, diff(a, b) = a - b
    of crop = [centre_y, centre_x, height, width] in fractions of the image, centre_x -> 1 - centre_x for
    *both views* where view a is flipped (as AugSelf's code, even when b is not), and colour = [(b-1),
    (c-1), (s-1), hue] / (2 * strength), the width of the jitter range as AugSelf, 0 without jitter."""
    def crop_of(p, flipped):  # (B, 4)
        top, left, height, width = p["crop"].unbind(1)
        cx = left + width / 2
        return torch.stack([top + height / 2, torch.where(flipped, 1 - cx, cx), height, width], dim=1)

    def color_of(p):
        # Column by column with Python scalars: constants built from lists would be host->device copies.
        j = p["jitter"]
        centred = [j[:, i] - (1.0 if i < 3 else 0.0) for i in range(4)]
        scaled = torch.stack([c / (2 * s) for c, s in zip(centred, jitter_strength)], dim=1)
        return scaled * p["jitter_applied"].to(j.dtype)[:, None]  # (B, 4)

    def diff(pa, pb):
        flipped = pa["flip"].bool()
        return {"crop": crop_of(pa, flipped) - crop_of(pb, flipped), "color": color_of(pa) - color_of(pb)}

    d12, d21 = diff(params1, params2), diff(params2, params1)
    return {t: torch.cat([d12[t], d21[t]]) for t in ("crop", "color")}


class AugSelfHead(nn.Module):
    """One AugSelf predictor per task on [h1||h2] and [h2||h1], 2D-512-512-4 with BN-ReLU, a bias on the last
    Linear only. It reads the backbone representation (not the projection) without detaching, as AugSelf."""

    def __init__(self, in_dim, hidden_dim=512, input_norm=False):
        super().__init__()
        self.input_norm = nn.LayerNorm(in_dim) if input_norm else nn.Identity()
        self.heads = nn.ModuleDict({t: build_mlp(3, 2 * in_dim, hidden_dim, 4, last_bn=False, last_bias=True)
                                    for t in ("crop", "color")})

    def forward(self, h1, h2):  # (B, D) each -> {task: (2B, 4)}
        h1, h2 = self.input_norm(h1), self.input_norm(h2)
        pairs = torch.cat([torch.cat([h1, h2], dim=1), torch.cat([h2, h1], dim=1)])  # (2B, 2D)
        return {t: head(pairs) for t, head in self.heads.items()}


def augself_loss(preds, targets):
    """sum_task 0.5 * MSE(tanh(pred), target), SER's ImageNet-100 weights; MSE over the global batch."""
    total = 0.0
    for t, w in (("crop", 0.5), ("color", 0.5)):
        pred = torch.tanh(_upcast(preds[t]))  # (2B, 4)
        sq = (pred - targets[t].to(pred.dtype)).pow(2).sum()
        total = total + w * _global_mean_of_sum(sq, global_count(pred.shape[0]) * pred.shape[1])
    return total


class ESSLHead(nn.Module):
    """E-SSL rotation classifier, SER's D-D-D-256-4: [Linear -> LayerNorm -> ReLU] x 3 -> Linear; no BN."""

    def __init__(self, in_dim, bottleneck_dim=256, input_norm=False):
        super().__init__()
        dims = [in_dim, in_dim, in_dim, bottleneck_dim]
        layers = [nn.LayerNorm(in_dim)] if input_norm else []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers, nn.Linear(bottleneck_dim, 4))

    def forward(self, h):  # (N, D) -> (N, 4) logits
        return self.net(h)


def essl_rotations(x):
    """(B, C, H, W) small crops -> ((4B, C, H, W) rotated by 0/90/180/270 deg counter-clockwise,
    (4B,) labels 0..3), rotation-major. H must equal W for the four copies to batch together."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"E-SSL crops must be square to batch the rotations, got {tuple(x.shape[-2:])}")
    labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])  # (4B,)
    return torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]), labels


def essl_loss(logits, labels):
    """Rotation cross-entropy averaged over the global batch (the total loss weighs it by E-SSL's 0.4)."""
    ce = F.cross_entropy(_upcast(logits), labels, reduction="sum")
    return _global_mean_of_sum(ce, global_count(logits.shape[0]))

"""Vision Transformer with SER's layer split, in timm/DINO parameter names.

`build_vit(dict(name="vit_small", patch_size=16))` has exactly the 150 keys and shapes of timm's
`vit_small_patch16_224(num_classes=0)` and DINO's `vit_small`, so released DINO and timm ViT-S/16 weights
load with strict=True and give the same outputs (load_backbone).

SER splits the encoder as f = f2 . f1 (aitrics-chris/SER vision_transformer.py): with `cls_after_block=L`,
blocks 1..L see patch tokens only, their output goes through its own LayerNorm (`norm_equiv`) and becomes
the token map that L_equiv acts on, and the [CLS] token joins before block L+1. L = 0 is the standard ViT.
"""

import errno
import functools
import hashlib
import json
import math
import os
import re
import tempfile
import textwrap
import time
from collections import OrderedDict
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint

try:
    import fcntl  # output-folder locks; Unix only
except ImportError:
    fcntl = None


class DropPath(nn.Module):
    """Stochastic depth per sample. With rows = (ids (B,) CPU long, n), the keep flags are drawn for all n rows
    of the global batch from torch's CPU generator and rows `ids` taken: a sample's mask is the same on any rank."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x, rows=None):
        if self.p == 0.0 or not self.training:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # (B, 1, ..., 1)
        if rows is None:
            keep = x.new_empty(shape).bernoulli_(1 - self.p)
        else:
            ids, n = rows
            keep = to_device(torch.rand(n)[ids] < 1 - self.p, x.device).to(x.dtype).view(shape)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)  # one Linear, as timm/DINO: keeps the keys
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attention=False):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each (B, H, T, hd)
        if return_attention:  # the readable path, for visualisation: the fused kernel never materialises (T, T)
            attn = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, T, T)
            out = attn @ v
        else:
            out, attn = F.scaled_dot_product_attention(q, k, v), None  # flash / memory-efficient kernels on GPU
        return self.proj(out.transpose(1, 2).reshape(B, T, D)), attn


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)  # exact erf GELU, as timm and DINO; named layers give timm's keys
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, return_attention=False, drop_path_rows=None):
        y, attn = self.attn(self.norm1(x), return_attention)
        x = x + self.drop_path(y, drop_path_rows)
        x = x + self.drop_path(self.mlp(self.norm2(x)), drop_path_rows)
        return x, attn


def sincos_pos_embed(dim, h, w):
    """MoCo v3's fixed 2-D sin-cos table (h*w, dim), row-major: channels [sin(a w), cos(a w), sin(b w), cos(b w)]
    with a the row, b the column (MoCo v3's meshgrid is 'ij', despite its names), w_d = 1 / 10000^(d / (dim/4))."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(h * w, dtype=torch.float64)  # row-major
    a = (pos // w)[:, None] * omega  # (h*w, dim/4)
    b = (pos % w)[:, None] * omega
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1).float()


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=384, depth=12, num_heads=6,
                 mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0, pos_embed="learned",
                 cls_after_block=0, stop_grad_conv1=False, weight_init="trunc_normal"):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if not 0 <= cls_after_block < depth:
            raise ValueError(f"cls_after_block must be in [0, depth={depth}), got {cls_after_block}")
        if pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {pos_embed!r}")
        if weight_init not in ("trunc_normal", "moco"):
            raise ValueError(f"weight_init must be 'trunc_normal' or 'moco', got {weight_init!r}")
        # The arguments (the only locals yet), saved in every checkpoint: a state dict shows no head count or SER split.
        self.arch = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.patch_size, self.embed_dim, self.depth, self.num_heads = patch_size, embed_dim, depth, num_heads
        self.cls_after_block = cls_after_block
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.grad_checkpointing = False  # trade compute for memory at large per-GPU batches
        self.drop_path_rows = None  # (ids, n) of the next calls' samples for DropPath; None: drawn per sample

        # timm's key patch_embed.proj: (B, 3, H, W) -> (B, D, H/p, W/p)
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Standard ViT: a [CLS] slot first (timm no_embed_class=False). SER: the [CLS] joins late and
        # gets no position, so the table covers patches only (the release's (1, 196, 384)).
        num_pos = self.grid_size[0] * self.grid_size[1] + (cls_after_block == 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dim), requires_grad=(pos_embed == "learned"))
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]  # stochastic depth grows with depth
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if cls_after_block:
            self.norm_equiv = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights(pos_embed, weight_init)
        self.patch_embed.proj.requires_grad_(not stop_grad_conv1)  # MoCo v3: frozen at random init, for stability

    @torch.no_grad()
    def _init_weights(self, pos_embed, weight_init):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if weight_init == "moco":
                    nn.init.xavier_uniform_(m.weight)
                else:
                    nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if pos_embed == "sincos":
            table = sincos_pos_embed(self.embed_dim, *self.grid_size)  # (N, D)
            self.pos_embed[0, -len(table):] = table  # the [CLS] slot, if any, stays zero
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if weight_init == "moco":
            for blk in self.blocks:  # Xavier per q, k and v rather than over the fused (3D, D) matrix
                bound = math.sqrt(6.0 / (blk.attn.qkv.weight.shape[0] // 3 + blk.attn.qkv.weight.shape[1]))
                nn.init.uniform_(blk.attn.qkv.weight, -bound, bound)
            nn.init.normal_(self.cls_token, std=1e-6)
            bound = math.sqrt(6.0 / (3 * self.patch_size ** 2 + self.embed_dim))
            nn.init.uniform_(self.patch_embed.proj.weight, -bound, bound)
        else:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            nn.init.trunc_normal_(self.patch_embed.proj.weight, std=0.02)
        nn.init.zeros_(self.patch_embed.proj.bias)

    # ------------------------------------------------------------------ tokens
    def resampled_pos_embed(self, h, w):
        """Position table for an (h, w) patch grid, (1, [1+] h*w, D): bicubic in float32 (multi-crop, SER's grids)."""
        n_cls = int(self.cls_after_block == 0)
        if (h, w) == self.grid_size:
            return self.pos_embed
        patch_pos = self._to_map(self.pos_embed[:, n_cls:], *self.grid_size).float()  # (1, D, gh, gw)
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", align_corners=False)  # (1, D, h, w)
        patch_pos = patch_pos.flatten(2).transpose(1, 2).to(self.pos_embed.dtype)  # (1, h*w, D)
        return torch.cat([self.pos_embed[:, :n_cls], patch_pos], dim=1)

    def _iter_blocks(self, x, return_attention=False):
        """Yield (l, tokens, attn) after each block l = 1..depth; tokens (B, [1+] N, D), [CLS] first when present."""
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input {H}x{W} is not divisible by the patch size {self.patch_size}")
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        if self.cls_after_block == 0:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.resampled_pos_embed(H // self.patch_size, W // self.patch_size)
        rows = self.drop_path_rows  # passed explicitly: a checkpointed block recomputes with the same rows
        for l, blk in enumerate(self.blocks, start=1):
            if self.grad_checkpointing and self.training and not return_attention:
                x, attn = checkpoint(blk, x, False, rows, use_reentrant=False)
            else:
                x, attn = blk(x, return_attention, rows)
            yield l, x, attn
            if l == self.cls_after_block:
                x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # f2 starts here

    @staticmethod
    def _to_map(patches, h, w):  # (B, N, D) -> (B, D, h, w), row-major; D explicit, as B may be 0
        return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], h, w)

    # ------------------------------------------------------------------ outputs
    def forward(self, x):
        return self.forward_features(x)["cls"]  # (B, D)

    def forward_features(self, x, layer=None):
        """Final-normed [CLS] and patches; with `layer`, also that block's token map (through `norm_equiv` at
        SER's split layer: the map L_equiv acts on) and its [CLS] (None where [CLS] has not joined yet)."""
        if layer is not None and not 1 <= layer <= self.depth:
            raise ValueError(f"layer must be in 1..{self.depth}, got {layer}")
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        out = {"grid": (h, w)}
        for l, tokens, _ in self._iter_blocks(x):
            if l == layer:
                patches = tokens[:, int(l > self.cls_after_block):]
                if l == self.cls_after_block:
                    patches = self.norm_equiv(patches)
                out["token_map"] = self._to_map(patches, h, w)  # (B, D, h, w)
                out["cls_at_layer"] = tokens[:, 0] if l > self.cls_after_block else None  # (B, D)
        tokens = self.norm(tokens)
        out["cls"], out["patch"] = tokens[:, 0], tokens[:, 1:]  # (B, D), (B, N, D)
        return out

    def get_intermediate_layers(self, x, n=1):
        """DINO's linear-eval features: the last n block outputs through the final norm, [(B, 1+N, D)]."""
        if not 1 <= n <= self.depth - self.cls_after_block:
            raise ValueError(f"n must be in 1..{self.depth - self.cls_after_block} "
                             f"([CLS] joins after block {self.cls_after_block}), got {n}")
        return [self.norm(t) for l, t, _ in self._iter_blocks(x) if l > self.depth - n]

    def block_token_maps(self, x):
        """Raw patch tokens after every block l = 1..depth, each (B, D, h, w): for equivariance scores."""
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return [self._to_map(t[:, int(l > self.cls_after_block):], h, w) for l, t, _ in self._iter_blocks(x)]

    def forward_with_attention(self, x):
        """[CLS] (B, D) through the readable attention path, plus every block's attention (B, H, T, T)."""
        blocks = list(self._iter_blocks(x, return_attention=True))
        return self.norm(blocks[-1][1])[:, 0], [attn for _, _, attn in blocks]


# The sizes of timm's and DINO's vit_tiny/small/base; every other option keeps VisionTransformer's default.
ARCHS = {"vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
         "vit_small": dict(embed_dim=384, depth=12, num_heads=6),  # timm's, DINO's and the SER release's
         # facebookresearch/moco-v3 vits.py vit_small: 12 heads of 32 dims, which no weight shape shows
         "vit_small_mocov3": dict(embed_dim=384, depth=12, num_heads=12),
         "vit_base": dict(embed_dim=768, depth=12, num_heads=12)}
# Keys of ViT variants this ViT does not compute; loading around them would change the network's function.
UNSUPPORTED_KEYS = {"fc_norm": "timm's global-pool fc_norm", "reg_token": "register tokens",
                    "dist_token": "DeiT's distillation token", "ls1": "layer scale"}


def build_vit(arch):
    """Rebuild a ViT from a saved `arch` dict, or from {'name': 'vit_small', **overrides} for released weights."""
    arch = dict(arch)
    name = arch.pop("name", None)
    if name is not None and name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; choose from {sorted(ARCHS)}")
    return VisionTransformer(**{**ARCHS.get(name, {}), **arch})


# ---------------------------------------------------------------------- devices and precision
def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor (augmentation parameters, indices, stochastic-depth masks) to `device` without
    making the host wait: on CUDA it is pinned first, as a copy from pageable memory waits for the GPU."""
    if t.device.type == "cpu" and device.type == "cuda" and not torch.compiler.is_compiling():  # (no pin in a graph)
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


# The one home of every script's autocast. bf16 needs no loss scaling and keeps fp32's range; the
# losses upcast their inputs to float32 themselves (losses.py).
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16():
    """Whether this CPU computes bf16 matmuls in hardware: AVX512_BF16 or AMX. Elsewhere (AVX2 only, AVX-512
    without BF16) torch emulates bf16, ~100x slower than fp32. torch's cpuinfo queries, else /proc/cpuinfo flags."""
    if hasattr(torch.cpu, "_is_avx512_bf16_supported") and hasattr(torch.cpu, "_is_amx_tile_supported"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: no reliable query, so no bf16 by default
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(device, precision="auto"):
    """'auto': bf16 on CUDA and on CPUs with native bf16, else fp32. fp16's loss scaler is CUDA-only here."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"fp16 needs a CUDA device (got {device.type}); use bf16 or fp32")
    return precision


def autocast(device, precision="auto"):
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[resolve_precision(device, precision)]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------------- checkpoints
# Wrappers (torch.compile, DDP) put these in front of the backbone's names: stripped at a key's start only.
WRAPPER_PREFIXES = re.compile(r"^(_orig_mod\.|module\.)+")


def strip_prefixes(state_dict):
    """Backbone keys in bare timm format: wrapper prefixes stripped, then only the backbone component's keys
    kept (e.g. DINO's 'backbone.' next to 'head.': the other components are heads, dropped on purpose)."""
    sd = {WRAPPER_PREFIXES.sub("", k): v for k, v in state_dict.items()}
    for p in ("backbone.", "base_encoder.", "encoder."):  # DINO MultiCropWrapper / ours, MoCo v3, generic
        if any(k.startswith(p) for k in sd):
            return {WRAPPER_PREFIXES.sub("", k[len(p):]): v for k, v in sd.items() if k.startswith(p)}
    return sd


def _finite_or_null(obj):
    """NaN and inf as None: json.dump writes them as bare NaN / Infinity, which strict parsers (JSON.parse) reject."""
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def save_atomic(path, obj, indent=1):
    """Write `obj` to `path` (strict JSON for `.json`, a list of records as JSON lines for `.jsonl`, a PIL image in the
    format of its extension, else torch.save) so that an interruption or a failed write (a full disk) never leaves a
    partial or lost file: os.replace is atomic."""
    path = os.fspath(path)
    as_json, as_lines = path.endswith(".json"), path.endswith(".jsonl")
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")  # one writer per process: no clash between ranks
    try:
        with open(tmp, "w" if as_json or as_lines else "wb") as f:
            if as_json:
                json.dump(_finite_or_null(obj), f, indent=indent)
            elif as_lines:
                f.writelines(json.dumps(record) + "\n" for record in obj)
            elif isinstance(obj, Image.Image):  # the temporary name has no image extension: PIL needs the format
                obj.save(f, format=Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG"))
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException as e:  # also a kill (KeyboardInterrupt) or an object that cannot be serialised
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            fix = ("move that folder away" if os.path.isdir(path) else "free some space" if e.errno == errno.ENOSPC
                   else "check its permissions")
            raise OSError(f"could not write {path}: {e.strerror or e}; the previous file, if any, is intact "
                          f"({fix} or choose another output folder)") from None
        raise


def append_jsonl(path, record):
    """One JSON line appended to a log; a last line that a kill left unfinished is ended first, costing only itself."""
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(max(0, end - 1))
        f.write((b"" if end == 0 or f.read(1) == b"\n" else b"\n") + json.dumps(record).encode() + b"\n")


def restart_log(path, step, key="step"):
    """A log.jsonl as of the checkpoint a run resumes at `step` (0: a new run, an empty log). Lines that a crash wrote
    after the checkpoint, or a failed run before it, would otherwise stand beside the new ones."""
    if not os.path.exists(path):
        return
    if not os.path.isfile(path):  # reading a pipe would wait for a writer for good, /dev/zero fill the memory
        raise OSError(errno.EINVAL, "not a regular file (a pipe or a device); move it away", path)
    records = []
    if step:
        with open(path, errors="replace") as f:  # bytes a crash left are a line that does not parse, not an error
            for line in f:
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):  # a line that a kill cut short, or not ours
                    continue
                if isinstance(record, dict) and isinstance(record.get(key), (int, float)) and record[key] <= step:
                    records.append(record)
    elif os.path.getsize(path):  # called on rank 0 only
        print(f"note: {path} held the records of a run that wrote no checkpoint; this new run starts it afresh")
    save_atomic(path, records)


@contextmanager
def exit_on_write_error(prefix=""):
    """Every script's outputs: a failed write ends the run with one line naming the file, `prefix` first."""
    try:
        yield
    except OSError as e:
        message = f"could not write {e.filename}: {e.strerror}" if e.filename else str(e)
        raise SystemExit(prefix + message) from None


def weights_source(path, key=None):
    """What an evaluation's results are of, for make_output_dir: the resolved file, and the network in it if named."""
    return os.path.realpath(path) + (f" ({key})" if key else "")


_LOCKED = {}  # output folders this process holds: resolved path -> the descriptor of its .lock
LOCK_WAIT_S = 60  # a requeued job may start while its predecessor still saves on its signal


def lock_output_dir(path, prefix="", flag="--output-dir"):
    """One run at a time in an output folder: a second one (a job requeued while the first still runs, a typo) would
    interleave its log and checkpoints with the first's. An flock on <path>/.lock, which the OS drops when the holder
    exits, waited for up to LOCK_WAIT_S; a process takes it once, so its runs one after another share it."""
    key = os.path.realpath(path)
    if fcntl is None or key in _LOCKED:
        return
    try:  # non-blocking: a pipe named .lock must not hang the run
        lock = os.open(os.path.join(path, ".lock"), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK, 0o644)
    except OSError:  # a folder or a pipe by that name: go on without a lock, as where the file system has none
        return
    for waited in range(LOCK_WAIT_S + 1):
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _LOCKED[key] = lock
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):  # a file system without locks
                os.close(lock)
                return
        if waited == 0:
            print(f"{path} is in use by another run; waiting up to {LOCK_WAIT_S} s for it to end", flush=True)
        if waited < LOCK_WAIT_S:
            time.sleep(1)
    os.close(lock)
    raise SystemExit(f"{prefix}{flag} {path} is in use by another run (it holds {path}/.lock): wait for it to end or "
                     f"choose another {flag}")


def data_location(data):
    """--data however it is written (trailing slash, relative, through a link): a folder, or the folder of
    'cifar10:<dir>', by its real path; anything else ('synthetic') as given."""
    if not isinstance(data, str) or data == "synthetic":  # the built-in data, whatever folder has that name
        return data
    if os.path.isdir(data):
        return os.path.realpath(data)
    kind, colon, root = data.partition(":")
    return f"{kind}:{os.path.realpath(root)}" if colon and os.path.isdir(root) else data


def make_output_dir(path, prefix="", flag="--output-dir", outputs=(), sources=None, lock=False, data=None,
                    drops=()):
    """An output folder, created and tried before any work, so that a run never computes results it cannot write.
    `outputs`: the files the run will write there (none may be a folder), the results JSON last. `sources`: what the
    results are of (resolved paths), recorded in that JSON as "source": results of these or of some of them are
    replaced (a rerun, a comparison with one more run), those of anything else kept by refusing the run (evaluation
    scripts share default folders). `data`: what they are computed on, recorded as "data": results of the same weights
    on other data are kept alike (an earlier version's JSON lacks it: not checked). `drops`: the result sections of
    that JSON this run does not write, kept alike. `lock`: hold the folder (lock_output_dir), on one rank only."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise SystemExit(f"{prefix}{flag} {path}: cannot write there ({e.strerror or e}); choose another") from None
    for name in outputs:
        if os.path.isdir(os.path.join(path, name)):
            raise SystemExit(f"{prefix}{flag} {path}: {name} there is a folder, where the run writes a file; move it "
                             "away or choose another")
    if lock:
        lock_output_dir(path, prefix, flag)
    if sources is None:
        return
    results, record = os.path.join(path, outputs[-1]), None
    try:  # a regular file of a results file's size: not a pipe, a device or a checkpoint
        if os.path.isfile(results) and os.path.getsize(results) < 2**24:
            with open(results) as f:
                record = json.load(f)
    except (OSError, ValueError, RecursionError):
        pass
    earlier = record.get("source") if isinstance(record, dict) else []  # none yet, or not JSON results
    if isinstance(record, dict) and "source" not in record and isinstance(record.get("backbone"), str):
        # an earlier version's linear_eval or detect_eval results: their weights as given, resolved from here
        earlier = [weights_source(record["backbone"]) if os.path.exists(record["backbone"]) else record["backbone"]]
    if isinstance(earlier, str):  # an earlier version's: one source
        earlier = [earlier]
    if not isinstance(earlier, list):  # results that do not say what they are of may be anyone's: not guessed
        raise SystemExit(f"{prefix}{flag} {path} holds a {outputs[-1]} that records no source, which this run would "
                         f"replace: move it away or choose another {flag}")
    lost = [s for s in earlier if s not in sources]
    if lost:
        raise SystemExit(f"{prefix}{flag} {path} holds the {outputs[-1]} of {', '.join(map(str, lost))}, this run's "
                         f"({', '.join(sources)}) would replace it: choose another {flag} (or move that one away)")
    lost = [k for k in drops if isinstance(record, dict) and k in record]  # sections this run would not write again
    if lost:
        raise SystemExit(f"{prefix}{flag} {path} holds {outputs[-1]} results of {', '.join(lost)}, which this run "
                         f"would drop: run those again with it, or choose another {flag}")
    before = record.get("data") if isinstance(record, dict) else None
    # Recorded resolved (data_location); an older file's relative path, resolved here, is compared as well.
    if data is not None and before is not None and data_location(data) not in (before, data_location(before)):
        raise SystemExit(f"{prefix}{flag} {path} holds the {outputs[-1]} of {', '.join(map(str, earlier))} on "
                         f"{before}, this run's on {data} would replace it: choose another {flag} (or move that one "
                         "away)")


def refuse_special_file(path, what):
    """ValueError naming `path` where it exists but is neither a regular file nor a folder: open() would wait on a
    pipe for a writer for good, and read a device such as /dev/zero without end."""
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is not a regular file (a pipe or a device), so not {what}")


def load_checkpoint(path, map_location="cpu"):
    """torch.load(path, weights_only=True): tensors and plain values only, so a crafted file cannot run code.
    Every failure is a one-line error naming the file: FileNotFoundError when it is missing, else ValueError."""
    refuse_special_file(path, "a checkpoint file")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as e:
        message = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", message)
        if found:  # the unpickler met a class or function it will not import
            raise ValueError(
                f"{path} holds Python objects beyond tensors and plain values ({found.group(1)}); it was not "
                "loaded because unpickling them can run code. If you trust the file, re-save it without them, "
                f"e.g. python -c \"import torch; c = torch.load('{path}', weights_only=False); "
                "torch.save({k: v for k, v in c.items() if isinstance(v, dict)}, 'weights.pth')\" (its state dicts), "
                "and pass weights.pth") from None
        first_line = textwrap.shorten((message.strip().splitlines() or [""])[0], 100)
        reason = f"{type(e).__name__}: {first_line}" if first_line else type(e).__name__
        raise ValueError(f"{path} is not a readable checkpoint ({reason}): it is truncated, empty or not a "
                         "torch file") from None


def load_resumable(path, args, keys, script, runtime_options, map_location="cpu"):
    """A run's own checkpoint to resume from, refused when another script wrote it (it lacks `keys`) or with
    other settings than `args`: only runtime_options, which do not change what is computed, may differ."""
    try:
        ckpt = load_checkpoint(path, map_location)
    except (FileNotFoundError, ValueError) as e:  # also a link to a file that is gone
        raise ValueError(f"{e}; move it away or use another --output-dir") from None
    if not (isinstance(ckpt, dict) and {"args", *keys} <= set(ckpt) and isinstance(ckpt["args"], dict)):
        raise ValueError(f"{path} is not a {script} checkpoint; move it away or use another --output-dir")
    saved, now, absent = ckpt["args"], vars(args), "(absent)"  # a setting one side lacks differs too (another version)

    def setting(values, k):  # --data by where it is (a trailing slash is no change); a typed list is its default tuple
        v = values.get(k, absent)
        return data_location(v) if k == "data" else list(v) if isinstance(v, tuple) else v

    names = [*saved, *sorted(now.keys() - saved.keys())]
    changed = [(k, saved.get(k, absent), now.get(k, absent)) for k in names
               if k not in runtime_options and setting(saved, k) != setting(now, k)]
    if changed:
        raise ValueError(f"{path} was written with different settings: "
                         + ", ".join(f"--{k.replace('_', '-')} {a!r} (now {b!r})" for k, a, b in changed)
                         + ". Use another --output-dir, or rerun with the saved settings.")
    return ckpt


def weights_digest(model):
    """A fingerprint of a network's weights, to tell whether results were computed on these weights: a file name
    can be overwritten since (detect_eval's resume, robustness_eval's table of linear_eval.json numbers)."""
    h = hashlib.blake2b(digest_size=16)
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype
    return h.hexdigest()


def refuse_non_finite(path, state_dict):
    """NaN or inf weights would give made-up accuracies downstream: a one-line ValueError naming the file."""
    bad = [k for k, t in state_dict.items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{path} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s), e.g. {bad[:3]}: "
                         "the run that wrote it diverged; use an earlier checkpoint")


def default_network_key(ckpt):
    """The network of a full checkpoint read without --checkpoint-key: the one ours evaluate (eval_key), else the
    first entry of the known layouts; None for a bare state dict."""
    if isinstance(ckpt.get("eval_key"), str) and ckpt["eval_key"] in ckpt:
        return ckpt["eval_key"]
    return next((k for k in ("backbone", "teacher", "student", "state_dict", "model") if isinstance(ckpt.get(k), dict)),
                None)


def load_backbone(path, arch=None, key=None):
    """A frozen-ready ViT (eval mode) from pretrain.py's export ({'arch', 'backbone'}) or full checkpoint (the
    network `key` names, else the one its method evaluates: DINO's teacher, the others' online encoder), or from
    released DINO/timm/MoCo v3 weights, which record no architecture: pass `arch` (dict(name='vit_small', ...))."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")

    saved_arch = ckpt["arch"] if isinstance(ckpt.get("arch"), dict) else None  # MoCo v3 saves a name string there
    if key is not None and key not in ckpt:
        raise ValueError(f"{path}: no key {key!r}; top-level keys are {sorted(ckpt)}")
    network = key if key is not None else default_network_key(ckpt)
    sd = ckpt if network is None else ckpt[network]
    tensors = isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())
    if not (tensors and sd):  # an empty entry (a scaler's state) would "fit" with every key missing
        networks = sorted(k for k, v in ckpt.items() if isinstance(v, dict) and any(
            str(n).endswith("pos_embed") and isinstance(t, torch.Tensor) for n, t in v.items()))  # ViT weights
        raise ValueError(f"{path}: {repr(key) if key else 'the file'} holds no network weights; pass --checkpoint-key "
                         f"with one of {networks}")
    # facebookresearch/moco-v3 main_moco.py saves {'arch': 'vit_small', 'state_dict': {'module.base_encoder...'}}, a
    # 12-head ViT-S whose weights read alike into 6 heads: the function would differ silently.
    moco_v3 = ckpt.get("arch") == "vit_small" and any(k.startswith(("module.base_encoder.", "base_encoder."))
                                                      for k in sd)
    if moco_v3 and (arch or {}).get("name") == "vit_small":
        raise ValueError(f"{path} is a MoCo v3 checkpoint, whose vit_small has 12 heads (timm's and DINO's: 6); pass "
                         "--arch vit_small_mocov3")
    sd = strip_prefixes(sd)
    # Heads (timm's classifier, MoCo v3's projector) and what only pretraining reads (MAE's decoder, mask tokens).
    dropped = sorted(k for k in sd if k.startswith(("head.", "decoder", "mask_token", "masked_embed")))
    table = sd.get("pos_embed")
    rows = table.shape[1] if isinstance(table, torch.Tensor) and table.dim() == 3 else 0
    cls_row = rows > 1 and math.isqrt(rows - 1) ** 2 == rows - 1  # [CLS] slot + grid^2 (a grid^2 table has none)
    split = (arch or {}).get("cls_after_block")
    if saved_arch is None:  # released weights: what they were trained with, read off them where it shows
        if cls_row and split:
            raise ValueError(f"{path} is a standard ViT (its position table has a [CLS] row, {rows} rows): its [CLS] "
                             "joins before block 1; drop --equiv-layer")
        # The SER release's baselines and add-ons (--equiv-mode inv, augself, equimod, essl) are standard ViTs, whose
        # norm_equiv is the final norm again or normalises only an add-on's input, not the features.
        if "norm_equiv.weight" in sd and cls_row:
            dropped += sorted(k for k in sd if k.startswith("norm_equiv."))
        elif "norm_equiv.weight" in sd and not split:
            raise ValueError(f"{path} holds SER release weights (aitrics-chris/SER), whose [CLS] joins after a block "
                             "no weight shape shows: pass --equiv-layer as in its run (3 in its run_pretrain.sh)")
        if arch is None:
            raise ValueError(f"{path} records no architecture (a released checkpoint?): pass the arch, e.g. --arch "
                             f"{'vit_small_mocov3' if moco_v3 else 'vit_small'} --patch-size 16; the head count cannot "
                             "be read off the weights")
        if rows > 1:  # its training resolution, off the position table
            arch = {**arch, "img_size": math.isqrt(rows - (not split)) * arch.get("patch_size", 16)}
        blocks = [int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()]
        if "depth" not in arch and "name" not in arch and blocks:  # its depth, off the block keys
            arch = {**arch, "depth": 1 + max(blocks)}
    elif arch is not None:
        with torch.random.fork_rng(devices=[]):  # models built to be overwritten leave the caller's generator alone
            requested = build_vit(arch).arch
        trained_with = ("patch_size", "embed_dim", "depth", "num_heads", "cls_after_block")
        clash = {k: (saved_arch.get(k), requested[k]) for k in trained_with if saved_arch.get(k) != requested[k]}
        if clash:
            raise ValueError(f"{path}: the checkpoint's architecture differs from the requested one: "
                             + ", ".join(f"{k} saved={a} requested={b}" for k, (a, b) in clash.items()))
    sd = {k: v for k, v in sd.items() if k not in dropped}
    try:
        with torch.random.fork_rng(devices=[]):
            model = build_vit(saved_arch if saved_arch is not None else arch)
    except (TypeError, ValueError) as e:  # a recorded arch with unknown keys or values of the wrong type
        raise ValueError(f"{path}: its recorded architecture does not build a ViT ({e}); it was not written by "
                         "pretrain.py") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shape_mismatch = [(k, tuple(sd[k].shape), tuple(expected[k].shape))
                      for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    feature = next((UNSUPPORTED_KEYS[part] for k in unexpected for part in k.split(".") if part in UNSUPPORTED_KEYS),
                   None)
    if feature:
        raise ValueError(f"{path} holds {feature}, which this ViT (timm's plain VisionTransformer) does not compute: "
                         "it cannot be evaluated here")
    if missing or unexpected or shape_mismatch:
        raise ValueError(f"{path} does not fit a {model.arch['embed_dim']}-dim, depth-{model.arch['depth']} ViT with "
                         f"patch {model.patch_size}: {len(missing)} missing keys {missing[:3]}, {len(unexpected)} "
                         f"unexpected {unexpected[:3]}, {len(shape_mismatch)} of another shape {shape_mismatch[:2]}; "
                         "check --arch, --patch-size, --depth")
    refuse_non_finite(path, sd)
    model.load_state_dict(sd, strict=True)
    model.dropped_keys = dropped  # linear_eval.py reports them
    # How far its run had come: pretrain.py's step of total_steps, or what a linear_probe.pth recorded of its backbone
    probe_record, run_record = ckpt.get("backbone_unfinished"), (ckpt.get("step"), ckpt.get("total_steps"))
    steps = tuple(probe_record) if isinstance(probe_record, (list, tuple)) else run_record
    model.unfinished = steps if len(steps) == 2 and all(type(s) is int for s in steps) and steps[0] < steps[1] else None
    return model.eval()


def add_backbone_flags(parser):
    """The backbone flags of linear_eval.py and detect_eval.py, read by backbone_from_flags."""
    g = parser.add_argument_group("backbone")
    g.add_argument("--pretrained", default=None, help="pretrain.py export (backbone.pth) or full checkpoint, or "
                   "released DINO/timm/MoCo v3/SER weights (then also --arch/--patch-size; SER: --equiv-layer)")
    g.add_argument("--checkpoint-key", default=None, help="network of a full checkpoint; default: the one its "
                   "method evaluates (DINO: 'teacher'). Use 'student' to follow SER's lincls_parallel.py")
    g.add_argument("--arch", default=None, choices=sorted(ARCHS), help="required for released weights (they "
                   "record no architecture) and for --random-init; leave unset for our own checkpoints")
    g.add_argument("--patch-size", type=int, default=None, help="with --arch only (default 16): 8 for DINO's /8 models")
    g.add_argument("--depth", type=int, default=None, help="with --arch: its number of blocks (default 12; "
                   "pretrain.py's built-in runs: 4)")
    g.add_argument("--equiv-layer", type=int, default=None, help="with --arch, for SER release weights: the block "
                   "after which their [CLS] joins (its --equiv-layer; 3); ours record it")
    g.add_argument("--random-init", action="store_true", help="an untrained --arch: the baseline at initialisation")


def backbone_from_flags(path, arch=None, patch_size=None, key=None, random_init=False, img_size=224, depth=None,
                        flag="--pretrained", equiv_layer=None, log=print):
    """The frozen ViT (eval mode) that a script's backbone flags name (add_backbone_flags, robustness_eval.py's
    --backbone), every error a one-line SystemExit naming `flag`, and a note through `log` when its run had not
    finished. --random-init draws from torch's generator: seed it alike on every rank first."""
    if arch is None and (patch_size or depth or equiv_layer) is not None:  # ours record them: a no-op otherwise
        raise SystemExit("--patch-size, --depth and --equiv-layer describe released weights or --random-init: pass "
                         "them with --arch")
    requested = dict(name=arch, patch_size=patch_size or 16)
    if depth is not None:
        requested["depth"] = depth
    if equiv_layer is not None:
        blocks = depth or ARCHS[arch]["depth"]
        if not 1 <= equiv_layer < blocks:
            raise SystemExit(f"--equiv-layer {equiv_layer}: [CLS] joins after one of blocks 1..{blocks - 1}")
        requested["cls_after_block"] = equiv_layer
    if random_init:
        if path is not None:
            raise SystemExit("--random-init and --pretrained exclude each other")
        if arch is None:
            raise SystemExit(f"--random-init needs --arch (one of: {', '.join(sorted(ARCHS))})")
        try:
            return build_vit(dict(requested, img_size=img_size)).eval()
        except ValueError as e:
            raise SystemExit(f"--random-init --arch {arch}: {e}") from None
    if path is None:
        raise SystemExit(f"pass {flag} PATH, or --random-init --arch NAME for the baseline at initialisation")
    try:
        model = load_backbone(path, requested if arch else None, key)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(f"{flag}: {e}") from None
    if model.unfinished:  # a backbone.pth exported at an epoch's end or on a signal
        log(f"note: {path} is of step {model.unfinished[0]} of {model.unfinished[1]}: its run has not finished")
    return model

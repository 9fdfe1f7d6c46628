"""The SER transformation group, acting on pixels and on ViT token maps. An element g acts on a batch as

    g(x) = R90^k( Resize_size( F^flip( R180^rot180(x) ) ) )

read right to left, the order the release builds SER's "b2" views in (aitrics-chris/SER, `Aug_equi.aug_equiv`); R90 is a
counter-clockwise torch.rot90 on dims (-2, -1). flip and rot180 are per sample, k and size shared by the batch, as a
quarter turn of a non-square grid or a resize changes the shape: the output grid is `size`, transposed for odd k.

Exactness: D4 parts (k, flip, rot180) compose and invert bit for bit. As continuous maps two resizes
compose into the last one (align_corners=False keeps pixel centres aligned), so compose keeps the last
target grid, although resampling twice differs slightly from resampling once. Shapes are always exact.

Run the demo:    python group_actions.py
"""
from __future__ import annotations

import functools
import math
import argparse
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import vit


@dataclass(eq=False)  # eq=False: comparing tensor fields with == has no single truth value
class GroupElement:
    k: int = 0                                # quarter turns (counter-clockwise), shared by the batch
    flip: Tensor | None = None                # (B,) bool, per-sample horizontal flip; None = no flips
    rot180: Tensor | None = None              # (B,) bool, per-sample 180-degree rotation; None = none
    size: tuple[int, int] | None = None       # token grid (h, w) before the rotation, shared; None = keep

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral):
            raise ValueError(f"GroupElement.k must be an int number of quarter turns, got {self.k!r}")
        self.k = int(self.k) % 4
        for name in ("flip", "rot180"):
            flags = getattr(self, name)
            if flags is not None and not (isinstance(flags, Tensor) and flags.dtype == torch.bool and flags.dim() == 1):
                raise ValueError(f"GroupElement.{name} must be a (B,) bool tensor or None, got "
                                 f"{_describe(flags)} (use .bool() on 0/1 tensors)")
        if self.flip is not None and self.rot180 is not None and len(self.flip) != len(self.rot180):
            raise ValueError(f"GroupElement.flip has {len(self.flip)} entries but rot180 has "
                             f"{len(self.rot180)}; both are per sample and need the batch size")
        if self.size is not None:
            self.size = _check_grid(self.size, "GroupElement.size")

    @property
    def batch_size(self) -> int | None:  # None: no per-sample flags, the element fits any batch
        flags = self.flip if self.flip is not None else self.rot180
        return None if flags is None else len(flags)


def _describe(v) -> str:
    return f"a {v.dtype} tensor of shape {tuple(v.shape)}" if isinstance(v, Tensor) else repr(v)


def _check_positive_int(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _check_grid(grid, name: str) -> tuple[int, int]:
    ok = (isinstance(grid, (tuple, list, torch.Size)) and len(grid) == 2
          and all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0 for n in grid))
    if not ok:
        raise ValueError(f"{name} must be a grid (h, w) of two positive ints, got {grid!r}")
    return int(grid[0]), int(grid[1])


def _check_batch(x: Tensor, g: GroupElement, what: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{what} must be a (B, C, H, W) tensor, got {_describe(x)}")
    if g.batch_size is not None and g.batch_size != x.shape[0]:
        raise ValueError(f"{what} has batch size {x.shape[0]} but the GroupElement has {g.batch_size} per-sample flags")
    if g.size is not None and not x.is_floating_point():
        raise ValueError(f"{what} must be floating point to be resized (bicubic), got {x.dtype}")


def _xor(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    # None means "all False", the neutral element of xor
    if a is None or b is None:
        return b if a is None else a
    return a ^ b.to(a.device)


def _where(mask: Tensor | None, x: Tensor, op) -> Tensor:
    """op(x) for the samples where mask is True, x elsewhere."""
    if mask is None or not mask.any():
        return x
    if mask.all():
        return op(x)
    # torch.where keeps both branches in the graph, so every sample still gets its gradient
    return torch.where(vit.to_device(mask, x.device).view(-1, 1, 1, 1), op(x), x)


def _act(x: Tensor, g: GroupElement, grid: tuple[int, int], resize) -> Tensor:
    """g(x) in the normal form; pixels and tokens differ only in `resize`, skipped when g.size is x's `grid`."""
    x = _where(g.rot180, x, lambda t: t.flip(-2, -1))   # R180 = flip both axes
    x = _where(g.flip, x, lambda t: t.flip(-1))          # F = flip the width axis
    if g.size not in (None, grid):
        x = resize(x)
    return torch.rot90(x, g.k, dims=(-2, -1)) if g.k else x


def select_samples(g: GroupElement, idx) -> GroupElement:
    """g on the samples `idx` (a slice or index tensor), e.g. those one process holds; k and size are shared."""
    return GroupElement(k=g.k, flip=None if g.flip is None else g.flip[idx],
                        rot180=None if g.rot180 is None else g.rot180[idx], size=g.size)


def sample_element(batch_size: int, generator: torch.Generator, base_grid=(14, 14),
                   scale=(0.7, 1.3), ratio=(3 / 4, 4 / 3)) -> GroupElement:
    """One random element, drawn like the release's Aug_equi.get_params (same draws, same order) from
    `generator` (a CPU torch.Generator): area = base_h*base_w*U(scale) tokens, aspect ratio log-uniform in
    `ratio`, then k ~ U{0..3} for the batch and per-sample rot180 and flip ~ Bernoulli(0.5)."""
    _check_positive_int(batch_size, "batch_size")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got {generator!r}")
    base_h, base_w = _check_grid(base_grid, "base_grid")
    for name, (lo, hi) in (("scale", scale), ("ratio", ratio)):
        if not 0 < lo <= hi:
            raise ValueError(f"{name} must be (lo, hi) with 0 < lo <= hi, got {(lo, hi)!r}")
    log_lo, log_hi = torch.log(torch.tensor(ratio)).tolist()
    area = base_h * base_w * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
    aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator).item())
    # The release calls these w and h but passes them to F.interpolate as (rows, cols), as we do (the
    # aspect law is symmetric in ar <-> 1/ar). max(1, .): tiny base grids could round to an empty grid.
    rows = max(1, round(math.sqrt(area * aspect)))
    cols = max(1, round(math.sqrt(area / aspect)))
    k = int(torch.randint(0, 4, (1,), generator=generator).item())
    rot180 = torch.rand(batch_size, generator=generator) > 0.5  # (B,)
    flip = torch.rand(batch_size, generator=generator) > 0.5    # (B,)
    return GroupElement(k=k, flip=flip, rot180=rot180, size=(rows, cols))


def sample_view_pair(batch_size: int, generator: torch.Generator, **kw) -> tuple[GroupElement, GroupElement]:
    """The release's pair of b2 views of one common crop: (g1, g2) = two sample_element(**kw) draws, g2's
    flags replaced by g1's negated (drawn and discarded, as the release, so the generator advances the same).
    Then g2 g1^-1 has one D4 part for every sample: R90^k2 . Resize . F . R180 . R90^-k1."""
    g1 = sample_element(batch_size, generator, **kw)
    g2 = sample_element(batch_size, generator, **kw)
    return g1, GroupElement(k=g2.k, flip=~g1.flip, rot180=~g1.rot180, size=g2.size)


def apply_to_images(x: Tensor, g: GroupElement, patch_size: int) -> Tensor:
    """(B, C, H, W) pixels -> g(x). A resize goes to (h*patch, w*patch) px, bicubic."""
    _check_positive_int(patch_size, "patch_size")
    _check_batch(x, g, "images")
    H, W = x.shape[-2:]
    if g.size is not None and (H % patch_size or W % patch_size):
        # g.size is in tokens: the scale means the same in pixels and in features only on a whole token grid
        raise ValueError(f"image size {H}x{W} is not divisible by patch_size {patch_size}")

    def resize(t: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, h*p, w*p)
        hw = (g.size[0] * patch_size, g.size[1] * patch_size)
        # Antialias when a side shrinks, or fine texture aliases into the view (PIL and torchvision avoid
        # it too); not when only growing, where it would just swap in PIL's cubic kernel (a=-0.5 vs -0.75).
        # torch antialiases both sides of one call, so a side that grows while the other shrinks gets a=-0.5.
        shrink = hw[0] < H or hw[1] < W
        low = t.dtype in (torch.float16, torch.bfloat16)  # CPU has no antialiased 16-bit kernel: use fp32
        y = F.interpolate(t.float() if low else t, size=hw, mode="bicubic", align_corners=False, antialias=shrink)
        return y.to(t.dtype)

    return _act(x, g, (H // patch_size, W // patch_size), resize)


@functools.lru_cache(maxsize=None)
def _bicubic_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n_out, n_in): F.interpolate's bicubic resize of a length-n_in axis, read off by resizing the identity."""
    eye = torch.eye(n_in, device=device, dtype=dtype).view(1, n_in, n_in, 1)  # channel j: the unit vector e_j
    return F.interpolate(eye, size=(n_out, 1), mode="bicubic", align_corners=False)[0, :, :, 0].T


def apply_to_token_map(t: Tensor, g: GroupElement) -> Tensor:
    """rho_g on a (B, C, h, w) token map: exact permutations for R90/F/R180, bicubic for the resize, with
    no antialias and no clamping (features have no value range), the release's `aug_equiv_feat`."""
    _check_batch(t, g, "token map")

    def resize(u: Tensor) -> Tensor:  # (B, C, h, w) -> (B, C, *g.size)
        # F.interpolate's bicubic as the separable product A_h u A_w^T: the same numbers, but a gradient of two
        # small matmuls, where CUDA's upsample_bicubic2d_backward loops over B*C in each thread (README, Cost).
        # Callers run it outside autocast (the losses, the evaluation), so the products stay in `dtype`.
        dtype = torch.promote_types(u.dtype, torch.float32)  # F.interpolate's accumulation type
        a_h, a_w = (_bicubic_matrix(n, m, u.device, dtype) for n, m in zip(u.shape[-2:], g.size))
        return torch.einsum("ih,bchw,jw->bcij", a_h, u.to(dtype), a_w).to(u.dtype)

    return _act(t, g, tuple(t.shape[-2:]), resize)


def compose(g2: GroupElement, g1: GroupElement) -> GroupElement:
    """g2 after g1, in normal form: exact for D4 parts, a resize keeps the last target grid. Moving g1's
    quarter turns left past g2 uses
        F . R90^k    = R90^k . R180^(k odd) . F      (a reflection reverses the rotation sense)
        Resize . R90^k = R90^k . Resize^T(k odd)     (target transposed for an odd turn)
    and per-sample F and R180 commute with each other and with an axis-aligned resize."""
    if g1.batch_size is not None and g2.batch_size is not None and g1.batch_size != g2.batch_size:
        raise ValueError(f"cannot compose elements for batch sizes {g2.batch_size} and {g1.batch_size}")
    odd = g1.k % 2 == 1
    size = g1.size if g2.size is None else (g2.size[::-1] if odd else g2.size)
    rot180 = _xor(_xor(g1.rot180, g2.rot180), g2.flip if odd else None)
    return GroupElement(k=(g1.k + g2.k) % 4, flip=_xor(g1.flip, g2.flip), rot180=rot180, size=size)


def inverse(g: GroupElement, input_size: tuple[int, int] | None) -> GroupElement:
    """g^-1, where input_size is the token grid (h, w) g was applied to ("resize to size" forgets where
    it came from; None only when g has no resize): R180^d F^f Resize_in after R90^-k, composed to normal form."""
    if g.size is not None and input_size is None:
        raise ValueError("inverse of an element with a resize needs input_size, the grid it was applied to")
    size = None if g.size is None else _check_grid(input_size, "input_size")
    return compose(GroupElement(flip=g.flip, rot180=g.rot180, size=size), GroupElement(k=-g.k))


def relative_action(g1: GroupElement, g2: GroupElement, base_size: tuple[int, int]) -> GroupElement:
    """g = g2 g1^-1: carries view 1's token map (g1 of the common crop, whose token grid is base_size) onto
    view 2's grid with a single resize, so rho_g resamples once, as the release does."""
    return compose(g2, inverse(g1, base_size))


if __name__ == "__main__":
    argparse.ArgumentParser(prog="group_actions.py", description="Demo: two SER views of one smooth 224-px crop; "
                            "view 1's tokens carried onto view 2's grid.").parse_args()
    gen = torch.Generator().manual_seed(0)
    g1, g2 = sample_view_pair(3, gen)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 224), torch.linspace(0, 1, 224), indexing="ij")
    crop = torch.stack([torch.cos(3 * yy + c) * torch.sin(2 * xx + 2 * c) for c in range(3)])
    crop = crop.expand(3, -1, -1, -1)                                    # (B, 3, 224, 224)
    v1, v2 = apply_to_images(crop, g1, 16), apply_to_images(crop, g2, 16)
    t1, t2 = F.avg_pool2d(v1, 16), F.avg_pool2d(v2, 16)                  # toy tokens (B, 3, h, w)
    t12 = apply_to_token_map(t1, relative_action(g1, g2, (14, 14)))      # (B, 3, *t2's grid)
    for name, g in (("g1", g1), ("g2", g2)):
        print(f"{name}: k={g.k} size={g.size} flip={g.flip.tolist()} rot180={g.rot180.tolist()}")
    print(f"views {tuple(v1.shape)} and {tuple(v2.shape)}; view 1's tokens on view 2's grid "
          f"{tuple(t12.shape)}, max |diff| to view 2's tokens {(t12 - t2).abs().max():.4f}")

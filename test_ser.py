"""The test suite (CPU, pytest): `python -m pytest -q test_ser.py`.

One section per component. DDP checks spawn 2 CPU processes with the gloo backend.
"""
import colorsys
import copy
import functools
import io
import json
import math
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms.v2 import functional as TF

import augment
import detect_eval
import group_actions
import linear_eval
import losses
import pretrain
import robustness_eval
import vit

torch.set_num_threads(1)  # tiny ops: threads only add synchronisation on a 2-core CI machine
CPU_HAS_NATIVE_BF16 = vit.cpu_has_native_bf16  # the real detection, before the fixture below replaces it
# `-m "not slow"` deselects the multi-process (torchrun) tests. The repository has no pytest configuration
# file, so the marker is registered here, with the config pytest is running (before any test uses it).
if getattr(pytest.mark, "_config", None) is not None:
    pytest.mark._config.addinivalue_line("markers", "slow: multi-process tests (torchrun); deselect with -m 'not slow'")


@pytest.fixture(autouse=True)
def fp32_on_every_cpu(monkeypatch):
    """The suite compares results to float rounding: precision 'auto' resolves to fp32 on every CPU, also
    on one with native bf16. Tests of the bf16 paths patch the detection themselves."""
    monkeypatch.setattr(vit, "cpu_has_native_bf16", lambda: False)


REPO = os.path.dirname(os.path.abspath(__file__))


def run_script(*argv, timeout=300):
    """One of the scripts as a user runs it: its exit status and the last line it printed on stderr."""
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = (result.stderr.strip().splitlines() or [""])[-1]
    return result.returncode, last, result.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank, world, port, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    vit.cpu_has_native_bf16 = lambda: False  # a spawned process: fp32 as under fp32_on_every_cpu
    fn(rank, world, *args)


def spawn(fn, *args, world=2):
    """The multi-process harness: fn(rank, world, *args) in `world` CPU processes, each started as torchrun
    starts a rank (RANK, WORLD_SIZE, MASTER_*), so fn joins the group with init_process_group("gloo") or
    a script's losses.init_distributed."""
    mp.spawn(_spawned, args=(world, _free_port(), fn, args), nprocs=world, join=True)


@contextmanager
def no_hang(what, seconds=20):
    """A regression that waits on a pipe fails here with `what` instead of hanging the suite."""
    def hung(signum, frame):
        raise TimeoutError(what)
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def tiny_vit(seed=None, **kw):
    """The suite's small ViT: 64-dim, 4 blocks of 4 heads, 32 px in 8 px patches unless overridden."""
    if seed is not None:
        torch.manual_seed(seed)
    return vit.VisionTransformer(**{**dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4), **kw})

# ================================================================================================
# vit.py: the ViT-S/16 state-dict contract, SER's layer split
# ================================================================================================

def test_vit_small_state_dict_contract():
    """The 150 keys, shapes and order of timm vit_small_patch16_224(num_classes=0) / DINO vit_small."""
    sd = vit.build_vit(dict(name="vit_small", patch_size=16)).state_dict()
    expected = [("cls_token", (1, 1, 384)), ("pos_embed", (1, 197, 384)),
                ("patch_embed.proj.weight", (384, 3, 16, 16)), ("patch_embed.proj.bias", (384,))]
    for i in range(12):
        b = f"blocks.{i}."
        expected += [(b + "norm1.weight", (384,)), (b + "norm1.bias", (384,)),
                     (b + "attn.qkv.weight", (1152, 384)), (b + "attn.qkv.bias", (1152,)),
                     (b + "attn.proj.weight", (384, 384)), (b + "attn.proj.bias", (384,)),
                     (b + "norm2.weight", (384,)), (b + "norm2.bias", (384,)),
                     (b + "mlp.fc1.weight", (1536, 384)), (b + "mlp.fc1.bias", (1536,)),
                     (b + "mlp.fc2.weight", (384, 1536)), (b + "mlp.fc2.bias", (384,))]
    expected += [("norm.weight", (384,)), ("norm.bias", (384,))]
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == expected
    assert len(sd) == 150
    assert sum(v.numel() for v in sd.values()) == 21_665_664
    m = vit.build_vit(dict(name="vit_small", patch_size=16))
    assert m.num_heads == 6 and m.blocks[0].attn.head_dim == 64
    assert m.blocks[0].norm1.eps == 1e-6


def test_ser_mode_keys_and_shapes():
    m = vit.build_vit(dict(name="vit_small", patch_size=16, cls_after_block=3))
    sd = m.state_dict()
    assert tuple(sd["pos_embed"].shape) == (1, 196, 384)  # no [CLS] slot, as the release
    assert "norm_equiv.weight" in sd and len(sd) == 152


def test_state_dict_roundtrip_and_export_loading(tmp_path):
    torch.manual_seed(0)
    m = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    fresh = tiny_vit()
    fresh.load_state_dict(m.state_dict(), strict=True)
    assert torch.equal(fresh.eval()(x), m(x))
    torch.save({"arch": m.arch, "backbone": m.state_dict()}, tmp_path / "export.pth")
    loaded = vit.load_backbone(tmp_path / "export.pth")
    assert not loaded.training and loaded.arch == m.arch
    assert torch.equal(loaded(x), m(x))


def test_released_weights_that_would_load_into_another_function_are_refused(tmp_path):
    """Head counts do not show in weights: MoCo v3's vit_small has 12 (timm's and DINO's: 6). A named --arch keeps
    its depth (a 6-block file is no 12-block ViT-Ti), and keys of ViT variants this one does not compute are named."""
    sd = tiny_vit(seed=0).state_dict()
    moco = {"arch": "vit_small", "state_dict": {"module.base_encoder." + k: v for k, v in sd.items()}}
    torch.save(moco, tmp_path / "moco.pth")
    with pytest.raises(ValueError, match="is a MoCo v3 checkpoint, whose vit_small has 12 heads .*--arch vit_small_mocov3"):
        vit.load_backbone(tmp_path / "moco.pth", dict(name="vit_small", patch_size=16))
    assert vit.build_vit(dict(name="vit_small_mocov3")).arch["num_heads"] == 12
    with pytest.raises(ValueError, match="records no architecture .*pass the arch, e.g. --arch vit_small_mocov3"):
        vit.load_backbone(tmp_path / "moco.pth")
    torch.save({**moco, "arch": "vit_small_patch16_224"}, tmp_path / "timm.pth")  # timm's saver records its model
    with pytest.raises(ValueError, match="does not fit a 384-dim"):  # not refused as MoCo v3 (tiny weights here)
        vit.load_backbone(tmp_path / "timm.pth", dict(name="vit_small", patch_size=16))
    torch.save({0: torch.zeros(1)}, tmp_path / "int_keys.pth")
    with pytest.raises(ValueError, match="int_keys.pth: the file holds no network weights"):
        vit.load_backbone(tmp_path / "int_keys.pth", dict(name="vit_tiny"))
    six = {k: v for k, v in vit.build_vit(dict(name="vit_tiny", patch_size=8, img_size=32)).state_dict().items()
           if not (k.startswith("blocks.") and int(k.split(".")[1]) >= 6)}
    torch.save(six, tmp_path / "six.pth")
    with pytest.raises(ValueError, match="does not fit a 192-dim, depth-12 ViT .*missing keys"):
        vit.load_backbone(tmp_path / "six.pth", dict(name="vit_tiny", patch_size=8))
    assert vit.load_backbone(tmp_path / "six.pth", dict(name="vit_tiny", patch_size=8, depth=6)).depth == 6
    arch = {k: tiny_vit().arch[k] for k in ("patch_size", "embed_dim", "num_heads")}
    mae = {**sd, "mask_token": torch.zeros(1, 1, 64), "decoder_embed.weight": torch.zeros(32, 64)}  # pretraining only
    torch.save(mae, tmp_path / "mae.pth")
    assert vit.load_backbone(tmp_path / "mae.pth", arch).dropped_keys == ["decoder_embed.weight", "mask_token"]
    for extra, feature in (({"fc_norm.weight": torch.ones(64)}, "timm's global-pool fc_norm"),
                           ({"blocks.0.ls1.gamma": torch.ones(64)}, "layer scale"),
                           ({"reg_token": torch.zeros(1, 4, 64)}, "register tokens")):
        torch.save({**sd, **extra}, tmp_path / "variant.pth")
        with pytest.raises(ValueError, match=f"variant.pth holds {feature}, which this ViT .* does not compute"):
            vit.load_backbone(tmp_path / "variant.pth", arch)


def test_prefix_stripping_released_formats(tmp_path):
    torch.manual_seed(0)
    m = tiny_vit().eval()
    x = torch.randn(1, 3, 32, 32)
    sd = m.state_dict()
    arch = dict(m.arch)
    # DINO full checkpoint: student under module.backbone., teacher under backbone., both with heads.
    head = {"head.mlp.0.weight": torch.zeros(3, 64), "head.last_layer.weight_g": torch.ones(5, 1)}
    student = {**{"module.backbone." + k: v + 1 for k, v in sd.items()}, **{"module." + k: v for k, v in head.items()}}
    teacher = {**{"backbone." + k: v for k, v in sd.items()}, **head}
    torch.save({"student": student, "teacher": teacher}, tmp_path / "dino.pth")
    assert torch.equal(vit.load_backbone(tmp_path / "dino.pth", arch=arch)(x), m(x))  # teacher by default
    assert not torch.equal(vit.load_backbone(tmp_path / "dino.pth", arch=arch, key="student")(x), m(x))
    # torch.compile + DDP wrappers, and a timm classifier head that a backbone drops.
    wrapped = {"module._orig_mod." + k: v for k, v in sd.items()}
    wrapped["module._orig_mod.head.weight"] = torch.zeros(10, 64)
    torch.save(wrapped, tmp_path / "wrapped.pth")
    loaded = vit.load_backbone(tmp_path / "wrapped.pth", arch=arch)
    assert torch.equal(loaded(x), m(x)) and loaded.dropped_keys == ["head.weight"]
    # MoCo v3 layout.
    torch.save({"state_dict": {"module.base_encoder." + k: v for k, v in sd.items()}}, tmp_path / "moco.pth")
    assert torch.equal(vit.load_backbone(tmp_path / "moco.pth", arch=arch)(x), m(x))
    # A prefix is only stripped at the start of a key.
    assert vit.strip_prefixes({"blocks.0.module.x": 1}) == {"blocks.0.module.x": 1}
    # Bare weights record no architecture: their resolution is read off the position table (32 px here, not 224).
    requested = {k: arch[k] for k in ("patch_size", "embed_dim", "num_heads")}  # the depth, 4, from the keys
    torch.save(sd, tmp_path / "bare.pth")
    loaded = vit.load_backbone(tmp_path / "bare.pth", arch=requested)
    assert (loaded.arch["img_size"], loaded.depth) == (32, 4) and torch.equal(loaded(x), m(x))
    torch.save({"arch": "vit_tiny", "epoch": 3, "state_dict": {"module.base_encoder." + k: v for k, v in sd.items()}},
               tmp_path / "moco_main.pth")  # MoCo v3's main_moco.py records the arch as a name
    assert torch.equal(vit.load_backbone(tmp_path / "moco_main.pth", arch=requested)(x), m(x))
    torch.save({"student": student, "step": 3, "scaler": {}}, tmp_path / "ckpt.pth")
    for key in ("step", "scaler"):  # an empty entry is no network either (it "fitted" with every key missing)
        with pytest.raises(ValueError, match=f"'{key}' holds no network weights; pass --checkpoint-key with one of "
                                             "\\['student'\\]"):
            vit.load_backbone(tmp_path / "ckpt.pth", arch=arch, key=key)
    # Recorded architectures, which hold a pos_embed *setting*, are not offered as networks, nor break the loader.
    torch.save({"arch": m.arch, "student": student, "eval_key": ["student"]}, tmp_path / "ours.pth")
    loaded = vit.load_backbone(tmp_path / "ours.pth")  # an eval_key that is not a name is ignored, not a crash
    assert torch.equal(loaded(x), vit.load_backbone(tmp_path / "ours.pth", key="student")(x))
    torch.save({"arch": m.arch, "student": student, "step": 3}, tmp_path / "ours.pth")
    with pytest.raises(ValueError, match="'step' holds no network weights; .*one of \\['student'\\]"):
        vit.load_backbone(tmp_path / "ours.pth", key="step")
    torch.save({"arch": {**m.arch, "colour": 1}, "backbone": student}, tmp_path / "odd_arch.pth")
    with pytest.raises(ValueError, match="odd_arch.pth: its recorded architecture does not build a ViT"):
        vit.load_backbone(tmp_path / "odd_arch.pth")


def test_mismatched_checkpoints_raise(tmp_path):
    m = tiny_vit()
    torch.save(m.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="records no architecture"):
        vit.load_backbone(tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="missing"):
        vit.load_backbone(tmp_path / "bare.pth", arch={**m.arch, "depth": 5})
    with pytest.raises(ValueError, match="of another shape"):
        vit.load_backbone(tmp_path / "bare.pth", arch={**m.arch, "embed_dim": 32, "num_heads": 2})
    sd = {**m.state_dict(), "extra.weight": torch.zeros(1)}
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="1 unexpected \\['extra.weight'\\]"):
        vit.load_backbone(tmp_path / "extra.pth", arch=m.arch)
    # The head count is invisible in the weights: a saved arch that disagrees is refused.
    torch.save({"arch": m.arch, "backbone": m.state_dict()}, tmp_path / "ours.pth")
    with pytest.raises(ValueError, match="num_heads saved=4 requested=2"):
        vit.load_backbone(tmp_path / "ours.pth", arch={**m.arch, "num_heads": 2})
    with pytest.raises(FileNotFoundError):
        vit.load_backbone(tmp_path / "nope.pth")


def test_sdpa_equals_attention_map_path():
    torch.manual_seed(0)
    for kw in (dict(), dict(cls_after_block=2)):
        m = tiny_vit(**kw).eval()
        x = torch.randn(2, 3, 32, 48)
        with torch.no_grad():
            cls, maps = m.forward_with_attention(x)
            assert torch.allclose(m(x), cls, atol=1e-5)
        assert len(maps) == 4 and maps[-1].shape == (2, 4, 25, 25)
        n_first = 24 if kw else 25  # SER: no [CLS] in block 1
        assert torch.allclose(maps[0].sum(-1), torch.ones(2, 4, n_first), atol=1e-5)


def test_pos_embed_resampling():
    m = tiny_vit()
    assert m.resampled_pos_embed(4, 4) is m.pos_embed  # identity at the native grid
    table = m.resampled_pos_embed(3, 7)
    assert table.shape == (1, 1 + 21, 64) and torch.equal(table[:, 0], m.pos_embed[:, 0])
    # Bicubic with align_corners=False at the same size is the identity too, so nothing is lost in float32.
    grid = m.pos_embed[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    same = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    assert torch.allclose(same, grid)
    y = m(torch.randn(1, 3, 24, 56))  # any grid, square or not
    assert y.shape == (1, 64) and torch.isfinite(y).all()


def test_sincos_pos_embed_moco_convention():
    table = vit.sincos_pos_embed(8, 3, 5)  # dim/4 = 2 frequencies: 1 and 1/100
    row, col = 2, 4
    v = table[row * 5 + col]
    expect = torch.tensor([torch.sin(torch.tensor(2.0)), torch.sin(torch.tensor(0.02)),
                           torch.cos(torch.tensor(2.0)), torch.cos(torch.tensor(0.02)),
                           torch.sin(torch.tensor(4.0)), torch.sin(torch.tensor(0.04)),
                           torch.cos(torch.tensor(4.0)), torch.cos(torch.tensor(0.04))])
    assert torch.allclose(v, expect, atol=1e-6)
    m = tiny_vit(pos_embed="sincos", weight_init="moco", stop_grad_conv1=True)
    assert not m.pos_embed.requires_grad and torch.equal(m.pos_embed[0, 0], torch.zeros(64))
    assert not m.patch_embed.proj.weight.requires_grad and not m.patch_embed.proj.bias.requires_grad
    assert m.cls_token.std() < 1e-4  # MoCo v3: normal(std=1e-6)


def test_ser_split_token_map_and_late_cls():
    torch.manual_seed(0)
    m = tiny_vit(cls_after_block=2)
    x = torch.randn(2, 3, 32, 40)
    out = m.forward_features(x, layer=2)
    assert out["token_map"].shape == (2, 64, 4, 5) and out["cls_at_layer"] is None
    assert out["cls"].shape == (2, 64) and out["patch"].shape == (2, 20, 64)
    # Blocks 1..L never see [CLS]: changing it leaves the token map unchanged but moves the output.
    with torch.no_grad():
        m.cls_token.add_(1.0)
    out2 = m.forward_features(x, layer=2)
    assert torch.equal(out2["token_map"], out["token_map"]) and not torch.allclose(out2["cls"], out["cls"])
    assert m.forward_features(x, layer=3)["cls_at_layer"].shape == (2, 64)
    # The token map goes through norm_equiv: per-token zero mean at init.
    assert out["token_map"].mean(1).abs().max() < 1e-5
    # Row-major layout: token (r, c) of the map is patch r * w + c.
    maps = m.block_token_maps(x)
    assert len(maps) == 4 and maps[0].shape == (2, 64, 4, 5)
    with pytest.raises(ValueError, match="n must be in"):
        m.get_intermediate_layers(x, n=3)
    with pytest.raises(ValueError, match="cls_after_block"):
        tiny_vit(cls_after_block=4)


def test_token_map_layout_is_row_major():
    m = tiny_vit()
    m.patch_embed.proj.weight.data.zero_()
    m.patch_embed.proj.bias.data.zero_()
    m.pos_embed.data.zero_()
    m.pos_embed.data[0, 1:, 0] = torch.arange(16.0)  # patch index -> channel 0
    for blk in m.blocks:  # make blocks the identity
        for p in blk.parameters():
            p.data.zero_()
    tm = m.block_token_maps(torch.zeros(1, 3, 32, 32))[0]  # grid 4 x 4
    assert torch.equal(tm[0, 0], torch.arange(16.0).view(4, 4))


def test_backward_reaches_every_parameter_and_blocks_before_split():
    torch.manual_seed(0)
    m = tiny_vit(drop_path_rate=0.1)
    m(torch.randn(2, 3, 32, 32)).square().sum().backward()  # not .sum(): LayerNorm outputs sum to a constant
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters() if p.requires_grad)
    s = tiny_vit(cls_after_block=2)
    s.forward_features(torch.randn(2, 3, 32, 32), layer=2)["token_map"].square().mean().backward()
    assert s.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0 and s.norm_equiv.weight.grad is not None
    assert s.blocks[2].mlp.fc1.weight.grad is None  # f2 is not on the token map's path


def test_grad_checkpointing_same_output():
    torch.manual_seed(0)
    m = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    y = m(x)
    m.grad_checkpointing = True
    assert torch.allclose(m(x), y, atol=1e-6)


def test_drop_path_rows_give_a_sample_its_mask_whatever_the_split():
    """With rows, a sample's keep flag depends on its row in the global call, not on the rows beside it
    (how the batch is split over ranks), and a checkpointed block recomputes the same masks."""
    drop = vit.DropPath(0.5).train()
    x = torch.ones(8, 3, 4)
    torch.manual_seed(1)
    whole = drop(x, (torch.arange(8), 8))
    torch.manual_seed(1)
    part = drop(x[5:], (torch.arange(5, 8), 8))
    assert torch.equal(part, whole[5:]) and (whole == 0).any() and (whole != 0).any()
    torch.manual_seed(0)
    m = tiny_vit(drop_path_rate=0.5).train()
    x, w = torch.randn(3, 3, 32, 32), torch.randn(3, 64)
    grads = []
    for checkpointing in (False, True):
        m.grad_checkpointing, m.drop_path_rows = checkpointing, (torch.tensor([4, 0, 2]), 6)
        m.zero_grad()
        torch.manual_seed(2)
        (m(x) * w).sum().backward()  # a random projection: the sum of a LayerNorm output has no gradient
        grads.append(m.blocks[0].mlp.fc1.weight.grad.clone())
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_input_not_divisible_raises():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        tiny_vit()(torch.randn(1, 3, 30, 32))



class _RunsCode:
    """Unpickling this creates a marker file: what a crafted checkpoint could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_checkpoint_runs_no_code_and_names_broken_files(tmp_path):
    model = tiny_vit()
    crafted, marker = tmp_path / "crafted.pth", tmp_path / "ran"
    torch.save({"arch": model.arch, "backbone": model.state_dict(), "x": _RunsCode(str(marker))}, crafted)
    with pytest.raises(ValueError, match="holds Python objects beyond tensors and plain values .*If you trust"):
        vit.load_backbone(crafted)
    assert not marker.exists()
    good = tmp_path / "good.pth"
    torch.save({"arch": model.arch, "backbone": model.state_dict()}, good)
    data = good.read_bytes()
    for name, content in (("truncated", data[:len(data) // 2]), ("empty", b""), ("random", os.urandom(4096))):
        path = tmp_path / f"{name}.pth"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"{path} is not a readable checkpoint .*not a torch file$"):
            vit.load_checkpoint(path)  # an input file: the --output-dir advice is load_resumable's
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        vit.load_checkpoint(tmp_path / "missing.pth")


def test_ser_release_weights_load_with_their_split_block(tmp_path):
    """aitrics-chris/SER main_dino.py saves {'student': MultiCropWrapper keys, 'args': a Namespace, loss lists}: the
    objects are refused (re-saved as the message says, its state dicts load); their ViT has no [CLS] position and a
    norm_equiv, and [CLS] joins after --equiv-layer, which no weight shape shows: asked for, then the same function."""
    torch.manual_seed(0)
    model = tiny_vit(embed_dim=192, num_heads=3, cls_after_block=2).eval()  # vit_tiny, 4 blocks, 32 px / 8 px
    assert model.pos_embed.shape[1] == 16 and "norm_equiv.weight" in model.state_dict()
    student = {f"module.backbone.{k}": v for k, v in model.state_dict().items()}
    student["module.head.last_layer.weight_g"] = torch.ones(8, 1)
    release = tmp_path / "checkpoint.pth"
    torch.save({"student": student, "teacher": student, "epoch": 100, "args": SimpleNamespace(equiv_layer=2),
                "loss_list_inv": np.zeros(3)}, release)
    with pytest.raises(ValueError, match="holds Python objects beyond tensors .*isinstance\\(v, dict\\)"):
        vit.load_checkpoint(release)
    c = torch.load(release, weights_only=False)  # the re-save the message gives
    torch.save({k: v for k, v in c.items() if isinstance(v, dict)}, tmp_path / "weights.pth")
    flags = dict(arch="vit_tiny", patch_size=8, key="teacher", depth=4)
    with pytest.raises(SystemExit, match="SER release weights .*pass --equiv-layer as in its run"):
        vit.backbone_from_flags(str(tmp_path / "weights.pth"), **flags)
    with pytest.raises(SystemExit, match="--equiv-layer 4: \\[CLS\\] joins after one of blocks 1..3"):
        vit.backbone_from_flags(str(tmp_path / "weights.pth"), equiv_layer=4, **flags)
    loaded = vit.backbone_from_flags(str(tmp_path / "weights.pth"), equiv_layer=2, **flags)
    assert (loaded.cls_after_block, loaded.arch["img_size"]) == (2, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = loaded.forward_features(x, layer=2), model.forward_features(x, layer=2)
    assert torch.equal(ours["cls"], theirs["cls"]) and torch.equal(ours["token_map"], theirs["token_map"])
    parse = robustness_eval.get_args_parser().parse_args  # robustness_eval's --backbone reads the flag too
    args = parse(["--arch", "vit_tiny", "--patch-size", "8", "--depth", "4", "--equiv-layer", "2",
                  "--checkpoint-key", "teacher"])
    assert robustness_eval.load_backbone(args, str(tmp_path / "weights.pth")).cls_after_block == 2


def test_load_backbone_refuses_non_finite_weights(tmp_path):
    model = tiny_vit()
    sd = model.state_dict()
    sd["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    torch.save({"arch": model.arch, "backbone": sd}, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match="non-finite weights .*blocks.1.mlp.fc1.weight"):
        vit.load_backbone(tmp_path / "nan.pth")


def test_save_atomic_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    vit.save_atomic(path, {"step": 1})
    vit.save_atomic(tmp_path / "results.json", {"top1": 1.0})
    assert json.loads((tmp_path / "results.json").read_text()) == {"top1": 1.0}
    before = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=f"could not write {path}: No space left on device"):
        vit.save_atomic(path, {"step": 2})
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "results.json"]


@pytest.mark.parametrize("native", [True, False])
def test_cpu_autocasts_to_bf16_only_where_the_cpu_has_it(native, monkeypatch):
    monkeypatch.setattr(vit, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert vit.resolve_precision(cpu) == ("bf16" if native else "fp32")
    with vit.autocast(cpu):
        assert torch.is_autocast_enabled("cpu") == native
        y = nn.Linear(8, 8)(torch.randn(2, 8))
    assert y.dtype == (torch.bfloat16 if native else torch.float32)
    # Explicit choices are kept; GPUs default to bf16 whatever the host CPU; fp16 needs CUDA's scaler.
    assert vit.resolve_precision(cpu, "fp32") == "fp32" and vit.resolve_precision(cpu, "bf16") == "bf16"
    assert vit.resolve_precision(torch.device("cuda")) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        vit.resolve_precision(cpu, "fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        vit.resolve_precision(cpu, "bf32")


def test_native_bf16_detection_reads_the_cpu_flags(monkeypatch):
    detect = CPU_HAS_NATIVE_BF16.__wrapped__  # uncached
    for avx512_bf16, amx, expected in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert detect() == expected
    # Older torch without the queries: the flags of /proc/cpuinfo (AVX-512 alone emulates bf16).
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    for flags, expected in (("fpu avx2 avx512f", False), ("fpu avx512f avx512_bf16", True), ("amx_bf16", True)):
        monkeypatch.setattr(vit, "open", lambda *a, **k: io.StringIO(f"flags\t: {flags}\n"), raising=False)
        assert detect() == expected


def test_a_pipe_given_as_a_checkpoint_is_refused_at_once(tmp_path):
    """torch.load would wait on a FIFO for a writer for good (linear_eval's --pretrained, robustness_eval's --probe, a
    pipe at pretrain.py's checkpoint.pth): refused by name first; links are followed, to a pipe or to a checkpoint."""
    model = tiny_vit()
    torch.save({"arch": model.arch, "backbone": model.state_dict()}, tmp_path / "good.pth")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "to_fifo").symlink_to(tmp_path / "fifo")
    (tmp_path / "to_good").symlink_to(tmp_path / "good.pth")

    with no_hang("load_checkpoint waited on a pipe"):
        for name in ("fifo", "to_fifo"):
            with pytest.raises(ValueError, match=f"^{tmp_path / name} is not a regular file \\(a pipe or a device\\)"):
                vit.load_checkpoint(tmp_path / name)
        with pytest.raises(SystemExit, match=f"^--pretrained: {tmp_path / 'fifo'} is not a regular file"):
            vit.backbone_from_flags(str(tmp_path / "fifo"))
        args = SimpleNamespace(epochs=1)
        with pytest.raises(ValueError, match="is not a regular file .*; move it away or use another --output-dir$"):
            vit.load_resumable(tmp_path / "fifo", args, ["student"], "pretrain.py", ())
    with pytest.raises(ValueError, match=f"^{tmp_path} is a folder, not a checkpoint file$"):
        vit.load_checkpoint(tmp_path)
    assert vit.load_backbone(tmp_path / "to_good").arch == model.arch


@pytest.mark.parametrize("add_on", [False, True])
def test_ser_release_baselines_load_as_the_standard_vit_they_are(tmp_path, add_on):
    """aitrics-chris/SER's baselines and add-ons (--equiv-mode inv/augself/equimod/essl) keep the [CLS] position row
    (197 rows at ViT-S/16, 224 px) and save a norm_equiv: the final norm again (--equiv-layer 12), or a LayerNorm of
    an add-on's input alone. The table decides: no --equiv-layer asked, norm_equiv dropped, the source's features."""
    torch.manual_seed(0)
    model = tiny_vit(embed_dim=192, num_heads=3).eval()  # vit_tiny, 4 blocks, 32 px / 8 px: 1 + 16 rows
    sd = model.state_dict()
    assert sd["pos_embed"].shape[1] == 17
    norm = {k: (torch.randn_like(v) if add_on else v.clone()) for k, v in sd.items() if k.startswith("norm.")}
    sd.update({"norm_equiv" + k[len("norm"):]: v for k, v in norm.items()})
    student = {f"module.backbone.{k}": v for k, v in sd.items()}
    student["module.head.last_layer.weight_g"] = torch.ones(8, 1)
    torch.save({"student": student, "teacher": student}, tmp_path / "weights.pth")
    flags = dict(arch="vit_tiny", patch_size=8, key="teacher", depth=4)
    loaded = vit.backbone_from_flags(str(tmp_path / "weights.pth"), **flags)
    assert (loaded.cls_after_block, loaded.arch["img_size"]) == (0, 32)
    assert loaded.dropped_keys == ["norm_equiv.bias", "norm_equiv.weight"]  # (the head goes with its wrapper)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = loaded.get_intermediate_layers(x, 2), model.get_intermediate_layers(x, 2)
    assert len(ours) == len(theirs) == 2 and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    with pytest.raises(SystemExit, match="is a standard ViT \\(its position table has a \\[CLS\\] row, 17 rows\\): "
                                         "its \\[CLS\\] joins before block 1; drop --equiv-layer$"):
        vit.backbone_from_flags(str(tmp_path / "weights.pth"), equiv_layer=2, **flags)


def test_results_that_record_no_source_are_kept(tmp_path):
    """Results JSON of an earlier version name their one source as a string; an object that records none may be any
    weights' results and is refused, not replaced. A file that is not a results object (or none) does not block."""
    out, results = tmp_path / "rob", tmp_path / "rob" / "robustness.json"
    out.mkdir()
    results.write_text(json.dumps({"source": "/r/a.pth", "top1": 1.0}))
    vit.make_output_dir(str(out), outputs=("robustness.json",), sources=["/r/a.pth"])  # its own rerun
    with pytest.raises(SystemExit, match=f"^--output-dir {out} holds the robustness.json of /r/a.pth, this run's "
                                         "\\(/r/b.pth\\) would replace it"):
        vit.make_output_dir(str(out), outputs=("robustness.json",), sources=["/r/b.pth"])
    for unsourced in ({"top1": 1.0}, {"source": 5}, {"source": None}):
        results.write_text(json.dumps(unsourced))
        with pytest.raises(SystemExit, match=f"^--output-dir {out} holds a robustness.json that records no source, "
                                             "which this run would replace: move it away or choose another "
                                             "--output-dir$"):
            vit.make_output_dir(str(out), outputs=("robustness.json",), sources=["/r/a.pth"])
    for unrelated in ("{", "[1]", '"/r/b.pth"', ""):
        results.write_text(unrelated)
        vit.make_output_dir(str(out), outputs=("robustness.json",), sources=["/r/a.pth"])
    (tmp_path / "a.pth").write_bytes(b"weights")  # linear_eval's and detect_eval's before "source": their "backbone"
    for backbone, source in ((str(tmp_path / "a.pth"), os.path.realpath(tmp_path / "a.pth")),
                             ("random init vit_tiny", "random init vit_tiny")):
        results.write_text(json.dumps({"backbone": backbone, "stats": {}}))
        vit.make_output_dir(str(out), outputs=("robustness.json",), sources=[source])
        with pytest.raises(SystemExit, match=f"holds the robustness.json of {backbone}, this run's \\(/r/b.pth\\)"):
            vit.make_output_dir(str(out), outputs=("robustness.json",), sources=["/r/b.pth"])
    results.unlink()
    vit.make_output_dir(str(out), outputs=("robustness.json",), sources=["/r/a.pth"], lock=True)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out / ".lock").st_mode & 0o777 == 0o644 & ~umask  # no executable bits on a lock


# ================================================================================================
# group_actions.py: the group on pixels and token maps
# ================================================================================================

B = 4

# Max abs error allowed when a resize is involved, for smooth images of amplitude <= 1 (a sum of
# three sinusoids with at most one cycle across the image) seen through a (16, 24) token grid,
# i.e. >= 16 tokens per period, at SER's scales (per side ~0.84-1.14; we test ~0.8-1.2).
# The pixel path resamples pixels and then averages patches; rho_g resamples the patch averages.
# They differ mostly by rho_g's own interpolation error: PyTorch's bicubic (Keys, a=-0.75) only
# reproduces linear functions, so on a sinusoid with N tokens per period it errs by O((pi/N)^2)
# of the amplitude, more at the borders where both paths clamp (replicate) at different
# resolutions. The changed box-filter width of a resized patch adds ~0.3%. Measured over 60
# random images and draws: <= 0.031 for one view (<= 0.057 with 8 tokens per period, the error
# grows as the map gets coarser). A wrong element (a missing flip) errs by > 0.45.
SMOOTH_TOL = 0.05
# relative_action compares two views, each carrying its own error of the size above: measured
# <= 0.042 over 60 random view pairs.
RELATIVE_TOL = 0.07


def flags(seed, n=B):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=gen) > 0.5, torch.rand(n, generator=gen) > 0.5


def d4(k, seed):
    """A D4 element with mixed per-sample flags (both values of each flag present)."""
    flip, rot180 = flags(seed)
    flip[:2], rot180[:2] = torch.tensor([True, False]), torch.tensor([False, True])
    return group_actions.GroupElement(k=k, flip=flip, rot180=rot180)


def int_images(H, W, C=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, (B, C, H, W), generator=gen).float()  # (B, C, H, W)


def smooth(H, W, C=3, seed=0):
    """Sum of three random low-frequency sinusoids (<= 1 cycle across the image), |x| <= 1."""
    gen = torch.Generator().manual_seed(seed)
    yy = ((torch.arange(H) + 0.5) / H)[:, None]
    xx = ((torch.arange(W) + 0.5) / W)[None, :]
    out = torch.zeros(B, C, H, W)
    for _ in range(3):
        fy, fx = (torch.rand(2, generator=gen) * 2 - 1).tolist()
        phase = torch.rand(B, C, 1, 1, generator=gen) * 2 * math.pi
        out += torch.cos(2 * math.pi * (fy * yy + fx * xx) + phase) / 3
    return out  # (B, C, H, W)


def tokens(x, p):
    return F.avg_pool2d(x, p)  # (B, C, H/p, W/p): a stand-in patch embedding that commutes with D4


def max_err(a, b):
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def identity(n):  # the identity element, with per-sample flags for n samples
    return group_actions.GroupElement(flip=torch.zeros(n, dtype=torch.bool), rot180=torch.zeros(n, dtype=torch.bool))


def output_grid(g, input_grid):  # the token grid g makes of one on input_grid: g.size, transposed by odd turns
    h, w = g.size if g.size is not None else input_grid
    return (w, h) if g.k % 2 else (h, w)


def test_identity_acts_as_identity():
    x, t = int_images(32, 48), torch.randn(B, 5, 4, 6)
    for g in (identity(B), group_actions.GroupElement()):
        assert torch.equal(group_actions.apply_to_images(x, g, 8), x)
        assert torch.equal(group_actions.apply_to_token_map(t, g), t)
    # a resize to the grid the map already has is the identity too
    assert torch.equal(group_actions.apply_to_token_map(t, group_actions.GroupElement(size=(4, 6))), t)


@pytest.mark.parametrize("k", range(4))
def test_inverse_undoes_d4_exactly(k):
    x, t = int_images(32, 48), torch.randn(B, 5, 4, 6)  # non-square, so odd k transposes
    g = d4(k, seed=k)
    for data, act in ((x, lambda u, e: group_actions.apply_to_images(u, e, 8)), (t, group_actions.apply_to_token_map)):
        y = act(data, g)
        assert not torch.equal(y, data)  # mixed flags: g really moved something
        assert torch.equal(act(y, group_actions.inverse(g, None)), data)
        assert torch.equal(act(y, group_actions.inverse(g, (4, 6))), data)
    # and algebraically: both products are the identity element
    inv = group_actions.inverse(g, (4, 6))
    for e in (group_actions.compose(inv, g), group_actions.compose(g, inv)):
        assert e.k == 0 and not e.flip.any() and not e.rot180.any() and e.size is None


def test_inverse_undoes_resize_up_to_resampling():
    x = smooth(16, 24, C=5)  # a token map
    g = group_actions.GroupElement(k=1, flip=flags(3)[0], rot180=flags(3)[1], size=(14, 28))
    y = group_actions.apply_to_token_map(x, g)
    assert y.shape[-2:] == (28, 14)
    back = group_actions.apply_to_token_map(y, group_actions.inverse(g, (16, 24)))
    assert max_err(back, x) < SMOOTH_TOL  # there and back: two resamplings of a smooth map


@pytest.mark.parametrize("k1", range(4))
def test_compose_matches_sequential_d4_exactly(k1):
    x, t = int_images(32, 48), torch.randn(B, 5, 4, 6)
    for k2 in range(4):
        g1, g2 = d4(k1, seed=10 + k1), d4(k2, seed=20 + k2)
        g = group_actions.compose(g2, g1)
        assert torch.equal(group_actions.apply_to_token_map(t, g),
                           group_actions.apply_to_token_map(group_actions.apply_to_token_map(t, g1), g2))
        assert torch.equal(group_actions.apply_to_images(x, g, 8),
                           group_actions.apply_to_images(group_actions.apply_to_images(x, g1, 8), g2, 8))


@pytest.mark.parametrize("k1", range(4))
def test_compose_with_resizes(k1):
    t = smooth(16, 24, C=5)  # a token map
    for k2 in range(4):
        f1, r1 = flags(k1)
        f2, r2 = flags(10 + k2)
        # one resize: the rewrite rules are exact identities, so only float rounding remains
        g1 = group_actions.GroupElement(k1, f1, r1, size=(14, 27))
        g2 = group_actions.GroupElement(k2, f2, r2)
        seq = group_actions.apply_to_token_map(group_actions.apply_to_token_map(t, g1), g2)
        assert max_err(group_actions.apply_to_token_map(t, group_actions.compose(g2, g1)), seq) < 1e-5
        # resize in the second element: its target is transposed when g1 turns by an odd k
        g1, g2 = group_actions.GroupElement(k1, f1, r1), group_actions.GroupElement(k2, f2, r2, size=(18, 21))
        seq = group_actions.apply_to_token_map(group_actions.apply_to_token_map(t, g1), g2)
        assert max_err(group_actions.apply_to_token_map(t, group_actions.compose(g2, g1)), seq) < 1e-5
        # two resizes: exact shape, values agree up to resampling once vs twice
        g1 = group_actions.GroupElement(k1, f1, r1, size=(19, 20))
        seq = group_actions.apply_to_token_map(group_actions.apply_to_token_map(t, g1), g2)
        assert max_err(group_actions.apply_to_token_map(t, group_actions.compose(g2, g1)), seq) < SMOOTH_TOL


@pytest.mark.parametrize("k", range(4))
def test_token_action_commutes_with_patch_averaging_d4(k):
    p = 4
    x = int_images(32, 48)
    g = d4(k, seed=30 + k)
    assert torch.equal(tokens(group_actions.apply_to_images(x, g, p), p), group_actions.apply_to_token_map(tokens(x, p), g))


@pytest.mark.parametrize("grid,size", [((14, 14), (12, 17)), ((4, 4), (5, 3)), ((5, 3), (2, 2)), ((1, 4), (3, 1))])
def test_token_map_resize_is_f_interpolate_bicubic(grid, size):
    """The token-map resize is a product of interpolation matrices (its gradient avoids CUDA's slow bicubic
    backward): values and gradients are F.interpolate's, to float64 rounding."""
    u = torch.randn(3, 5, *grid, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, *size, dtype=torch.float64)
    ours = group_actions.apply_to_token_map(u, group_actions.GroupElement(size=size))
    ref = F.interpolate(u, size=size, mode="bicubic", align_corners=False)
    assert max_err(ours, ref) < 1e-12
    (g_ours,), (g_ref,) = torch.autograd.grad((ours * w).sum(), u), torch.autograd.grad((ref * w).sum(), u)
    assert max_err(g_ours, g_ref) < 1e-12


@pytest.mark.parametrize("size", [(13, 27), (19, 20), (14, 29), (18, 28)])
def test_token_action_tracks_pixel_resize_on_smooth_images(size):
    p = 4
    x = smooth(64, 96)  # token grid (16, 24)
    f, r = flags(sum(size))
    for k in range(4):
        g = group_actions.GroupElement(k, f, r, size)
        pix = tokens(group_actions.apply_to_images(x, g, p), p)
        assert pix.shape[-2:] == output_grid(g, (16, 24))
        assert max_err(pix, group_actions.apply_to_token_map(tokens(x, p), g)) < SMOOTH_TOL
        # the tolerance discriminates: the same element with every flip toggled is far off
        wrong = group_actions.GroupElement(k, ~f, r, size)
        assert max_err(pix, group_actions.apply_to_token_map(tokens(x, p), wrong)) > 4 * SMOOTH_TOL


def test_relative_action_d4_exact_both_ways():
    p = 4
    crop = int_images(32, 48)  # common crop, token grid (8, 12)
    for k1 in range(4):
        for k2 in range(4):
            g1, g2 = d4(k1, seed=40 + k1), d4(k2, seed=50 + k2)
            t1 = tokens(group_actions.apply_to_images(crop, g1, p), p)
            t2 = tokens(group_actions.apply_to_images(crop, g2, p), p)
            assert torch.equal(group_actions.apply_to_token_map(t1, group_actions.relative_action(g1, g2, (8, 12))), t2)
            assert torch.equal(group_actions.apply_to_token_map(t2, group_actions.relative_action(g2, g1, (8, 12))), t1)


@pytest.mark.parametrize("seed", range(6))
def test_relative_action_with_resizes_matches_views_and_release(seed):
    p, base = 4, (16, 24)
    crop = smooth(64, 96, seed=seed)
    g1, g2 = group_actions.sample_view_pair(B, torch.Generator().manual_seed(seed), base_grid=base)
    t1 = tokens(group_actions.apply_to_images(crop, g1, p), p)
    t2 = tokens(group_actions.apply_to_images(crop, g2, p), p)
    t12 = group_actions.apply_to_token_map(t1, group_actions.relative_action(g1, g2, base))
    t21 = group_actions.apply_to_token_map(t2, group_actions.relative_action(g2, g1, base))
    assert t12.shape == t2.shape and t21.shape == t1.shape
    assert max_err(t12, t2) < RELATIVE_TOL and max_err(t21, t1) < RELATIVE_TOL
    # the release's aug_equiv_feat(t1, size2, -k1, k2): rot90(2 - k1), h-flip, resize, rot90(k2)
    u = torch.rot90(t1, 2 - g1.k, dims=(-2, -1)).flip(-1)
    u = torch.rot90(F.interpolate(u, size=g2.size, mode="bicubic", align_corners=False), g2.k, dims=(-2, -1))
    assert max_err(t12, u) < 1e-5


def test_sample_view_pair_negates_flags_and_gives_a_uniform_relative_d4():
    for seed in range(8):
        g1, g2 = group_actions.sample_view_pair(16, torch.Generator().manual_seed(seed))
        assert torch.equal(g2.flip, ~g1.flip) and torch.equal(g2.rot180, ~g1.rot180)
        rel = group_actions.relative_action(g1, g2, (14, 14))
        # F . R180 . R90^-k1 in normal form: flip everywhere, R180 iff k1 is even
        assert rel.flip.all() and bool((rel.rot180 == (g1.k % 2 == 0)).all())
        assert rel.k == (g2.k - g1.k) % 4 and output_grid(rel, output_grid(g1, (14, 14))) == \
            output_grid(g2, (14, 14))


def test_sample_element_reproducible_and_in_range():
    a = group_actions.sample_element(B, torch.Generator().manual_seed(7))
    b = group_actions.sample_element(B, torch.Generator().manual_seed(7))
    assert (a.k, a.size) == (b.k, b.size) and torch.equal(a.flip, b.flip) and torch.equal(a.rot180, b.rot180)
    gen, ks, flips = torch.Generator().manual_seed(0), set(), []
    for _ in range(200):
        g = group_actions.sample_element(64, gen)
        h, w = g.size
        ks.add(g.k)
        flips.append(torch.stack([g.flip, g.rot180]).float().mean())
        # area 196*U(0.7, 1.3) tokens and aspect in [3/4, 4/3], up to rounding each side by <= 0.5
        # (|h*w - area| <= (h + w)/2 + 1/4)
        slack = (h + w) / 2 + 0.25
        assert 0.7 * 196 - slack <= h * w <= 1.3 * 196 + slack
        assert h - 0.5 <= 4 / 3 * (w + 0.5) and w - 0.5 <= 4 / 3 * (h + 0.5)
    assert ks == {0, 1, 2, 3}
    assert abs(torch.stack(flips).mean().item() - 0.5) < 0.02
    c = group_actions.sample_element(B, torch.Generator().manual_seed(8))
    assert (c.k, c.size) != (a.k, a.size) or not torch.equal(c.flip, a.flip)


def test_token_action_keeps_gradients():
    t = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    g = group_actions.GroupElement(k=3, flip=torch.tensor([True, False]), rot180=torch.tensor([True, True]), size=(6, 3))
    assert torch.autograd.gradcheck(lambda u: group_actions.apply_to_token_map(u, g), (t,))
    group_actions.apply_to_token_map(t, g).square().sum().backward()
    assert t.grad is not None and (t.grad.abs().flatten(1).sum(1) > 0).all()  # every sample gets a gradient


def test_dtypes_are_kept():
    g = group_actions.GroupElement(k=1, flip=torch.tensor([True, False]), size=(3, 5))
    for dtype in (torch.float64, torch.bfloat16):
        t = torch.randn(2, 3, 4, 4, dtype=dtype)
        assert group_actions.apply_to_token_map(t, g).dtype == dtype
        assert group_actions.apply_to_images(t.repeat_interleave(4, -1).repeat_interleave(4, -2), g, 4).dtype == dtype


def test_demo_runs_and_refuses_unknown_flags():
    code, _, out = run_script("group_actions.py")
    assert code == 0 and "view 1's tokens on view 2's grid (3, 3, 14, 15)" in out
    code, last, _ = run_script("group_actions.py", "--bogus")
    assert code == 2 and last.endswith("unrecognized arguments: --bogus")


def test_input_validation():
    t = torch.randn(2, 3, 4, 4)
    bad_elements = [dict(k=1.5), dict(k=True), dict(k=torch.tensor(1)),
                    dict(flip=torch.tensor([1, 0])), dict(rot180=torch.ones(2, 1, dtype=torch.bool)),
                    dict(flip=torch.ones(2, dtype=torch.bool), rot180=torch.ones(3, dtype=torch.bool)),
                    dict(size=(0, 4)), dict(size=(4,)), dict(size=(2.5, 3)), dict(size=(True, 3))]
    for kw in bad_elements:
        with pytest.raises(ValueError, match="GroupElement"):
            group_actions.GroupElement(**kw)
    with pytest.raises(ValueError, match="batch size 2"):
        group_actions.apply_to_token_map(t, group_actions.GroupElement(flip=torch.ones(3, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        group_actions.apply_to_token_map(t[0], group_actions.GroupElement(k=1))
    with pytest.raises(ValueError, match="not divisible by patch_size 8"):
        group_actions.apply_to_images(torch.randn(2, 3, 30, 32), group_actions.GroupElement(size=(3, 3)), 8)
    group_actions.apply_to_images(torch.randn(2, 3, 30, 32), group_actions.GroupElement(k=1), 8)  # fine without a resize
    with pytest.raises(ValueError, match="patch_size"):
        group_actions.apply_to_images(torch.randn(2, 3, 32, 32), group_actions.GroupElement(), 0)
    with pytest.raises(ValueError, match="floating point"):
        group_actions.apply_to_images(torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
                                      group_actions.GroupElement(size=(3, 3)), 8)
    with pytest.raises(ValueError, match="input_size"):
        group_actions.inverse(group_actions.GroupElement(size=(3, 3)), None)
    with pytest.raises(ValueError, match="batch sizes"):
        group_actions.compose(identity(2), identity(3))
    with pytest.raises(ValueError, match="batch_size"):
        group_actions.sample_element(0, torch.Generator())
    with pytest.raises(ValueError, match="generator"):
        group_actions.sample_element(2, 0)
    with pytest.raises(ValueError, match="scale"):
        group_actions.sample_element(2, torch.Generator(), scale=(1.3, 0.7))
    with pytest.raises(ValueError, match="base_grid"):
        group_actions.sample_element(2, torch.Generator(), base_grid=(14, 0))


# ================================================================================================
# losses.py: every loss against an independent computation, exact under DDP
# ================================================================================================

DT = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def leaf(*shape, seed=0):
    return randn(*shape, seed=seed).requires_grad_()


def mask_offdiag(m):
    return m[~torch.eye(m.shape[0], dtype=torch.bool)]


# ------------------------------------------------------------------------------------------
# GlobalBatchNorm1d and heads
# ------------------------------------------------------------------------------------------


def test_global_bn_single_process_is_batchnorm():
    x = randn(16, 5) * 3 + 1
    ours, ref = losses.GlobalBatchNorm1d(5).double(), nn.BatchNorm1d(5).double()
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for _ in range(2):
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))
    with pytest.raises(ValueError, match="expects \\(N, C\\)"):
        ours(randn(2, 5, 3))


def test_build_mlp_layout():
    mlp = losses.build_mlp(3, 8, 16, 4, last_bn=True, bias=True)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["Linear", "GlobalBatchNorm1d", "ReLU"] * 2 + ["Linear", "GlobalBatchNorm1d"]
    assert mlp[0].bias is not None and mlp[6].bias is None and not mlp[7].affine
    no_bn = losses.build_mlp(2, 8, 16, 4, last_bn=False)
    assert len(no_bn) == 4 and no_bn[0].bias is None


def test_build_heads_official_sizes():
    def linear_shapes(m):
        return [tuple(x.weight.shape) for x in m.modules() if isinstance(x, nn.Linear)]

    with torch.device("meta"):  # the official sizes without allocating 8192x8192 matrices
        proj, pred = losses.build_heads("mocov3", 384)
        assert linear_shapes(proj) == [(4096, 384), (4096, 4096), (256, 4096)]
        assert linear_shapes(pred) == [(4096, 256), (256, 4096)] and isinstance(pred[-1], losses.GlobalBatchNorm1d)
        head, none = losses.build_heads("dino", 384)
        assert none is None and tuple(head.last_layer.weight_v.shape) == (65536, 256)
        assert linear_shapes(head) == [(2048, 384), (2048, 2048), (256, 2048)]
        assert head.last_layer.weight_g.requires_grad  # norm_last_layer=False for ViT-S
        assert linear_shapes(losses.build_heads("barlowtwins", 384)[0]) == [(8192, 384), (8192, 8192), (8192, 8192)]
        vic = losses.build_heads("vicreg", 384)[0]
        assert [m.bias is not None for m in vic if isinstance(m, nn.Linear)] == [True, True, False]
        assert linear_shapes(losses.build_heads("simclr", 384)[0]) == [(384, 384), (384, 384), (128, 384)]
        proj, pred = losses.build_heads("byol", 384)
        assert linear_shapes(proj) == [(4096, 384), (256, 4096)] and linear_shapes(pred) == [(4096, 256), (256, 4096)]
    proj, pred = losses.build_heads("mocov3", 32, hidden_dim=16, out_dim=8)
    assert proj(randn(4, 32).float()).shape == (4, 8) and pred(torch.randn(4, 8)).shape == (4, 8)
    with pytest.raises(ValueError, match="unknown method"):
        losses.build_heads("swav", 32)
    with pytest.raises(ValueError, match="unexpected options"):
        losses.build_heads("mocov3", 32, bottleneck_dim=8)


def test_dino_head_matches_weight_norm_layout():
    head = losses.DINOHead(32, 64, hidden_dim=16, bottleneck_dim=8, norm_last_layer=True).double()
    keys = set(head.state_dict())
    assert {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight", "last_layer.weight_g", "last_layer.weight_v"} <= keys
    assert not head.last_layer.weight_g.requires_grad
    x = randn(5, 32)
    # weight-normalised last layer with g = 1: logits are cosines of the bottleneck with each row of v
    z = F.normalize(head.mlp(x), dim=-1)
    expected = z @ F.normalize(head.last_layer.weight_v, dim=1).T
    torch.testing.assert_close(head(x), expected)
    copy.deepcopy(head)  # the EMA teacher is a deep copy


# ------------------------------------------------------------------------------------------
# Base losses against independent computations
# ------------------------------------------------------------------------------------------


def official_moco_ctr(q, k, T):
    q, k = nn.functional.normalize(q, dim=1), nn.functional.normalize(k, dim=1)
    logits = torch.einsum("nc,mc->nm", q, k) / T
    return nn.CrossEntropyLoss()(logits, torch.arange(len(q))) * (2 * T)


def test_mocov3_against_official_and_closed_form():
    q1, q2, k1, k2 = leaf(6, 8, seed=1), leaf(6, 8, seed=2), leaf(6, 8, seed=3), leaf(6, 8, seed=4)
    ours = losses.mocov3_loss([q1, q2], [k1, k2], temperature=0.2)
    ref = official_moco_ctr(q1, k2, 0.2) + official_moco_ctr(q2, k1, 0.2)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    assert k1.grad is None and k2.grad is None  # keys are stop-grad
    assert torch.isfinite(q1.grad).all() and q1.grad.abs().sum() > 0
    # orthonormal queries equal to their keys: positive logit 1/T, N-1 negatives at 0
    e = torch.eye(6, 8, dtype=DT)
    T, n = 0.2, 6
    per_dir = -math.log(math.exp(1 / T) / (math.exp(1 / T) + n - 1)) * 2 * T
    torch.testing.assert_close(losses.mocov3_loss([e, e], [e, e], T), torch.tensor(2 * per_dir, dtype=DT))


def test_mocov3_multicrop_is_the_sum_over_student_and_other_momentum_views():
    """SER's 2+4 (builder/moco.py erl_local4): each of the 6 student views against each other global
    momentum view, 10 official ctr terms; with 2 views it is the two-view loss."""
    T = 0.2
    qs, ks = [leaf(5, 4, seed=s) for s in range(6)], [randn(5, 4, seed=10 + s) for s in range(2)]
    expected = sum(official_moco_ctr(q, k, T) for i, q in enumerate(qs) for j, k in enumerate(ks) if i != j)
    torch.testing.assert_close(losses.mocov3_loss(qs, ks, T), expected)
    two_view = official_moco_ctr(qs[0], ks[1], T) + official_moco_ctr(qs[1], ks[0], T)
    torch.testing.assert_close(losses.mocov3_loss(qs[:2], ks, T), two_view)
    with pytest.raises(ValueError, match="momentum views"):
        losses.mocov3_loss(qs[:1], ks, T)


def test_dino_loss_against_formula_and_centre():
    B, K, ncrops = 3, 7, 4
    student, teacher = leaf(ncrops * B, K, seed=1), randn(2 * B, K, seed=2) * 2
    loss_fn = losses.DINOLoss(K).double()
    ours = loss_fn(student, teacher, ncrops, teacher_temp=0.05)
    # every (teacher view t, student crop s) term at once, then drop s == t and average the rest
    log_p_s = F.log_softmax(student.detach().view(ncrops, B, K) / 0.1, -1)
    p_t = F.softmax(teacher.view(2, B, K) / 0.05, -1)  # centre is 0 at the first call
    ce = -torch.einsum("tbk,sbk->ts", p_t, log_p_s) / B  # (2, ncrops)
    keep = torch.ones(2, ncrops, dtype=torch.bool)
    keep[0, 0] = keep[1, 1] = False
    torch.testing.assert_close(ours, ce[keep].mean())
    assert keep.sum() == 2 * ncrops - 2
    torch.testing.assert_close(loss_fn.center, 0.1 * teacher.mean(0, keepdim=True))
    # second call uses the updated centre
    ours2 = loss_fn(student, teacher, ncrops, teacher_temp=0.05)
    p_t2 = F.softmax((teacher.view(2, B, K) - 0.1 * teacher.mean(0)) / 0.05, -1)
    ce2 = -torch.einsum("tbk,sbk->ts", p_t2, log_p_s) / B
    torch.testing.assert_close(ours2, ce2[keep].mean())
    ours.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="ncrops"):
        loss_fn(student[:-1], teacher, ncrops, 0.05)


def test_teacher_temp_schedule_is_dino_linspace():
    official = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))
    ours = [losses.teacher_temp_schedule(e, 0.04, 0.07, 30) for e in range(100)]
    np.testing.assert_allclose(ours, official, rtol=0, atol=1e-15)
    assert losses.teacher_temp_schedule(0, 0.04, 0.07, 0) == 0.07
    assert losses.teacher_temp_schedule(0, 0.04, 0.07, 1) == 0.04


def test_barlow_twins_against_official_and_identical_views():
    z1, z2 = leaf(32, 6, seed=1), leaf(32, 6, seed=2)
    bn = nn.BatchNorm1d(6, affine=False).double()
    c = bn(z1).T @ bn(z2) / 32
    ref = (torch.diagonal(c) - 1).pow(2).sum() + 0.0051 * mask_offdiag(c).pow(2).sum()
    ours = losses.barlow_twins_loss(z1, z2)
    torch.testing.assert_close(ours, ref)
    # identical (standardised) views: the diagonal is 1, only the correlations off it remain
    z = randn(64, 5, seed=3) * 10
    corr = torch.corrcoef(z.T)
    off_diag = 0.0051 * mask_offdiag(corr).pow(2).sum()
    torch.testing.assert_close(losses.barlow_twins_loss(z, z), off_diag, rtol=1e-5, atol=1e-6)  # BN's eps
    # invariant to a per-feature affine map, up to BN's eps
    torch.testing.assert_close(losses.barlow_twins_loss(z1, z2), losses.barlow_twins_loss(2 * z1 + 4, z2), rtol=1e-5, atol=0)
    ours.backward()
    assert torch.isfinite(z1.grad).all() and z2.grad.abs().sum() > 0


def test_vicreg_against_official_and_collapse():
    z1, z2 = leaf(24, 6, seed=1), leaf(24, 6, seed=2)
    x, y = z1.detach(), z2.detach()
    repr_loss = ((x - y) ** 2).mean()
    xc, yc = x - x.mean(0), y - y.mean(0)

    def std(t):  # unbiased, centred t
        return torch.sqrt(t.pow(2).sum(0) / (len(t) - 1) + 1e-4)

    def cov(t):
        return mask_offdiag(t.T @ t / (len(t) - 1)).pow(2).sum() / t.shape[1]

    std_loss = F.relu(1 - std(xc)).mean() / 2 + F.relu(1 - std(yc)).mean() / 2
    ref = 25 * repr_loss + 25 * std_loss + cov(xc) + cov(yc)
    ours = losses.vicreg_loss(z1, z2)
    torch.testing.assert_close(ours, ref)
    # full collapse: no invariance or covariance penalty, the variance hinge at 1 - sqrt(1e-4) per branch
    const = torch.ones(10, 4, dtype=DT)
    torch.testing.assert_close(losses.vicreg_loss(const, const), torch.tensor(25 * (1 - 0.01), dtype=DT))
    ours.backward()
    assert torch.isfinite(z1.grad).all() and z2.grad.abs().sum() > 0


def tf_simclr_loss(z1, z2, tau):
    """google-research/simclr tf2 add_contrastive_loss, one replica."""
    h1, h2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = len(h1)
    big = 1e9 * torch.eye(n, dtype=h1.dtype)
    aa, bb = h1 @ h1.T / tau - big, h2 @ h2.T / tau - big
    ab, ba = h1 @ h2.T / tau, h2 @ h1.T / tau
    labels = torch.arange(n)
    loss_a = F.cross_entropy(torch.cat([ab, aa], 1), labels, reduction="none")
    loss_b = F.cross_entropy(torch.cat([ba, bb], 1), labels, reduction="none")
    return (loss_a + loss_b).mean()


def test_simclr_is_half_the_tf_loss_and_closed_forms():
    z1, z2 = leaf(8, 5, seed=1), leaf(8, 5, seed=2)
    ours = losses.simclr_loss(z1, z2, temperature=0.1)
    torch.testing.assert_close(2 * ours, tf_simclr_loss(z1, z2, 0.1))
    n, tau = 6, 0.1
    same = torch.ones(n, 4, dtype=DT)  # perfectly correlated, all equal: every logit ties
    torch.testing.assert_close(losses.simclr_loss(same, same, tau), torch.tensor(math.log(2 * n - 1), dtype=DT))
    e = torch.eye(n, 8, dtype=DT)  # pairs equal, all others orthogonal
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * n - 2))
    torch.testing.assert_close(losses.simclr_loss(e, e, tau), torch.tensor(expected, dtype=DT))
    ours.backward()
    assert torch.isfinite(z1.grad).all() and z2.grad.abs().sum() > 0


def test_byol_closed_forms_and_stop_grad():
    p = randn(5, 4, seed=1)
    q = torch.stack([p[:, 1], -p[:, 0], p[:, 3], -p[:, 2]], 1)  # orthogonal to p row by row
    torch.testing.assert_close(losses.byol_loss(p, p, 3 * p, p), torch.tensor(0.0, dtype=DT))
    torch.testing.assert_close(losses.byol_loss(p, p, q, q), torch.tensor(4.0, dtype=DT))
    torch.testing.assert_close(losses.byol_loss(p, p, -p, -p), torch.tensor(8.0, dtype=DT))
    p1, p2, z1, z2 = leaf(5, 4, seed=2), leaf(5, 4, seed=3), leaf(5, 4, seed=4), leaf(5, 4, seed=5)
    losses.byol_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    assert torch.isfinite(p1.grad).all() and p2.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------
# SER
# ------------------------------------------------------------------------------------------


def ser_reference(groups, tau):
    """The paper's L_equiv on one process, written per anchor. groups: list of (z1, z2, g1, g2,
    base_size), one per rank; each group's images are distinct images. Global mean over anchors."""
    def ntx(pairs):
        a = torch.cat([F.normalize(p[0].flatten(2).transpose(1, 2).reshape(-1, p[0].shape[1]), dim=1) for p in pairs])
        b = torch.cat([F.normalize(p[1].flatten(2).transpose(1, 2).reshape(-1, p[1].shape[1]), dim=1) for p in pairs])
        ids, start = [], 0
        for p in pairs:
            ids.append(start + torch.arange(p[0].shape[0]).repeat_interleave(p[0].shape[2] * p[0].shape[3]))
            start += p[0].shape[0]
        ids = torch.cat(ids)
        losses = []
        for anchors, partners in ((a, b), (b, a)):
            sim = anchors @ torch.cat([a, b]).T / tau  # (T, 2T)
            pos = (anchors * partners).sum(1) / tau  # (T,)
            other = ids[:, None] != torch.cat([ids, ids])[None, :]
            denom = pos.exp() + (sim.exp() * other).sum(1)
            losses.append(denom.log() - pos)
        return torch.cat(losses).mean()

    act, relative = group_actions.apply_to_token_map, group_actions.relative_action
    forward = [(act(z1, relative(g1, g2, base)), z2) for z1, z2, g1, g2, base in groups]
    backward = [(z1, act(z2, group_actions.inverse(relative(g1, g2, base), z1.shape[-2:])))
                for z1, z2, g1, g2, base in groups]
    return 0.5 * (ntx(forward) + ntx(backward))


def test_ser_against_reference_with_random_group_elements():
    gen = torch.Generator().manual_seed(3)
    g1, g2 = group_actions.sample_view_pair(3, gen, base_grid=(4, 4))
    h1, w1 = output_grid(g1, (4, 4))
    h2, w2 = output_grid(g2, (4, 4))
    z1, z2 = leaf(3, 6, h1, w1, seed=1), leaf(3, 6, h2, w2, seed=2)
    ours = losses.ser_loss([losses.SERGroup(z1, z2, g1, g2, (4, 4))], temperature=0.4)
    torch.testing.assert_close(ours, ser_reference([(z1, z2, g1, g2, (4, 4))], 0.4))
    ours.backward()
    for z in (z1, z2):
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_ser_closed_forms():
    tau = 0.5
    ident = identity(2)
    z = torch.eye(4, dtype=DT).T.reshape(4, 2, 1, 2).transpose(0, 1).contiguous()  # (2, 4, 1, 2): 4 orthonormal tokens
    # the positive at cosine 1; 2 tokens x 2 views of the other image at cosine 0; same-image tokens excluded
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 4))
    torch.testing.assert_close(losses.ser_loss([losses.SERGroup(z, z, ident, ident, (1, 2))], tau),
                               torch.tensor(expected, dtype=DT))
    collapsed = torch.ones(2, 4, 1, 2, dtype=DT)  # every token identical: positive among 5 equal terms
    torch.testing.assert_close(losses.ser_loss([losses.SERGroup(collapsed, collapsed, ident, ident, (1, 2))], tau),
                               torch.tensor(math.log(5), dtype=DT))
    # an exactly equivariant map (rho_g of view 1 is view 2) beats a shuffled one
    g = group_actions.GroupElement(k=1, flip=torch.tensor([True, False]), rot180=torch.tensor([False, True]))
    z1 = randn(2, 8, 3, 3, seed=4)
    z2 = group_actions.apply_to_token_map(z1, g)
    good = losses.ser_loss([losses.SERGroup(z1, z2, ident, g, (3, 3))], tau)
    bad = losses.ser_loss([losses.SERGroup(z1, z2.flip(-1), ident, g, (3, 3))], tau)
    assert good < bad


def test_ser_gradients_reach_projector_encoder_and_both_views():
    torch.manual_seed(0)
    patch, base = 4, (4, 4)
    encoder = nn.Conv2d(3, 16, patch, stride=patch).double()  # stand-in for blocks 1..L
    projector = losses.SERProjector(16, 12, 12).double()
    crop = randn(3, 3, base[0] * patch, base[1] * patch, seed=5)
    g1, g2 = group_actions.sample_view_pair(3, torch.Generator().manual_seed(1), base_grid=base)
    maps = [encoder(group_actions.apply_to_images(crop, g, patch)) for g in (g1, g2)]
    for m in maps:
        m.retain_grad()
    losses.ser_loss([losses.SERGroup(projector(maps[0]), projector(maps[1]), g1, g2, base)], temperature=0.4).backward()
    for t in [maps[0], maps[1], encoder.weight, *projector.parameters()]:
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_ser_projector_weights_take_their_gradients_in_their_own_layout():
    """The ViT's token map is channels-last, and so are the projector's weight gradients at the main job's size
    (oneDNN may choose otherwise for tiny batches); weights of another layout would make DDP copy every gradient
    and warn "Grad strides do not match bucket view strides"."""
    backbone = tiny_vit(seed=0, cls_after_block=2)
    projector = losses.SERProjector(backbone.embed_dim)
    token_map = backbone.forward_features(torch.randn(16, 3, 32, 32), layer=2)["token_map"]  # (16, 64, 4, 4)
    incoming = []  # the gradients as autograd makes them, before they are accumulated into .grad
    for p in projector.parameters():
        p.register_hook(lambda grad, p=p: incoming.append(grad.stride() == p.stride()))
    projector(token_map).square().sum().backward()
    assert incoming == [True, True]


# ------------------------------------------------------------------------------------------
# Add-ons
# ------------------------------------------------------------------------------------------


def view_params(batch, seed):
    g = torch.Generator().manual_seed(seed)
    applied = (torch.rand(batch, generator=g) < 0.8).to(DT)
    jitter = torch.where(applied[:, None] > 0,
                         torch.tensor([0.6, 0.6, 0.8, -0.1], dtype=DT) + torch.rand(batch, 4, generator=g, dtype=DT)
                         * torch.tensor([0.8, 0.8, 0.4, 0.2], dtype=DT), torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=DT))
    size = 0.3 + 0.7 * torch.rand(batch, 2, generator=g, dtype=DT)
    top_left = (1 - size) * torch.rand(batch, 2, generator=g, dtype=DT)
    sigma = torch.where(torch.rand(batch, generator=g) < 0.5, 0.1 + torch.rand(batch, generator=g, dtype=DT), 0.0)
    return {"crop": torch.cat([top_left, size], 1), "flip": (torch.rand(batch, generator=g) < 0.5).to(DT),
            "jitter": jitter, "jitter_applied": applied, "jitter_order": torch.rand(batch, 4, generator=g).argsort(1),
            "gray": (torch.rand(batch, generator=g) < 0.2).to(DT), "blur_sigma": sigma.to(DT),
            "solarize": (torch.rand(batch, generator=g) < 0.2).to(DT)}


def test_equimod_param_vector_layout():
    p = {"crop": torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]]), "flip": torch.tensor([1.0, 0.0]),
         "jitter": torch.tensor([[1.1, 0.9, 1.2, 0.05], [1.0, 1.0, 1.0, 0.0]]),
         "jitter_applied": torch.tensor([1.0, 0.0]),
         "jitter_order": torch.tensor([[3, 1, 0, 2], [2, 3, 1, 0]]), "gray": torch.tensor([0.0, 1.0]),
         "blur_sigma": torch.tensor([0.0, 1.5]), "solarize": torch.tensor([1.0, 0.0])}
    expected = torch.tensor([
        [0.1, 0.2, 0.5, 0.6, 1, 1, 1, 1 / 3, 0, 2 / 3, 1.1, 0.9, 1.2, 0.05, 0, 0, 0.0, 1],
        [0.0, 0.0, 1.0, 1.0, 0, 0, 0, 1 / 3, 2 / 3, 1, 1.0, 1.0, 1.0, 0.0, 1, 1, 1.5, 0],  # no jitter: order 0..3
    ])
    torch.testing.assert_close(losses.equimod_param_vector(p), expected)
    with pytest.raises(ValueError, match="solarize"):
        losses.equimod_param_vector({k: v for k, v in p.items() if k != "solarize"})


def test_equimod_head_and_loss_against_official_ntxent():
    torch.manual_seed(0)
    head = losses.EquiModHead(16, hidden_dim=12, out_dim=6, input_norm=True).double()
    h0, hv = leaf(4, 16, seed=1), leaf(8, 16, seed=2)
    p = torch.cat([losses.equimod_param_vector(view_params(4, s)) for s in (1, 2)])
    y_t, y_hat = head(h0, hv, p)
    assert y_t.shape == y_hat.shape == (8, 6)
    ours = losses.equimod_loss(y_t, y_hat, temperature=0.2)
    # EquiMod's NTXentLoss(zeta=1e8): rows [y_t; y_hat], partner at +-M, diagonal pushed to -1e8
    z = F.normalize(torch.cat([y_t, y_hat]), dim=1)
    m = len(y_t)
    logits = z @ z.T / 0.2 - 1e8 * torch.eye(2 * m, dtype=DT)
    ref = F.cross_entropy(logits, (torch.arange(2 * m) + m) % (2 * m))
    torch.testing.assert_close(ours, ref)
    ours.backward()
    for t in [h0, hv, *head.parameters()]:
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_augself_targets_by_hand():
    p1 = {"crop": torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.2, 0.4, 0.4, 0.2]]), "flip": torch.tensor([1.0, 0.0]),
          "jitter": torch.tensor([[1.4, 0.6, 1.0, 0.1], [1.0, 1.0, 1.0, 0.0]]),
          "jitter_applied": torch.tensor([1.0, 0.0])}
    p2 = {"crop": torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]]), "flip": torch.tensor([0.0, 1.0]),
          "jitter": torch.tensor([[1.0, 1.0, 1.2, -0.1], [0.8, 1.2, 0.9, 0.05]]),
          "jitter_applied": torch.tensor([1.0, 1.0])}
    t = losses.augself_targets(p1, p2)
    # sample 0, (1,2): view 1 flipped, so both x-centres mirror: 1-0.25 vs 1-0.75
    # sample 0, (2,1): view 2 not flipped, no mirroring: 0.75 vs 0.25
    # sample 1, (1,2): no mirror: centres (0.4, 0.5) vs (0.5, 0.5); (2,1): view 2 flipped, mirror both
    crop = torch.tensor([[-0.5, 0.5, 0.0, 0.0], [-0.1, 0.0, -0.6, -0.8],
                         [0.5, 0.5, 0.0, 0.0], [0.1, 0.0, 0.6, 0.8]])
    torch.testing.assert_close(t["crop"], crop)
    # colour: (factor - 1) / (2 strength) with strengths (0.4, 0.4, 0.2, 0.1), hue / 0.2
    c1 = torch.tensor([[0.5, -0.5, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    c2 = torch.tensor([[0.0, 0.0, 0.5, -0.5], [-0.25, 0.25, -0.25, 0.25]])
    torch.testing.assert_close(t["color"], torch.cat([c1 - c2, c2 - c1]))


def test_augself_head_and_loss():
    torch.manual_seed(0)
    head = losses.AugSelfHead(16, hidden_dim=12, input_norm=True).double()
    h1, h2 = leaf(5, 16, seed=1), leaf(5, 16, seed=2)
    preds = head(h1, h2)
    assert preds["crop"].shape == preds["color"].shape == (10, 4)
    targets = losses.augself_targets(view_params(5, 1), view_params(5, 2))
    ours = losses.augself_loss(preds, targets)
    ref = sum(0.5 * ((torch.tanh(preds[k]) - targets[k]) ** 2).mean() for k in ("crop", "color"))
    torch.testing.assert_close(ours, ref)
    # both orders see the same pair: swapping the views swaps the two halves of the rows
    swapped = head(h2, h1)
    torch.testing.assert_close(swapped["crop"], torch.cat([preds["crop"][5:], preds["crop"][:5]]))
    ours.backward()
    for t in [h1, h2, *head.parameters()]:
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_essl_head_rotations_and_loss():
    torch.manual_seed(0)
    head = losses.ESSLHead(16, bottleneck_dim=8, input_norm=True).double()
    shapes = [tuple(m.weight.shape) for m in head.net if isinstance(m, nn.Linear)]
    assert shapes == [(16, 16), (16, 16), (8, 16), (4, 8)]  # D-D-D-256-4 with a small bottleneck
    x = randn(2, 3, 4, 4, seed=1)
    rotated, labels = losses.essl_rotations(x)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(rotated[2], torch.rot90(x[0], 1, (-2, -1)))
    h = leaf(8, 16, seed=2)
    logits = head(h)
    loss = losses.essl_loss(logits, labels)
    torch.testing.assert_close(loss, -F.log_softmax(logits, 1)[torch.arange(8), labels].mean())
    loss.backward()
    assert torch.isfinite(h.grad).all() and all(p.grad.abs().sum() > 0 for p in head.parameters())
    with pytest.raises(ValueError, match="square"):
        losses.essl_rotations(randn(1, 3, 4, 6))


# ------------------------------------------------------------------------------------------
# DDP: the average of the per-rank gradients equals the single-process gradient
# ------------------------------------------------------------------------------------------

N, DIN = 8, 10  # global batch, input width of the heads
WORLD = 2
SPLIT = (3, 5)  # rows per rank out of every 8: uneven, as SER's groups make them (every loss must be exact)
# SER: (images per group, first global position of each rank's share). "ser": 3 groups with their own
# grids, the middle one straddling the ranks; "ser_empty_rank": every b2 image on rank 1.
SER_SPLITS = {"ser": ((2, 3, 2), (0, 3, 7)), "ser_empty_rank": ((2, 3), (0, 0, 5))}
CASES = ("mocov3", "mocov3_multicrop", "dino", "barlowtwins", "vicreg", "simclr", "byol", "ser", "ser_empty_rank",
         "equimod", "augself", "essl")


def shard(x, rank, world):
    if world == 1:
        return x
    bounds = [0, round(len(x) * SPLIT[0] / sum(SPLIT)), len(x)]
    return x[bounds[rank]:bounds[rank + 1]]


def stacked_shard(x, views, rank, world):
    # (views*N, ...) view-major -> this rank's rows of every view, still view-major
    return torch.cat([shard(v, rank, world) for v in x.chunk(views)])


def run_case(name, rank, world):
    """Loss, parameter gradients and buffers for this rank's share of a fixed global batch.
    world == 1 is the single process on the whole batch."""
    torch.manual_seed(0)  # identical modules on every rank

    def part(x):
        return shard(x, rank, world)

    buffers = {}
    if name in ("mocov3", "byol"):
        proj, pred = losses.build_heads(name, DIN, hidden_dim=12, out_dim=6)
        proj, pred = proj.double(), pred.double()
        target = copy.deepcopy(proj)  # momentum encoder, train-mode BN, no grad
        h1, h2 = part(randn(N, DIN, seed=1)), part(randn(N, DIN, seed=2))
        q1, q2 = pred(proj(h1)), pred(proj(h2))
        with torch.no_grad():
            k1, k2 = target(h1), target(h2)
        loss = losses.mocov3_loss([q1, q2], [k1, k2]) if name == "mocov3" else losses.byol_loss(q1, q2, k1, k2)
        modules = {"proj": proj, "pred": pred, "target": target}
    elif name == "mocov3_multicrop":  # 2 global + 4 local student views, 2 momentum views
        proj, pred = losses.build_heads("mocov3", DIN, hidden_dim=12, out_dim=6)
        proj, pred = proj.double(), pred.double()
        target = copy.deepcopy(proj)
        hs = [part(randn(N, DIN, seed=30 + v)) for v in range(6)]
        with torch.no_grad():
            ks = [target(h) for h in hs[:2]]
        loss = losses.mocov3_loss([pred(proj(h)) for h in hs], ks)
        modules = {"proj": proj, "pred": pred, "target": target}
    elif name == "dino":
        student, _ = losses.build_heads("dino", DIN, hidden_dim=12, out_dim=9, bottleneck_dim=5, use_bn=True)
        student = student.double()
        teacher = copy.deepcopy(student)
        crops = randn(4 * N, DIN, seed=3)  # 2 global + 2 local crops, crop-major
        loss_fn = losses.DINOLoss(9).double()
        loss_fn.center.copy_(randn(1, 9, seed=4))  # a non-zero centre from earlier steps
        with torch.no_grad():
            t_out = teacher(stacked_shard(crops[: 2 * N], 2, rank, world))
        s_out = student(stacked_shard(crops, 4, rank, world))
        loss = loss_fn(s_out, t_out, ncrops=4, teacher_temp=0.06)
        modules = {"student": student, "teacher": teacher}
        buffers["center"] = loss_fn.center.clone()
    elif name in ("barlowtwins", "vicreg", "simclr"):
        proj, _ = losses.build_heads(name, DIN, hidden_dim=12, out_dim=6)
        proj = proj.double()
        z1, z2 = proj(part(randn(N, DIN, seed=1))), proj(part(randn(N, DIN, seed=2)))
        loss_fn = {"barlowtwins": losses.barlow_twins_loss, "vicreg": losses.vicreg_loss, "simclr": losses.simclr_loss}
        loss = loss_fn[name](z1, z2)
        modules = {"proj": proj}
    elif name in SER_SPLITS:
        patch, base = 2, (3, 3)
        encoder = nn.Conv2d(3, 8, patch, stride=patch).double()
        projector = losses.SERProjector(8, 6, 6).double()
        sizes, starts = SER_SPLITS[name]
        groups, first = [], 0
        for g, n in enumerate(sizes):  # each group: its own elements (own grids) and images
            gen = torch.Generator().manual_seed(10 + g)
            g1, g2 = group_actions.sample_view_pair(n, gen, base_grid=base, scale=(0.5, 1.6))
            crop = randn(n, 3, base[0] * patch, base[1] * patch, seed=20 + g)
            lo, hi = (first, first + n) if world == 1 else (max(first, starts[rank]), min(first + n, starts[rank + 1]))
            ours = slice(lo - first, hi - first)  # the group's images on this rank
            first += n
            if lo >= hi:
                continue
            g1, g2 = group_actions.select_samples(g1, ours), group_actions.select_samples(g2, ours)
            z1, z2 = (projector(encoder(group_actions.apply_to_images(crop[ours], g, patch))) for g in (g1, g2))
            groups.append(losses.SERGroup(z1, z2, g1, g2, base, torch.arange(lo, hi)))
        if world == 1:  # the whole global batch: every group's images and grids, in one process
            loss = ser_reference([grp[:5] for grp in groups], 0.4)
        else:
            if not groups:  # no b2 image here: an empty group keeps the parameters and collectives in step
                z = projector(encoder(torch.zeros(0, 3, base[0] * patch, base[1] * patch, dtype=DT)))
                groups = [losses.SERGroup(z, z, None, None, base, torch.zeros(0, dtype=torch.long))]
            loss = losses.ser_loss(groups, temperature=0.4)
            buffers["b2_images"] = torch.tensor(sum(grp.z1.shape[0] for grp in groups))
        modules = {"encoder": encoder, "projector": projector}
    elif name == "equimod":
        head = losses.EquiModHead(DIN, hidden_dim=12, out_dim=6, input_norm=True).double()
        params = torch.cat([losses.equimod_param_vector(view_params(N, s)) for s in (1, 2)])
        y_t, y_hat = head(part(randn(N, DIN, seed=1)), stacked_shard(randn(2 * N, DIN, seed=2), 2, rank, world),
                          stacked_shard(params, 2, rank, world))
        loss = losses.equimod_loss(y_t, y_hat)
        modules = {"head": head}
    elif name == "augself":
        head = losses.AugSelfHead(DIN, hidden_dim=12).double()
        p1, p2 = ({k: part(v) for k, v in view_params(N, s).items()} for s in (1, 2))
        preds = head(part(randn(N, DIN, seed=1)), part(randn(N, DIN, seed=2)))
        loss = losses.augself_loss(preds, losses.augself_targets(p1, p2))
        modules = {"head": head}
    else:  # essl
        head = losses.ESSLHead(DIN, bottleneck_dim=6, input_norm=True).double()
        labels = torch.arange(4).repeat_interleave(N // 4).repeat(4)
        loss = losses.essl_loss(head(part(randn(4 * N, DIN, seed=1))), part(labels))
        modules = {"head": head}
    loss.backward()
    grads = {f"{m}.{n}": p.grad.clone() for m, mod in modules.items() for n, p in mod.named_parameters()
             if p.grad is not None}
    buffers.update({f"{m}.{n}": b.clone() for m, mod in modules.items() for n, b in mod.named_buffers()})
    return {"loss": loss.detach(), "grads": grads, "buffers": buffers}


def losses_ddp_worker(rank, world, out_dir):
    dist.init_process_group("gloo")
    try:
        results = {name: run_case(name, rank, world) for name in CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def disagreement_worker(rank, world):
    dist.init_process_group("gloo")
    try:
        losses.refuse_disagreement(7, "a count")  # the same on every rank: nothing to say
        with pytest.raises(SystemExit, match="^error: the ranks disagree on the step: rank 0 0, rank 1 1$"):
            losses.refuse_disagreement(rank, "the step")  # e.g. a checkpoint on one node's disk only
        losses.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_that_disagree_stop_together_in_one_line():
    """Ranks that resume from different steps would wait for each other's collectives for good."""
    spawn(disagreement_worker)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    spawn(losses_ddp_worker, out_dir, world=WORLD)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_ddp_average_gradient_equals_single_process(name, ddp_results):
    single = run_case(name, 0, 1)
    ranks = [res[name] for res in ddp_results]
    assert single["grads"] and set(single["grads"]) == set(ranks[0]["grads"])
    for key, ref in single["grads"].items():
        assert ref.abs().sum() > 0, f"{name}: {key} gets no gradient"
        ddp_mean = sum(r["grads"][key] for r in ranks) / WORLD
        torch.testing.assert_close(ddp_mean, ref, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name} {key}: {m}")
    # the loss: mean of the local losses (each scaled to sum to W x global) is the global loss
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, single["loss"], rtol=1e-9, atol=1e-12)
    for key, ref in single["buffers"].items():  # BN running stats, DINO centre: identical on every rank
        for r in ranks:
            torch.testing.assert_close(r["buffers"][key], ref, rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f"{name} {key}: {m}")
    if name in SER_SPLITS:  # the point of the variable-length gather: the ranks really held different groups
        assert [int(r["buffers"]["b2_images"]) for r in ranks] == [s - r for r, s in
                                                                   zip(SER_SPLITS[name][1], SER_SPLITS[name][1][1:])]


# ================================================================================================
# augment.py: datasets, view recipes, device-side photometric augmentation
# ================================================================================================

def _batch_equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return all(_batch_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_batch_equal(a[k], b[k]) for k in a)
    return a == b


# ---------------------------------------------------------------------------- synthetic data

def test_synthetic_deterministic_and_split_streams(monkeypatch):
    train = augment.SyntheticShapes("train", 50, img_size=32, seed=0)
    again = augment.SyntheticShapes("train", 50, img_size=32, seed=0)
    val = augment.SyntheticShapes("val", 50, img_size=32, seed=0)
    other_seed = augment.SyntheticShapes("train", 50, img_size=32, seed=1)
    a, label = train.render(7)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, again.render(7)[0]) and label == again.render(7)[1]
    assert not np.array_equal(a, val.render(7)[0])
    assert not np.array_equal(a, other_seed.render(7)[0])
    image, label = train[7]
    assert isinstance(image, Image.Image) and image.size == (32, 32) and image.mode == "RGB"
    # __getitem__ keeps what it renders: the same images in any order of access, each rendered once.
    calls, kept = [], augment.SyntheticShapes("train", 50, img_size=32, seed=0)
    kept.render = lambda i, render=kept.render: calls.append(i) or render(i)
    for i in (8, 7, 8, 7):
        assert np.array_equal(np.asarray(kept[i][0]), again.render(i)[0])
    assert calls == [8, 7] and augment.SyntheticShapes("train", 10 ** 6, img_size=32).kept is None
    # Loader workers keep their own copies: the limit holds for their total (14 workers x 482 MB at 224 px).
    monkeypatch.setattr(augment, "get_worker_info", lambda: SimpleNamespace(num_workers=2))
    half, over = (augment.SyntheticShapes("train", n, img_size=32) for n in (2 ** 29 // 6144, 2 ** 29 // 6144 + 1))
    assert half[0] and over[0] and len(half.kept) == 1 and over.kept is None
    assert half.keeps(2) and not over.keeps(2) and over.keeps(0)  # --benchmark warms only what is kept


def test_synthetic_classes_and_colours():
    data = augment.SyntheticShapes("train", 240, img_size=32)
    assert data.num_classes == 6 and len(data.classes) == data.num_classes
    labels = [data[i][1] for i in range(len(data))]
    assert sorted(set(labels)) == list(range(data.num_classes))
    assert labels == [i % data.num_classes for i in range(len(data))]
    # Colour varies within a class: mean colours of same-class images differ a lot; at the default
    # saturation 0 they are grey levels, and a saturation above 0 gives colours.
    means = np.stack([data.render(i * data.num_classes)[0].reshape(-1, 3).mean(0) for i in range(20)])
    assert means.std(0).min() > 20
    image = data.render(5)[0].astype(int)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    data.SATURATION = 0.5
    image = data.render(5)[0].astype(int)
    assert np.abs(image[..., 0] - image[..., 1]).mean() > 2
    # The object is drawn: images are not flat.
    assert all(data.render(i)[0].std() > 5 for i in range(12))


def test_build_dataset_synthetic_and_transforms():
    data = augment.build_dataset("synthetic", "val", transform=augment.eval_transform(32), img_size=32, length=24)
    x, y = data[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and len(data) == 24 and data.num_classes == 6
    x, _ = augment.build_dataset("synthetic", "train", augment.linear_train_transform(32), img_size=40, length=4)[0]
    assert x.shape == (3, 32, 32)


# ---------------------------------------------------------------------------- real-data errors

def _write_png_tree(root, split, classes=("a", "b"), n=3):
    for c in classes:
        (root / split / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((10, 12, 3), 40 * i % 256, np.uint8)).save(root / split / c / f"{i}.png")


def test_imagefolder_works(tmp_path):
    _write_png_tree(tmp_path, "train")
    data = augment.build_dataset(str(tmp_path), "train")
    assert len(data) == 6 and data.num_classes == 2 and data.classes == ["a", "b"]
    image, label = data[4]
    assert isinstance(image, Image.Image) and image.size == (12, 10) and label == 1
    short = augment.build_dataset(str(tmp_path), "train", length=2)
    assert len(short) == 2 and {short[i][1] for i in range(2)} == {0, 1} and short.num_classes == 2


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        augment.build_dataset(str(tmp_path / "nowhere"), "train")
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path / "val")):
        augment.build_dataset(str(tmp_path), "val")
    (tmp_path / "val" / "cls").mkdir()  # a class folder without images
    with pytest.raises(ValueError, match="no images"):
        augment.build_dataset(str(tmp_path), "val")
    with pytest.raises(ValueError, match="cifar10 files in .*cifar-10-batches-py: missing data_batch_1, .*test_batch, batches.meta; "
                                         "place the extracted torchvision archive there"):
        augment.build_dataset(f"cifar10:{tmp_path}", "train")
    (tmp_path / "stl10_binary").mkdir()
    for name in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"):  # torchvision checks all five
        (tmp_path / "stl10_binary" / name).write_bytes(b"")
    with pytest.raises(ValueError, match="stl10 files in .*stl10_binary: missing unlabeled_X.bin; place"):
        augment.build_dataset(f"stl10:{tmp_path}", "train")
    (tmp_path / "stl10_binary" / "unlabeled_X.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="stl10 files in .*stl10_binary: a file fails torchvision's checksum; place"):
        augment.build_dataset(f"stl10:{tmp_path}", "train")
    with pytest.raises(ValueError, match="does not exist"):
        augment.build_dataset(f"stl10:{tmp_path / 'nowhere'}", "train")


def test_corrupt_image_names_the_file(tmp_path):
    _write_png_tree(tmp_path, "train", classes=("a",), n=1)
    bad = tmp_path / "train" / "a" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg" * 10)
    data = augment.build_dataset(str(tmp_path), "train")
    index = [p for p, _ in data.samples].index(str(bad))
    with pytest.raises(augment.UnreadableImage, match="broken.jpg"):
        data[index]


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    grey = np.array([[0, 257 * 100 + 128, 257 * 100 + 129], [257 * 200, 65534, 65535]], np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")  # PIL opens it as mode I;16
    rgb = np.asarray(augment.load_rgb(str(tmp_path / "g.png")))
    assert rgb.shape == (2, 3, 3) and rgb[..., 0].tolist() == [[0, 100, 101], [200, 255, 255]]  # round(v / 257)
    Image.fromarray(np.ones((2, 2), np.float32)).save(tmp_path / "f.tiff")  # mode F: no range to scale from
    with pytest.raises(augment.UnreadableImage, match="f.tiff: float or signed pixels"):
        augment.load_rgb(str(tmp_path / "f.tiff"))
    Image.fromarray(np.full((2, 2), 10 ** 6, np.int32)).save(tmp_path / "i.tiff")  # mode I beyond 16 bits
    with pytest.raises(augment.UnreadableImage, match="i.tiff: (float or signed pixels|integer pixels beyond 16 bits)"):
        augment.load_rgb(str(tmp_path / "i.tiff"))
    Image.fromarray(np.array([[0, 65535]], np.uint16)).save(tmp_path / "wiz.tiff", tiffinfo={262: 0})
    with pytest.raises(augment.UnreadableImage, match="wiz.tiff: 16-bit white-is-zero pixels"):  # read as black-is-zero
        augment.load_rgb(str(tmp_path / "wiz.tiff"))
    os.mkfifo(tmp_path / "pipe.png")  # open() would wait for a writer for good
    with pytest.raises(augment.UnreadableImage, match="pipe.png: not a regular file"):
        augment.load_rgb(str(tmp_path / "pipe.png"))


def test_load_rgb_reads_palette_transparency_without_a_warning(tmp_path):
    image = Image.new("P", (4, 4))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    image.putpixel((1, 2), 1)
    image.save(tmp_path / "p.png", transparency=b"\x80\xff")  # partial alpha, kept as bytes: PIL warns on convert("RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = np.asarray(augment.load_rgb(str(tmp_path / "p.png")))
    assert (rgb[2, 1] == [0, 0, 255]).all() and (rgb[0, 0] == [255, 0, 0]).all()


def test_augment_preview_refuses_bad_flags_in_one_line(tmp_path, monkeypatch):
    for argv, message in [(["--img-size", "0"], "--img-size must be in 8..1024 .*, got 0"),
                          (["--out", str(tmp_path / "s.jpgx")], "not an image file name; end it in .png or .jpg")]:
        monkeypatch.setattr(sys, "argv", ["augment.py", "--out", str(tmp_path / "s.png"), *argv])
        with pytest.raises(SystemExit, match=message):
            runpy.run_path(os.path.join(REPO, "augment.py"), run_name="__main__")
    assert not os.listdir(tmp_path)


def test_load_rgb_refuses_a_decompression_bomb(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images of more than twice as many pixels
    with pytest.raises(augment.UnreadableImage, match="big.png: .*decompression bomb"):
        augment.load_rgb(str(tmp_path / "big.png"))


def test_run_script_gives_one_line_and_releases_the_loaders(capsys):
    worker_message = ("Caught UnreadableImage in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                      "last):\n  ...\naugment.UnreadableImage: cannot read image file x.png: truncated")
    for message in ("cannot read image file x.png: truncated", worker_message):
        def main():
            raise augment.UnreadableImage(message)
        with pytest.raises(SystemExit) as stop:
            augment.run_script(main)
        assert stop.value.code == "error: cannot read image file x.png: truncated"

    for gloo in ("Connection closed by peer", "Read error [127.0.0.1]:11151: Connection reset by peer"):
        def peer_gone():  # gloo's error in a rank whose peer has exited or was killed (the OOM killer)
            raise RuntimeError(f"[gloo/transport/tcp/pair.cc:561] {gloo} [127.0.0.1]:55215")
        with pytest.raises(SystemExit) as stop:
            augment.run_script(peer_gone)
        assert stop.value.code.startswith("error: another rank stopped")

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as stop:
        augment.run_script(interrupted)
    assert stop.value.code == 130 and "interrupted; every file already written is complete" in capsys.readouterr().err

    def buggy():
        raise KeyError("a bug")
    with pytest.raises(SystemExit) as stop:
        augment.run_script(buggy)
    assert stop.value.code == 1 and "KeyError: 'a bug'" in capsys.readouterr().err  # a bug keeps its traceback
    assert augment.run_script(lambda: 7) == 7

    def bad_flag():
        raise SystemExit("error: --lr must be positive, got -1.0")
    for rank, code in (("0", "error: --lr must be positive, got -1.0"), ("1", 1)):  # torchrun: rank 0's line only
        with pytest.MonkeyPatch.context() as m:
            for name, value in (("RANK", rank), ("WORLD_SIZE", "2"), ("LOCAL_RANK", rank), ("MASTER_ADDR", "h"),
                                ("MASTER_PORT", "29500")):
                m.setenv(name, value)
            with pytest.raises(SystemExit) as stop:
                augment.run_script(bad_flag)
        assert stop.value.code == code



def test_symlink_loop_is_refused(tmp_path):
    _write_png_tree(tmp_path, "train")
    os.symlink("..", tmp_path / "train" / "a" / "up")  # train/a/up -> train: every image again, under 'a'
    with pytest.raises(ValueError, match="train/a/up is a symlink to .*back into the image tree"):
        augment.build_dataset(str(tmp_path), "train")
    os.unlink(tmp_path / "train" / "a" / "up")
    _write_png_tree(tmp_path / "elsewhere", "store", classes=("c",))
    os.symlink(tmp_path / "elsewhere" / "store" / "c", tmp_path / "train" / "c")  # a class folder on another disk
    assert augment.build_dataset(str(tmp_path), "train").classes == ["a", "b", "c"]


def test_image_trees_that_imagefolder_would_misread_are_refused(tmp_path, monkeypatch):
    """A cycle of links outside the tree (its images counted again and again), images beside the class folders
    (ignored), a folder that cannot be read (skipped), a val/ sharing train/'s folders (training images scored),
    an image too thin to resize and an unknown dataset kind: each one error naming what to change."""
    _write_png_tree(tmp_path, "train")
    _write_png_tree(tmp_path / "outside", "x", classes=("1",), n=1)
    (tmp_path / "outside" / "y").mkdir()
    os.symlink(tmp_path / "outside" / "y", tmp_path / "outside" / "x" / "1" / "to_y")
    os.symlink(tmp_path / "outside" / "x", tmp_path / "outside" / "y" / "to_x")  # x -> y -> x, outside the tree
    os.symlink(tmp_path / "outside" / "x", tmp_path / "train" / "a" / "more")
    with pytest.raises(ValueError, match="are the same folder .* through symlinks; its images would be counted twice"):
        augment.build_dataset(str(tmp_path), "train")
    os.unlink(tmp_path / "train" / "a" / "more")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "stray.png")
    with pytest.raises(ValueError, match="train holds 1 images .*stray.png.* beside its class folders"):
        augment.build_dataset(str(tmp_path), "train")
    os.unlink(tmp_path / "train" / "stray.png")
    scandir = os.scandir

    def no_access(path="."):
        if os.fspath(path).endswith(os.path.join("train", "b")):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)
    with monkeypatch.context() as m:
        m.setattr(os, "scandir", no_access)
        with pytest.raises(ValueError, match="cannot read folder .*train/b \\(Permission denied\\); fix its permissions"):
            augment.build_dataset(str(tmp_path), "train")
    os.symlink(tmp_path / "train", tmp_path / "val")
    with pytest.raises(ValueError, match="train/ and val/ share the folder .*, so val would score training images"):
        augment.build_dataset(str(tmp_path), "val")
    os.unlink(tmp_path / "val")
    _write_png_tree(tmp_path, "val", classes=("a",))
    os.symlink(tmp_path / "train" / "b", tmp_path / "val" / "b")  # one class folder shared
    with pytest.raises(ValueError, match="share the folder .*train/b"):
        augment.build_dataset(str(tmp_path), "val")
    os.unlink(tmp_path / "val" / "b")
    os.symlink(tmp_path / "train" / "b", tmp_path / "val" / "a" / "more")  # deeper: val/a/more is train/b
    with pytest.raises(ValueError, match="share the folder .*train/b"):
        augment.build_dataset(str(tmp_path), "val")
    os.unlink(tmp_path / "val" / "a" / "more")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "stray.png")  # train's own flaw: said when train is read
    assert len(augment.build_dataset(str(tmp_path), "val")) == 3
    os.unlink(tmp_path / "train" / "stray.png")
    Image.new("RGB", (3000, 2)).save(tmp_path / "train" / "a" / "thin.png")  # a few hundred bytes on disk
    data = augment.build_dataset(str(tmp_path), "train")
    with pytest.raises(augment.UnreadableImage, match="thin.png: 3000x2 px, an aspect ratio above 1000:1"):
        data[data.imgs.index((str(tmp_path / "train" / "a" / "thin.png"), 0))]
    with pytest.raises(ValueError, match="unknown dataset 'cifar100'; use cifar10:<dir>, stl10:<dir> or an ImageFolder"):
        augment.build_dataset("cifar100:/nowhere", "train")


def test_class_balanced_prefix_takes_every_class_in_turn(tmp_path):
    """A class-sorted folder gives each class's first image, then each class's second...; the built-in data (labels
    cycling with the index) keeps its order, so its evaluations score the same images as a plain prefix."""
    _write_png_tree(tmp_path, "val", classes=("a", "b", "c"), n=3)
    folder = augment.build_dataset(str(tmp_path), "val")
    assert augment.class_balanced_prefix(folder, 5) == [0, 3, 6, 1, 4]
    assert augment.class_balanced_prefix(augment.build_dataset("synthetic", "val", length=40), 20) == list(range(20))


def test_progress_reports_counts_and_eta():
    lines = []
    assert list(augment.progress(range(4), 4, "pass", lines.append, every=0.0)) == [0, 1, 2, 3]
    assert len(lines) == 4 and lines[1].startswith("pass 2/4, ") and "ETA" in lines[1]
    lines.clear()
    list(augment.progress(range(4), 4, "pass", lines.append))  # fast: only the final line
    assert len(lines) == 1 and lines[0].startswith("pass 4/4")


def test_images_imagefolder_skips_for_their_extension_are_refused(tmp_path):
    """A .gif or .jfif in a class folder is an image PIL reads but ImageFolder does not list: a class would train on
    what is left of it. Other files (notes, PIL's save-only .pdf, the video and HDF5 formats its registry lists) stay
    ignored."""
    _write_png_tree(tmp_path, "train", n=1)
    for name in ("1.gif", "2.gif", "3.jfif"):
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / name, format="GIF" if name.endswith("gif") else "JPEG")
    (tmp_path / "train" / "b" / "notes.txt").write_text("labels checked")
    (tmp_path / "train" / "b" / "scan.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "train" / "b" / "clip.mpg").write_bytes(b"\x00\x00\x01\xba")
    (tmp_path / "train" / "features.h5").write_bytes(b"\x89HDF")
    with pytest.raises(ValueError, match=r"train holds 3 images ImageFolder skips for their extension \(.gif, .jfif; "
                                         r"e\.g\. .*train/a/.*\); convert them to .png or .jpg"):
        augment.build_dataset(str(tmp_path), "train")
    for name in ("1.gif", "2.gif", "3.jfif"):
        os.unlink(tmp_path / "train" / "a" / name)
    assert len(augment.build_dataset(str(tmp_path), "train")) == 2


def test_broken_class_folder_links_are_refused(tmp_path):
    """A class folder whose link is broken is no class to ImageFolder: it would vanish. A link to a file (a labels
    .csv beside the class folders) is no class either way, and stays ignored."""
    _write_png_tree(tmp_path, "train")
    os.symlink(tmp_path / "moved" / "c", tmp_path / "train" / "c")
    with pytest.raises(ValueError, match="train/c is a symlink to .*moved/c, which does not exist, so ImageFolder "
                                         "would skip it as a class"):
        augment.build_dataset(str(tmp_path), "train")
    os.unlink(tmp_path / "train" / "c")
    (tmp_path / "labels.csv").write_text("a,b\n")
    os.symlink(tmp_path / "labels.csv", tmp_path / "train" / "labels.csv")
    assert augment.build_dataset(str(tmp_path), "train").classes == ["a", "b"]
    # An image that is a broken link or a pipe: read mid-epoch (or never: a pipe blocks), so refused up front.
    for odd in ("link", "loop", "pipe"):
        path = tmp_path / "train" / "a" / f"{odd}.png"
        os.symlink({"link": tmp_path / "moved.png", "loop": path}[odd], path) if odd != "pipe" else os.mkfifo(path)
        with pytest.raises(ValueError, match=f"train/a/{odd}.png is no regular file \\(a broken link, a pipe or a "
                                             "device\\), yet ImageFolder would list it as an image; remove or replace"):
            augment.build_dataset(str(tmp_path), "train")
        path.unlink()


def test_image_links_across_splits_and_classes_are_refused(tmp_path):
    """A linked image is held to what a linked folder is: val/ may not score a train/ image (nor train/ learn a val/
    one), and one image may not sit in two classes. Links elsewhere (a symlink farm) or within a class are fine."""
    _write_png_tree(tmp_path, "train")
    _write_png_tree(tmp_path, "val")
    _write_png_tree(tmp_path / "store", "flat", classes=("x",))
    os.symlink("../../train/a/0.png", tmp_path / "val" / "a" / "leak.png")
    with pytest.raises(ValueError, match="train/ and val/ share the image .*train/a/0.png through symlinks, so val "
                                         "would score training images; give val/ images of its own"):
        augment.build_dataset(str(tmp_path), "val")
    os.unlink(tmp_path / "val" / "a" / "leak.png")
    os.symlink(tmp_path / "train" / "a" / "0.png", tmp_path / "store" / "chain.png")  # through a second link
    os.symlink(tmp_path / "store" / "chain.png", tmp_path / "val" / "a" / "leak.png")
    with pytest.raises(ValueError, match="share the image .*train/a/0.png"):
        augment.build_dataset(str(tmp_path), "val")
    os.unlink(tmp_path / "val" / "a" / "leak.png")
    os.symlink("../../val/b/1.png", tmp_path / "train" / "b" / "leak.png")
    with pytest.raises(ValueError, match="share the image .*val/b/1.png .*give train/ images of its own"):
        augment.build_dataset(str(tmp_path), "train")
    os.unlink(tmp_path / "train" / "b" / "leak.png")
    os.symlink("../a/0.png", tmp_path / "train" / "b" / "twice.png")
    with pytest.raises(ValueError, match="train/b/twice.png is a symlink to .*train/a/0.png in class folder a, so one "
                                         "image would carry two labels"):
        augment.build_dataset(str(tmp_path), "train")
    os.unlink(tmp_path / "train" / "b" / "twice.png")
    os.symlink("0.png", tmp_path / "train" / "a" / "again.png")
    for i in range(3):
        os.symlink(f"../../store/flat/x/{i}.png", tmp_path / "val" / "b" / f"farm{i}.png")
    assert len(augment.build_dataset(str(tmp_path), "train")) == 7
    assert len(augment.build_dataset(str(tmp_path), "val")) == 9
    os.rename(tmp_path / "val", tmp_path / "old_val")
    os.symlink(tmp_path / "train", tmp_path / "val")  # refused when val is read, not for train's own links
    assert len(augment.build_dataset(str(tmp_path), "train")) == 7
    with pytest.raises(ValueError, match="train/ and val/ share the folder .*train through symlinks"):
        augment.build_dataset(str(tmp_path), "val")


def test_hidden_entries_imagefolder_would_read_are_refused(tmp_path):
    """macOS '._' files end in .jpg but hold metadata; a hidden folder in a split is one more class, an empty one a
    puzzling error. Hidden files ImageFolder ignores (.DS_Store) stay allowed."""
    _write_png_tree(tmp_path, "train")
    (tmp_path / "train" / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    assert len(augment.build_dataset(str(tmp_path), "train")) == 6
    (tmp_path / "train" / "a" / "._0.png").write_bytes(b"\0\5\26\7AppleDouble")
    with pytest.raises(ValueError, match="train/a/._0.png is hidden .*an image of class a .*; remove it"):
        augment.build_dataset(str(tmp_path), "train")
    os.unlink(tmp_path / "train" / "a" / "._0.png")
    (tmp_path / "train" / "a" / ".thumbs").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "a" / ".thumbs" / "0.png")
    with pytest.raises(ValueError, match="train/a/.thumbs/0.png is hidden"):
        augment.build_dataset(str(tmp_path), "train")
    os.rename(tmp_path / "train" / "a" / ".thumbs", tmp_path / "train" / ".thumbs")
    with pytest.raises(ValueError, match="train/.thumbs is a hidden folder, which ImageFolder would read as one more "
                                         "class; remove it"):
        augment.build_dataset(str(tmp_path), "train")
    os.unlink(tmp_path / "train" / ".thumbs" / "0.png")
    os.rename(tmp_path / "train" / ".thumbs", tmp_path / "train" / ".ipynb_checkpoints")
    with pytest.raises(ValueError, match="train/.ipynb_checkpoints is a hidden folder"):
        augment.build_dataset(str(tmp_path), "train")


def test_stl10_class_names_are_checked(tmp_path, monkeypatch):
    """class_names.txt is outside torchvision's checksums and read as is: missing, short, or with a blank line it
    would give no classes, labels beyond the names, or an 11th class ''."""
    labels = np.arange(20) % 10
    monkeypatch.setattr(augment.datasets.STL10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(augment.datasets.STL10, "_STL10__loadfile",
                        lambda self, images, labels_file=None: (np.zeros((20, 3, 96, 96), np.uint8), labels))
    names = tmp_path / "stl10_binary" / "class_names.txt"
    names.parent.mkdir()
    with pytest.raises(ValueError, match="--data stl10:.*: cannot read .*class_names.txt \\(No such file or directory"):
        augment.build_dataset(f"stl10:{tmp_path}", "train")
    ten = [f"class{i}" for i in range(10)]
    names.write_text("\n".join(ten[:9]) + "\n")
    with pytest.raises(ValueError, match="class_names.txt names 9 classes, STL-10 has 10 .*; restore it"):
        augment.build_dataset(f"stl10:{tmp_path}", "val")
    names.write_text("\n".join(ten) + "\n\n")
    data = augment.build_dataset(f"stl10:{tmp_path}", "train")
    assert data.classes == ten and data.num_classes == 10
    labels = np.arange(20) % 11  # a label beyond the names
    with pytest.raises(ValueError, match="names 10 classes, STL-10 has 10 \\(labels up to 10\\)"):
        augment.build_dataset(f"stl10:{tmp_path}", "train")


# ---------------------------------------------------------------------------- worker-side views

def test_multicrop_shapes_and_params():
    recipe = augment.recipe_for("dino", img_size=32, crop_min=0.4, n_local=3, extra="essl", patch_size=8)
    assert [v.name for v in recipe.views] == ["global0", "global1", "local0", "local1", "local2", "essl"]
    data = augment.MultiViewDataset(augment.build_dataset("synthetic", "train", img_size=40, length=8), recipe, seed=0)
    batch = next(iter(DataLoader(data, batch_size=4)))
    sizes = [tuple(x.shape) for x in batch["images"]]
    assert sizes == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 4  # 32*96/224 = 13.7 -> 2 patches of 8
    assert all(x.dtype == torch.uint8 for x in batch["images"])
    for v, crop in enumerate(batch["crop"]):
        assert crop.shape == (4, 4) and (crop >= 0).all() and (crop[:, :2] + crop[:, 2:] <= 1 + 1e-6).all()
        area = crop[:, 2] * crop[:, 3]
        lo, hi = recipe.views[v].scale
        assert (area > lo * 0.8).all() and (area < hi * 1.2).all()  # pixel rounding only
    assert batch["flip"][0].shape == (4,) and batch["flip"][0].dtype == torch.bool
    assert batch["label"].shape == (4,) and "plain" not in batch


@pytest.mark.parametrize("img_size,patch_size,side", [(224, 16, 96), (64, 16, 32), (32, 8, 16)])
def test_mocov3_local_crop_recipe(img_size, patch_size, side):
    """SER's 2+4 loader (loader/local4.py): 4 local crops of 96/224 of the global side (whole patches),
    scale (0.05, 0.25), bilinear, flip 0.5, blur 0.5, no solarize; jitter p 0.8 and gray 0.2 as every view."""
    recipe = augment.recipe_for("mocov3", img_size, crop_min=0.08, n_local=4, patch_size=patch_size)
    locals_ = recipe.views[2:]
    assert [v.name for v in locals_] == [f"local{i}" for i in range(4)]
    for v in locals_:
        assert (v.size, v.scale, v.ratio, v.interpolation, v.p_flip) == (side, (0.05, 0.25), (3 / 4, 4 / 3),
                                                                         "bilinear", 0.5)
        assert (v.p_blur, v.p_solarize) == (0.5, 0.0)
    for aug in recipe.photometric()[2:]:
        assert (aug.jitter, aug.p_jitter, aug.p_gray, aug.p_blur, aug.p_solarize) == ((0.4, 0.4, 0.2, 0.1), 0.8,
                                                                                      0.2, 0.5, 0.0)


def test_equimod_plain_view_and_recipes():
    recipe = augment.recipe_for("mocov3", img_size=32, crop_min=0.08, extra="equimod")
    assert [v.interpolation for v in recipe.views] == ["bilinear"] * 2 and recipe.views[0].scale == (0.08, 1.0)
    assert (recipe.views[0].p_blur, recipe.views[1].p_blur, recipe.views[1].p_solarize) == (1.0, 0.1, 0.2)
    assert augment.recipe_for("dino", 32, crop_min=0.25).views[1].scale == (0.25, 1.0)
    assert augment.recipe_for("barlowtwins", 32, crop_min=0.08).views[0].interpolation == "bicubic"
    with pytest.raises(ValueError, match="unknown method"):
        augment.recipe_for("simsiam", 32, crop_min=0.08)
    base = augment.build_dataset("synthetic", "train", img_size=40, length=4)
    sample = augment.MultiViewDataset(base, recipe)[1]
    expected = TF.center_crop(TF.resize(base[1][0], 37, interpolation=TF.InterpolationMode.BICUBIC), 32)
    assert torch.equal(sample["plain"], TF.pil_to_tensor(expected))


def test_worker_determinism_and_epoch():
    recipe = augment.recipe_for("mocov3", img_size=32, crop_min=0.08, n_local=2)
    data = augment.MultiViewDataset(augment.build_dataset("synthetic", "train", img_size=32, length=16), recipe, seed=3)
    data.set_epoch(1)
    serial = list(DataLoader(data, batch_size=4, num_workers=0))
    parallel = list(DataLoader(data, batch_size=4, num_workers=2))
    assert _batch_equal(serial, parallel)
    data.set_epoch(2)
    next_epoch = list(DataLoader(data, batch_size=4, num_workers=0))
    assert not torch.equal(serial[0]["crop"][0], next_epoch[0]["crop"][0])
    assert torch.equal(serial[0]["label"], next_epoch[0]["label"])
    # set_epoch reaches workers that are already running.
    loader = DataLoader(data, batch_size=4, num_workers=2, persistent_workers=True)
    data.set_epoch(1)
    assert _batch_equal(list(loader), serial)
    data.set_epoch(2)
    assert _batch_equal(list(loader), next_epoch)


def test_crop_flip_match_pixels():
    """The recorded box and flip reproduce the crop from the original image."""
    base = augment.build_dataset("synthetic", "train", img_size=48, length=2)
    recipe = augment.recipe_for("dino", img_size=24, crop_min=0.4)
    sample = augment.MultiViewDataset(base, recipe, seed=0)[0]
    image = base[0][0]
    for v in range(2):
        top, left, h, w = (sample["crop"][v] * torch.tensor([48, 48, 48, 48])).round().int().tolist()
        crop = image.resize((24, 24), Image.BICUBIC, box=(left, top, left + w, top + h))
        expected = TF.pil_to_tensor(crop)
        if sample["flip"][v]:
            expected = expected.flip(-1)
        assert torch.equal(sample["images"][v], expected)


# ---------------------------------------------------------------------------- device-side photometric

@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 20, 24, generator=g)
    x[0] = 0.5  # a gray image: hue undefined, saturation 0
    x[1, :, :4] = 1.0  # saturated corner
    x[2] = torch.randint(0, 3, (3, 20, 24), generator=g) / 2  # many ties between channels (as from uint8)
    return x


@pytest.mark.parametrize("op,tv_op,values", [
    (0, TF.adjust_brightness, [0.6, 1.0, 1.4, 0.0, 0.9, 1.3]),
    (1, TF.adjust_contrast, [0.6, 1.0, 1.4, 0.0, 0.9, 1.3]),
    (2, TF.adjust_saturation, [0.8, 1.0, 1.2, 0.0, 0.9, 2.0]),
    (3, TF.adjust_hue, [-0.1, 0.0, 0.1, 0.5, -0.5, 0.03]),
])
def test_colour_ops_match_torchvision(images, op, tv_op, values):
    """Each jitter op first, the others at their identity factors, also beyond the ranges the recipes draw."""
    aug = augment.PhotometricAugment(img_size=24)
    params = {k: torch.zeros_like(v) for k, v in aug.sample_params(6, torch.Generator()).items()}
    params["jitter_applied"][:] = 1
    params["jitter_order"][:] = torch.tensor([op] + [k for k in range(4) if k != op])
    params["jitter"][:] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    params["jitter"][:, op] = torch.tensor(values)
    ours = aug.apply(images, params)
    for i, value in enumerate(values):
        torch.testing.assert_close(ours[i], tv_op(images[i], value), atol=1e-5, rtol=0)


def test_gray_solarize_blur_match_torchvision(images):
    aug = augment.PhotometricAugment(img_size=224)
    params = {k: torch.zeros_like(v) for k, v in aug.sample_params(6, torch.Generator()).items()}
    params["jitter"][:] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    params["jitter_order"][:] = torch.arange(4)
    params["gray"][::2] = 1
    gray = aug.apply(images, params)
    for i in range(6):
        expected = TF.rgb_to_grayscale(images[i], 3) if i % 2 == 0 else images[i]
        torch.testing.assert_close(gray[i], expected, atol=1e-6, rtol=0)
    assert aug.kernel_size == 9
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 0.0, 1.5])
    blurred = augment.gaussian_blur(images, sigma, 9)
    for i, s in enumerate(sigma.tolist()):
        expected = TF.gaussian_blur(images[i], [9, 9], [s, s]) if s > 0 else images[i]
        torch.testing.assert_close(blurred[i], expected, atol=1e-5, rtol=0)
    solar = augment.solarize(images)
    torch.testing.assert_close(solar, TF.solarize(images, 0.5))
    values = torch.tensor([0.2, 0.49, 0.5, 0.9])  # >= 0.5 inverts (0.5 stays 0.5)
    torch.testing.assert_close(augment.solarize(values), torch.tensor([0.2, 0.49, 0.5, 0.1]))


def test_blur_properties(images):
    assert torch.equal(augment.gaussian_blur(images, torch.full((6,), 1e-3), 9), images)
    blurred = augment.gaussian_blur(images, torch.full((6,), 2.0), 9)
    torch.testing.assert_close(blurred.mean((2, 3)), images.mean((2, 3)), atol=1e-2, rtol=0)
    assert blurred[2:].std() < images[2:].std() * 0.6  # noise is smoothed
    assert augment.blur_kernel_size(64) == 3 and augment.blur_kernel_size(96) == 5


def test_jitter_in_random_order_matches_torchvision(images):
    aug = augment.PhotometricAugment(p_jitter=1.0, p_gray=0.0, p_blur=0.0, img_size=24)
    params = aug.sample_params(6, torch.Generator().manual_seed(5))
    out = aug.apply(images, params)
    tv_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(6):
        expected = images[i]
        for k in params["jitter_order"][i].tolist():
            expected = tv_ops[k](expected, params["jitter"][i, k].item())
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


def test_param_dict_shapes_and_ranges():
    aug = augment.PhotometricAugment(p_blur=0.5, p_solarize=0.2, img_size=64)
    x = torch.randint(0, 256, (512, 3, 8, 8), dtype=torch.uint8)
    p = aug.sample_params(512, augment.device_generator(0, step=10, rank=0, view_id=1))
    out = augment.normalize(aug.apply(x.float() / 255, p))
    assert out.shape == (512, 3, 8, 8) and out.dtype == torch.float32
    assert p["jitter"].shape == (512, 4) and p["jitter_order"].shape == (512, 4)
    assert p["jitter_order"].dtype == torch.long
    assert torch.equal(p["jitter_order"].sort(1).values, torch.arange(4).expand(512, 4))
    for key in ("jitter_applied", "gray", "blur_sigma", "solarize"):
        assert p[key].shape == (512,) and p[key].dtype == torch.float32
    on = p["jitter_applied"] > 0
    assert 0.7 < on.float().mean() < 0.9 and 0.1 < p["gray"].mean() < 0.3 and 0.1 < p["solarize"].mean() < 0.3
    lo, hi = torch.tensor([0.6, 0.6, 0.8, -0.1]), torch.tensor([1.4, 1.4, 1.2, 0.1])
    assert ((p["jitter"][on] >= lo) & (p["jitter"][on] <= hi)).all()
    assert torch.equal(p["jitter"][~on], torch.tensor([1.0, 1.0, 1.0, 0.0]).expand((~on).sum(), 4))
    assert torch.equal(p["jitter_order"][~on], torch.arange(4).expand((~on).sum(), 4))
    sigma = p["blur_sigma"][p["blur_sigma"] > 0]
    assert 0.4 < len(sigma) / 512 < 0.6
    assert sigma.min() >= 0.1 * 64 / 224 and sigma.max() <= 2.0 * 64 / 224
    # Same (seed, step, rank, view) -> same parameters; another view -> others.
    again = aug.sample_params(512, augment.device_generator(0, step=10, rank=0, view_id=1))
    other = aug.sample_params(512, augment.device_generator(0, step=10, rank=0, view_id=2))
    assert all(torch.equal(p[k], again[k]) for k in p) and not torch.equal(p["jitter"], other["jitter"])


def test_identity_params_leave_images_unchanged():
    aug = augment.PhotometricAugment(p_jitter=0.0, p_gray=0.0, p_blur=0.0, p_solarize=0.0, img_size=32)
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    params = aug.sample_params(4, torch.Generator().manual_seed(0))
    assert torch.equal(aug.apply(x.float() / 255, params), x.float() / 255)
    out = augment.normalize(aug.apply(x.float() / 255, params))
    torch.testing.assert_close(out, augment.normalize(x))
    mean = torch.tensor(augment.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(augment.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out * std + mean, x.float() / 255)


# ================================================================================================
# pretrain.py: every method and add-on, resume, torchrun
# ================================================================================================

TINY = ("--epochs 1 --synthetic-length 32 --batch-size 16 --img-size 32 --patch-size 8 --depth 3 "
        "--head-hidden 32 --head-out 16 --knn-every 0 --num-workers 0 --log-every 1000")


def config(extra, out):
    tiny = TINY.replace("--synthetic-length 32 ", "") if "--data " in extra else TINY  # built-in data only
    measures = "--benchmark" in extra or "--count-flops" in extra
    tiny = tiny.replace(" --log-every 1000", "") if measures else tiny  # a benchmark or FLOP count logs no steps
    tiny += "" if "--count-flops" in extra else f" --output-dir {out}"  # a FLOP count writes nothing
    return pretrain.resolve_config(pretrain.get_args_parser().parse_args(f"{tiny} {extra}".split()))


def run(extra, out):
    pretrain.train(config(extra, out))
    return torch.load(os.path.join(out, "checkpoint.pth"), weights_only=False)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("method", list(pretrain.METHOD_DEFAULTS))
@pytest.mark.parametrize("addon", ["", "--ser --equiv-layer 2", "--equimod", "--augself", "--essl --equiv-layer 2"])
def test_every_method_and_addon_trains(method, addon, tmp_path):
    """Two optimisation steps: finite loss terms, the student moves, and (EMA methods) the teacher
    moves by exactly the EMA rule of the step's momentum."""
    first = run(f"--method {method} {addon} --stop-at-step 1", tmp_path)
    second = run(f"--method {method} {addon} --stop-at-step 2", tmp_path)  # resumes from step 1
    assert first["step"] == 1 and second["step"] == 2
    logged = read_log(tmp_path)
    assert len(logged) == 2 and all(math.isfinite(v) for row in logged for k, v in row.items() if k != "epoch")
    if addon:
        assert logged[-1]["equiv"] > 0
    moved = [k for k, v in second["student"].items() if v.is_floating_point() and not torch.equal(v, first["student"][k])]
    assert any(k.startswith("backbone.blocks.0.") for k in moved) and any(k.startswith("projector.") for k in moved)
    if addon:
        assert any(k.startswith("addon_head.") for k in moved)
    if method in pretrain.EMA_METHODS:
        args = config(f"--method {method}", tmp_path)
        m = pretrain.ema_momentum(1, 2, args.momentum)
        for name, t_new in second["teacher"].items():
            if "running" in name or "num_batches" in name:
                continue  # BN buffers follow the teacher's own forward, not the EMA
            expected = m * first["teacher"][name] + (1 - m) * second["student"][name]
            assert torch.allclose(t_new, expected, atol=1e-6), name
        assert not torch.equal(second["teacher"]["backbone.blocks.0.attn.qkv.weight"],
                               first["teacher"]["backbone.blocks.0.attn.qkv.weight"])
    else:
        assert second["teacher"] is None


@pytest.mark.parametrize("addon", ["--ser --equiv-layer 2", "--essl"])
def test_mocov3_multicrop_trains_two_steps(addon, tmp_path):
    """SER's 2+4 views (MoCo v3, 4 local crops) with SER's three pairs or with E-SSL, on the built-in data."""
    ckpt = run(f"--method mocov3 --n-local-crops 4 {addon} --stop-at-step 2 --log-every 1", tmp_path)
    logged = read_log(tmp_path)
    assert ckpt["step"] == 2 and [row["step"] for row in logged] == [1, 2]
    assert all(math.isfinite(row[k]) for row in logged for k in ("loss", "inv", "equiv")) and logged[-1]["equiv"] > 0
    torch.manual_seed(augment.seed_from("init", 0))  # the run's initial weights
    initial = pretrain.build_models(config(f"--method mocov3 --n-local-crops 4 {addon}", tmp_path))[0].state_dict()
    moved = [k for k, v in ckpt["student"].items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert any(k.startswith("backbone.blocks.0.") for k in moved) and any(k.startswith("addon_head.") for k in moved)


def test_multicrop_and_ser_chunk_errors(tmp_path):
    with pytest.raises(SystemExit, match="multi-crop is not part of the official byol recipe"):
        config("--method byol --n-local-crops 4", tmp_path)
    with pytest.raises(SystemExit, match="use an even number"):
        config("--method mocov3 --ser --equiv-layer 2 --n-local-crops 3", tmp_path)
    with pytest.raises(SystemExit, match="--augself with MoCo v3 multi-crop"):
        config("--method mocov3 --augself --n-local-crops 4", tmp_path)
    with pytest.raises(SystemExit, match="--ser-chunk must be positive"):
        config("--method mocov3 --ser --equiv-layer 2 --ser-chunk 0", tmp_path)


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = "--method dino --ser --equiv-layer 2 --epochs 2 --drop-path 0.1"  # drop-path: RNG must replay too
    full = run(common, tmp_path / "full")
    run(common + " --stop-at-step 3", tmp_path / "cut")  # mid-epoch (2 steps per epoch)
    resumed = run(common, tmp_path / "cut")
    assert full["step"] == resumed["step"] == 4
    for part in ("student", "teacher", "dino_loss"):
        for k, v in full[part].items():
            assert torch.equal(v, resumed[part][k]), (part, k)
    assert os.path.exists(tmp_path / "full" / "backbone.pth")


def test_interrupt_handler_requests_a_checkpoint():
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        interrupt = augment.Interrupt()
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.poll() == signal.SIGTERM
        interrupt.close()  # after the loop a signal stops at once (detect_eval's evaluation ignored them)
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == previous
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def test_the_backbone_of_an_unfinished_run_is_noted_by_the_evaluations(tmp_path):
    """backbone.pth is exported at every epoch's end and on a signal: it records how far its run had come, and
    the evaluations' loader says so while the run has not finished."""
    run("--method mocov3 --stop-at-step 1", tmp_path)
    notes, path = [], str(tmp_path / "backbone.pth")
    assert vit.backbone_from_flags(path, log=notes.append).unfinished == (1, 2)
    assert notes == [f"note: {path} is of step 1 of 2: its run has not finished"]
    backbone, probe = vit.load_backbone(path), str(tmp_path / "linear_probe.pth")  # the same weights in a probe
    linear_eval.save_probe(probe, backbone, linear_eval.LinearClassifier(backbone.embed_dim, 6), 1, False, 6, 32,
                           "synthetic", backbone_unfinished=[1, 2])
    assert vit.load_backbone(probe).unfinished == (1, 2)
    run("--method mocov3", tmp_path)
    assert vit.backbone_from_flags(path, log=notes.append).unfinished is None and len(notes) == 1


def test_resume_refuses_a_run_whose_heads_saw_each_view_apart(tmp_path):
    """A checkpoint whose SimCLR or DINO head was called on each view apart (an earlier pretrain.py) would go on
    with other BatchNorm statistics: refused. MoCo v3's head is called per view either way: its checkpoints resume."""
    for method, joint in (("simclr", True), ("mocov3", False)):
        run(f"--method {method} --stop-at-step 1", tmp_path / method)
        ckpt = torch.load(tmp_path / method / "checkpoint.pth", weights_only=True)
        assert ckpt.pop("joint_heads") is joint
        torch.save(ckpt, tmp_path / method / "checkpoint.pth")
        if joint:
            with pytest.raises(SystemExit, match="trained with the head called on each view apart, which --method "
                                                 "simclr no longer does"):
                run(f"--method {method} --stop-at-step 2", tmp_path / method)
        else:
            assert run(f"--method {method} --stop-at-step 2", tmp_path / method)["step"] == 2


def test_resume_refuses_a_different_run(tmp_path, capsys):
    run("--method byol --stop-at-step 1", tmp_path)
    with pytest.raises(SystemExit, match="different settings: --method 'byol' \\(now 'simclr'\\)"):
        run("--method simclr --stop-at-step 1", tmp_path)
    with pytest.MonkeyPatch.context() as m:  # --precision auto, resumed where it resolves otherwise
        m.setattr(vit, "cpu_has_native_bf16", lambda: True)
        with pytest.raises(SystemExit, match="checkpoint.pth was trained in fp32, this run would use bf16 \\(--precision "
                                             "auto\\); pass --precision fp32 to continue"):
            run("--method byol --stop-at-step 2", tmp_path)
        run("--method byol --stop-at-step 2 --precision fp32", tmp_path)  # as the message says
        assert read_log(tmp_path)[-1]["step"] == 2
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    del ckpt["precision"]  # as an older pretrain.py wrote it: the flag is compared
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit, match="was trained in fp32, this run would use auto"):
        run("--method byol --stop-at-step 2", tmp_path)
    ckpt["args"]["precision"] = "auto"
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit, match="different settings: --compile False \\(now True\\)"):
        run("--method byol --stop-at-step 2 --compile", tmp_path)  # compiled graphs draw drop-path masks otherwise
    run("--method byol --stop-at-step 2", tmp_path)  # the last step: the run is finished
    run("--method byol --stop-at-step 2", tmp_path)  # and the same command again says so, no error
    assert "the run had finished" in capsys.readouterr().out
    exported, saved = torch.load(tmp_path / "backbone.pth"), (tmp_path / "checkpoint.pth").read_bytes()
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    ckpt["eval_key"], ckpt["arch"] = "teacher", "vit_small"  # read by no export: it takes the run's own
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    run("--method byol --stop-at-step 2", tmp_path)
    again = torch.load(tmp_path / "backbone.pth")
    assert again["arch"] == exported["arch"] and all(torch.equal(v, again["backbone"][k])
                                                     for k, v in exported["backbone"].items())
    (tmp_path / "checkpoint.pth").write_bytes(saved)

    def full_disk(path, state):
        raise OSError(28, "No space left on device", path)
    with pytest.MonkeyPatch.context() as m:  # the finished run's backbone.pth, exported again, fails in one line too
        m.setattr(pretrain, "export_backbone", full_disk)
        with pytest.raises(SystemExit, match="^error: could not write .*backbone.pth: No space left on device$"):
            run("--method byol --stop-at-step 2", tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    ckpt["student"].pop("projector.layers.0.weight", None) or ckpt["student"].popitem()  # another version's keys
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit, match="its student does not fit this run .*use another --output-dir"):
        run("--method byol --stop-at-step 2", tmp_path)
    os.unlink(tmp_path / "checkpoint.pth")
    os.symlink(tmp_path / "gone.pth", tmp_path / "checkpoint.pth")  # not a fresh start that replaces the link
    with pytest.raises(SystemExit, match="checkpoint not found: .*move it away or use another --output-dir"):
        run("--method byol --stop-at-step 2", tmp_path)


def test_a_run_starts_its_own_log_and_a_resume_cuts_it_back(tmp_path, capsys):
    """log.jsonl holds this run's records only: a fresh start drops a failed run's lines, a resume those a crash
    wrote after the checkpoint; a resume on data that changed size since the checkpoint is refused."""
    _write_png_tree(tmp_path / "data", "train", n=10)
    (tmp_path / "run").mkdir()
    vit.append_jsonl(tmp_path / "run" / "log.jsonl", {"step": 5, "knn_top1": 99.0})  # a failed run's
    common = f"--method byol --data {tmp_path / 'data'} --epochs 2 --warmup-epochs 0 --log-every 1"
    run(common + " --stop-at-step 1", tmp_path / "run")
    assert [row["step"] for row in read_log(tmp_path / "run")] == [1]
    assert "log.jsonl held the records of a run that wrote no checkpoint; this new run starts it afresh" in \
        capsys.readouterr().out
    vit.append_jsonl(tmp_path / "run" / "log.jsonl", {"step": 2, "loss": 1.0})  # a crash's, after the checkpoint
    with open(tmp_path / "run" / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # and a line it cut short
    run(common + " --stop-at-step 2", tmp_path / "run")
    assert [row["step"] for row in read_log(tmp_path / "run")] == [1, 2] and read_log(tmp_path / "run")[1]["loss"] != 1
    os.unlink(tmp_path / "data" / "train" / "a" / "0.png")
    with pytest.raises(SystemExit, match="--data .* holds 19 training images, 20 when .* was written: the run cannot"):
        run(common, tmp_path / "run")


def test_resume_refuses_checkpoints_that_pretrain_never_writes(tmp_path):
    """A setting the checkpoint lacks (another code version), non-finite or retyped weights, an optimizer state of
    another shape (it crashed the fused AdamW step), and a fresh start over another run's backbone.pth."""
    run("--method byol --stop-at-step 1", tmp_path)
    good = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    tampered = [("args", lambda c: c["args"].pop("crop_min"), "different settings: --crop-min '\\(absent\\)' \\(now"),
                ("student", lambda c: c["student"]["backbone.cls_token"].fill_(math.nan), "non-finite weights"),
                ("teacher", lambda c: c["teacher"].update({k: v.double() for k, v in c["teacher"].items()}),
                 "its teacher holds torch.float64 weights where this run keeps torch.float32"),
                ("optimizer", lambda c: next(iter(c["optimizer"]["state"].values())).update(exp_avg=torch.zeros(3)),
                 "its optimizer state does not fit this run's parameters")]
    for part, change, message in tampered:
        ckpt = copy.deepcopy(good)
        change(ckpt)
        torch.save(ckpt, tmp_path / "checkpoint.pth")
        with pytest.raises(SystemExit, match=message):
            run("--method byol --stop-at-step 2", tmp_path)
    os.unlink(tmp_path / "checkpoint.pth")  # e.g. deleted to keep only the smaller backbone.pth
    with pytest.raises(SystemExit, match="holds a backbone.pth but no checkpoint.pth: another run's result"):
        run("--method byol --stop-at-step 2", tmp_path)


def test_log_lines_cut_short_by_a_kill_cost_only_themselves(tmp_path):
    path = tmp_path / "log.jsonl"
    vit.append_jsonl(path, {"step": 0, "knn_top1": 20.0})
    with open(path, "a") as f:
        f.write('{"step": 6, "epo')  # a kill in mid-write
    vit.append_jsonl(path, {"step": 8, "knn_top1": 30.0})
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2]) == {"step": 8, "knn_top1": 30.0}
    assert pretrain.run_summary(str(tmp_path), 60).startswith("done: k-NN top-1 20.0 -> 30.0 (+10.0)")
    assert f"--pretrained '{tmp_path / 'my run' / 'backbone.pth'}' " in pretrain.run_summary(str(tmp_path / "my run"), 6)
    # A resume with another --knn-val-size: the summary compares the records of the last bank and val sizes only.
    for step, top1, images in ((10, 40.0, [2000, 1000]), (12, 45.0, [2000, 12]), (14, 47.5, [2000, 12])):
        vit.append_jsonl(path, {"step": step, "knn_top1": top1, "knn_images": images})
    assert pretrain.run_summary(str(tmp_path), 60).startswith(
        "done: k-NN top-1 45.0 -> 47.5 (+2.5) since step 12 (before it, the monitor had other --knn-train-size")


def test_bad_configurations_give_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="one add-on at a time"):
        config("--ser --essl", tmp_path)
    with pytest.raises(SystemExit, match="--equiv-layer"):
        config("--ser --equiv-layer 3", tmp_path)  # depth 3: [CLS] would join after the last block
    with pytest.raises(SystemExit, match="must divide over the 2 ranks"):
        pretrain.GlobalBatchSampler(32, 15, 0, 2, 0)
    with pytest.raises(SystemExit, match="b2 group would take 2 of the 2 images"):
        pretrain.ser_groups(2, 256, 0.01, 2)
    with pytest.raises(SystemExit, match="not divisible by --patch-size"):
        config("--img-size 36", tmp_path)
    with pytest.raises(SystemExit, match="fewer than --batch-size"):
        run("--synthetic-length 8", tmp_path)
    with pytest.raises(SystemExit, match="--ser-min-images must be at least 2"):
        config("--ser --equiv-layer 2 --ser-min-images 1", tmp_path)
    for scale in ("1.3 0.7", "1000 1000"):
        with pytest.raises(SystemExit, match="--ser-scale"):
            config(f"--ser --equiv-layer 2 --ser-scale {scale}", tmp_path)
    with pytest.raises(SystemExit, match="--ser-scale 0.01: SER's 4x4-token b2 crops would shrink below one token; "
                                         "pass at least 0.0625"):
        config("--ser --equiv-layer 2 --ser-scale 0.01 0.01", tmp_path)  # 0.16 of a token: rounded up to 1
    capsys.readouterr()
    config("--ser --equiv-layer 2 --batch-size 16 --ser-chunk 5", tmp_path)
    assert "--ser-chunk 5 does not divide --batch-size 16: the b2 groups come from chunks of 5.33 images (3 of them)" \
        in capsys.readouterr().out
    with pytest.raises(SystemExit, match="got 3 \\(the default with --ser\\)"):
        config("--ser --depth 2", tmp_path)
    for size in ("0", "1", str(10**11)):  # BatchNorm heads need two images; 10^11 listed SER groups for minutes
        with pytest.raises(SystemExit, match="--batch-size must be at least 2 .* and at most 2\\^24"):
            config(f"--ser --equiv-layer 2 --batch-size {size}", tmp_path)
    with pytest.raises(SystemExit, match="--count-flops and --benchmark each end the run"):
        config("--count-flops --benchmark 2", tmp_path)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit, match="--count-flops counts one process"):
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "h"),
                            ("MASTER_PORT", "29500")):
            patch.setenv(name, value)
        config("--count-flops", tmp_path)
    with pytest.raises(SystemExit, match="--synthetic-length sets the built-in data's size"):
        config(f"--synthetic-length 32 --data {tmp_path}", tmp_path)
    with pytest.raises(SystemExit, match="--warmup-epochs 3 must be"):
        config("--warmup-epochs 3", tmp_path)
    with pytest.raises(SystemExit, match=r"--warmup-epochs 10 \(the default here\) must be in 0..2 \(--epochs 2\)"):
        config(f"--data {tmp_path} --epochs 2", tmp_path)
    (tmp_path / "train").mkdir()
    for flags, message in [  # each would leave the run short of what was asked, without a word
            ("--method dino --epochs 2 --warmup-teacher-temp-epochs 3", "--warmup-teacher-temp-epochs 3 must be in "
                                                                        "0..2 \\(--epochs 2\\)"),
            ("--method dino --epochs 2 --freeze-last-layer 2", "--freeze-last-layer 2 must be in 0..1 \\(--epochs 2\\)"),
            ("--lr 1e-3 --min-lr 0.5", "--min-lr 0.5 must not exceed --lr 0.001"),
            ("--method simclr --min-lr 0.01", "--min-lr 0.01 must not exceed --lr 0.0015 \\(the default here\\)"),
            ("--seed 1000000000000000", "--seed must be in 0..2\\^31-1"),
            ("--ser --depth 1", "--ser needs at least 2 blocks \\(L_equiv acts before the last\\), got --depth 1")]:
        with pytest.raises(SystemExit, match=f"^error: {message}"):
            config(flags, tmp_path)
    with pytest.raises(SystemExit, match=f"^error: --output-dir {tmp_path}/train/runs is inside {tmp_path}/train, "
                                         "whose folders are the classes of --data; write outputs elsewhere"):
        config(f"--data {tmp_path}", tmp_path / "train" / "runs")


@pytest.mark.parametrize("flags,users", [("--method byol --temperature 0.5", "--method mocov3 or simclr"),
                                         ("--method simclr --momentum 0.9", "an EMA teacher"),
                                         ("--method mocov3 --teacher-temp 0.05", "--method dino"),
                                         ("--method mocov3 --no-use-bn-in-head", "--method dino"),
                                         ("--method dino --ser-ratio 0.5", "--ser"),
                                         ("--method dino --ser-scale 1 2", "--ser"),
                                         ("--method byol --equiv-layer 2", "an add-on"),
                                         ("--method byol --augself --equiv-tau 0.1", "--ser or --equimod"),
                                         ("--count-flops --compile", "a training run, not --count-flops"),
                                         ("--count-flops --precision fp32", "a training run, not --count-flops"),
                                         ("--count-flops --stop-at-step 1", "a training run, not --benchmark or --c"),
                                         ("--count-flops --knn-every 1", "a training run, not --benchmark or --c"),
                                         ("--count-flops --output-dir runs/x", "a training run or --benchmark"),
                                         ("--method dino --warmup-teacher-temp 0.5",
                                          "--method dino with --warmup-teacher-temp-epochs above 0"),
                                         ("--peak-tflops 5", "--benchmark"),
                                         ("--knn-every 0 --knn-val-size 5", "the k-NN monitor")])
def test_flags_a_run_would_ignore_are_refused(flags, users, tmp_path):
    config("--method dino --ser-scale 0.7 1.3", tmp_path)  # a flag given at its default changes nothing: accepted
    name = [f for f in flags.split() if f.startswith("--")][-1]  # as typed: --no-use-bn-in-head
    with pytest.raises(SystemExit, match=f"^error: {name} is read only with {users}.*; this run would ignore it: drop it$"):
        config(flags, tmp_path)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(losses, "simclr_loss", lambda z1, z2, t: (z1.sum() + z2.sum()) * float("nan"))
    with pytest.raises(SystemExit, match="non-finite loss at step 1.* --clip-grad, with another --output-dir.$"):
        run("--method simclr --stop-at-step 1", tmp_path)  # a resume keeps the settings the advice would change



@pytest.mark.parametrize("flag", ["--lr -1", "--lr nan", "--lr inf", "--min-lr -0.5", "--weight-decay nan",
                                  "--temperature 0", "--teacher-temp inf", "--momentum 1.5", "--momentum -0.1",
                                  "--crop-min 0", "--crop-min 1.5", "--synthetic-length 0", "--synthetic-length -5",
                                  "--depth 0", "--num-workers -1", "--drop-path 1", "--equiv-tau nan"])
def test_out_of_range_flags_are_refused(flag, tmp_path):
    name = flag.split()[0]
    method = {"--teacher-temp": "dino", "--momentum": "byol", "--equiv-tau": "simclr --ser"}.get(name, "simclr")
    with pytest.raises(SystemExit, match=f"error: {name} must be "):
        config(f"--method {method} {flag}", tmp_path)


def test_out_of_range_flags_stop_the_script_before_training(tmp_path):
    """As a user runs it: one line and exit 1, no traceback, nothing written (--stop-at-step 1 would
    otherwise end a run that got past the check with exit 0)."""
    for flag in ("--lr -1", "--synthetic-length 0"):
        result = subprocess.run([sys.executable, "pretrain.py", *flag.split(), "--stop-at-step", "1", "--output-dir",
                                 str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 1, result.stderr[-500:]
        assert result.stderr.strip().splitlines() == [f"error: {flag.split()[0]} must be "
                                                      + ("positive, got -1.0" if "lr" in flag else "in 1..2^31-1, got 0")]
        assert not (tmp_path / "run").exists()


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    """A finite loss whose gradient is NaN: the loss logged at the epoch's end is from before the update,
    so only a check of the weights themselves can keep NaN out of checkpoint.pth and backbone.pth."""
    run("--method simclr --stop-at-step 1", tmp_path)
    saved = (tmp_path / "checkpoint.pth").read_bytes()
    monkeypatch.setattr(losses, "simclr_loss", lambda z1, z2, t: (z1.sum() * 0).sqrt())  # 0, NaN gradient
    with pytest.raises(SystemExit, match="non-finite weights at step 2; the last checkpoint, at step 1, .* is intact"):
        run("--method simclr", tmp_path)
    assert (tmp_path / "checkpoint.pth").read_bytes() == saved
    with pytest.raises(SystemExit, match="non-finite weights at step 1; no checkpoint was written"):
        run("--method simclr --stop-at-step 1", tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "checkpoint.pth").exists() and not (tmp_path / "fresh" / "backbone.pth").exists()


def test_backbone_export_matches_the_checkpoint_and_a_rerun_repairs_it(tmp_path):
    ckpt = run("--method dino", tmp_path)
    exported = torch.load(tmp_path / "backbone.pth", weights_only=True)
    teacher = {k[len("backbone."):]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}
    assert exported["backbone"].keys() == teacher.keys()
    assert all(torch.equal(exported["backbone"][k], v) for k, v in teacher.items())
    (tmp_path / "backbone.pth").write_bytes(b"stale")  # a kill between the two final writes
    run("--method dino", tmp_path)  # the run has finished: only the export is redone
    again = torch.load(tmp_path / "backbone.pth", weights_only=True)
    assert all(torch.equal(again["backbone"][k], v) for k, v in teacher.items())


def test_broken_checkpoint_gives_a_one_line_error(tmp_path):
    (tmp_path / "checkpoint.pth").write_bytes(b"PK\x03\x04 truncated")
    code, last, _ = run_script("pretrain.py", *TINY.split(), "--output-dir", tmp_path)
    assert code == 1 and last.startswith(f"error: {tmp_path / 'checkpoint.pth'} is not a readable checkpoint")
    assert "move it away or use another --output-dir" in last


def test_a_resume_reads_the_data_it_was_written_on(tmp_path, monkeypatch):
    """--data is recorded where it is: the same relative --data from another folder is other data (it resumed on it);
    a trailing slash, or a typed default (--ser-scale 0.7 1.3), is no change."""
    for folder in ("x", "y"):
        _write_png_tree(tmp_path / folder / "data", "train", n=8)
    flags = "--data data --method mocov3 --ser --equiv-layer 2 --warmup-epochs 0 --epochs 3"
    monkeypatch.chdir(tmp_path / "x")
    run(f"{flags} --ser-scale 0.7 1.3 --stop-at-step 1", tmp_path / "run")
    assert run(f"{flags.replace('--data data', '--data data/')} --stop-at-step 2", tmp_path / "run")["step"] == 2
    monkeypatch.chdir(tmp_path / "y")
    with pytest.raises(SystemExit, match="different settings: --data .*x/data' \\(now .*y/data'\\)"):
        run(flags, tmp_path / "run")
    (tmp_path / "y" / "synthetic").mkdir()  # a folder of that name here is no --data synthetic
    assert config("--method byol", tmp_path / "built_in").data == "synthetic"


def test_knn_monitor_refuses_an_unreadable_val_split_and_one_class(tmp_path, capsys):
    _write_png_tree(tmp_path / "data", "train", n=8)
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)  # a val/ that exists but holds no images
    args = config(f"--data {tmp_path / 'data'} --warmup-epochs 0 --knn-every 1", tmp_path / "run")
    with pytest.raises(SystemExit, match="error: --data .*holds no images"):
        pretrain.knn_data(args, 0, 1)
    os.rmdir(tmp_path / "data" / "val" / "a")
    os.rmdir(tmp_path / "data" / "val")
    os.symlink(tmp_path / "unmounted", tmp_path / "data" / "val")  # e.g. a disk not mounted: not a missing val/
    with pytest.raises(SystemExit, match="error: --data .*val.* does not exist"):
        pretrain.knn_data(args, 0, 1)
    os.unlink(tmp_path / "data" / "val")
    assert pretrain.knn_data(args, 0, 1)[2] == 2  # no val/: a held-out part of train
    out = capsys.readouterr().out  # 16 images, so both the held-out split and the smaller bank are said
    assert "no val/; it classifies 8 held-out train images" in out and "8 bank and 8 val images, fewer than" in out
    _write_png_tree(tmp_path / "one", "train", classes=("a",), n=8)
    args.data = str(tmp_path / "one")
    with pytest.raises(SystemExit, match="has one class; the k-NN monitor needs two: pass --knn-every 0"):
        pretrain.knn_data(args, 0, 1)


def test_unreadable_image_and_unwritable_output_stop_in_one_line(tmp_path):
    """A loader worker that meets a broken file: one line naming it and exit 1. The workers ignore SIGTERM
    (for the preemption save), so an exception left to the interpreter used to hang the process at exit."""
    for split in ("train", "val"):
        _write_png_tree(tmp_path / "data", split, n=8)  # 16 images: the one step sees them all
    (tmp_path / "data" / "train" / "b" / "5.png").write_bytes(b"")
    tiny = TINY.replace("--num-workers 0", "--num-workers 1").replace("--synthetic-length 32 ", "")
    argv = ["pretrain.py", *tiny.split(), "--data", tmp_path / "data",
            "--warmup-epochs", "0", "--arch", "vit_tiny"]
    code, last, _ = run_script(*argv, "--output-dir", tmp_path / "run", timeout=120)
    assert code == 1 and last.startswith(f"error: cannot read image file {tmp_path / 'data/train/b/5.png'}: ")
    (tmp_path / "file").write_text("")
    code, last, _ = run_script(*argv, "--output-dir", tmp_path / "file", timeout=120)
    assert code == 1 and last.startswith(f"error: --output-dir {tmp_path / 'file'}: cannot write there")
    (tmp_path / "taken" / "backbone.pth").mkdir(parents=True)  # found before training, not at the first save
    code, last, _ = run_script(*argv, "--output-dir", tmp_path / "taken", timeout=120)
    assert code == 1 and last.startswith(f"error: --output-dir {tmp_path / 'taken'}: backbone.pth there is a folder")
    code, last, _ = run_script(*argv[:-6], "--data", tmp_path / "nowhere", *argv[-4:], timeout=120)
    assert code == 1 and last.startswith(f"error: --data {tmp_path / 'nowhere'}: expected an ImageFolder root")


def test_sigterm_checkpoints_and_exits_143(tmp_path):
    argv = [sys.executable, "-u", "pretrain.py", *TINY.replace("--epochs 1", "--epochs 200").split(),
            "--log-every", "1", "--output-dir", str(tmp_path)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in proc.stdout:
            if line.startswith("epoch 0 step 1/"):
                proc.send_signal(signal.SIGTERM)
                break
        output = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 143, output
    assert "on SIGTERM, exit status 143" in output
    step = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["step"]
    assert 1 <= step < 400


def test_every_option_has_help_and_the_usage_names_the_script():
    for module in (pretrain, linear_eval, robustness_eval, detect_eval):
        name, parser = f"{module.__name__}.py", module.get_args_parser()
        assert parser.format_usage().startswith(f"usage: {name} ")
        undocumented = [a.dest for a in parser._actions if not a.help]
        assert not undocumented, (name, undocumented)
    assert "143 (SIGTERM)" in pretrain.get_args_parser().format_help()

def test_ser_loss_reaches_blocks_before_the_split_only(tmp_path):
    args = config("--method dino --ser --equiv-layer 2", tmp_path)
    student, _ = pretrain.build_models(args)
    assert student.backbone.cls_after_block == 2
    torch.manual_seed(0)
    g1, g2 = group_actions.sample_view_pair(3, torch.Generator().manual_seed(0), base_grid=(4, 4))
    x = torch.randn(3, 3, 32, 32)
    maps = [student.addon_head(student.backbone.forward_features(
        group_actions.apply_to_images(x, g, 8), layer=2)["token_map"]) for g in (g1, g2)]
    losses.ser_loss([losses.SERGroup(*maps, g1, g2, (4, 4))], temperature=0.4).backward()
    blocks = student.backbone.blocks
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for b in blocks[:2] for p in b.parameters())
    assert all(p.grad is None for p in blocks[2].parameters())
    assert all(p.grad is not None for p in student.addon_head.parameters())


def test_clip_grad_per_param_clips_each_gradient_on_its_own():
    """DINO's clip_gradients: every parameter's gradient is scaled to norm <= max_norm separately."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s)) for s in ((3, 4), (5,), (7, 7), (2,))]
    for p, scale in zip(params, (10.0, 0.01, 1.0, 100.0)):
        p.grad = torch.randn_like(p) * scale
    before = [p.grad.clone() for p in params]
    params.append(nn.Parameter(torch.randn(3)))  # no gradient (e.g. DINO's frozen last layer): skipped
    pretrain.clip_grad_per_param(params, 3.0)
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g * min(1.0, 3.0 / (g.norm().item() + 1e-6)))
    assert params[-1].grad is None


def test_schedules_are_pure_functions_of_the_step():
    assert pretrain.cosine_schedule(0, 100, 1.0, 0.1, warmup_steps=10) == 0.0
    assert pretrain.cosine_schedule(5, 100, 1.0, 0.1, warmup_steps=10) == 0.5
    assert pretrain.cosine_schedule(10, 100, 1.0, 0.1, warmup_steps=10) == 1.0
    assert math.isclose(pretrain.cosine_schedule(55, 100, 1.0, 0.1, warmup_steps=10), 0.55)
    assert math.isclose(pretrain.cosine_schedule(100, 100, 1.0, 0.1, warmup_steps=10), 0.1)
    assert pretrain.ema_momentum(0, 100, 0.996) == 0.996 and pretrain.ema_momentum(100, 100, 0.996) == 1.0


def test_global_batch_sampler_slices_the_single_process_batch():
    single = list(pretrain.GlobalBatchSampler(50, 8, 0, 1, seed=3))
    ranks = [list(pretrain.GlobalBatchSampler(50, 8, r, 2, seed=3)) for r in range(2)]
    assert len(single) == 6 and all(len(b) == 4 for r in ranks for b in r)
    for step, batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == batch
    resumed = pretrain.GlobalBatchSampler(50, 8, 0, 1, seed=3)
    resumed.set_epoch(0, start_step=4)
    assert list(resumed) == single[4:] and len(resumed) == 2
    other_epoch = pretrain.GlobalBatchSampler(50, 8, 0, 1, seed=3)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != single


def test_ser_groups_are_cut_from_the_global_batch():
    # the paper's setting: 8 chunks of 256, the last 3 images (1%) of each form a group
    assert pretrain.ser_groups(2048, 256, 0.01, 2) == [(256 * g + 253, 256 * (g + 1)) for g in range(8)]
    assert pretrain.ser_groups(16, 256, 0.01, 2) == [(14, 16)]  # a small batch: one group, the floor of 2
    assert pretrain.ser_groups(10, 4, 0.4, 2) == [(3, 5), (8, 10)]  # round(10 / 4) = 2 chunks of 5
    assert pretrain.ser_groups(16, 5, 0.01, 2) == [(3, 5), (9, 11), (14, 16)]  # chunks of 5, 6, 5


def fake_global_batch(recipe, batch, seed=0):
    """What the workers would deliver for a global batch: uint8 crops, boxes and flips per view."""
    gen = torch.Generator().manual_seed(seed)
    return {"images": [torch.randint(0, 256, (batch, 3, v.size, v.size), generator=gen, dtype=torch.uint8)
                       for v in recipe.views],
            "crop": [torch.rand(batch, 4, generator=gen) for _ in recipe.views],
            "flip": [torch.rand(batch, generator=gen) < 0.5 for _ in recipe.views]}


def rank_slice(batch, rank, world):
    n = batch["images"][0].shape[0] // world
    return {k: [t[rank * n:(rank + 1) * n] for t in v] for k, v in batch.items()}


@pytest.mark.parametrize("extra", ["--ser-chunk 8 --ser-ratio 0.6", "--ser-chunk 16 --ser-ratio 0.6",
                                   "--n-local-crops 4 --ser-chunk 5"])
def test_ser_split_ranks_share_the_single_process_step(extra, tmp_path):
    """On 2 or 4 ranks, the b1 rows and the b2 groups' rows cover the global batch exactly once, and each
    group's rows (images, group elements, colours) are the single process's, including groups that
    straddle a rank boundary."""
    args = config(f"--method mocov3 --ser --equiv-layer 2 {extra}", tmp_path)
    recipe, cpu = pretrain.build_recipe(args), torch.device("cpu")
    full = fake_global_batch(recipe, args.batch_size)
    one = pretrain.make_step_inputs(full, recipe.photometric(), 5, args, 0, 1, cpu)
    groups = pretrain.ser_groups(args.batch_size, args.ser_chunk, args.ser_ratio, args.ser_min_images)
    assert [(int(g.positions[0]), int(g.positions[-1]) + 1) for g in one.b2] == groups
    straddling = 0
    for world in (2, 4):
        shares = [pretrain.make_step_inputs(rank_slice(full, r, world), recipe.photometric(), 5, args, r, world, cpu)
                  for r in range(world)]
        seen = torch.cat([torch.cat([s.stream_positions[0], *[g.positions for g in s.b2]]) for s in shares])
        assert sorted(seen.tolist()) == list(range(args.batch_size))  # every image once, in b1 or in b2
        for v in range(len(one.streams)):  # b1 rows: the single process's, in the same order
            assert torch.equal(torch.cat([s.stream_positions[v] for s in shares]), one.stream_positions[v])
            assert torch.allclose(torch.cat([s.streams[v] for s in shares]), one.streams[v], atol=1e-6)
        for whole in one.b2:
            parts = [g for s in shares for g in s.b2 if g.index == whole.index]
            straddling += len(parts) > 1
            assert torch.equal(torch.cat([p.positions for p in parts]), whole.positions)
            for k, pair in enumerate(whole.pairs):
                for name in ("x1", "x2"):
                    assert torch.allclose(torch.cat([getattr(p.pairs[k], name) for p in parts]), getattr(pair, name),
                                          atol=1e-6)
                for name in ("g1", "g2"):
                    g, pieces = getattr(pair, name), [getattr(p.pairs[k], name) for p in parts]
                    assert all(piece.k == g.k and piece.size == g.size for piece in pieces)
                    assert torch.equal(torch.cat([piece.flip for piece in pieces]), g.flip)
                    assert torch.equal(torch.cat([piece.rot180 for piece in pieces]), g.rot180)
    assert straddling > 0


def test_ser_multicrop_pairs_use_global_crop_0_and_every_other_local_crop(tmp_path):
    """MoCo v3 2+4 with SER (builder/moco.py train_erl_local4): pairs from global crop 0 and local crops #0
    and #2, each view with its own element, grids drawn relative to the crop's own token grid; the six
    views join the six invariance streams. With identity colours, x_j = g_j(normalised crop) exactly."""
    args = config("--method mocov3 --n-local-crops 4 --ser --equiv-layer 2 --ser-ratio 0.25", tmp_path)
    recipe, cpu = pretrain.build_recipe(args), torch.device("cpu")
    full = fake_global_batch(recipe, args.batch_size)
    identity = [augment.PhotometricAugment(p_jitter=0, p_gray=0, p_blur=0, p_solarize=0, img_size=32)] * len(recipe.views)
    batch = pretrain.make_step_inputs(full, identity, 3, args, 0, 1, cpu)
    assert [v.size for v in recipe.views[:6]] == [32, 32, 16, 16, 16, 16]
    (group,) = batch.b2
    assert group.positions.tolist() == [12, 13, 14, 15]  # round(0.25 * 16) = 4 images
    assert [(p.base_grid, p.streams) for p in group.pairs] == [((4, 4), (0, 1)), ((2, 2), (2, 3)), ((2, 2), (4, 5))]
    # The draw again, from the group's generator: per pair its elements relative to its own crop's token
    # grid (4x4 global, 2x2 local) at --ser-scale (0.7, 1.3), then its two views' colours.
    gen = torch.Generator().manual_seed(augment.seed_from("ser", args.seed, 3, 0))
    for pair, view, grid in zip(group.pairs, (0, 2, 4), ((4, 4), (2, 2), (2, 2))):
        expected = group_actions.sample_view_pair(4, gen, base_grid=grid, scale=(0.7, 1.3))
        identity[0].sample_params(4, gen), identity[0].sample_params(4, gen)
        crop = augment.normalize(full["images"][view][12:16].float() / 255)
        for x, g, want in ((pair.x1, pair.g1, expected[0]), (pair.x2, pair.g2, expected[1])):
            assert (g.k, g.size) == (want.k, want.size)
            assert torch.equal(g.flip, want.flip) and torch.equal(g.rot180, want.rot180)
            assert torch.allclose(x, group_actions.apply_to_images(crop, g, 8), atol=1e-6)
        assert torch.equal(pair.g2.flip, ~pair.g1.flip)  # negated flags, as sample_view_pair
    assert [s.shape[0] for s in batch.streams] == [12] * 6  # b1 rows; the b2 views follow in Student._b2


@pytest.mark.parametrize("n_local", [0, 4])
def test_ser_pair_views_draw_their_own_colours_from_the_pair_recipe(n_local, tmp_path):
    """Each b2 view has its own colour parameters, drawn after the pair's elements from the group's
    generator. 2 views (train_erl): global crop 0 with global0's then global1's photometric. 2+4
    (train_erl_local4): every pair, global crop 0's included, with the local crops' photometric twice."""
    args = config(f"--method mocov3 --n-local-crops {n_local} --ser --equiv-layer 2 --ser-ratio 0.25", tmp_path)
    recipe, cpu = pretrain.build_recipe(args), torch.device("cpu")
    full, photometric = fake_global_batch(recipe, args.batch_size), recipe.photometric()
    batch = pretrain.make_step_inputs(full, photometric, 3, args, 0, 1, cpu)
    # (crop view, its token grid, the two views' photometric): global0/global1's for 2 views, local's for 2+4
    pairs = ([(0, (4, 4), (photometric[0], photometric[1]))] if not n_local else
             [(view, grid, (photometric[2],) * 2) for view, grid in ((0, (4, 4)), (2, (2, 2)), (4, (2, 2)))])
    assert [augs for _, augs, _ in pretrain.ser_pair_sources(args, photometric)] == [augs for *_, augs in pairs]
    blur_solarize = [(1.0, 0.0), (0.1, 0.2)] if not n_local else [(0.5, 0.0)] * 6
    assert [(aug.p_blur, aug.p_solarize) for *_, augs in pairs for aug in augs] == blur_solarize
    (group,) = batch.b2
    assert len(group.pairs) == len(pairs)
    gen = torch.Generator().manual_seed(augment.seed_from("ser", args.seed, 3, 0))
    for pair, (view, grid, augs) in zip(group.pairs, pairs):
        group_actions.sample_view_pair(4, gen, base_grid=grid, scale=(0.7, 1.3))
        colours = [aug.sample_params(4, gen) for aug in augs]
        assert not torch.equal(colours[0]["jitter"], colours[1]["jitter"])  # drawn independently
        crop = full["images"][view][12:16].float() / 255
        for x, g, aug, p in zip((pair.x1, pair.x2), (pair.g1, pair.g2), augs, colours):
            want = group_actions.apply_to_images(augment.normalize(aug.apply(crop, p)), g, 8)
            assert torch.equal(x, want)  # the same ops on the same rows: a faint 32-px blur counts too


@pytest.mark.parametrize("addon", ["", "--ser --equiv-layer 2 --ser-ratio 0.25"])
def test_mocov3_multicrop_losses_equal_a_hand_written_reference(addon, tmp_path):
    """compute_losses on a real 2+4 step: the invariance term is the sum over the 6 student streams and the
    other global momentum stream (10 official ctr terms, float64), SER's is the sum over its 3 pairs of the
    paper's L_equiv (ser_reference); every stream holds all 16 images, b2 rows included."""
    args = config(f"--method mocov3 --n-local-crops 4 {addon}", tmp_path)
    torch.manual_seed(0)
    student, teacher = pretrain.build_models(args)
    recipe = pretrain.build_recipe(args)
    batch = pretrain.make_step_inputs(fake_global_batch(recipe, 16), recipe.photometric(), 0, args, 0, 1,
                                      torch.device("cpu"))
    out, keys = student(batch), teacher(batch)
    terms = pretrain.compute_losses(args, out, keys, batch, None, 0)
    assert len(out["pred"]) == 6 and all(q.shape[0] == 16 for q in out["pred"] + keys)
    expected = sum(official_moco_ctr(q.double(), k.double(), args.temperature)
                   for i, q in enumerate(out["pred"]) for j, k in enumerate(keys) if i != j)
    torch.testing.assert_close(terms["inv"].double(), expected, rtol=1e-5, atol=1e-6)
    if addon:
        assert len(out["ser"]) == 3
        expected = sum(ser_reference([tuple(t.double() if torch.is_tensor(t) else t for t in grp[:2]) + tuple(grp[2:5])
                                      for grp in pair], args.equiv_tau) for pair in out["ser"])
        torch.testing.assert_close(terms["equiv"].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, extra, joint", [("dino", "--use-bn-in-head --n-local-crops 2 --ser --equiv-layer 2", True),
                                                  ("simclr", "", True), ("mocov3", "", False), ("byol", "", False),
                                                  ("barlowtwins", "", False), ("vicreg", "", False)])
def test_heads_see_all_views_at_once_where_the_official_code_does(method, extra, joint, tmp_path):
    """DINO's MultiCropWrapper and SimCLR's release call the projection head once on every view (b2 rows
    included), so its BatchNorm normalises them together; MoCo v3, BYOL, Barlow Twins and VICReg call it per view."""
    args = config(f"--method {method} {extra}", tmp_path)
    student, teacher = pretrain.build_models(args)
    recipe = pretrain.build_recipe(args)
    batch = pretrain.make_step_inputs(fake_global_batch(recipe, 16), recipe.photometric(), 0, args, 0, 1,
                                      torch.device("cpu"))
    calls = {"student": [], "teacher": []}
    for name, model in (("student", student), ("teacher", teacher)):
        if model is not None:
            model.projector.register_forward_pre_hook(lambda m, inp, name=name: calls[name].append(inp[0].shape[0]))
    out = student(batch)
    rows = [z.shape[0] for z in out["proj"]]
    assert calls["student"] == ([sum(rows)] if joint else rows) and len(rows) == len(recipe.views)
    if teacher is not None:
        keys = [k.shape[0] for k in teacher(batch)]
        assert calls["teacher"] == ([sum(keys)] if joint else keys) and len(keys) == 2


def test_benchmark_mode_counts_the_ser_flops(tmp_path):
    base = pretrain.benchmark(config("--method mocov3 --benchmark 1 --batch-size 32 --synthetic-length 64",
                                 tmp_path / "base"))
    ser = pretrain.benchmark(config("--method mocov3 --ser --ser-ratio 0.5 --equiv-layer 2 --benchmark 1 --batch-size 32 "
                                "--synthetic-length 64", tmp_path / "ser"))
    assert base["images_per_s"] > 0 and base["pipeline_images_per_s_per_worker"] > 0
    assert base["data_wait_ms"] >= 0 and base["compute_ms"] > 0
    assert ser["gflops_per_image"] > base["gflops_per_image"] > 0
    assert json.load(open(tmp_path / "ser" / "benchmark.json"))["addon"] == "ser"


def test_benchmark_reports_the_distance_to_the_compute_floor(tmp_path, capsys):
    result = pretrain.benchmark(config("--method dino --ser --equiv-layer 2 --benchmark 1", tmp_path))
    assert result["floor_ms"] > 0
    assert result["step_over_floor"] == pytest.approx(result["step_ms"] / result["floor_ms"])
    assert "step / floor: " in capsys.readouterr().out
    saved = json.load(open(tmp_path / "benchmark.json"))
    assert saved["step_over_floor"] == result["step_over_floor"] and saved["precision"] == "fp32"
    # No --peak-tflops: MFU against a measured matmul peak; with it: against the given number.
    assert saved["peak_source"].startswith("measured") and saved["peak_tflops"] > 0 and saved["mfu_compute"] > 0
    given = pretrain.benchmark(config("--method mocov3 --benchmark 1 --peak-tflops 2", tmp_path / "given"))
    assert given["peak_tflops"] == 2 and given["peak_source"] == "--peak-tflops"
    assert given["mfu_compute"] == pytest.approx(given["achieved_tflops_per_rank"] / 2)


def test_benchmark_times_only_steps_it_has_warmed_up(tmp_path, monkeypatch):
    """SER draws new b2 grids each step (on a GPU a new grid plans its attention kernels once): steps 3..n+2
    are timed only after a warm-up over the same steps; without SER 3 warm-up steps suffice. In the main
    process each timed step is followed by its floor step; with loader workers the floor comes first."""
    steps, train_step = [], pretrain.train_step
    monkeypatch.setattr(pretrain, "train_step",
                        lambda batch, step, **kw: steps.append(step) or train_step(batch, step, **kw))
    for flags, warm, timed in (("--method mocov3 --ser --equiv-layer 2", [0, 1, 2, 3, 4], [0, 1, 2, 3, 3, 4, 4]),
                               ("--method mocov3", [0, 1, 2], [0, 1, 2, 3, 3, 4, 4]),
                               ("--method mocov3 --num-workers 1", [0, 1, 2], [3, 4, 0, 1, 2, 3, 4])):
        steps.clear()
        pretrain.benchmark(config(f"{flags} --benchmark 2", tmp_path / flags.replace(" ", "")))
        assert steps == warm + timed


@pytest.mark.parametrize("native, flag, expected", [(True, "", torch.bfloat16), (False, "", torch.float32),
                                                    (True, "--precision fp32", torch.float32),
                                                    (False, "--precision bf16", torch.bfloat16)])
def test_pretrain_autocasts_to_bf16_only_where_the_cpu_has_it(native, flag, expected, tmp_path, monkeypatch,
                                                               capsys):
    """bf16 by default only on a CPU with native bf16; an explicit bf16 elsewhere runs with a warning.
    The heads compute in the autocast dtype, the losses in float32."""
    monkeypatch.setattr(vit, "cpu_has_native_bf16", lambda: native)
    seen, compute_losses = [], pretrain.compute_losses

    def spy(args, student_out, *rest):
        terms = compute_losses(args, student_out, *rest)
        seen.append((student_out["proj"][0].dtype, terms["inv"].dtype))
        return terms

    monkeypatch.setattr(pretrain, "compute_losses", spy)
    run(f"--method dino --stop-at-step 1 {flag}", tmp_path)
    assert seen == [(expected, torch.float32)]
    assert ("bf16 is emulated" in capsys.readouterr().out) == (flag == "--precision bf16")
    if not native:
        with pytest.raises(SystemExit, match="--precision fp16: fp16 needs a CUDA device"):
            run("--precision fp16", tmp_path / "fp16")


# One process vs torchrun: every base method with SER (groups on one rank, on both, straddling the ranks,
# several per rank), each other add-on with one method, MoCo v3's 2+4 views; stochastic depth on in one.
TORCHRUN_BASE = ("--arch vit_tiny --depth 2 --img-size 32 --patch-size 8 --batch-size 16 --synthetic-length 32 "
                 "--num-workers 0 --knn-every 0 --stop-at-step 2 --log-every 1 --head-hidden 32 --head-out 16 "
                 "--precision fp32")  # fp32 on any CPU
TORCHRUN_CONFIGS = {
    "mocov3_ser": "--method mocov3 --ser --equiv-layer 1",  # one group, all on rank 1
    # 10 b2 images over both ranks, local crops (their b2 rows are plain local crops), stochastic depth
    # Without the head's BatchNorm: the bias of the Linear before it has an exactly zero gradient, whose
    # rounding noise Adam turns into +-lr, differently on 1 and 2 ranks (GlobalBatchNorm1d is checked above).
    "dino_ser": "--method dino --ser --equiv-layer 1 --ser-ratio 0.6 --n-local-crops 2 --drop-path 0.1 --no-use-bn-in-head",
    "barlowtwins_ser": "--method barlowtwins --ser --equiv-layer 1 --ser-chunk 5",  # 3 groups: 1 on rank 0, 2 on rank 1
    "vicreg_ser": "--method vicreg --ser --equiv-layer 1 --ser-chunk 4 --ser-ratio 0.5",  # 4 groups, 2 per rank
    "simclr_ser": "--method simclr --ser --equiv-layer 1 --ser-chunk 16 --ser-ratio 0.4",
    "byol_ser": "--method byol --ser --equiv-layer 1 --ser-chunk 5",
    "simclr_equimod": "--method simclr --equimod",
    "byol_augself": "--method byol --augself",
    "vicreg_essl": "--method vicreg --essl",
    "mocov3_2+4_ser": "--method mocov3 --n-local-crops 4 --ser --equiv-layer 1 --ser-chunk 5",
    "mocov3_2+4_essl": "--method mocov3 --n-local-crops 4 --essl",
}
# Several runs in one torchrun job: each process starts once (imports dominate a tiny run). Each run
# rendezvouses on its own store (port): re-initialising through torchrun's store could read the previous
# run's keys and hang. Rank 0 picks each port just before its run starts and hands it over through
# torchrun's store, since a port picked before the launch can be taken by then (EADDRINUSE).
_TORCHRUN_DRIVER = """
import os
import socket
import sys
import torch.distributed as dist
import pretrain
agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
for i, argv in enumerate(sys.argv[1:]):
    if os.environ["RANK"] == "0":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            agent_store.set(f"run_port_{i}", str(s.getsockname()[1]))
    port = agent_store.get(f"run_port_{i}").decode()
    os.environ.update(TORCHELASTIC_USE_AGENT_STORE="False", MASTER_PORT=port)
    pretrain.main(argv.split())
"""


@pytest.mark.slow
def test_torchrun_two_ranks_train_exactly_as_one_process(tmp_path):
    """Nothing a step computes depends on the number of ranks except float rounding: the union of the
    ranks' batches is the single-process batch, augmentation parameters, SER's groups and drop-path masks
    are drawn for the global batch, and every loss is exact under DDP. The logged terms of both steps and
    every weight and buffer after them agree to float rounding."""
    repo = os.path.dirname(os.path.abspath(pretrain.__file__))
    runs = {name: f"{TORCHRUN_BASE} {extra}" for name, extra in TORCHRUN_CONFIGS.items()}
    for name, argv in runs.items():
        pretrain.main(f"{argv} --output-dir {tmp_path / 'one' / name}".split())
    driver = tmp_path / "driver.py"
    driver.write_text(_TORCHRUN_DRIVER)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(_free_port()), str(driver),
              *[f"{argv} --output-dir {tmp_path / 'two' / name}" for name, argv in runs.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    result = subprocess.run(launch, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in runs:
        one = torch.load(tmp_path / "one" / name / "checkpoint.pth", weights_only=False)
        two = torch.load(tmp_path / "two" / name / "checkpoint.pth", weights_only=False)
        assert json.load(open(tmp_path / "two" / name / "config.json"))["world_size"] == 2
        for part in ("student", "teacher", "dino_loss"):
            for k, v in (one[part] or {}).items():
                if not v.is_floating_point():
                    continue
                if v.dim() > 1:  # weight matrices: relative to float rounding (1.4e-5 seen for a cls_token on
                    # AVX-512 kernels: Adam's normalised first steps pass on the gradients' relative rounding)
                    assert (v - two[part][k]).norm() <= 1e-4 * v.norm(), (name, part, k)
                # Everything, biases and buffers included, elementwise: Adam's first steps turn a gradient
                # that is zero in exact arithmetic (a key bias's) but rounding noise in floats into +-lr.
                assert torch.allclose(v, two[part][k], rtol=1e-4, atol=1e-4), (name, part, k)
        # The logged terms are averaged over the ranks at the same steps: they equal the single-process ones.
        logged_one, logged_two = read_log(tmp_path / "one" / name), read_log(tmp_path / "two" / name)
        assert [e["step"] for e in logged_one] == [e["step"] for e in logged_two] == [1, 2], name
        for a, b in zip(logged_one, logged_two):
            for k in ("loss", "inv", "equiv"):
                if k in a:
                    assert b[k] == pytest.approx(a[k], rel=1e-5), (name, a["step"], k)


@pytest.mark.parametrize("method", ["mocov3", "dino", "barlowtwins"])
def test_ser_flops_overhead_at_the_paper_setting(method):
    """ViT-S/16, 224 px, 256 images per rank, b2 = 1%: the paper reports 1.008x; counted on the meta device.
    Within 1% of 1 either way: the [CLS] joining after block 3 saves a little in blocks 1-3, and the b2
    grids, drawn at random (196 x U(0.7, 1.3) tokens), add or save about as much at a given step."""
    result = pretrain.main(f"--method {method} --ser --data /datasets/imagenet --batch-size 256 --count-flops".split())
    assert result["arch"] == "vit_small" and result["img_size"] == 224
    assert 0.99 < result["ratio"] <= 1.01
    assert 50 < result["base_gflops_per_image"] < 80  # 2 views x 3 x 9.2 GFLOPs (+ teacher forwards)


def test_pretrain_checkpoint_loads_as_the_evaluated_backbone(tmp_path):
    run("--method dino --stop-at-step 2", tmp_path)  # step 0 has lr 0: the student moves from step 1 on
    from_ckpt = vit.load_backbone(tmp_path / "checkpoint.pth")  # DINO evaluates its teacher
    export = vit.load_backbone(tmp_path / "backbone.pth")
    assert from_ckpt.arch == export.arch
    for k, v in export.state_dict().items():
        assert torch.equal(v, from_ckpt.state_dict()[k])
    student = vit.load_backbone(tmp_path / "checkpoint.pth", key="student")
    assert not torch.equal(student.blocks[0].attn.qkv.weight, export.blocks[0].attn.qkv.weight)


def test_explicit_addon_flags_are_kept(tmp_path):
    assert config("--method mocov3 --essl --equiv-lambda 1.0", tmp_path).equiv_lambda == 1.0
    assert config("--method dino --equimod --equiv-tau 0.4", tmp_path).equiv_tau == 0.4
    assert config("--method dino --ser --equiv-layer 2", tmp_path).equiv_lambda == pretrain.SER_DEFAULTS["dino"][0]
    assert config("--method dino --essl", tmp_path).equiv_lambda == 0.4


def test_dino_centre_is_updated_once_per_step(tmp_path, monkeypatch):
    calls = []
    original = losses.DINOLoss.update_center
    monkeypatch.setattr(losses.DINOLoss, "update_center", lambda self, t: (calls.append(1), original(self, t))[1])
    ckpt = run("--method dino --stop-at-step 2", tmp_path)
    assert len(calls) == 2 and ckpt["dino_loss"]["center"].abs().sum() > 0


def test_resume_refuses_changed_settings(tmp_path):
    run("--method byol --stop-at-step 1", tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["precision_used"] == "fp32"  # 'auto' resolved
    with pytest.raises(SystemExit, match="lr 0.0015 \\(now 0.001\\)"):
        run("--method byol --lr 0.001", tmp_path)
    with pytest.raises(SystemExit, match="--stop-at-step 1 is not after the resumed step 1"):
        run("--method byol --stop-at-step 1", tmp_path)
    run("--method byol --stop-at-step 2 --num-workers 1", tmp_path)  # runtime options may change


def test_knn_monitor_reports_initialisation_and_epochs(tmp_path, capsys):
    run("--method simclr --knn-every 1 --knn-train-size 16 --knn-val-size 16", tmp_path)
    knn = [row for row in read_log(tmp_path) if "knn_top1" in row]
    assert [row["step"] for row in knn] == [0, 2] and all(0 <= row["knn_top1"] <= 100 for row in knn)
    assert all(row["knn_images"] == [16, 16] for row in knn)  # bank and val images
    # The last lines say what happened and what to run next, from the whole log (resumes included).
    first, last = knn[0]["knn_top1"], knn[-1]["knn_top1"]
    out = capsys.readouterr().out
    steps = [line for line in out.splitlines() if line.startswith("epoch 0 step ")]
    assert steps[0].endswith("img/s with warm-up") and "ETA" in steps[1]  # no ETA from a warm-up step
    assert f"done: k-NN top-1 {first:.1f} -> {last:.1f} ({last - first:+.1f}) in " in out
    assert f"backbone: {tmp_path / 'backbone.pth'}" in out and "next: python linear_eval.py --pretrained" in out
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "epoch": 1, "knn_top1": last + 10.0, "knn_images": [16, 16]}) + "\n")
    assert f"-> {last + 10:.1f} ({last + 10 - first:+.1f})" in pretrain.run_summary(str(tmp_path), 60)
    # Every --knn-every epochs, and the last one whatever the count (2 steps an epoch here).
    run("--method simclr --epochs 3 --knn-every 2 --knn-train-size 16 --knn-val-size 16", tmp_path / "every2")
    assert [row["step"] for row in read_log(tmp_path / "every2") if "knn_top1" in row] == [0, 4, 6]


def test_knn_monitor_survives_stops_at_epoch_ends(tmp_path, capsys, monkeypatch):
    """A --stop-at-step on an epoch's last step still runs that epoch's monitor; a signal there skips it (its grace
    time is short) and the resumed run catches up before its first step."""
    flags = "--method simclr --epochs 3 --knn-every 1 --knn-train-size 16 --knn-val-size 16"  # 2 steps an epoch
    knn_steps = lambda: [row["step"] for row in read_log(tmp_path) if "knn_top1" in row]  # noqa: E731
    run(flags + " --stop-at-step 2", tmp_path)
    assert knn_steps() == [0, 2] and "rerun without --stop-at-step (or with a later one) to resume" in \
        capsys.readouterr().out
    polls = iter([0, signal.SIGTERM])  # a signal after step 4, an epoch's last
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as stop:
        patch.setattr(augment.Interrupt, "poll", lambda self: next(polls))
        run(flags, tmp_path)
    assert stop.value.code == 143 and knn_steps() == [0, 2]
    run(flags, tmp_path)
    assert knn_steps() == [0, 2, 4, 6]
    out = capsys.readouterr().out
    assert "resumed from" in out and "epoch 1: k-NN top-1" in out and " min since the resume at step 4; " in out



def test_knn_monitor_keeps_the_built_in_bank_and_scores_it_as_rendered(tmp_path, monkeypatch):
    """The built-in bank and val images are rendered once and kept as tensors (no workers), and score
    exactly as the same images rendered on every pass."""
    args = config("--method simclr --knn-every 1 --knn-train-size 24 --knn-val-size 16", tmp_path)
    backbone = tiny_vit(seed=0, depth=2, num_heads=2).eval()
    kept = pretrain.knn_data(args, 0, 1)
    assert all(isinstance(loader.dataset.dataset, TensorDataset) and loader.num_workers == 0 for loader in kept[:2])
    monkeypatch.setattr(pretrain, "KNN_KEEP_BYTES", 0)
    rendered = pretrain.knn_data(args, 0, 1)
    assert not isinstance(rendered[0].dataset.dataset, TensorDataset)
    cpu = torch.device("cpu")
    assert pretrain.knn_eval(backbone, *kept, cpu) == pretrain.knn_eval(backbone, *rendered, cpu)

def test_compile_keeps_checkpoint_keys_bare(tmp_path, monkeypatch):
    """--compile wiring: a compiled step runs and the checkpoint has no '_orig_mod.' prefixes. The eager
    backend traces with dynamo but skips code generation, which keeps the test fast."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    ckpt = run("--method dino --ser --equiv-layer 2 --compile --stop-at-step 1", tmp_path)
    assert not any("_orig_mod" in k for part in ("student", "teacher") for k in ckpt[part])
    assert vit.load_backbone(tmp_path / "backbone.pth").depth == 3


def test_compile_sees_only_fixed_training_shapes(tmp_path, monkeypatch):
    """--compile: only the b1 calls of student and teacher (one fixed shape) reach the compiled function;
    SER's b2 views (a new grid every step) and the k-NN monitor (eval mode) run eagerly, so nothing
    recompiles during a run."""
    seen = []

    def recording_compile(fn, **kw):
        def compiled(x, layer=None):
            seen.append(tuple(x.shape))
            return fn(x, layer=layer)
        return compiled

    monkeypatch.setattr(torch, "compile", recording_compile)
    run("--method dino --ser --equiv-layer 2 --ser-ratio 0.01 --compile --knn-every 1 --knn-train-size 16 "
        "--knn-val-size 8", tmp_path)
    n_b1 = 2 * (16 - 2)  # two views of the 14 b1 images per step; b2 holds 2 of the 16
    assert seen == [(n_b1, 3, 32, 32)] * 4  # student and teacher, 2 steps (one epoch), k-NN before and after


def test_benchmark_neither_resumes_nor_changes_a_run(tmp_path):
    """A benchmark pointed at a training run's directory starts from initialisation (any method) and
    leaves the run's checkpoint and config untouched."""
    ckpt = run("--method dino --stop-at-step 1", tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in ("checkpoint.pth", "config.json")}
    result = pretrain.benchmark(config("--method mocov3 --ser --equiv-layer 2 --benchmark 1", tmp_path))
    assert result["method"] == "mocov3" and ckpt["step"] == 1
    assert all((tmp_path / f).read_bytes() == b for f, b in before.items())


def test_equimod_plain_view_joins_the_global_call(tmp_path, monkeypatch):
    """EquiMod's un-augmented view shares the global views' backbone call (one call per resolution), and
    the add-on sees exactly what separate calls would give."""
    args = config("--method simclr --equimod --equiv-layer 2", tmp_path)
    torch.manual_seed(0)
    student, _ = pretrain.build_models(args)
    views, plain = [torch.randn(4, 3, 32, 32) for _ in range(2)], torch.randn(4, 3, 32, 32)
    params = torch.randn(8, 18)
    calls = []
    original = student.backbone.forward_features
    monkeypatch.setattr(student.backbone, "forward_features",
                        lambda x, layer=None: calls.append(x.shape[0]) or original(x, layer=layer))
    batch = pretrain.StepBatch(key=(0, 0), batch_size=4, streams=views, stream_positions=[torch.arange(4)] * 2,
                               view_params=[], plain=plain, equimod_params=params)
    y_t, y_hat_t = student(batch)["equimod"]
    assert calls == [12]
    h_views = original(torch.cat(views), layer=2)["cls_at_layer"]
    h_plain = original(plain, layer=2)["cls_at_layer"]
    want_t, want_hat_t = student.addon_head(h_plain, h_views, params)
    assert torch.allclose(y_t, want_t, atol=1e-5) and torch.allclose(y_hat_t, want_hat_t, atol=1e-5)


def test_run_summary_after_a_resume_that_changed_the_knn_monitor(tmp_path, capsys):
    """A resume may change the monitor's sizes or turn it off: the summary never says 'off' while records exist,
    reports a lone comparable record as such, and names the step of the last record when it is not the run's last."""
    first = "--method simclr --epochs 2 --knn-every 1 --knn-train-size 16 --knn-val-size 16"  # 2 steps an epoch
    for out, resumed in (("sizes", "--knn-every 1 --knn-train-size 16 --knn-val-size 8"), ("off", "--knn-every 0")):
        run(first + " --stop-at-step 2", tmp_path / out)
        run(f"--method simclr --epochs 2 {resumed}", tmp_path / out)
    out = capsys.readouterr().out
    knn = {d: {row["step"]: row["knn_top1"] for row in read_log(tmp_path / d) if "knn_top1" in row}
           for d in ("sizes", "off")}
    assert list(knn["sizes"]) == [0, 2, 4] and list(knn["off"]) == [0, 2]
    assert (f"done: k-NN top-1 {knn['sizes'][4]:.1f} at step 4 (before it, the monitor had other --knn-train-size / "
            "--knn-val-size) in ") in out
    a, b = knn["off"][0], knn["off"][2]
    assert f"done: k-NN top-1 {a:.1f} -> {b:.1f} ({b - a:+.1f}), last measured at step 2 of 4 in " in out
    (tmp_path / "one").mkdir()
    vit.append_jsonl(tmp_path / "one" / "log.jsonl", {"step": 0, "knn_top1": 20.0, "knn_images": [16, 16]})
    assert pretrain.run_summary(str(tmp_path / "one"), 60, 0, 4).startswith("done: k-NN top-1 20.0 at step 0 of 4 in")
    assert pretrain.run_summary(str(tmp_path / "none"), 60, 0, 4).startswith("done: k-NN monitor off in")
    (tmp_path / "cut").mkdir()  # a log that lost its step-0 record before the resume
    for step, top1 in ((2, 25.0), (4, 30.0)):
        vit.append_jsonl(tmp_path / "cut" / "log.jsonl", {"step": step, "knn_top1": top1, "knn_images": [16, 16]})
    assert pretrain.run_summary(str(tmp_path / "cut"), 60, 2, 4).startswith("done: k-NN top-1 25.0 -> 30.0 (+5.0) "
                                                                            "since step 2 in")


def test_resume_refuses_altered_checkpoint_values(tmp_path):
    """Values save_checkpoint never writes stop the resume in one line naming checkpoint.pth (they resumed at the
    wrong step, or crashed in the schedule, the seed or the optimizer), and so does an emptied optimizer state."""
    run("--method byol --stop-at-step 1", tmp_path)  # 2 steps in all
    good = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    tampered = [("step", True, "its step is True, not a step of this run (0..2)"),
                ("step", -3, "its step is -3, not a step"), ("step", 3, "its step is 3, not a step"),
                ("step", "1", "its step is '1', not a step"), ("step", 1.0, "its step is 1.0, not a step"),
                ("step", torch.tensor(1), "its step is a Tensor, not a step"),
                ("train_images", "32", "its train_images is '32', not a count of images"),
                ("total_steps", 4, "its total_steps is 4, not this run's 2"),
                ("precision", None, "its precision is None, not bf16 or fp16 or fp32"),
                ("joint_heads", None, "its joint_heads is None, not True or False"),
                ("joint_heads", "yes", "its joint_heads is 'yes', not True or False"),
                ("optimizer", {**good["optimizer"], "state": {}}, "its optimizer state is empty at step 1 (AdamW's")]
    for key, value, message in tampered:
        torch.save({**good, key: value}, tmp_path / "checkpoint.pth")
        with pytest.raises(SystemExit) as stop:
            run("--method byol --stop-at-step 2", tmp_path)
        line = str(stop.value)
        assert line.startswith(f"error: {tmp_path / 'checkpoint.pth'}: {message}") and "\n" not in line
        assert line.endswith("; move it away or use another --output-dir")
    torch.save(good, tmp_path / "checkpoint.pth")
    assert run("--method byol --stop-at-step 2", tmp_path)["step"] == 2


@pytest.mark.parametrize("flags,users", [("--stop-at-step 1", "a training run, not --benchmark or --count-flops"),
                                         ("--log-every 5", "a training run, not --benchmark or --count-flops"),
                                         ("--knn-every 1", "a training run, not --benchmark or --count-flops"),
                                         ("--knn-train-size 5", "the k-NN monitor \\(--knn-every above 0, a "
                                                                "training run\\)")])
def test_benchmark_refuses_the_flags_of_a_training_run(flags, users, tmp_path):
    config("--method byol --benchmark 1 --knn-every 0", tmp_path)  # the monitor off, as a benchmark runs anyway
    with pytest.raises(SystemExit, match=f"^error: {flags.split()[0]} is read only with {users}; this run would "
                                         "ignore it: drop it$"):
        config(f"--method byol --benchmark 1 {flags}", tmp_path)


def test_a_stop_signal_is_said_at_once_and_a_finished_run_keeps_its_config(tmp_path, capfd):
    """The loop stops on a signal only after its step (and a due k-NN pass, minutes on real data): the signal is said
    when it arrives, once. A rerun of a finished run, with other runtime options, leaves config.json as it ran."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        interrupt = augment.Interrupt()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.poll() == signal.SIGINT
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    err = capfd.readouterr().err
    assert err == "SIGTERM: saving a checkpoint and stopping after this step\n", err
    run("--method byol", tmp_path)
    config = (tmp_path / "config.json").read_bytes()
    run("--method byol --log-every 5", tmp_path)
    assert (tmp_path / "config.json").read_bytes() == config


def test_a_log_that_is_a_pipe_is_refused_on_resume(tmp_path):
    """A resume reads log.jsonl to cut it back to the checkpoint: a FIFO there would block it for good, a link to
    /dev/zero fill the memory."""
    run("--method byol --stop-at-step 1", tmp_path)
    (tmp_path / "log.jsonl").unlink()
    os.mkfifo(tmp_path / "log.jsonl")
    with no_hang("the resume waited on a pipe"), pytest.raises(
            SystemExit, match="^error: could not write .*log.jsonl: not a regular file \\(a pipe or a device\\); "
                              "move it away$"):
        run("--method byol", tmp_path)
    (tmp_path / "log.jsonl").unlink()
    (tmp_path / "log.jsonl").write_text("[" * 100_000 + "\n")  # too deep for json: not a record, not a traceback
    run("--method byol", tmp_path)
    assert [r["step"] for r in read_log(tmp_path)] == [2]


def test_a_benchmark_keeps_the_results_of_another_configuration(tmp_path):
    """benchmark.json records the settings it measured: a rerun of them replaces it, other ones are refused."""
    for _ in range(2):
        pretrain.benchmark(config("--method byol --benchmark 1 --peak-tflops 1", tmp_path))
    with pytest.raises(SystemExit, match="^error: --output-dir .* holds the benchmark.json of --method byol "
                                         "\\(settings [0-9a-f]{12}\\), this run's \\(--method byol --ser"):
        pretrain.benchmark(config("--method byol --ser --equiv-layer 2 --benchmark 1 --peak-tflops 1", tmp_path))


def test_benchmark_json_that_cannot_be_written_stops_in_one_line(tmp_path, monkeypatch):
    def full_disk(path, state):
        raise OSError(28, "No space left on device", path)
    monkeypatch.setattr(vit, "save_atomic", full_disk)
    with pytest.raises(SystemExit, match="^error: could not write .*benchmark.json: No space left on device$"):
        pretrain.benchmark(config("--method byol --benchmark 1 --peak-tflops 1", tmp_path))


# ================================================================================================
# linear_eval.py: linear probe and k-NN
# ================================================================================================

def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    num_classes, dim = 5, 32
    means = 3 * torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(600) % num_classes
    features = means[labels] + 0.3 * torch.randn(600, dim, generator=g)  # (600, 32)
    loader = linear_eval.FeatureLoader(features[:500], labels[:500], batch_size=50, rank=0, world=1)
    torch.manual_seed(0)
    sweep = linear_eval.LinearSweep(dim, num_classes, 2)
    linear_eval.train_sweep(sweep, loader, [0.1, 1.0], epochs=10, device=torch.device("cpu"), log=lambda *a: None)
    accuracies = linear_eval.evaluate_sweep(sweep, features[500:], labels[500:])
    assert max(a["top1"] for a in accuracies) == 100.0
    assert all(a["top5"] is None for a in accuracies)  # 5 classes: any top-5 holds the true one


@pytest.mark.parametrize("num_classes", [3, 5, 6])
def test_top5_is_none_with_at_most_5_classes(num_classes):
    """Any 5 of <= 5 classes hold the true one: the probe's and k-NN's top-5 are None there, not a 100% that says
    nothing, and the log lines say so; with 6 classes a ranking can miss."""
    torch.manual_seed(0)
    labels = torch.arange(8) % num_classes
    loader = augment.make_loader(linear_eval.WithIndex(TensorDataset(torch.randn(8, 3, 32, 32), labels)), 4, 0, 1, 0)
    knn = linear_eval.knn_eval(tiny_vit(seed=0, depth=2, num_heads=2).eval(), loader, loader, num_classes,
                               torch.device("cpu"), k=3)
    probe = linear_eval.evaluate_sweep(linear_eval.LinearSweep(16, num_classes, 2), torch.randn(8, 16), labels)
    for acc in [knn, *probe]:
        if num_classes <= 5:
            assert acc["top5"] is None and linear_eval.top5_text(acc["top5"]) == "top-5 n/a (<= 5 classes)"
        else:
            assert 0 <= acc["top1"] <= acc["top5"] <= 100
            assert linear_eval.top5_text(acc["top5"]) == f"top-5 {acc['top5']:.2f}"


def test_feature_loader_shards_cover_the_set():
    features, labels = torch.arange(10.0)[:, None], torch.arange(10)
    shards = [linear_eval.FeatureLoader(features, labels, batch_size=2, rank=r, world=2, seed=3) for r in range(2)]
    seen = [torch.cat([y for _, y in shard]) for shard in shards]
    assert [len(shard) for shard in shards] == [3, 3] and sorted(torch.cat(seen).tolist()) == list(range(10))
    shards[0].sampler.set_epoch(1)
    assert not torch.equal(torch.cat([y for _, y in shards[0]]), seen[0])  # reshuffled per epoch


def sweep_worker(rank, world, features, labels, out_dir):
    losses.init_distributed()
    torch.manual_seed(0)
    sweep = linear_eval.LinearSweep(features.shape[1], 3, 2)
    loader = linear_eval.FeatureLoader(features, labels, batch_size=2, rank=rank, world=world, seed=1)
    loss = linear_eval.train_sweep(sweep, loader, [0.1, 1.0], epochs=3, device=torch.device("cpu"), log=lambda *a: None)
    torch.save((sweep.state_dict(), loss), os.path.join(out_dir, f"rank{rank}.pth"))
    losses.finish_distributed()


@pytest.mark.slow
def test_cached_probe_trains_alike_on_any_number_of_ranks(tmp_path):
    """7 features in global batches of 4 (4, then 3) over 2 ranks: each rank takes its part of every global batch,
    without the padding (repeated rows) of a DistributedSampler, and DDP's mean is weighed to the global batch's."""
    features, labels = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)), torch.arange(7) % 3
    spawn(sweep_worker, features, labels, str(tmp_path))
    torch.manual_seed(0)
    sweep = linear_eval.LinearSweep(5, 3, 2)
    loader = linear_eval.FeatureLoader(features, labels, batch_size=4, rank=0, world=1, seed=1)
    loss = linear_eval.train_sweep(sweep, loader, [0.1, 1.0], epochs=3, device=torch.device("cpu"), log=lambda *a: None)
    for rank in range(2):
        state, ddp_loss = torch.load(tmp_path / f"rank{rank}.pth")
        for k, v in sweep.state_dict().items():
            torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6)
        assert ddp_loss == pytest.approx(loss, rel=1e-5)


def test_linear_classifier_init():
    torch.manual_seed(0)
    head = linear_eval.LinearClassifier(2000, 100)
    assert abs(head.linear.weight.std().item() - 0.01) < 5e-4 and not head.linear.bias.any()


def hand_knn(train, train_labels, query, num_classes, k, T):
    """Plain-Python weighted k-NN: rank classes by sum of exp(cos / T) over the k nearest, ties to the smaller class."""
    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.hypot(*a) / math.hypot(*b)
    sims = sorted(((cos(query, t), y) for t, y in zip(train, train_labels)), reverse=True)[:k]
    votes = [0.0] * num_classes
    for s, y in sims:
        votes[y] += math.exp(s / T)
    return sorted(range(num_classes), key=lambda c: (-votes[c], c))[:5]


def test_knn_matches_hand_computation():
    # Unnormalised on purpose: knn_classify must normalise. Train points at 0, 90, 45, -45 and 180 degrees.
    train = [(2.0, 0.0), (0.0, 3.0), (1.0, 1.0), (1.0, -1.0), (-1.0, 0.0)]
    train_labels = [0, 1, 2, 3, 4]
    queries = [(1.0, 0.0), (-1.0, 0.2), (0.9, 0.1)]
    query_labels = torch.tensor([3, 4, 5])  # top-5 hit, top-1 hit, miss (class 5 gets no vote)
    num_classes, k, T = 6, 3, 0.5
    ranked = linear_eval.knn_classify(torch.tensor(train), torch.tensor(train_labels), torch.tensor(queries),
                             num_classes, k=k, T=T, chunk_size=2)  # chunking must not matter
    assert ranked.shape == (3, 5)
    for row, q in zip(ranked.tolist(), queries):
        assert row == hand_knn(train, train_labels, q, num_classes, k, T)
    # Query 1: classes 2 and 3 receive exactly equal votes (45 and -45 degrees): the smaller index ranks first,
    # and the vote-less classes 1, 4 complete the top-5 in index order.
    assert ranked[0].tolist() == [0, 2, 3, 1, 4]
    acc = linear_eval.topk_accuracy(ranked, query_labels, num_classes)
    assert acc["top1"] == pytest.approx(100 / 3) and acc["top5"] == pytest.approx(200 / 3)


def test_knn_vote_weights():
    # Two neighbours of class 0 at cos 0.6 outvote one of class 1 at cos 0.8 only if 2 exp(0.6/T) > exp(0.8/T).
    train = torch.tensor([[0.6, 0.8], [0.6, -0.8], [0.8, 0.6]])
    labels = torch.tensor([0, 0, 1])
    query = torch.tensor([[1.0, 0.0]])
    for T, winner in [(0.07, 1), (1.0, 0)]:  # exp(0.2/0.07) = 17.4 > 2, exp(0.2) = 1.22 < 2
        assert linear_eval.knn_classify(train, labels, query, 2, k=3, T=T)[0, 0].item() == winner
    # Beyond float32 (exp(1/0.012) = 1.4e36, 600 of them): the votes are scaled, not all inf with class 0 winning.
    near = torch.tensor([[1.0, 0.0]]) + 1e-4 * torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    labels = (torch.arange(1000) < 600).long()  # 600 of class 1
    assert linear_eval.knn_classify(near, labels, query, 2, k=1000, T=0.012)[0, 0].item() == 1


def test_extract_features_matches_intermediate_layers():
    model = tiny_vit(seed=0, depth=2, num_heads=2).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        blocks = model.get_intermediate_layers(x, 2)
        plain = linear_eval.extract_features(model, x, n_last_blocks=2)
        pooled = linear_eval.extract_features(model, x, n_last_blocks=2, avgpool=True)
        final_cls = model(x)
    assert plain.shape == (3, 2 * 64) and pooled.shape == (3, 3 * 64)
    torch.testing.assert_close(plain, torch.cat([blocks[0][:, 0], blocks[1][:, 0]], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(pooled[:, 128:], blocks[1][:, 1:].mean(1), rtol=0, atol=0)
    torch.testing.assert_close(plain[:, 64:], final_cls)  # run() takes the k-NN features from this slice


def test_extract_features_late_cls():
    model = tiny_vit(seed=0, depth=3, num_heads=2, cls_after_block=1).eval()
    with torch.no_grad():
        assert linear_eval.extract_features(model, torch.randn(2, 3, 32, 32), n_last_blocks=2).shape == (2, 128)


def test_frozen_check_catches_a_modified_backbone():
    model = tiny_vit(seed=0, depth=2, num_heads=2).eval()
    reference = linear_eval.snapshot(model)
    linear_eval.assert_unchanged(model, reference)
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0, 0] += 1e-6
    with pytest.raises(RuntimeError, match="blocks.1.mlp.fc1.weight"):
        linear_eval.assert_unchanged(model, reference)


def test_probe_round_trip(tmp_path):
    model = tiny_vit(seed=0, depth=2, num_heads=2).eval()
    torch.manual_seed(1)
    head = linear_eval.LinearClassifier(3 * 64, 7)
    path = tmp_path / "linear_probe.pth"
    linear_eval.save_probe(path, model, head, 2, True, 7, 32, "synthetic", lr=0.1)
    backbone, classifier, meta = linear_eval.load_probe(path)
    assert not backbone.training and not classifier.training
    assert meta == dict(n_last_blocks=2, avgpool=True, num_classes=7, img_size=32, data="synthetic", lr=0.1)
    x = torch.randn(4, 3, 32, 32)
    expected = linear_eval.predict(model, head, x, 2, True)
    assert expected.shape == (4, 7)
    assert torch.equal(linear_eval.predict(backbone, classifier, x, meta["n_last_blocks"], meta["avgpool"]), expected)


def test_load_probe_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="linear_probe.pth"):
        linear_eval.load_probe(tmp_path / "missing.pth")
    torch.save({"backbone": {}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing"):
        linear_eval.load_probe(tmp_path / "bad.pth")


def probe_run(probe, tmp_path):
    """robustness_eval's clean task on `probe`, as a user runs it from Python."""
    return robustness_eval.main(robustness_eval.get_args_parser().parse_args([
        "--probe", str(probe), "--tasks", "clean", "--num-images", "2", "--num-workers", "0",
        "--output-dir", str(tmp_path / "rob")]))


def test_probe_whose_head_disagrees_with_its_num_classes_is_refused(tmp_path):
    probe = tmp_path / "linear_probe.pth"
    model = tiny_vit(seed=0, depth=2, num_heads=2).eval()
    linear_eval.save_probe(probe, model, linear_eval.LinearClassifier(64, 10), 1, False, 6, 32, "synthetic")
    with pytest.raises(SystemExit, match=f"^--probe: {probe}: the head predicts 10 classes but its metadata says "
                                         "num_classes 6; rerun linear_eval.py"):  # --data has 6: it would run
        probe_run(probe, tmp_path)


@pytest.mark.parametrize("edit, message", [
    ({"img_size": "32"}, r"its metadata has img_size '32' \(n_last_blocks, num_classes and img_size are positive"),
    ({"n_last_blocks": "1", "avgpool": "False"}, "its metadata has n_last_blocks '1', avgpool 'False' "),
    ({"num_classes": 6.0}, "its metadata has num_classes 6.0 "),
    ({"img_size": 36}, "its img_size 36 is not a multiple of its backbone's patch size 8"),
    ({"cls_after_block": 1, "n_last_blocks": 2}, r"its n_last_blocks 2 is more than its backbone's blocks that "
                                                 r"carry \[CLS\] \(1\)")])
def test_probe_metadata_of_the_wrong_type_or_range_is_refused_in_one_line(tmp_path, edit, message):
    probe = tmp_path / "linear_probe.pth"
    split = edit.get("cls_after_block", 0)  # SER's: [CLS] only in the blocks after it
    model = tiny_vit(seed=0, depth=2, num_heads=2, cls_after_block=split).eval()
    meta = {**dict(n_last_blocks=1, avgpool=False, num_classes=6, img_size=32, data="synthetic"),
            **{k: v for k, v in edit.items() if k != "cls_after_block"}}
    head = linear_eval.LinearClassifier(128 if split else 64, 6)  # as wide as 2 blocks: the features agree
    linear_eval.save_probe(probe, model, head, **meta)
    with pytest.raises(SystemExit, match=f"^--probe: {probe}: {message}.*rerun linear_eval.py to write it again$"):
        probe_run(probe, tmp_path)


@pytest.mark.parametrize("extra", [
    ["--cached", "--epochs", "5", "--n-last-blocks", "2"],  # 2 x 64-d [CLS]
    ["--epochs", "1", "--n-last-blocks", "1", "--avgpool"],  # augmented path; [CLS] + avgpool, 128-d too
])
def test_end_to_end(tmp_path, extra):
    model = tiny_vit(seed=0, depth=2, num_heads=2).eval()
    export = tmp_path / "backbone.pth"
    torch.save({"arch": model.arch, "backbone": model.state_dict()}, export)
    out = tmp_path / "out"
    results = linear_eval.main(["--pretrained", str(export), "--data", "synthetic", "--img-size", "32",
                       "--train-length", "300", "--val-length", "100", "--batch-size", "64", "--lrs", "0.03", "0.3",
                       "--num-workers", "0", "--output-dir", str(out), *extra])
    written = json.loads((out / "linear_eval.json").read_text())
    assert written["linear"] == results["linear"] and len(written["sweep"]) == 2
    assert written["num_fit"] == 270 and written["num_holdout"] == 30 and written["num_val"] == 100
    assert 0 <= written["linear"]["top1"] <= written["linear"]["top5"] <= 100
    assert 0 <= written["knn"]["top1"] <= written["knn"]["top5"] <= 100
    backbone, classifier, meta = linear_eval.load_probe(out / "linear_probe.pth")
    assert classifier.linear.in_features == written["num_features"] == 128
    assert meta["classes"] == augment.build_dataset("synthetic", "train").classes  # robustness_eval compares them
    assert meta["top1"] == written["linear"]["top1"]


def test_diverged_heads_are_left_out_and_the_k_used_is_reported(tmp_path, capsys):
    """A head whose lr made its weights non-finite never wins the selection (an argmax of NaN logits is a made-up
    accuracy), all of them diverging is an error, and a --knn-k above the bank is reported as the k it ran with."""
    model = tiny_vit(seed=0, depth=2, num_heads=2).eval()
    torch.save({"arch": model.arch, "backbone": model.state_dict()}, tmp_path / "backbone.pth")
    common = ["--pretrained", str(tmp_path / "backbone.pth"), "--img-size", "32", "--train-length", "64", "--val-length",
              "32", "--batch-size", "32", "--cached", "--epochs", "5", "--num-workers", "0"]
    results = linear_eval.main(common + ["--lrs", "0.03", "3e38", "--knn-k", "1000", "--output-dir", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert results["linear"]["lr"] == 0.03 and "lr 3e+38 diverged (non-finite weights or logits)" in out, out
    assert results["knn"]["k"] == 64  # the whole bank
    with pytest.raises(SystemExit, match="--lrs 3e\\+38: every head diverged \\(non-finite weights or logits\\); lower"):
        linear_eval.main(common + ["--lrs", "3e38", "--output-dir", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="--lrs must be below 2.72e\\+39 \\(times --batch-size/256"):  # SGD's float
        linear_eval.main(common + ["--lrs", "0.03", "3e39", "--output-dir", str(tmp_path / "c")])
    with torch.no_grad():  # features of 1e18: one step at lr 1000 leaves finite weights whose logits overflow
        model.norm.weight.fill_(1e18)
    torch.save({"arch": model.arch, "backbone": model.state_dict()}, tmp_path / "backbone.pth")
    one_step = [a if a != "5" else "1" for a in common] + ["--batch-size", "58"]  # the fit split in one batch
    with pytest.raises(SystemExit, match="--lrs 1000: every head diverged \\(non-finite weights or logits\\)"):
        linear_eval.main(one_step + ["--lrs", "1000", "--output-dir", str(tmp_path / "d")])


def test_a_rerun_keeps_the_k_nn_result_and_random_inits_are_told_apart(tmp_path):
    """--knn-k 0 in a rerun would drop the earlier k-NN numbers; a random init of another --depth is other weights."""
    flags = ["--random-init", "--arch", "vit_tiny", "--depth", "1", "--patch-size", "8", "--img-size", "32",
             "--train-length", "40", "--val-length", "20", "--batch-size", "20", "--cached", "--epochs", "1",
             "--lrs", "0.1", "--num-workers", "0", "--output-dir", str(tmp_path)]
    linear_eval.main(flags)
    with pytest.raises(SystemExit, match="holds linear_eval.json results of knn, which this run would drop"):
        linear_eval.main(flags + ["--knn-k", "0"])
    with pytest.raises(SystemExit, match="holds the linear_eval.json of random init vit_tiny \\(weights [0-9a-f]{12}\\), "
                                         "this run's \\(random init vit_tiny \\(weights"):
        linear_eval.main(flags + ["--depth", "2"])
    linear_eval.main(flags)  # the same init again: a rerun


def test_an_output_folder_holds_one_run_at_a_time(tmp_path, monkeypatch):
    """Another process (a requeued job while the first still runs) waits for the folder's lock, then is refused in
    one line; this process's later runs share the lock it holds, and the lock goes with the process that held it."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {REPO!r}); import vit; "
                               f"vit.make_output_dir({str(out)!r}, lock=True); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(vit, "LOCK_WAIT_S", 1)
        with pytest.raises(SystemExit, match=f"^--output-dir {out} is in use by another run \\(it holds .*\\.lock\\): "
                                             "wait for it to end or choose another --output-dir$"):
            vit.make_output_dir(str(out), lock=True)
    finally:
        holder.kill()
        holder.wait()
    vit.make_output_dir(str(out), lock=True)  # the holder is gone
    vit.make_output_dir(str(out), lock=True)  # and this process holds it now: its next run goes on
    for odd in ("folder", "pipe"):  # a .lock that is no file: no lock, and no hang
        (tmp_path / odd).mkdir()
        (tmp_path / odd / ".lock").mkdir() if odd == "folder" else os.mkfifo(tmp_path / odd / ".lock")
        vit.make_output_dir(str(tmp_path / odd), lock=True)


def test_evaluations_keep_the_results_of_other_weights_in_their_folder(tmp_path, tiny_probe):
    """The default output folders are shared (runs/linear, runs/robustness): an evaluation of other weights refuses
    a folder holding another's results, before any work, where DINO's scripts would overwrite them; a rerun on the
    same file replaces its own. A results file that is not JSON does not block."""
    model = tiny_vit(seed=0, depth=2, num_heads=2).eval()
    for name in ("a", "b"):
        torch.save({"arch": model.arch, "backbone": model.state_dict()}, tmp_path / f"{name}.pth")
    common = ["--img-size", "32", "--train-length", "64", "--val-length", "32", "--batch-size", "32", "--cached",
              "--epochs", "1", "--lrs", "0.03", "--num-workers", "0", "--output-dir", str(tmp_path / "linear")]
    first = linear_eval.main(["--pretrained", str(tmp_path / "a.pth"), *common])
    assert first["source"] == [os.path.realpath(tmp_path / "a.pth")]
    written = (tmp_path / "linear" / "linear_eval.json").read_bytes()
    with pytest.raises(SystemExit, match=f"--output-dir {tmp_path / 'linear'} holds the linear_eval.json of "
                                         f"{tmp_path / 'a.pth'}, this run's \\(.*b.pth\\) would replace it: choose "
                                         "another --output-dir"):
        linear_eval.main(["--pretrained", str(tmp_path / "b.pth"), *common])
    assert (tmp_path / "linear" / "linear_eval.json").read_bytes() == written
    linear_eval.main(["--pretrained", os.path.relpath(tmp_path / "a.pth"), *common])  # the same file, written otherwise
    rob = ["--tasks", "clean", "--num-images", "6", "--img-size", "32", "--num-workers", "0", "--output-dir",
           str(tmp_path / "rob")]
    robustness_eval.main(robustness_eval.get_args_parser().parse_args(["--probe", tiny_probe, *rob]))
    other = tmp_path / "other_probe.pth"
    other.write_bytes(open(tiny_probe, "rb").read())
    with pytest.raises(SystemExit, match="holds the robustness.json of .*linear_probe.pth, this run's "
                                         "\\(.*other_probe.pth\\) would replace it"):
        robustness_eval.main(robustness_eval.get_args_parser().parse_args(["--probe", str(other), *rob]))
    # A comparison may replace one of fewer runs, as when runs/*/backbone.pth has one more; not one missing a run.
    table = tmp_path / "table"
    vit.make_output_dir(str(table), outputs=("robustness.json",), sources=["/r/a.pth"])
    (table / "robustness.json").write_text(json.dumps({"source": ["/r/a.pth"]}))
    vit.make_output_dir(str(table), outputs=("robustness.json",), sources=["/r/a.pth", "/r/b.pth"])
    (table / "robustness.json").write_text(json.dumps({"source": ["/r/a.pth", "/r/b.pth"]}))
    with pytest.raises(SystemExit, match="holds the robustness.json of /r/b.pth, this run's \\(/r/a.pth\\)"):
        vit.make_output_dir(str(table), outputs=("robustness.json",), sources=["/r/a.pth"])
    for unrelated in ("{", "[1]", "[" * 100_000):  # not ours
        (table / "robustness.json").write_text(unrelated)
        vit.make_output_dir(str(table), outputs=("robustness.json",), sources=[str(other)])
    (table / "robustness.json").unlink()
    os.mkfifo(table / "robustness.json")  # never opened: it would block
    vit.make_output_dir(str(table), outputs=("robustness.json",), sources=[str(other)])
    # Another network of the same file is another source.
    assert vit.weights_source(str(other), "student") == os.path.realpath(other) + " (student)"


def test_bad_flags_give_clear_errors(tmp_path):
    parser = linear_eval.get_args_parser()
    with pytest.raises(SystemExit, match="must be divisible by the world size 3"):
        linear_eval.check_args(parser.parse_args(["--batch-size", "256"]), world=3)
    with pytest.raises(SystemExit, match="^--batch-size must be at least 1, got 0$"):  # not a ZeroDivisionError
        linear_eval.check_args(parser.parse_args(["--batch-size", "0"]), world=1)
    with pytest.raises(SystemExit, match="--knn-temperature is read only with --knn-k above 0; .*drop it"):
        linear_eval.check_args(parser.parse_args(["--knn-k", "0", "--knn-temperature", "0.5"]), world=1)
    with pytest.raises(SystemExit, match="--checkpoint-key is read only with --pretrained"):
        linear_eval.check_args(parser.parse_args(["--random-init", "--arch", "vit_tiny", "--checkpoint-key", "x"]), 1)
    with pytest.raises(SystemExit, match="--random-init needs --arch"):
        linear_eval.main(["--random-init"])
    with pytest.raises(SystemExit, match="--pretrained"):
        linear_eval.main(["--pretrained", "/nonexistent/backbone.pth"])
    tiny = ["--random-init", "--arch", "vit_tiny", "--depth", "2", "--patch-size", "8"]
    with pytest.raises(SystemExit, match="--random-init --arch vit_tiny: img_size 30 is not divisible"):
        linear_eval.main(tiny + ["--img-size", "30"])
    with pytest.raises(SystemExit, match="--patch-size, --depth and --equiv-layer describe released weights"):
        linear_eval.main(["--pretrained", "backbone.pth", "--depth", "7"])  # ours record theirs: it would be ignored
    _write_png_tree(tmp_path / "one", "train", classes=("a",))
    _write_png_tree(tmp_path / "one", "val", classes=("a",))
    with pytest.raises(SystemExit, match="has one class: every accuracy would be 100%"):
        linear_eval.main(tiny + ["--img-size", "32", "--data", str(tmp_path / "one")])
    with pytest.raises(SystemExit, match="--img-size 36 is not a multiple of the backbone's patch size 8"):
        torch.save({"arch": tiny_vit().arch, "backbone": tiny_vit().state_dict()}, tmp_path / "backbone.pth")
        linear_eval.main(["--pretrained", str(tmp_path / "backbone.pth"), "--img-size", "36"])
    _write_png_tree(tmp_path / "one", "train", classes=("b",))  # 2 classes, 2 x 3 images: 6 train the heads
    _write_png_tree(tmp_path / "one", "val", classes=("b",))
    with pytest.raises(SystemExit, match="--batch-size 7 exceeds the 6 images the heads train on: pass at most 6"):
        linear_eval.main(tiny + ["--img-size", "32", "--data", str(tmp_path / "one"), "--holdout-fraction", "0",
                                 "--batch-size", "7", "--num-workers", "0", "--output-dir", str(tmp_path / "lin")])
    with pytest.raises(SystemExit, match="^--seed must be in 0..2\\^31-1"):
        linear_eval.check_args(parser.parse_args(["--seed", str(2**64)]), world=1)
    with pytest.raises(SystemExit, match=f"^--output-dir {tmp_path}/one/val/x is inside {tmp_path}/one/val, whose"):
        linear_eval.check_args(parser.parse_args(["--data", f"{tmp_path}/one", "--output-dir", f"{tmp_path}/one/val/x"]),
                               world=1)


@pytest.mark.parametrize("flag", ["--lrs 0.1 -1", "--lrs nan", "--depth 0", "--num-workers -1", "--epochs 0",
                                  "--knn-temperature 0", "--knn-k -1", "--holdout-fraction 1", "--n-last-blocks 0",
                                  "--train-length 2147483648", "--val-length 0"])
def test_out_of_range_linear_eval_flags_are_refused(flag):
    with pytest.raises(SystemExit, match=f"^{flag.split()[0]} must be "):
        linear_eval.check_args(linear_eval.get_args_parser().parse_args(flag.split()), world=1)



def test_class_names_of_the_splits_must_match(tmp_path):
    _write_png_tree(tmp_path, "train", classes=("a", "b"))
    _write_png_tree(tmp_path, "val", classes=("b", "c"))  # by position, val's 'b' would be scored as 'a'
    code, last, _ = run_script("linear_eval.py", "--random-init", "--arch", "vit_tiny", "--img-size", "32",
                               "--data", tmp_path, "--num-workers", "0", "--output-dir", tmp_path / "out")
    assert code == 1 and "different classes (only in train: ['a'], only in val: ['c'])" in last
    # é composed in train/, decomposed in val/ (as some file systems store it): names that print alike
    with pytest.raises(ValueError, match=r"train's \['\\xe9'\] are val's \['e\\u0301'\] in another Unicode form: "
                                         "rename one split's folders"):
        augment.check_same_classes(SimpleNamespace(classes=["\u00e9"]), SimpleNamespace(classes=["e\u0301"]), "nf")
    with pytest.raises(SystemExit, match="different classes"):  # the k-NN monitor of pretrain.py too
        args = config(f"--data {tmp_path} --warmup-epochs 0", tmp_path / "run")
        pretrain.knn_data(args, 0, 1)


def test_robustness_eval_refuses_data_with_other_classes_than_the_probe(tmp_path):
    _write_png_tree(tmp_path, "val", classes=("a", "b"))
    model = tiny_vit(seed=0, depth=2, num_heads=2).eval()
    probe = tmp_path / "linear_probe.pth"
    argv = ["--probe", str(probe), "--data", str(tmp_path), "--img-size", "32", "--tasks", "clean",
            "--num-workers", "0", "--output-dir", str(tmp_path / "rob")]
    for classes, detail in ((["a", "c"], r"only in --data: \['b'\], only in the probe: \['c'\]"),
                            (["b", "a"], "same names in another order")):  # 'b' would be scored as 'c', or as 'a'
        linear_eval.save_probe(probe, model, linear_eval.LinearClassifier(64, 2), 1, False, 2, 32, "train data",
                               classes=classes)
        with pytest.raises(SystemExit, match=f"classes differ from the probe's \\({detail}\\); labels are class "
                                             "positions"):
            robustness_eval.main(robustness_eval.get_args_parser().parse_args(argv))
    linear_eval.save_probe(probe, model, linear_eval.LinearClassifier(64, 2), 1, False, 2, 32, "train data")
    with pytest.raises(SystemExit, match="the probe was trained on train data \\(as written .*\\) and records no class names"):
        robustness_eval.main(robustness_eval.get_args_parser().parse_args(argv))  # an older probe, on other data
    linear_eval.save_probe(probe, model, linear_eval.LinearClassifier(64, 2), 1, False, 2, 32, "train data",
                           classes=["a", "b"])
    assert robustness_eval.main(robustness_eval.get_args_parser().parse_args(argv))["num_images"] == 6


def test_non_finite_backbone_and_swapped_probe_backbone_are_refused(tmp_path):
    model = tiny_vit(seed=0, depth=2, num_heads=2).eval()
    sd = model.state_dict()
    sd["norm.weight"][3] = float("inf")
    torch.save({"arch": model.arch, "backbone": sd}, tmp_path / "diverged.pth")
    code, last, _ = run_script("linear_eval.py", "--pretrained", tmp_path / "diverged.pth", "--num-workers", "0",
                               "--output-dir", tmp_path / "out")
    assert code == 1 and "non-finite weights" in last and "diverged.pth" in last
    probe = tmp_path / "linear_probe.pth"
    linear_eval.save_probe(probe, model, linear_eval.LinearClassifier(64, 10), 1, False, 10, 32, "synthetic")
    ckpt = torch.load(probe, weights_only=True)
    wide = tiny_vit(seed=0, depth=2, embed_dim=96, num_heads=2).eval()  # another backbone swapped into the probe file
    torch.save({**ckpt, "arch": wide.arch, "backbone": wide.state_dict()}, probe)
    code, last, _ = run_script("robustness_eval.py", "--probe", probe, "--tasks", "clean", "--num-images", "2",
                               "--num-workers", "0", "--output-dir", tmp_path / "rob")
    assert code == 1 and "the head reads 64 features but its backbone gives 96" in last


def test_probe_with_non_finite_weights_is_refused(tmp_path):
    model = tiny_vit(seed=0, depth=2, num_heads=2).eval()
    probe = tmp_path / "linear_probe.pth"
    linear_eval.save_probe(probe, model, linear_eval.LinearClassifier(64, 6), 1, False, 6, 32, "synthetic")
    ckpt = torch.load(probe, weights_only=True)
    ckpt["backbone"]["blocks.0.attn.qkv.weight"][0, 0] = float("nan")  # its backbone diverged
    torch.save(ckpt, probe)
    with pytest.raises(SystemExit, match=f"--probe: {probe} holds non-finite weights .*blocks.0.attn.qkv.weight"):
        robustness_eval.main(robustness_eval.get_args_parser().parse_args([
            "--probe", str(probe), "--tasks", "clean", "--num-images", "2", "--num-workers", "0",
            "--output-dir", str(tmp_path / "rob")]))
    assert not (tmp_path / "rob").exists()


def test_outputs_are_replaced_atomically_results_last(tmp_path, monkeypatch):
    model = tiny_vit(seed=0, depth=2, num_heads=2).eval()
    torch.save({"arch": model.arch, "backbone": model.state_dict()}, tmp_path / "backbone.pth")
    out = tmp_path / "out"
    argv = ["--pretrained", str(tmp_path / "backbone.pth"), "--train-length", "40", "--val-length", "20",
            "--batch-size", "20", "--cached", "--epochs", "1", "--knn-k", "0", "--num-workers", "0",
            "--output-dir", str(out)]
    linear_eval.main(argv)
    probe, results = (out / "linear_probe.pth").read_bytes(), (out / "linear_eval.json").read_bytes()
    real_save = torch.save

    def killed_mid_write(obj, f):  # the write of linear_probe.pth fails halfway
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(SystemExit, match="could not write .*linear_probe.pth"):
        linear_eval.main(argv + ["--seed", "1"])
    monkeypatch.setattr(torch, "save", real_save)
    assert (out / "linear_probe.pth").read_bytes() == probe and (out / "linear_eval.json").read_bytes() == results
    assert sorted(os.listdir(out)) == [".lock", "linear_eval.json", "linear_probe.pth"]  # no temporary file left


def test_feature_pass_reports_progress(tmp_path, capsys):
    linear_eval.main(["--random-init", "--arch", "vit_tiny", "--img-size", "32", "--train-length", "40",
                      "--val-length", "20",
             "--batch-size", "20", "--cached", "--epochs", "1", "--num-workers", "0", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "features of val: batch 1/1, " in out and "features of train: batch 2/2, " in out


def test_linear_eval_printout_without_holdout(tmp_path, capsys):
    linear_eval.main(["--random-init", "--arch", "vit_tiny", "--depth", "1", "--patch-size", "8", "--img-size", "32",
                      "--train-length", "40", "--val-length", "20", "--batch-size", "20", "--cached", "--epochs", "1",
                      "--knn-k", "0", "--holdout-fraction", "0", "--lrs", "0.1", "1", "--num-workers", "0",
                      "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "features: [CLS] of the last block -> 192-d" in out
    rows = [line for line in out.splitlines() if line.lstrip().startswith("lr ")]
    assert len(rows) == 2 and all(row.count("top-1") == 1 for row in rows)  # selected on val: one val column


def test_random_init_takes_the_depth_of_the_built_in_runs(tmp_path):
    results = linear_eval.main(["--random-init", "--arch", "vit_tiny", "--depth", "2", "--patch-size", "8",
                                "--img-size", "32", "--train-length", "40", "--val-length", "20", "--batch-size", "20",
                                "--cached", "--epochs", "1", "--num-workers", "0", "--output-dir", str(tmp_path)])
    assert results["arch"]["depth"] == 2 and results["num_features"] == 2 * 192  # --n-last-blocks follows: min(4, 2)


def test_holdout_split_is_deterministic_and_disjoint():
    fit, holdout = linear_eval.holdout_split(1000, 0.1)
    assert len(holdout) == 100 and not set(fit) & set(holdout) and len(fit) + len(holdout) == 1000
    assert (fit, holdout) == linear_eval.holdout_split(1000, 0.1)


# ---------------------------------------------------------------------- 2-process gloo gather
def gather_worker(rank, world, dataset, out_dir):
    dist.init_process_group("gloo")
    model = tiny_vit(seed=0, depth=2, num_heads=2).eval()
    cpu = torch.device("cpu")
    # 7 samples over 2 ranks: the sampler pads rank 1's shard with sample 0 again.
    loader = augment.make_loader(linear_eval.WithIndex(dataset), 2, rank, world, 0)
    features, labels = linear_eval.gather_features(model, loader, cpu)
    knn = linear_eval.knn_eval(model, loader, loader, 3, cpu, k=3)
    torch.save((features, labels, knn), os.path.join(out_dir, f"rank{rank}.pth"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gather_equals_single_process(tmp_path):
    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(7, 3, 32, 32), torch.arange(7) % 3)
    spawn(gather_worker, dataset, str(tmp_path))

    model = tiny_vit(seed=0, depth=2, num_heads=2).eval()
    loader = augment.make_loader(linear_eval.WithIndex(dataset), 4, 0, 1, 0)
    features, labels = linear_eval.gather_features(model, loader, torch.device("cpu"))
    knn = linear_eval.knn_eval(model, loader, loader, 3, torch.device("cpu"), k=3)
    with torch.no_grad():
        direct = model(dataset.tensors[0])
    torch.testing.assert_close(features, direct)  # dataset order, one row per sample
    for rank in range(2):
        ddp_features, ddp_labels, ddp_knn = torch.load(tmp_path / f"rank{rank}.pth")
        torch.testing.assert_close(ddp_features, features)
        assert torch.equal(ddp_labels, labels) and ddp_knn == knn


@pytest.mark.parametrize("entry, value, message", [
    ("classes", None, "its classes None are not a list of its 6 distinct class names"),
    ("classes", 5, "its classes 5 are not"), ("classes", [[1]] * 6, r"its classes \[\[1\], \[1\], .*\] are not"),
    ("classes", ["a"] * 6, "its classes .* are not"), ("classes", list("abcde"), "its classes .* are not"),
    ("classes", tuple("abcdef"), "its classes .* are not"),  # --data's names are a list: never equal
    ("backbone_unfinished", [1], r"its backbone_unfinished \[1\] is not \[step, total steps\] of its backbone's run"),
    ("backbone_unfinished", "1 of 2", "its backbone_unfinished '1 of 2' is not")])
def test_probe_classes_and_run_steps_of_the_wrong_form_are_refused_in_one_line(tmp_path, entry, value, message):
    """robustness_eval matches a probe's classes to --data's names and records its backbone's steps: anything but a
    list of the head's number of distinct names, or a [step, total steps] pair, is a malformed probe there."""
    probe = tmp_path / "linear_probe.pth"
    linear_eval.save_probe(probe, tiny_vit(seed=0, depth=2, num_heads=2).eval(), linear_eval.LinearClassifier(64, 6), 1,
                           False, 6, 32, "synthetic", **{entry: value})
    with pytest.raises(SystemExit, match=f"^--probe: {probe}: {message}.*; rerun linear_eval.py to write it again$"):
        probe_run(probe, tmp_path)


def test_results_of_the_same_weights_on_other_data_are_kept_in_their_folder(tmp_path, tiny_probe, capsys,
                                                                            monkeypatch):
    """Results are of weights on data: the same weights on another --data (or, in detect_eval, another scored val
    set) refuse a folder holding the others' results in one line before any work; the same data, however written,
    replaces them, and results of an earlier version, which record no data, do not block."""
    model = tiny_vit(seed=0, depth=2, num_heads=2).eval()
    torch.save({"arch": model.arch, "backbone": model.state_dict()}, tmp_path / "a.pth")
    tree = tmp_path / "tree"
    for split in ("train", "val"):
        _write_png_tree(tree, split)
    out = tmp_path / "linear"
    common = ["--pretrained", str(tmp_path / "a.pth"), "--img-size", "32", "--batch-size", "4", "--cached",
              "--epochs", "1", "--lrs", "0.03", "--knn-k", "0", "--holdout-fraction", "0", "--num-workers", "0",
              "--output-dir", str(out)]
    assert linear_eval.main(common + ["--train-length", "8", "--val-length", "4"])["data"] == "synthetic"
    written = (out / "linear_eval.json").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit, match=f"^--output-dir {out} holds the linear_eval.json of "
                                         f"{os.path.realpath(tmp_path / 'a.pth')} on synthetic, this run's on {tree} "
                                         "would replace it: choose another --output-dir \\(or move that one away\\)$"):
        linear_eval.main(common + ["--data", str(tree)])
    assert (out / "linear_eval.json").read_bytes() == written and "features of" not in capsys.readouterr().out
    os.symlink(tree, tmp_path / "link")
    lin = tmp_path / "lin_tree"
    linear_eval.main(common + ["--data", str(tree), "--output-dir", str(lin)])
    linear_eval.main(common + ["--data", f"{tmp_path / 'link'}/", "--output-dir", str(lin)])  # the same folder
    monkeypatch.chdir(tmp_path)  # recorded resolved: a relative --data means the same folder from anywhere after
    linear_eval.main(common + ["--data", "tree", "--output-dir", str(lin)])
    monkeypatch.chdir(tree)
    linear_eval.main(common + ["--data", str(tree), "--output-dir", str(lin)])
    assert json.loads((lin / "linear_eval.json").read_text())["data"] == os.path.realpath(tree)
    # robustness_eval: robustness.json and the --figures folder
    rob = ["--equivariance-only", "--probe", tiny_probe, "--num-images", "2", "--num-workers", "0"]
    fig = ["--figures", tmp_path / "fig", "--figure-images", "1"]
    robust(*rob, "--output-dir", tmp_path / "rob", *fig)
    for folders, flag, name in (([tmp_path / "rob"], "--output-dir", "robustness.json"),
                                ([tmp_path / "rob2", *fig], "--figures", "figures.json")):
        with pytest.raises(SystemExit, match=f"^{flag} .* holds the {name} of {os.path.realpath(tiny_probe)} on "
                                             f"synthetic, this run's on {tree} would replace it: choose another "
                                             f"{flag} "):
            robust(*rob, "--data", tree, "--output-dir", *folders)
    assert not (tmp_path / "rob2" / "robustness.json").exists()
    robust(*rob, "--output-dir", tmp_path / "rob", *fig)  # a rerun replaces its own
    # an earlier version's results, of the same weights: no data recorded, not checked
    for folder, name in ((out, "linear_eval.json"), (tmp_path / "rob", "robustness.json")):
        record = json.loads((folder / name).read_text())
        del record["data"]
        (folder / name).write_text(json.dumps(record))
    linear_eval.main(common + ["--data", str(tree)])
    robust(*rob, "--data", tree, "--output-dir", tmp_path / "rob")
    # 'cifar10:<dir>' by its folder's real path; anything else as given
    results = tmp_path / "table"
    vit.make_output_dir(str(results), outputs=("r.json",), sources=["w"])
    (results / "r.json").write_text(json.dumps({"source": ["w"], "data": f"cifar10:{tree}"}))
    vit.make_output_dir(str(results), outputs=("r.json",), sources=["w"], data=f"cifar10:{tmp_path / 'link'}/")
    with pytest.raises(SystemExit, match=f"holds the r.json of w on cifar10:{tree}, this run's on stl10:{tree}"):
        vit.make_output_dir(str(results), outputs=("r.json",), sources=["w"], data=f"stl10:{tree}")


def test_detection_scores_on_another_val_set_are_kept_in_their_folder(tmp_path, backbone_path):
    """--synthetic-val (as --val-split of COCO) may change on a resume, which evaluates the trained heads anew on that
    set: detect_results.json and detections_val.json of the other one are kept, a plain resume replaces its own."""
    out = tmp_path / "run"
    first = detect_eval.main(tiny_run_args(backbone_path, out, 1))
    assert first["data"] == "synthetic --synthetic-val 5 --synthetic-size 64 --data-seed 0"
    written = {f: (out / f).read_bytes() for f in ("detect_results.json", "detections_val.json", "synthetic_val.json")}
    with pytest.raises(SystemExit, match=f"^detect_eval.py: --output-dir {out} holds the detect_results.json of "
                                         f".*backbone.pth on synthetic --synthetic-val 5 --synthetic-size 64 "
                                         "--data-seed 0, this run's on synthetic --synthetic-val 6 .* would replace"):
        detect_eval.main(tiny_run_args(backbone_path, out, 1, ["--synthetic-val", "6"]))
    assert all((out / f).read_bytes() == data for f, data in written.items())
    assert detect_eval.main(tiny_run_args(backbone_path, out, 1))["num_val_images"] == 5  # a resume: evaluated again


def test_lengths_beyond_a_real_split_are_refused(tmp_path):
    """On real data --train-length / --val-length take an evenly strided subset: a larger one would keep the whole
    split while the results record the flag as its size."""
    for split in ("train", "val"):
        _write_png_tree(tmp_path, split)  # 6 images each
    argv = ["--random-init", "--arch", "vit_tiny", "--depth", "1", "--patch-size", "8", "--img-size", "32", "--data",
            str(tmp_path), "--num-workers", "0", "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=f"^--train-length 7 exceeds the 6 images of --data {tmp_path}'s train split: "
                                         "pass at most 6, or drop it for all of them$"):
        linear_eval.main(argv + ["--train-length", "7"])
    with pytest.raises(SystemExit, match="^--val-length 100000 exceeds the 6 images of .*'s val split: pass at most 6"):
        linear_eval.main(argv + ["--train-length", "6", "--val-length", "100000"])  # the whole train split is fine
    assert not (tmp_path / "out").exists()


# ================================================================================================
# robustness_eval.py: ImageNet-C/P, geometry, equivariance scores
# ================================================================================================

def natural_image(n=96):
    """A fixed natural-ish image: smooth gradient, a disc, a box and a striped (textured) patch."""
    y, x = np.mgrid[0:n, 0:n] / n
    img = np.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y, 0.7 - 0.4 * x * y], -1)
    img[(x - 0.3) ** 2 + (y - 0.35) ** 2 < 0.03] = [0.9, 0.2, 0.1]
    img[(abs(x - 0.72) < 0.12) & (abs(y - 0.3) < 0.15)] = [0.1, 0.3, 0.8]
    stripes = np.sin(2 * np.pi * (x + 0.5 * y) * n / 6) > 0
    patch = (y > 0.6) & (y < 0.9) & (x > 0.15) & (x < 0.85)
    img[patch] = np.where(stripes[patch, None], [0.95, 0.9, 0.3], [0.15, 0.1, 0.2])
    return (img * 255).round().astype(np.uint8)


IMG = natural_image(96)


def l1(a, b):
    return np.abs(a.astype(np.float64) - b).mean()


def corr_distance(a, b):
    return 1 - np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1]


# ------------------------------------------------------------------------------------------- corruptions

@pytest.mark.parametrize("name", robustness_eval.CORRUPTIONS)
def test_corruption_shape_dtype_range_determinism(name):
    out = robustness_eval.corrupt(IMG, name, 3, rng=7)
    assert out.shape == IMG.shape and out.dtype == np.uint8
    assert np.array_equal(out, robustness_eval.corrupt(IMG, name, 3, rng=7))
    assert not np.array_equal(out, IMG)
    # float tensors (..., 3, H, W) in [0, 1], any resolution, non-square included
    x = torch.from_numpy(natural_image(48)[:40]).permute(2, 0, 1).float()[None] / 255  # (1, 3, 40, 48)
    y = robustness_eval.corrupt(x, name, 2, rng=0)
    assert y.shape == x.shape and y.dtype == x.dtype and 0 <= y.min() and y.max() <= 1


# Distance to the clean image, mean over 3 seeds. L1 by default; 1 - correlation for frost and fog,
# whose constants fade the image while adding a bright layer (L1 can cancel). The original constants
# are NOT monotone everywhere, and we keep them: elastic severities 1-2 use a large global warp
# (alpha 244*2) and 3-5 small local ones (AlexNet error 70.1% at s2 > 55.7% at s3); snow s2 -> s3
# (AlexNet 88.4% > 86.5%); glass blur trades iterations for offsets (s3: delta 2 x 3 iterations,
# s4: delta 3 x 2), so its pixel distance is flat between s1/s2 and s3/s4. Those use the chains below.
MONOTONE_CHAINS = {"elastic_transform": [(1, 2), (3, 4, 5)], "snow": [(1, 2), (3, 4, 5), (1, 3)],
                   "glass_blur": [(1, 3, 5), (2, 4, 5)]}


@pytest.mark.parametrize("name", robustness_eval.CORRUPTIONS)
def test_severity_increases_distance(name):
    dist = corr_distance if name in ("frost", "fog") else l1
    d = {s: np.mean([dist(robustness_eval.corrupt(IMG, name, s, rng=seed), IMG) for seed in range(3)]) for s in range(1, 6)}
    for chain in MONOTONE_CHAINS.get(name, [(1, 2, 3, 4, 5)]):
        values = [d[s] for s in chain]
        assert all(a < b for a, b in zip(values, values[1:])), (name, chain, values)


def test_noise_formulas_match_originals():
    x = IMG / 255.0
    for s, c in enumerate((0.08, 0.12, 0.18, 0.26, 0.38), start=1):
        ref = (np.clip(x + np.random.default_rng(3).normal(size=x.shape, scale=c), 0, 1) * 255).astype(np.uint8)
        assert np.array_equal(robustness_eval.corrupt(IMG, "gaussian_noise", s, rng=3), ref)
    for s, c in enumerate((60, 25, 12, 5, 3), start=1):
        ref = (np.clip(np.random.default_rng(3).poisson(x * c) / c, 0, 1) * 255).astype(np.uint8)
        assert np.array_equal(robustness_eval.corrupt(IMG, "shot_noise", s, rng=3), ref)
    # gaussian noise std on a mid-grey image (no clipping at severity 1-3)
    grey = np.full((96, 96, 3), 128, np.uint8)
    for s, c in enumerate((0.08, 0.12, 0.18), start=1):
        assert abs((robustness_eval.corrupt(grey, "gaussian_noise", s, rng=0) / 255.0).std() - c) < 0.05 * c
    # impulse: the flipped fraction is the amount, half salt, half pepper
    out = robustness_eval.corrupt(grey, "impulse_noise", 5, rng=0)
    assert abs((out != 128).mean() - 0.27) < 0.01 and abs((out == 255).mean() - 0.135) < 0.01


def test_brightness_is_hsv_value_shift():
    small = natural_image(16)
    for s, c in enumerate((0.1, 0.2, 0.3, 0.4, 0.5), start=1):
        out = robustness_eval.corrupt(small, "brightness", s, rng=0).astype(int)
        for p, q in zip(small.reshape(-1, 3)[::7], out.reshape(-1, 3)[::7]):
            h, sat, v = colorsys.rgb_to_hsv(*(p / 255.0))  # an independent HSV implementation
            ref = np.array(colorsys.hsv_to_rgb(h, sat, min(v + c, 1.0))) * 255
            assert np.all(np.abs(q - np.floor(ref)) <= 1), (p, q, ref)  # truncation of 56.9999 vs 57.0


def test_contrast_pixelate_jpeg_match_originals():
    x = IMG / 255.0
    for s, c in enumerate((0.4, 0.3, 0.2, 0.1, 0.05), start=1):
        m = x.mean((0, 1), keepdims=True)
        assert np.array_equal(robustness_eval.corrupt(IMG, "contrast", s),
                              (np.clip((x - m) * c + m, 0, 1) * 255).astype(np.uint8))
    assert [robustness_eval.pixelate_size(s, 224, 224) for s in range(1, 6)] == \
        [(134, 134), (112, 112), (89, 89), (67, 67), (56, 56)]
    big = natural_image(224)
    out = robustness_eval.corrupt(big, "pixelate", 3)
    ref = Image.fromarray(big).resize((89, 89), Image.BOX).resize((224, 224), Image.BOX)
    assert np.array_equal(out, np.asarray(ref))
    for s, q in enumerate((25, 18, 15, 10, 7), start=1):
        buf = io.BytesIO()
        Image.fromarray(IMG).save(buf, "JPEG", quality=q)
        assert np.array_equal(robustness_eval.corrupt(IMG, "jpeg_compression", s), np.asarray(Image.open(buf)))


def test_zoom_factor_counts_and_clipped_zoom():
    assert [len(z) for z in robustness_eval.ZOOM_FACTORS] == [12, 16, 11, 13, 11]
    assert robustness_eval.ZOOM_FACTORS[1][-1] == pytest.approx(1.15)
    x = IMG.astype(np.float64)
    assert np.allclose(robustness_eval.clipped_zoom(x, 1.0), x)
    # zoom 2 of a 96 image: the central 48x48 upsampled (align_corners) to 96
    out = robustness_eval.clipped_zoom(x, 2.0)
    assert out.shape == x.shape and np.allclose(out[0, 0], x[24, 24]) and np.allclose(out[-1, -1], x[71, 71])


def test_fog_plasma_amplitude_quirk():
    raw = robustness_eval.plasma_fractal(256, 2.0, np.random.default_rng(5), normalise=False)
    # the first point is mean(0)/4 + wibble * U(-wibble, wibble), wibble = 100: amplitude 1e4, not 100
    assert raw[128, 128] == pytest.approx(100 * np.random.default_rng(5).uniform(-100, 100))
    assert np.abs(raw).max() > 1000
    m = robustness_eval.plasma_fractal(256, 2.0, np.random.default_rng(5))
    assert m.min() == 0 and m.max() == 1


def test_elastic_244_constants():
    originals = [(244 * 2, 244 * 0.7, 244 * 0.1), (244 * 2, 244 * 0.08, 244 * 0.2), (244 * 0.05, 244 * 0.01, 244 * 0.02),
                 (244 * 0.07, 244 * 0.01, 244 * 0.02), (244 * 0.12, 244 * 0.01, 244 * 0.02)]
    assert [robustness_eval.elastic_constants(s, 224) for s in range(1, 6)] == originals
    assert robustness_eval.elastic_constants(1, 112)[0] == pytest.approx(244)


def test_filters_match_references():
    rng = np.random.default_rng(0)
    sig = rng.random((10, 1))
    # skimage gaussian, mode 'reflect' (half-sample symmetric), with a radius larger than the signal
    w = np.exp(-0.5 * (np.arange(-15, 16) / 5.0) ** 2)
    w /= w.sum()
    ref = np.correlate(np.pad(sig[:, 0], 15, mode="symmetric"), w, mode="valid")  # numpy reflects repeatedly
    assert np.allclose(robustness_eval.gaussian_filter(np.hstack([sig] * 31), 5.0, "symmetric", truncate=3)[:, 15], ref)
    # ImageMagick motion blur at angle 0: one-sided, an impulse smears to the left
    img = np.zeros((5, 20, 1))
    img[2, 10] = 255
    out = robustness_eval.magick_motion_blur(img, 3, 2, 0)
    k = np.exp(-np.arange(7) ** 2 / 8.0)
    q16 = np.rint(255 * 257 * k[::-1] / k.sum())  # rounded to a 16-bit quantum, then truncated to 8 bits
    assert np.allclose(out[2, 4:11, 0], np.floor(q16 / 257)) and out[2, 11:].sum() == 0
    # OpenCV disk: 17x17 for r <= 8, sums to 1, symmetric
    d = robustness_eval.disk_kernel(3, 0.1)
    assert d.shape == (17, 17) and d.sum() == pytest.approx(1) and np.allclose(d, d.T)
    assert robustness_eval.disk_kernel(10, 0.5).shape == (21, 21)


def test_frost_dir_and_procedural(tmp_path):
    for i in range(1, 7):
        Image.fromarray(np.full((300, 260, 3), 40 * i, np.uint8)).save(tmp_path / f"frost{i}.png")
    (tmp_path / "frost6.png").write_bytes(b"")  # never drawn, so never read
    photos = robustness_eval.load_frost_images(str(tmp_path))
    assert [p[0, 0, 0] for p in photos] == [40 * i for i in range(1, 6)]
    out = robustness_eval.corrupt(IMG, "frost", 1, rng=0, frost_images=photos)
    # a = 1, b = 0.4 of a constant photo: the shift is 0.4 * value of one of frost1..5 (never frost6)
    shift = (out.astype(int) - IMG).mean()
    assert any(abs(shift - 0.4 * 40 * i) < 8 for i in range(1, 6))
    (tmp_path / "frost3.png").unlink()
    with pytest.raises(SystemExit, match="frost3"):
        robustness_eval.load_frost_images(str(tmp_path))
    for not_a_folder in (tmp_path / "nowhere", tmp_path / "frost1.png"):
        with pytest.raises(SystemExit, match="--frost-dir .*: no such folder"):
            robustness_eval.load_frost_images(str(not_a_folder))
    (tmp_path / "frost2.png").write_bytes(b"")
    with pytest.raises(augment.UnreadableImage, match="frost2.png"):
        robustness_eval.load_frost_images(str(tmp_path))
    for i, size in ((2, 223), (3, 260)):  # frost2 a thumbnail, that frost would stretch
        Image.fromarray(np.full((300, size, 3), 40, np.uint8)).save(tmp_path / f"frost{i}.png")
    with pytest.raises(SystemExit, match="^--frost-dir .*: frost2.png is 223x300, but frost crops 224x224 from each"):
        robustness_eval.load_frost_images(str(tmp_path))


def test_alexnet_table_reproduces_means():
    means = {"gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
             "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816,
             "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204,
             "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500}
    assert set(robustness_eval.ALEXNET_ERR) == set(robustness_eval.CORRUPTIONS) == set(means)
    for c, m in means.items():
        assert np.mean(robustness_eval.ALEXNET_ERR[c]) == pytest.approx(m, abs=1e-6)


def test_mce_by_hand():
    errors = {c: [0.1 * s for s in range(1, 6)] for c in robustness_eval.CORRUPTIONS}  # sum 1.5, mean 0.3
    errors["fog"] = [0.5] * 5
    out = robustness_eval.corruption_errors(errors, clean_error=0.2)
    ce_fog = 2.5 / sum(robustness_eval.ALEXNET_ERR["fog"])
    ce_gauss = 1.5 / sum(robustness_eval.ALEXNET_ERR["gaussian_noise"])
    assert out["ce"]["fog"] == pytest.approx(100 * ce_fog) and out["ce"]["gaussian_noise"] == pytest.approx(100 * ce_gauss)
    alexnet = robustness_eval.ALEXNET_ERR
    expected = np.mean([(2.5 if c == "fog" else 1.5) / sum(alexnet[c]) for c in robustness_eval.CORRUPTIONS])
    assert out["mce"] == pytest.approx(100 * expected)
    rel_fog = (0.5 - 0.2) / (np.mean(robustness_eval.ALEXNET_ERR["fog"]) - 0.43478)
    assert out["relative_ce"]["fog"] == pytest.approx(100 * rel_fog)
    rel = [((0.5 if c == "fog" else 0.3) - 0.2) / (np.mean(alexnet[c]) - 0.43478) for c in robustness_eval.CORRUPTIONS]
    assert out["relative_mce"] == pytest.approx(100 * np.mean(rel))
    with pytest.raises(ValueError, match="fog"):
        robustness_eval.corruption_errors({c: v for c, v in errors.items() if c != "fog"})


def test_a_generated_corruption_does_not_depend_on_the_others_listed():
    """Each (corruption, severity) draws from its own key: shot noise alone is shot noise after gaussian noise."""
    base = augment.build_dataset("synthetic", "val", img_size=32, length=2)
    args = SimpleNamespace(imagenet_c_dir=None, frost_dir=None, c_jpeg=False, seed=0)
    alone = robustness_eval.corruption_set(args, base, 32, ["shot_noise"], 6, None)
    after = robustness_eval.corruption_set(args, base, 32, ["gaussian_noise", "shot_noise"], 6, None)
    assert len(alone) == 10 and all(torch.equal(alone[i][0], after[10 + i][0]) for i in range(10))


# ------------------------------------------------------------------------------------------- ImageNet-P

def test_flip_probability_noise_vs_consecutive():
    preds = torch.tensor([[0, 1, 1, 0, 0], [2, 2, 2, 2, 2]])
    # consecutive: 0->1 flip, 1->1, 1->0 flip, 0->0: 2/4; second video never flips
    assert torch.allclose(robustness_eval.flip_probability(preds, noise=False), torch.tensor([0.5, 0.0]))
    # noise: against frame 0: 1, 1, 0, 0 differ in 2 of 4
    assert torch.allclose(robustness_eval.flip_probability(preds, noise=True), torch.tensor([0.5, 0.0]))
    preds = torch.tensor([[0, 1, 1, 1, 1]])
    assert robustness_eval.flip_probability(preds, noise=False).item() == pytest.approx(0.25)
    assert robustness_eval.flip_probability(preds, noise=True).item() == pytest.approx(1.0)
    # difficulty 2: walks 0,2,4 (0,1,1: one flip) and 1,3 (1,1: none) -> 1/3
    assert robustness_eval.flip_probability(preds, noise=False, difficulty=2).item() == pytest.approx(1 / 3)


def _logits_from_order(order, num_classes=8):
    """Logits whose ranking (best first) is `order` followed by the remaining classes."""
    rest = [c for c in range(num_classes) if c not in order]
    logits = torch.zeros(num_classes)
    for r, c in enumerate(list(order) + rest):
        logits[c] = num_classes - r
    return logits


def test_top5_distance_by_hand():
    ref = _logits_from_order([0, 1, 2, 3, 4])
    same = ref.clone()
    swap = _logits_from_order([1, 0, 2, 3, 4])  # sigma = (2, 1, 3, 4, 5): d = 1 + 1 = 2
    out_of_top = _logits_from_order([5, 6, 7, 1, 2])  # class 0 now rank 6, 3 -> 7, 4 -> 8; 1 -> 4, 2 -> 5
    # sigma = (6, 4, 5, 7, 8) -> |1-6| + |2-4| + |3-5| + |4-6| + |5-6| = 5 + 2 + 2 + 2 + 1 = 12
    seq = torch.stack([ref, same, swap, out_of_top])[None]  # (1, 4, C)
    assert robustness_eval.top5_distance(seq, noise=True).item() == pytest.approx((0 + 2 + 12) / 3)
    # consecutive: ref->same 0; same->swap 2; swap->out_of_top: ref order 1,0,2,3,4 -> ranks 4,6,5,7,8
    d = abs(1 - 4) + abs(2 - 6) + abs(3 - 5) + abs(4 - 6) + abs(5 - 6)
    assert robustness_eval.top5_distance(seq, noise=False).item() == pytest.approx((0 + 2 + d) / 3)


def _full(n=96):
    """The Resize(256) analogue: a bit larger than the crop."""
    return np.asarray(Image.fromarray(natural_image(n)).resize((round(n * 256 / 224),) * 2, Image.BILINEAR))


@pytest.mark.parametrize("name", robustness_eval.PERTURBATIONS)
def test_perturbation_sequence_shape_determinism(name):
    full = _full(64)
    seq = robustness_eval.perturbation_sequence(full, name, 64, rng=1, num_frames=5)
    assert seq.shape == (5, 64, 64, 3) and seq.dtype == np.uint8
    assert np.array_equal(seq, robustness_eval.perturbation_sequence(full, name, 64, rng=1, num_frames=5))
    assert len(robustness_eval.frame_indices(name)) == (41 if name == "translate" else 31)


def test_perturbation_strength_grows():
    full = _full(64)
    crop = robustness_eval._center_crop(full, 64)
    for name in ("gaussian_noise", "shot_noise"):  # difficulty 1 -> 3
        d = [l1(robustness_eval.perturbation_sequence(full, name, 64, 0, diff, 4)[1:], crop) for diff in (1, 2, 3)]
        assert d[0] < d[1] < d[2], (name, d)
    # parametric ones: the distance to the identity frame grows with the parameter offset
    for name, identity in (("brightness", 15), ("rotate", 15), ("tilt", 15), ("translate", 20), ("scale", 24)):
        seq = robustness_eval.perturbation_sequence(full, name, 64, 0)
        base = seq[robustness_eval.frame_indices(name).index(identity)]
        d = [l1(seq[identity - k], base) for k in (1, 4, 12)]
        assert d[0] < d[1] < d[2], (name, d)
        # identity frames are the clean crop, up to the original's uint8 truncation after HSV (brightness);
        # the original tilt matrix at 0 degrees is not the identity (it scales by f / (f + 1))
        if name != "tilt":
            assert np.abs(base.astype(int) - crop).max() <= (name == "brightness"), name
    seq = robustness_eval.perturbation_sequence(full, "zoom_blur", 64, 0)
    d = [l1(seq[i], crop) for i in (1, 10, 30)]
    assert np.array_equal(seq[0], crop) and d[0] < d[1] < d[2]


# ------------------------------------------------------------------------------------------- equivariance

class StandIn(nn.Module):
    """block_token_maps = pointwise maps of the patch-averaged image: equivariant by construction
    (ViT-like: patch grid, any input size). `bias` adds a fixed position-dependent term, breaking it."""

    def __init__(self, patch_size=8, dim=16, depth=3, bias=False):
        super().__init__()
        self.patch_size, self.depth = patch_size, depth
        self.mixers = nn.ModuleList(nn.Conv2d(3 if l == 0 else dim, dim, 1) for l in range(depth))
        self.bias = nn.Parameter(torch.randn(1, dim, 4, 4)) if bias else None

    def block_token_maps(self, x):
        t = F.avg_pool2d(x, self.patch_size)  # (B, 3, h, w)
        maps = []
        for mixer in self.mixers:
            t = torch.tanh(mixer(t))
            if self.bias is not None:
                t = t + F.interpolate(self.bias, size=t.shape[-2:], mode="bilinear", align_corners=False)
            maps.append(t)  # (B, D, h, w)
        return maps


def test_equivariance_scores_standin():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    elements = robustness_eval.geometric_elements(3, (4, 4))
    good = robustness_eval.equivariance_scores(StandIn(), x, elements, x_other=x.roll(1, 0))  # (E, L, M, B)
    bad = robustness_eval.equivariance_scores(StandIn(bias=True), x, elements)
    names = list(elements)
    assert good.shape == (len(names), 3, len(robustness_eval.EQUIV_METRICS), 3)
    for e, n in enumerate(names):
        if n.startswith("scale"):  # pixel resize then pooling ~ pooling then token resize: close, not exact
            assert good[e, :, 0].min() > 0.9
            assert torch.isnan(good[e, :, 2]).all()  # no invariance error across grid sizes
            continue
        assert torch.allclose(good[e, :, 0], torch.ones(3, 3), atol=1e-5)  # cosine 1
        assert good[e, :, 1].abs().max() < 1e-5  # relative error 0
        assert good[e, :, 2].min() > 0.05  # but not invariant
        assert (bad[e, :, 0].mean() < 0.999) and (bad[e, :, 1].mean() > 1e-2)
        assert good[e, :, 4].mean() > 0.1  # chance baseline: unrelated images disagree
    assert torch.isnan(bad[:, :, 3:]).all()  # no unrelated images given, no baseline


def test_rescalings_are_named_by_the_scale_their_token_grid_realises(capsys):
    """0.75 of a 14x14 grid (ViT-S/16 at 224 px) is 10x10: its rows say 0.7143, not 0.75, and the run says so."""
    assert [n for n in robustness_eval.geometric_elements(1, (14, 14)) if n.startswith("scale")] == [
        "scale0.7143", "scale1.286"]
    assert [n for n in robustness_eval.geometric_elements(1, (4, 4)) if n.startswith("scale")] == [
        "scale0.75", "scale1.25"]
    robustness_eval.check_scales([0.75, 1.25], (14, 14))
    out = capsys.readouterr().out
    assert "note: --scales 0.75 gives the 14x14 token grid 10x10 (effective scale 0.7143): its rows are scale0.7143" in out
    robustness_eval.check_scales([0.75, 1.25], (4, 4))
    robustness_eval.check_scales([0.3], (10, 10))  # 10 * 0.3 is 3.0000000000000004: still 3x3, exact
    assert "note" not in capsys.readouterr().out


def test_equivariance_figure_panels_and_pngs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    g = robustness_eval.geometric_elements(2, (4, 4))
    for name in ("rot90", "vflip"):  # D4 elements: the stand-in is exactly equivariant, so the panels agree
        f_gx, rho_f_x = robustness_eval.equivariance_panels(StandIn(), x, g[name], layer=2)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(f_gx, rho_f_x))
        f_gx, rho_f_x = robustness_eval.equivariance_panels(StandIn(bias=True), x, g[name], layer=2)
        assert max((a - b).abs().max() for a, b in zip(f_gx, rho_f_x)) > 0.05  # a broken one does not
    vits = [tiny_vit(depth=2, num_heads=2), tiny_vit(depth=2, num_heads=4, cls_after_block=1)]
    paths, panels = robustness_eval.write_figures(vits, ["base", "ser"], x, str(tmp_path), layer=1, tile=32)
    assert [os.path.basename(p) for p in paths] == ["equivariance.png", "attention_base.png", "attention_ser.png"]
    pad, top = 4, 14  # _grid_image's layout: 2 images x 3 elements rows; x, g x, then 2 panels per backbone
    assert Image.open(paths[0]).size == (6 * (32 + pad) + pad, top + 12 + 6 * (32 + pad) + pad)  # 2 header lines
    assert Image.open(paths[2]).size == (5 * (32 + pad) + pad, top + 2 * (32 + pad) + pad)  # image + 4 heads
    assert Image.open(paths[2]).convert("RGB").getpixel((0, 0)) != (255, 255, 255)  # a white map stands out
    from PIL import ImageDraw
    drawn, text = [], ImageDraw.ImageDraw.text

    def recorded(self, xy, title, *args, **kw):
        drawn.append(title)
        return text(self, xy, title, *args, **kw)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", recorded)
    robustness_eval.write_figures(vits, ["dino_ser_abc", "full1_abcdef"], x, str(tmp_path / "named"), layer=1)
    assert {"dino_ser_abc", "full1_abcdef", "f(gx)", "rho f(x)", "head 3"} <= set(drawn)  # whole, at the default tile
    attn = robustness_eval.cls_attention(vits[1], x)
    assert attn.shape == (2, 4, 4, 4) and torch.all(attn.flatten(2).sum(-1) <= 1 + 1e-5)


def test_no_figure_row_or_image_count_stands_for_what_did_not_happen(tmp_path, monkeypatch):
    """On a token grid under 3x3 the figure's 1.25 upscale rounds to the identity, whose two panels agree for any
    network: its row is left out. The comparison table's 200 images are the built-in data's default only."""
    vits = [tiny_vit(seed=0, depth=2, num_heads=2)]
    for side, shown in ((16, ["rot90", "vflip"]), (32, ["rot90", "vflip", "scale1.25"])):
        _, panels = robustness_eval.write_figures(vits, ["base"], torch.randn(1, 3, side, side), str(tmp_path), 1)
        assert list(panels["base"]) == shown
    defaults = []
    monkeypatch.setattr(robustness_eval, "val_images", lambda args, img_size, default=None: defaults.append(default)
                        or (_ for _ in ()).throw(SystemExit("stop")))
    torch.save({"arch": vits[0].arch, "backbone": vits[0].state_dict()}, tmp_path / "a.pth")
    shutil.copy(tmp_path / "a.pth", tmp_path / "b.pth")
    tree = tmp_path / "tree"
    for split in ("train", "val"):
        _write_png_tree(tree, split)
    for data in ("synthetic", tree):
        with pytest.raises(SystemExit, match="^stop$"):
            robust("--equivariance-only", "--backbone", tmp_path / "a.pth", tmp_path / "b.pth", "--data", data,
                   "--num-workers", "0", "--output-dir", tmp_path / "out")
    assert defaults == [200, None]


def test_figures_and_the_sample_grid_are_replaced_atomically(tmp_path, monkeypatch):
    x, vits = torch.randn(1, 3, 32, 32), [tiny_vit(seed=0, depth=2, num_heads=2)]
    paths, _ = robustness_eval.write_figures(vits, ["base"], x, str(tmp_path), layer=1, tile=16)
    samples = str(tmp_path / "samples.png")
    monkeypatch.setattr(sys, "argv", ["augment.py", "--out", samples, "--img-size", "8"])
    runpy.run_path(os.path.join(REPO, "augment.py"), run_name="__main__")  # augment.py's preview
    before = {p: open(p, "rb").read() for p in [*paths, samples]}
    assert Image.open(samples).size == (8 * 8, 6 * 8)
    monkeypatch.setattr(sys, "argv", ["augment.py", "--out", str(tmp_path / "new" / "s.png"), "--img-size", "8"])
    runpy.run_path(os.path.join(REPO, "augment.py"), run_name="__main__")  # into a folder it makes
    assert Image.open(tmp_path / "new" / "s.png").size == (8 * 8, 6 * 8)
    shutil.rmtree(tmp_path / "new")
    for flags, message in ((["--img-size", "2000"], "--img-size must be in 8..1024"),
                           (["--out", str(tmp_path / "x.ico")], "not an image file name")):  # an .ico is resized
        monkeypatch.setattr(sys, "argv", ["augment.py", "--out", samples, *flags])
        with pytest.raises(SystemExit, match=message):
            runpy.run_path(os.path.join(REPO, "augment.py"), run_name="__main__")
    monkeypatch.setattr(sys, "argv", ["augment.py", "--out", samples, "--img-size", "8"])

    def full_disk(image, fp, format=None, **kw):  # the write fails halfway
        with (open(fp, "wb") if isinstance(fp, (str, os.PathLike)) else nullcontext(fp)) as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError, match="could not write .*equivariance.png: No space left on device"):
        robustness_eval.write_figures(vits, ["base"], x, str(tmp_path), layer=1, tile=16)
    with pytest.raises(SystemExit, match="could not write .*samples.png: No space left on device"):
        runpy.run_path(os.path.join(REPO, "augment.py"), run_name="__main__")
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in before)  # no temporary file left
    assert all(open(p, "rb").read() == data for p, data in before.items())  # the previous files intact


def test_compare_backbones_scores_every_run_at_one_block(tmp_path):
    """--equivariance-only with several --backbone: one table at the SER split block of the first backbone that
    has one; runs without SER at block 3, where SER acts in the paper, not at block 1."""
    paths = []
    for name, split in (("base", 0), ("base_again", 0), ("ser", 2)):
        model = tiny_vit(seed=0, num_heads=2, cls_after_block=split)
        os.makedirs(tmp_path / name)
        vit.save_atomic(str(tmp_path / name / "backbone.pth"), {"arch": model.arch, "backbone": model.state_dict(),
                                                               "method": "mocov3", "addon": "ser" if split else None})
        paths.append(str(tmp_path / name / "backbone.pth"))

    def compare(*backbones):  # then further flags; a folder per table (one would refuse to replace another's)
        out = tmp_path / f"out{len(os.listdir(tmp_path))}"
        robustness_eval.main(robustness_eval.get_args_parser().parse_args(
            ["--equivariance-only", "--backbone", *backbones, "--num-images", "4", "--num-workers", "0",
             "--output-dir", str(out)]))
        return json.loads((out / "robustness.json").read_text())

    both = compare(paths[0], paths[2])
    assert both["layer"] == 2 and list(both["runs"]) == ["base", "ser"]
    assert all(len(run["equivariance"]["rot90"]["cos"]) == 4 for run in both["runs"].values())
    assert compare(*paths[:2])["layer"] == 3
    coarse = tiny_vit(seed=0, num_heads=2, patch_size=16)
    torch.save({"arch": coarse.arch, "backbone": coarse.state_dict()}, tmp_path / "p16.pth")
    with pytest.raises(SystemExit, match="--img-size 24 is not a multiple of the patch size 16 of .*p16.pth"):
        compare(paths[0], str(tmp_path / "p16.pth"), "--img-size", "24")
    with pytest.raises(SystemExit, match="--figures needs backbones of one patch size"):  # panels at one grid
        compare(paths[0], str(tmp_path / "p16.pth"), "--figures", str(tmp_path / "figures"))
    large = tiny_vit(seed=0, num_heads=2, img_size=64)
    torch.save({"arch": large.arch, "backbone": large.state_dict()}, tmp_path / "large.pth")
    with pytest.raises(SystemExit, match="trained at different sizes .*large.pth 64 px.*; pass --img-size"):
        compare(paths[0], str(tmp_path / "large.pth"))  # else the first one's size, and an order-dependent table
    assert compare(str(tmp_path / "large.pth"), paths[0], "--img-size", "32")["img_size"] == 32
    shallow = tiny_vit(seed=0, num_heads=2, depth=1)
    torch.save({"arch": shallow.arch, "backbone": shallow.state_dict()}, tmp_path / "shallow.pth")
    with pytest.raises(SystemExit, match="--figure-layer 2 \\(the default: the first SER backbone's split block\\) "
                                         "must be in 1..1, the shallowest backbone's depth: pass --figure-layer"):
        compare(paths[2], str(tmp_path / "shallow.pth"))
    (tmp_path / "bad.pth").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="^--backbone: .*bad.pth is not a readable checkpoint") as error:
        compare(str(tmp_path / "bad.pth"))
    assert str(error.value).count("bad.pth") == 1


def test_compare_backbones_shows_linear_numbers_only_of_the_weights_evaluated(tmp_path, capsys):
    """The table's linear / k-NN columns come from <run>/linear/linear_eval.json: only when linear_eval.py computed
    them on the backbone as it is now, not before a resume trained it on, and a broken file is no traceback."""
    common = "--method mocov3 --epochs 2"
    run(common + " --stop-at-step 2", tmp_path / "run")  # mid-run: backbone.pth of step 2
    backbone, linear = tmp_path / "run" / "backbone.pth", tmp_path / "run" / "linear" / "linear_eval.json"
    linear_eval.main(["--pretrained", str(backbone), "--train-length", "40", "--val-length", "20", "--batch-size", "20",
                      "--cached", "--epochs", "1", "--num-workers", "0", "--output-dir", str(linear.parent)])
    written = json.loads(linear.read_text())
    other = tiny_vit(seed=0, depth=3, num_heads=2)  # a second run, never linearly evaluated
    os.makedirs(tmp_path / "other")
    torch.save({"arch": other.arch, "backbone": other.state_dict()}, tmp_path / "other" / "backbone.pth")

    def table():
        capsys.readouterr()
        robust("--equivariance-only", "--backbone", backbone, tmp_path / "other" / "backbone.pth", "--num-images", "2",
               "--num-workers", "0", "--output-dir", tmp_path / "out")
        return json.loads((tmp_path / "out" / "robustness.json").read_text())["runs"]["run"], capsys.readouterr().out

    shown, out = table()
    assert (shown["linear_top1"], shown["knn_top1"]) == (written["linear"]["top1"], written["knn"]["top1"])
    assert "settings differ" not in out
    other_linear = tmp_path / "other" / "linear" / "linear_eval.json"  # its numbers, from 100 epochs
    os.makedirs(other_linear.parent)
    for setting, value in (("epochs", 100), ("knn_temperature", 5.0)):
        other_linear.write_text(json.dumps({**written, "backbone_digest": vit.weights_digest(other),
                                            "args": {**written["args"], setting: value}}))
        assert f"note: the runs' linear_eval.py settings differ ({setting}): their linear and k-NN columns are not " \
            "one protocol" in table()[1]
    os.remove(other_linear)
    linear.write_text(json.dumps({**written, "data": "/datasets/digits"}))  # the same weights, other data
    elsewhere, out = table()
    assert "linear_top1" not in elsewhere
    assert "computed on --data /datasets/digits at 32 px, this table on synthetic at 32 px" in out
    linear.write_text(json.dumps(written))
    model, folder = tiny_vit(seed=0, depth=2, num_heads=2), tmp_path / "data"
    folder.mkdir()
    (tmp_path / "lin.json").write_text(json.dumps({"linear": {"top1": 50.0}, "backbone_digest": vit.weights_digest(model),
                                                   "data": str(folder), "img_size": 32}))
    for data in (f"{folder}/", os.path.relpath(folder)):  # one folder, written another way
        assert robustness_eval.linear_numbers(str(tmp_path / "lin.json"), "b.pth", model, data, 32)["linear_top1"] == 50
    run(common, tmp_path / "run")  # the resume trains on: backbone.pth changes, linear_eval.json stays
    stale, out = table()
    assert "linear_top1" not in stale and "knn_top1" not in stale
    assert f"{linear} was not computed on {backbone} as it is now (stale)" in out and "rerun linear_eval.py" in out
    row = [line for line in out.splitlines() if line.strip().startswith("run ")][-1]  # under the header
    assert row.split()[-2:] == ["-", "-"]
    del written["backbone_digest"]  # as an older linear_eval.py wrote it
    linear.write_text(json.dumps(written))
    assert "(stale)" in table()[1]
    for broken, why in (("{", "JSONDecodeError"), ('{"knn": {"top1": 50.0}}', "KeyError: 'linear'")):
        linear.write_text(broken)
        unread, out = table()
        assert "linear_top1" not in unread and f"{linear} is not a readable linear_eval.py result ({why}" in out


# ------------------------------------------------------------------------------------------- driver

@pytest.fixture(scope="module")
def tiny_probe(tmp_path_factory):
    backbone = tiny_vit(seed=0, depth=2, num_heads=2)
    num_classes = augment.build_dataset("synthetic", "val", img_size=32).num_classes
    classifier = linear_eval.LinearClassifier(64, num_classes)
    path = tmp_path_factory.mktemp("probe") / "linear_probe.pth"
    linear_eval.save_probe(str(path), backbone, classifier, n_last_blocks=1, avgpool=False, num_classes=num_classes,
                           img_size=32, data="synthetic")
    return str(path)


def test_backbone_flags_match_the_other_scripts(tmp_path):
    """--checkpoint-key and --depth, as in linear_eval.py and detect_eval.py: the network of a full checkpoint, and
    the blocks of released weights (the loaders' errors name these flags)."""
    run("--method dino --stop-at-step 2", tmp_path)  # a full checkpoint: student and teacher differ (lr > 0)
    parse = robustness_eval.get_args_parser().parse_args
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    for key in ("student", "teacher"):
        backbone = robustness_eval.load_backbone(parse(["--checkpoint-key", key]), str(tmp_path / "checkpoint.pth"))
        assert torch.equal(backbone.blocks[0].attn.qkv.weight, ckpt[key]["backbone.blocks.0.attn.qkv.weight"])
    weights = str(tmp_path / "bare.pth")
    torch.save(tiny_vit(seed=0, embed_dim=192, num_heads=3, depth=2, img_size=224, patch_size=16).state_dict(), weights)
    assert robustness_eval.load_backbone(parse(["--arch", "vit_tiny", "--depth", "2"]), weights).depth == 2
    with pytest.raises(SystemExit, match="^--backbone: .*depth"):  # the flag reaches the loader
        robustness_eval.load_backbone(parse(["--arch", "vit_tiny", "--depth", "3"]), weights)
    with pytest.raises(SystemExit, match="--depth is read only with --backbone"):
        robust("--probe", "p.pth", "--depth", "2")


def test_driver_smoke(tiny_probe, tmp_path):
    args = robustness_eval.get_args_parser().parse_args([
        "--probe", tiny_probe, "--num-images", "3", "--p-frames", "3", "--num-workers", "0", "--batch-size", "16",
        "--corruptions", "gaussian_noise,frost,pixelate", "--perturbations", "gaussian_noise,rotate",
        "--output-dir", str(tmp_path)])
    robustness_eval.main(args)
    out = json.loads((tmp_path / "robustness.json").read_text())
    assert out["num_images"] == 3 and 0 <= out["clean"]["top1"] <= 100
    c = out["imagenet_c"]
    assert set(c["errors"]) == {"gaussian_noise", "frost", "pixelate"} and len(c["errors"]["frost"]) == 5
    assert "deviation" in c and "mce" not in c  # 10 classes: no AlexNet normalisation
    p = out["imagenet_p"]["per_perturbation"]
    assert p["rotate"]["frames"] == 3 and 0 <= p["rotate"]["fp"] <= 100
    assert set(out["geometry"]) == {"rot90", "rot180", "rot270", "hflip", "vflip", "scale0.75", "scale1.25"}
    eq = out["equivariance"]["rot90"]
    assert len(eq["cos"]) == 2 and all(-1 <= v <= 1 for v in eq["cos"])


def test_driver_equivariance_only_and_errors(tiny_probe, tmp_path):
    args = robustness_eval.get_args_parser().parse_args(["--equivariance-only", "--probe", tiny_probe, "--num-images", "2",
                                           "--num-workers", "0", "--output-dir", str(tmp_path)])
    out = robustness_eval.main(args)
    assert set(out) >= {"equivariance"} and "clean" not in out
    with pytest.raises(SystemExit, match="--probe"):
        robustness_eval.main(robustness_eval.get_args_parser().parse_args(["--output-dir", str(tmp_path)]))
    with pytest.raises(SystemExit, match="^--corruptions: unknown 'fogg'; choose from"):
        robustness_eval.main(robustness_eval.get_args_parser().parse_args(["--probe", tiny_probe, "--corruptions", "fogg"]))
    with pytest.raises(SystemExit, match="^--tasks: unknown ' c'; choose from"):  # a space after the comma
        robust("--probe", tiny_probe, "--tasks", "clean, c", "--output-dir", tmp_path)
    for flag in ("--imagenet-c-dir", "--imagenet-p-dir", "--frost-dir", "--p-normalizers", "--figures"):
        with pytest.raises(SystemExit, match=f"^{flag} is empty: pass a path, or drop the flag$"):  # "$UNSET"
            robust("--probe", tiny_probe, flag, "", "--output-dir", tmp_path)
    for extra, why in ((["--backbone", tiny_probe], "--probe holds its backbone"), (["--tasks", "c"], "drop --tasks"),
                       (["--tasks", ""], "drop --tasks")):
        with pytest.raises(SystemExit, match=why):  # else --backbone or --tasks would be ignored
            robustness_eval.main(robustness_eval.get_args_parser().parse_args(["--equivariance-only", "--probe",
                                                                               tiny_probe, *extra]))
    with pytest.raises(SystemExit, match=f"^--backbone names {tiny_probe} twice \\(again as .*\\): give each run"):
        robust("--equivariance-only", "--backbone", tiny_probe, os.path.relpath(tiny_probe), "--output-dir", tmp_path)
    for flag in (["--num-images", "0"], ["--scales", "nan"], ["--batch-size", "0"], ["--scales", "100"],
                 ["--seed", "-1"], ["--patch-size", "0"]):  # 0 images meant all of them; scale 100: 3200 px images
        with pytest.raises(SystemExit, match=f"{flag[0]} must be"):
            robustness_eval.check_args(robustness_eval.get_args_parser().parse_args(["--probe", tiny_probe, *flag]))
    # a duplicate would be run twice and counted toward mCE's 15; an empty list would run nothing or write NaN
    assert robustness_eval._choices("fog,snow,fog,", robustness_eval.CORRUPTIONS, "--corruptions") == ["fog", "snow"]
    _write_png_tree(tmp_path / "tree", "val")
    for flag, path in (("--output-dir", "val/out"), ("--figures", "val/a/figures")):
        with pytest.raises(SystemExit, match=f"^{flag} .*/tree/{path} is inside .*/tree/val, whose folders are the "
                                             "classes of --data"):
            robustness_eval.check_args(robustness_eval.get_args_parser().parse_args(
                ["--probe", tiny_probe, "--data", str(tmp_path / "tree"), flag, str(tmp_path / "tree" / path)]))
    for flag in (["--tasks", ","], ["--tasks", ""], ["--corruptions", ""], ["--perturbations", ",,"]):
        with pytest.raises(SystemExit, match=f"^{flag[0]}: none given"):
            robust("--probe", tiny_probe, "--tasks", "clean", "--num-images", "1", "--num-workers", "0",
                   "--output-dir", tmp_path, *flag)


def robust(*argv):
    return robustness_eval.main(robustness_eval.get_args_parser().parse_args([str(a) for a in argv]))


def test_a_rerun_of_other_tasks_keeps_the_results_of_the_first(tiny_probe, tmp_path):
    """robustness.json is replaced whole: a rerun that leaves out a task of the run before it would lose its
    results (hours of ImageNet-C under a run of -P alone), so it is refused until it runs that task too."""
    common = ["--probe", tiny_probe, "--num-images", "2", "--num-workers", "0", "--output-dir", tmp_path]
    robust(*common, "--tasks", "geometry")
    written = (tmp_path / "robustness.json").read_bytes()
    with pytest.raises(SystemExit, match=f"^--output-dir {tmp_path} holds robustness.json results of geometry, which "
                                         "this run would drop: run those again with it, or choose another"):
        robust(*common, "--tasks", "equivariance")
    assert (tmp_path / "robustness.json").read_bytes() == written
    assert {"geometry", "equivariance"} <= robust(*common, "--tasks", "equivariance,geometry").keys()


def test_robustness_json_is_strict_json(tiny_probe, tmp_path):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    robust("--probe", tiny_probe, "--tasks", "clean,equivariance", "--num-images", "2", "--num-workers", "0",
           "--output-dir", tmp_path)  # a rescaled grid has no invariance error: NaN
    out = json.loads((tmp_path / "robustness.json").read_text(), parse_constant=refuse)
    assert out["equivariance"]["scale1.25"]["inv_error"] == [None, None]
    assert all(-1 <= v <= 1 for v in out["equivariance"]["rot90"]["cos"])  # numbers stay numbers


def robust_ddp_worker(rank, world, argv):
    robust(*argv)


def test_chance_baseline_pairs_the_same_images_whatever_the_batching(tiny_probe, tmp_path):
    def chance(*flags):  # the unrelated image of each image: not a batch neighbour, which the batching decides
        robust("--equivariance-only", "--probe", tiny_probe, "--num-images", "5", "--num-workers", "0",
               "--output-dir", tmp_path, *flags)
        out = json.loads((tmp_path / "robustness.json").read_text())["equivariance"]
        return np.array([[v["chance_cos"], v["chance_rel_error"]] for v in out.values()])

    one = chance("--batch-size", "1")
    assert np.isfinite(one).all()  # a batch of one has no neighbour
    np.testing.assert_allclose(chance("--batch-size", "3"), one, rtol=1e-5)


@pytest.mark.slow
def test_two_process_equivariance_equals_one_process(tiny_probe, tmp_path):
    argv = ["--equivariance-only", "--probe", tiny_probe, "--num-images", "5", "--num-workers", "0",
            "--batch-size", "2"]
    spawn(robust_ddp_worker, argv + ["--output-dir", tmp_path / "ddp"])
    robust(*argv, "--output-dir", tmp_path / "one")
    ddp, one = (json.loads((tmp_path / run / "robustness.json").read_text()) for run in ("ddp", "one"))
    assert ddp["world_size"] == 2

    def scores(out):  # null (no invariance error across grid sizes) as NaN
        return np.array([[v[m] for m in robustness_eval.EQUIV_METRICS] for v in out["equivariance"].values()], float)
    np.testing.assert_allclose(scores(ddp), scores(one), rtol=1e-5)


def test_robustness_eval_refuses_a_backbone_of_non_finite_features_naming_its_file(tmp_path):
    good, bad = tiny_vit(seed=0, depth=2, num_heads=2).eval(), tiny_vit(seed=0, depth=2, num_heads=2).eval()
    with torch.no_grad():
        bad.patch_embed.proj.weight.mul_(1e30)  # finite weights, tokens that overflow: NaN from the first norm
    probe = tmp_path / "linear_probe.pth"
    linear_eval.save_probe(probe, bad, linear_eval.LinearClassifier(64, 6), 1, False, 6, 32, "synthetic")
    for name, model in (("good", good), ("bad", bad)):
        os.makedirs(tmp_path / name)
        torch.save({"arch": model.arch, "backbone": model.state_dict()}, tmp_path / name / "backbone.pth")
    runs = [(["--probe", probe, "--tasks", "clean"], f"--probe {probe}"),
            (["--probe", probe, "--tasks", "p", "--perturbations", "rotate", "--p-frames", "3"], f"--probe {probe}"),
            (["--equivariance-only", "--backbone", tmp_path / "bad/backbone.pth"], "--backbone .*bad/backbone.pth"),
            (["--equivariance-only", "--backbone", tmp_path / "good/backbone.pth", tmp_path / "bad/backbone.pth"],
             "--backbone .*bad/backbone.pth")]  # the comparison table names the run that fails
    for argv, source in runs:
        with pytest.raises(SystemExit, match=f"^{source}: the backbone gives non-finite features .*be evaluated"):
            robust(*argv, "--num-images", "2", "--num-workers", "0", "--output-dir", tmp_path / "out")
    assert not (tmp_path / "out" / "robustness.json").exists()


def test_robustness_outputs_are_tried_before_any_work(tiny_probe, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv = ["--probe", tiny_probe, "--tasks", "clean", "--num-images", "2", "--num-workers", "0",
            "--output-dir", tmp_path / "out"]
    for flag in ("--output-dir", "--figures"):
        with pytest.raises(SystemExit, match=f"^{flag} .*file: cannot write there"):
            robust(*argv, flag, tmp_path / "file")
        assert "clean top-1" not in capsys.readouterr().out
    assert robust(*argv)["num_images"] == 2


@pytest.mark.parametrize("tasks, flags", [
    ("clean", "--c-jpeg"), ("clean", "--corruptions fog"), ("clean", "--mce off"), ("clean", "--imagenet-c-dir C"),
    ("clean", "--frost-dir F"), ("c", "--corruptions fog --frost-dir F"),  # frost not generated: its photos unread
    ("c", "--imagenet-c-dir C --frost-dir F"), ("c", "--imagenet-c-dir C --c-jpeg"),
    ("c", "--imagenet-c-dir C --seed 1"),
    ("clean", "--perturbations rotate"), ("clean,c", "--p-frames 3"), ("clean", "--p-difficulty 2"),
    ("clean", "--p-normalizers N"), ("clean", "--imagenet-p-dir P"), ("p", "--imagenet-p-dir P --p-frames 3"),
    ("clean", "--seed 1"), ("clean,c", "--scales 0.5"), ("clean", "--figure-layer 2"), ("clean", "--figure-images 3"),
    ("clean", "--arch vit_small"), ("clean", "--patch-size 8"),  # the probe's architecture is its own
    (None, "--equivariance-only --corruptions fog"), (None, "--equivariance-only --figure-layer 1")])
def test_flags_the_run_would_ignore_are_refused(tiny_probe, tmp_path, tasks, flags):
    argv = ["--probe", tiny_probe, "--num-images", "2", "--num-workers", "0", "--output-dir", tmp_path / "out",
            *(["--tasks", tasks] if tasks else []), *flags.split()]  # C, F, N, P: paths never read
    refused = [f for f in flags.split() if f.startswith("--")][-1]
    with pytest.raises(SystemExit, match=f"^{refused} is read only with .*; this run would ignore it: drop it$"):
        robust(*argv)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_every_ignored_flag_is_named_and_the_read_ones_run(tiny_probe, tmp_path):
    ignored = ("--c-jpeg --p-frames 3 --corruptions fog --perturbations rotate --figure-layer 2 --figure-images 3 "
               "--scales 0.5 --p-difficulty 2 --mce off").split()
    with pytest.raises(SystemExit) as refused:
        robust("--probe", tiny_probe, "--tasks", "clean", "--output-dir", tmp_path, *ignored)
    assert "\n" not in str(refused.value) and all(f in str(refused.value) for f in ignored if f.startswith("--"))
    out = robust("--probe", tiny_probe, "--tasks", "geometry", "--scales", "0.5", "--num-images", "2",
                 "--num-workers", "0", "--output-dir", tmp_path)  # each read where its task runs
    assert set(out["geometry"]) == {"rot90", "rot180", "rot270", "hflip", "vflip", "scale0.5"}
    figures = robust("--equivariance-only", "--probe", tiny_probe, "--num-images", "2", "--num-workers", "0",
                     "--figures", tmp_path / "figures", "--figure-layer", "1", "--figure-images", "1",
                     "--output-dir", tmp_path / "equivariance")  # not the geometry run's: its results stay
    assert "equivariance" in figures and (tmp_path / "figures" / "equivariance.png").is_file()


def test_imagenet_p_frame_counts_and_normalizers_are_refused_before_any_work(tiny_probe, tmp_path, capsys):
    argv = ["--probe", tiny_probe, "--tasks", "p", "--perturbations", "gaussian_noise,rotate", "--num-images", "2",
            "--num-workers", "0", "--output-dir", tmp_path / "out", "--p-frames", "3"]
    for flags, message in ((["--p-frames", "2", "--p-difficulty", "2"], "^--p-difficulty 2 compares frames 2 apart"),
                           (["--p-frames", "1000"], "^--p-frames must be in 2..31")):
        with pytest.raises(SystemExit, match=message):
            robust(*argv, *flags)
        assert "ImageNet-P" not in capsys.readouterr().out
    norms = tmp_path / "normalizers.json"
    for unreadable in ('{"fp": {"rotate": 1}}', norms, tmp_path):  # the JSON itself, a missing file, a folder
        with pytest.raises(SystemExit, match="^--p-normalizers .*: cannot read it .*; pass the path of a JSON file"):
            robust(*argv, "--p-normalizers", unreadable)
    for bad in ("0", "-1", "nan", "inf"):  # they divide: ZeroDivisionError, or a NaN or negative mFR
        fp = {"gaussian_noise": 1, "rotate": float(bad)}
        norms.write_text(json.dumps({"fp": fp, "t5d": {"gaussian_noise": 1, "rotate": 1}}))
        with pytest.raises(SystemExit, match="^--p-normalizers .*: fp rotate must be positive, got"):
            robust(*argv, "--p-normalizers", norms)
        assert "ImageNet-P" not in capsys.readouterr().out
    every = robustness_eval.PERTURBATIONS
    norms.write_text(json.dumps({"fp": {k: 0.5 for k in every}, "t5d": {k: 2 for k in every}}))
    with pytest.raises(SystemExit, match="^--p-normalizers: mFR and mT5D need all 10 perturbations"):
        robust(*argv, "--p-normalizers", norms)  # mFR over 2 of the 10 is no mFR, as mCE
    assert "ImageNet-P" not in capsys.readouterr().out
    p = robust(*argv, "--perturbations", ",".join(every), "--p-normalizers", norms)["imagenet_p"]
    assert p["mfr"] == pytest.approx(100 * p["mean_fp"] / 50) and p["mt5d"] == pytest.approx(50 * p["mean_t5d"])
    assert all(v["num_videos"] == 2 for v in p["per_perturbation"].values())  # the videos each scored
    norms.write_text(json.dumps({"fp": {k: 50 for k in every}, "t5d": {k: 2 for k in every}}))
    with pytest.raises(SystemExit, match="^--p-normalizers .*: fp gaussian_noise must be at most 1 .FP is a probab"):
        robust(*argv, "--p-normalizers", norms)  # 50 is a percent: mFR would be 100 times too small


def _png(path, size=32):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size, size, 3), 90, np.uint8)).save(path)


@pytest.fixture
def ab_probe(tmp_path):
    """robustness_eval argv for a probe that records its classes a, b, and --data with those classes."""
    _write_png_tree(tmp_path, "val", classes=("a", "b"), n=1)
    probe = tmp_path / "linear_probe.pth"
    linear_eval.save_probe(probe, tiny_vit(seed=0, depth=2, num_heads=2), linear_eval.LinearClassifier(64, 2), 1,
                           False, 2, 32, "train data", classes=["a", "b"])
    return ["--probe", probe, "--data", tmp_path, "--num-workers", "0", "--output-dir", tmp_path / "out"]


def test_imagenet_c_dir_folders_classes_and_images_are_checked(ab_probe, tmp_path, capsys):
    c = tmp_path / "c"
    for s in range(1, 6):
        for k in "ab":
            _png(c / "fog" / str(s) / k / "0.png")
    argv = ab_probe + ["--tasks", "c", "--corruptions", "fog", "--imagenet-c-dir", c]
    assert robust(*argv)["imagenet_c"]["source"] == "released"
    (c / "fog/3/b/0.png").unlink()
    with pytest.raises(SystemExit, match="^--imagenet-c-dir: .*fog/3/b holds no"):  # else its error is NaN
        robust(*argv)
    os.rmdir(c / "fog/3/b")  # by position, labels would shift in this severity only
    with pytest.raises(SystemExit, match=r"fog/3: class folder 1 is \(none\) but .*fog/2's is b"):
        robust(*argv)
    for s in range(1, 6):  # other names than the probe's classes, in every severity
        os.rename(c / "fog" / str(s) / "a", c / "fog" / str(s) / "z")
    with pytest.raises(SystemExit, match="fog/1: class folder 0 is b but the probe's is a; labels are class"):
        robust(*argv)
    for s in range(1, 6):
        os.rename(c / "fog" / str(s) / "z", c / "fog" / str(s) / "a")
    _png(c / "fog/3/b/0.png", size=24)
    with pytest.raises(augment.UnreadableImage, match="fog/3/b/0.png is 24x24; --img-size 32 needs at least 32x32"):
        robust(*argv)
    (c / "fog/3/b/0.png").write_bytes(b"")  # as the user runs it: one line naming the file
    argv[argv.index(tmp_path / "out")] = tmp_path / "cli_out"  # this process holds its runs' folder (lock_output_dir)
    code, last, _ = run_script("robustness_eval.py", *argv)
    assert code == 1 and last.startswith("error: cannot read image file") and "fog/3/b/0.png" in last
    _png(c / "fog/3/b/0.png")
    _png(c / "fog/3/a/0.png", size=24)  # one image of each set is checked before the clean pass, not after it
    capsys.readouterr()
    with pytest.raises(augment.UnreadableImage, match="fog/3/a/0.png is 24x24; --img-size 32 needs at least"):
        robust(*argv)
    assert "clean top-1" not in capsys.readouterr().out


def test_imagenet_p_dir_folders_videos_and_frames_are_checked(ab_probe, tmp_path, capsys):
    p = tmp_path / "p"
    for k in "ab":
        for f in range(3):
            _png(p / "rotate" / k / "v0" / f"{f}.png")
    argv = ab_probe + ["--tasks", "p", "--perturbations", "rotate", "--imagenet-p-dir", p]

    def refused(*flags, match, error=SystemExit):
        with pytest.raises(error, match=match):
            robust(*argv, *flags)

    assert robust(*argv)["imagenet_p"]["per_perturbation"]["rotate"]["frames"] == 3
    capsys.readouterr()
    refused("--perturbations", "rotate,scale", match="no folder scale")  # before rotate's pass
    assert "ImageNet-P rotate" not in capsys.readouterr().out
    refused("--p-difficulty", "3", match="--p-difficulty 3 compares frames 3 apart, but rotate has 3 frames per video")
    for f in range(2):
        _png(p / "rotate/b/v1" / f"{f}.png")
    refused(match="rotate/b/v1 has 2 frame.* but .*rotate/a/v0 has 3; all need as many")
    (p / "rotate/b/v1/1.png").unlink()
    refused(match="rotate/b/v1 has 1 frame.* but a video needs at least 2")
    (p / "rotate/b/v1/0.png").unlink()
    os.rmdir(p / "rotate/b/v1")
    _png(p / "rotate/b/v0/2.png", size=40)  # a crop of it would be another frame
    refused(match="rotate/b/v0/2.png is 40x40; --img-size 32 needs exactly 32x32", error=augment.UnreadableImage)
    (p / "rotate/b/v0/2.png").write_bytes(b"")
    refused(match="cannot read image file .*rotate/b/v0/2.png", error=augment.UnreadableImage)
    _png(p / "rotate/b/v0/2.png")
    for k in "ab":  # a second perturbation whose frames are of another size: refused before rotate's pass
        for f in range(3):
            _png(p / "scale" / k / "v0" / f"{f}.png", size=40)
    capsys.readouterr()
    refused("--perturbations", "rotate,scale", match="scale/a/v0/0.png is 40x40; --img-size 32 needs exactly",
            error=augment.UnreadableImage)
    assert "ImageNet-P rotate" not in capsys.readouterr().out
    os.rename(p / "rotate/a", p / "rotate/c")
    refused(match="rotate: class folder 0 is b but the probe's is a")


def _released_c(root, corruptions=("fog",), per_class=1):
    for name in corruptions:
        for s in range(1, 6):
            for k in "ab":
                for i in range(per_class):
                    _png(root / name / str(s) / k / f"{i}.png")


def test_counts_the_run_cannot_have_are_said(tiny_probe, tmp_path, capsys):
    """One image has no unrelated partner (the chance baseline is NaN); more images than the data holds are all."""
    out = robust("--probe", tiny_probe, "--tasks", "equivariance", "--num-images", "1", "--num-workers", "0",
                 "--output-dir", tmp_path)
    assert math.isnan(out["equivariance"]["rot90"]["chance_cos"][0])
    assert "one image has no unrelated image to pair with: the chance baseline is NaN" in capsys.readouterr().out
    images, _, _ = robustness_eval.val_images(SimpleNamespace(data="synthetic", num_images=10**6), 32)
    assert f"--num-images 1000000, but --data synthetic has {len(images)} val images: all are used" in \
        capsys.readouterr().out


def test_released_folders_fix_the_images_and_each_task_records_its_count(ab_probe, tmp_path):
    """--num-images cuts the clean images, never the release: relative mCE would mix errors over other images."""
    _released_c(tmp_path / "c", per_class=2)
    argv = ab_probe + ["--tasks", "clean,c", "--corruptions", "fog", "--imagenet-c-dir", tmp_path / "c"]
    with pytest.raises(SystemExit, match="^--num-images with --imagenet-c-dir: the released folders fix the images"):
        robust(*argv, "--num-images", "1")
    out = robust(*argv)
    assert out["num_images"] == 2 and out["imagenet_c"]["num_images"] == 4
    _released_c(tmp_path / "c", robustness_eval.CORRUPTIONS, per_class=2)  # 4 images a set against 2 clean ones
    full = robust(*ab_probe, "--tasks", "clean,c", "--imagenet-c-dir", tmp_path / "c", "--mce", "on")["imagenet_c"]
    assert "mce" in full and "relative_mce" not in full  # which subtracts the clean error of other images
    _released_c(tmp_path / "c1", robustness_eval.CORRUPTIONS, per_class=1)
    assert "relative_mce" in robust(*ab_probe, "--tasks", "clean,c", "--imagenet-c-dir", tmp_path / "c1", "--mce",
                                    "on")["imagenet_c"]
    for f in range(2):
        _png(tmp_path / "p" / "rotate" / "a" / "v0" / f"{f}.png")
        _png(tmp_path / "p" / "rotate" / "b" / "v0" / f"{f}.png")
    with pytest.raises(SystemExit, match="^--num-images with --imagenet-p-dir: the released folders fix the images"):
        robust(*ab_probe, "--tasks", "p", "--perturbations", "rotate", "--imagenet-p-dir", tmp_path / "p",
               "--num-images", "1")


def test_released_severities_must_hold_as_many_images(ab_probe, tmp_path):
    c = tmp_path / "c"
    _released_c(c, ("fog", "snow"), per_class=2)
    argv = ab_probe + ["--tasks", "c", "--corruptions", "fog,snow", "--imagenet-c-dir", c]
    (c / "snow/3/a/1.png").unlink()  # a partial download: averaged as a whole severity
    with pytest.raises(SystemExit, match="^--imagenet-c-dir: .*snow/3 holds 3 images but .*fog/1 holds 4; every"):
        robust(*argv)
    _png(c / "snow/3/a/1.png")
    _released_c(c / "weather", ("snow",), per_class=2)  # a per-family copy beside the flat one
    for k in "ab":
        for i in range(2):
            (c / "snow/4" / k / f"{i}.png").unlink()
        os.rmdir(c / "snow/4" / k)
    os.rmdir(c / "snow/4")  # flat severity 4 would be read from the family copy
    with pytest.raises(SystemExit, match="^--imagenet-c-dir .*: snow is in both .*c/snow and .*c/weather/snow; keep"):
        robust(*argv)


def test_released_class_folders_without_videos_and_folders_named_like_images_are_refused(ab_probe, tmp_path):
    p = tmp_path / "p"
    for k in "ab":
        for f in range(2):
            _png(p / "rotate" / k / "v0" / f"{f}.png")
    os.rename(p / "rotate/b/v0", tmp_path / "v0")
    (p / "rotate/b/v0.mp4").write_bytes(b"")  # not extracted: the class would silently drop out, as in ImageNet-C
    with pytest.raises(SystemExit, match="^--imagenet-p-dir: .*rotate/b holds no per-video frame folders"):
        robust(*ab_probe, "--tasks", "p", "--perturbations", "rotate", "--imagenet-p-dir", p)
    c = tmp_path / "c"
    _released_c(c)
    os.makedirs(c / "fog/5/a/zzz.png")  # a folder named like an image: no image, not a video
    argv = ab_probe + ["--tasks", "c", "--corruptions", "fog", "--imagenet-c-dir", c]
    assert robust(*argv)["imagenet_c"]["num_images"] == 2
    _png(c / "fog/5/a/zzz.png/0.png")
    assert robust(*argv)["imagenet_c"]["num_images"] == 2


def test_released_c_images_larger_than_the_model_are_resized_whole_not_cropped(tmp_path):
    """A released image is already an eval crop: a 32-px model sees all of a 64-px one, its red border too."""
    u8 = np.zeros((64, 64, 3), np.uint8)
    u8[..., 0] = 255
    u8[16:48, 16:48] = (0, 255, 0)  # the part a centre crop keeps
    Image.fromarray(u8).save(tmp_path / "big.png")
    small = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(small).save(tmp_path / "small.png")
    data = robustness_eval.Released([(str(tmp_path / "big.png"), 0), (str(tmp_path / "small.png"), 1)], [0, 0], 32)
    big, _ = data.load(data.items[0])
    assert big.shape == (32, 32, 3) and big[0, 0, 0] > 200 and big[16, 16, 1] > 200
    assert np.array_equal(data.load(data.items[1])[0], small)  # at the model's size: read as it is


def test_scales_that_leave_the_token_grid_or_repeat_another_are_refused(tiny_probe, tmp_path):
    argv = ["--probe", tiny_probe, "--tasks", "geometry", "--num-images", "2", "--num-workers", "0",
            "--output-dir", tmp_path / "out"]  # a 4x4 token grid
    with pytest.raises(SystemExit, match=r"^--scales 1.1: on the 4x4 token grid it gives 4x4 .effective scale 1., the"):
        robust(*argv, "--scales", "0.5", "1.1")  # 4 * 1.1 rounds to 4: no rescaling, reported as one
    with pytest.raises(SystemExit, match=r"^--scales 1.2 and 1.3: on the 4x4 token grid both give 5x5 .effective sc"):
        robust(*argv, "--scales", "1.2", "1.3")
    assert not (tmp_path / "out").exists()  # refused before any work
    assert set(robust(*argv, "--scales", "0.5", "1.5")["geometry"]) >= {"scale0.5", "scale1.5"}


def test_released_class_folders_take_the_probe_labels_of_their_names(tmp_path):
    """The built-in classes are not alphabetical: sorted folders get the label of their name, not of their place."""
    classes = ["circle", "triangle", "square"]
    for s in range(1, 6):
        for k in classes:
            _png(tmp_path / "fog" / str(s) / k / "0.png")
    data = robustness_eval.released_corruptions(str(tmp_path), [("fog", s) for s in range(1, 6)], 32, 3, classes)
    assert {os.path.basename(os.path.dirname(p)): label for p, label in data.items} == {k: i for i, k in
                                                                                          enumerate(classes)}
    with pytest.raises(SystemExit, match="fog/1: class folder 2 is triangle but the probe's is star; labels are"):
        robustness_eval.released_corruptions(str(tmp_path), [("fog", 1)], 32, 3, ["circle", "square", "star"])


def test_figure_paths_are_tried_before_any_work_and_the_numbers_written_first(tiny_probe, tmp_path, capsys,
                                                                              monkeypatch):
    argv = ["--probe", tiny_probe, "--tasks", "clean", "--num-images", "2", "--num-workers", "0",
            "--output-dir", tmp_path / "out", "--figures", tmp_path / "fig"]
    attention = f"attention_{robustness_eval.probe_name(tiny_probe)}.png"
    os.makedirs(tmp_path / "fig" / attention)
    with pytest.raises(SystemExit, match=f"^--figures .*fig: {attention} there is a folder"):
        robust(*argv)
    assert "clean top-1" not in capsys.readouterr().out
    os.rmdir(tmp_path / "fig" / attention)

    def full_disk(*_, **__):
        raise OSError(28, "No space left on device", str(tmp_path / "fig" / "equivariance.png"))

    monkeypatch.setattr(robustness_eval, "write_figures", full_disk)
    with pytest.raises(SystemExit, match="could not write .*equivariance.png"):
        robust(*argv)
    assert "clean" in json.loads((tmp_path / "out" / "robustness.json").read_text())  # the numbers are kept


def test_procedural_frost_is_marked_next_to_every_number(tiny_probe, tmp_path, capsys):
    argv = ["--probe", tiny_probe, "--num-images", "2", "--num-workers", "0", "--tasks", "c",
            "--corruptions", "brightness,frost", "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="--mce on needs all 15 corruptions"):  # refused before the pass
        robustness_eval.main(robustness_eval.get_args_parser().parse_args(argv + ["--mce", "on"]))
    robustness_eval.main(robustness_eval.get_args_parser().parse_args(argv))
    printed = capsys.readouterr().out
    assert "ImageNet-C (10 sets): batch 1/1, " in printed  # progress of the pass
    frost_row = next(l for l in printed.splitlines() if l.strip().startswith("frost "))
    mean_row = next(l for l in printed.splitlines() if "mean top-1 over" in l)
    assert frost_row.endswith("*") and mean_row.split(":")[1].split()[0].endswith("*")
    assert "* frost used a procedural texture" in printed and "--frost-dir" in printed
    c = json.loads((tmp_path / "robustness.json").read_text())["imagenet_c"]
    assert c["top1_frost"].startswith("procedural substitute") and "top1_per_corruption_frost" in c
    assert c["errors_frost"] == c["error_per_severity_frost"] == c["top1_frost"]  # both hold frost's numbers
    robustness_eval.main(robustness_eval.get_args_parser().parse_args([  # without frost, nothing is marked
        "--probe", tiny_probe, "--num-images", "2", "--num-workers", "0", "--tasks", "c",
        "--corruptions", "brightness", "--output-dir", str(tmp_path)]))
    assert "*" not in capsys.readouterr().out
    assert not any(k.endswith("_frost") for k in json.loads((tmp_path / "robustness.json").read_text())["imagenet_c"])


def test_motion_blur_matches_imagemagick_q16_bit_for_bit():
    """Fixture: make_imagenet_c.py's path (PNG -> Wand MagickMotionBlurImage -> make_blob PNG) with
    ImageMagick 6.9.11 Q16 and Wand 0.6.13, radius 3, sigma 1.5, angle 20, on a grey 3x8 image."""
    i, j = np.mgrid[0:3, 0:8]
    image = np.repeat(((i * 97 + j * 41) % 256)[..., None], 3, -1).astype(np.float64)
    magick = np.array([[57, 83, 80, 121, 162, 200, 145, 54], [95, 136, 177, 132, 65, 103, 134, 151],
                       [168, 123, 57, 98, 138, 176, 207, 225]])
    out = robustness_eval.magick_motion_blur(image, 3.0, 1.5, 20.0)
    assert np.array_equal(out[..., 0], magick) and np.array_equal(out[..., 2], magick)


def test_figures_of_other_weights_are_refused_in_their_folder(tiny_probe, tmp_path, capsys):
    """--figures records what its figures are of (figures.json): a run of another probe or of other backbones is
    refused there in one line before any work (equivariance.png is one for all of them), a rerun of the same one
    replaces them. A probe's attention map is named after its run."""
    other = tmp_path / "other" / "linear" / "linear_probe.pth"  # linear_eval.py's <run>/linear
    os.makedirs(other.parent)
    other.write_bytes(open(tiny_probe, "rb").read())
    model = tiny_vit(seed=0, depth=2, num_heads=2)
    os.makedirs(tmp_path / "base")
    torch.save({"arch": model.arch, "backbone": model.state_dict()}, tmp_path / "base" / "backbone.pth")
    fig = tmp_path / "fig"
    common = ["--equivariance-only", "--num-images", "2", "--num-workers", "0", "--figure-images", "1",
              "--figures", fig]
    robust(*common, "--probe", tiny_probe, "--output-dir", tmp_path / "a")
    assert json.loads((fig / "figures.json").read_text()) == {"source": [os.path.realpath(tiny_probe)],
                                                              "data": "synthetic"}
    name = os.path.basename(os.path.dirname(tiny_probe))
    assert robustness_eval.probe_name(tiny_probe) == name and (fig / f"attention_{name}.png").is_file()
    assert robustness_eval.probe_name(str(other)) == "other"
    written = {p.name: p.read_bytes() for p in fig.iterdir()}
    capsys.readouterr()
    refused = (f"^--figures {fig} holds the figures.json of {os.path.realpath(tiny_probe)}, this run's \\(.*\\) "
               "would replace it: choose another --figures \\(or move that one away\\)$")
    for argv, out in ((["--probe", other], "b"), (["--backbone", tmp_path / "base" / "backbone.pth"], "c")):
        with pytest.raises(SystemExit, match=refused):
            robust(*common, *argv, "--output-dir", tmp_path / out)
        assert "equivariance per block" not in capsys.readouterr().out
        assert not (tmp_path / out / "robustness.json").exists()
    assert {p.name: p.read_bytes() for p in fig.iterdir()} == written
    robust(*common, "--probe", tiny_probe, "--output-dir", tmp_path / "a")  # a rerun replaces its own
    robust(*common, "--probe", tiny_probe, "--output-dir", fig)  # one folder for both: its lock is taken once
    assert {"robustness.json", "figures.json", "equivariance.png"} <= set(os.listdir(fig))
    (fig / "figures.json").unlink()  # figures that record nothing (an earlier version's): kept, not replaced
    with pytest.raises(SystemExit, match=f"^--figures {fig} holds an equivariance.png that no figures.json records"):
        robust(*common, "--probe", tiny_probe, "--output-dir", tmp_path / "a")


def test_robustness_json_records_an_unfinished_runs_backbone(tmp_path, capsys):
    """As linear_eval.json: robustness.json says when the backbone is of a run that had not finished (a
    backbone.pth exported at an epoch's end or on a signal), of a --backbone or of the one a probe was trained on;
    the comparison table per run."""
    model = tiny_vit(seed=0, depth=2, num_heads=2)
    for name, steps in (("done", {}), ("early", {"step": 1, "total_steps": 2})):
        os.makedirs(tmp_path / name)
        torch.save({"arch": model.arch, "backbone": model.state_dict(), **steps}, tmp_path / name / "backbone.pth")
    linear_eval.main(["--pretrained", str(tmp_path / "early" / "backbone.pth"), "--train-length", "64",
                      "--val-length", "32", "--batch-size", "32", "--cached", "--epochs", "1", "--lrs", "0.03",
                      "--knn-k", "0", "--num-workers", "0", "--output-dir", str(tmp_path / "early" / "linear")])
    capsys.readouterr()
    common = ["--equivariance-only", "--num-images", "2", "--num-workers", "0"]
    robust(*common, "--probe", tmp_path / "early" / "linear" / "linear_probe.pth", "--output-dir", tmp_path / "a")
    assert "linear_probe.pth: its backbone is of step 1 of 2: its run has not finished" in capsys.readouterr().out
    for backbone, out in (("early", "b"), ("done", "c")):
        robust(*common, "--backbone", tmp_path / backbone / "backbone.pth", "--output-dir", tmp_path / out)
    robust(*common, "--backbone", *(tmp_path / n / "backbone.pth" for n in ("done", "early")),
           "--output-dir", tmp_path / "d")
    written = {d: json.loads((tmp_path / d / "robustness.json").read_text()) for d in "abcd"}
    assert [written[d].get("backbone_unfinished", "absent") for d in "abc"] == [[1, 2], [1, 2], None]
    assert {n: run["backbone_unfinished"] for n, run in written["d"]["runs"].items()} == {"done": None, "early": [1, 2]}


def test_released_severities_must_hold_the_same_images_in_each_class(tmp_path):
    """As many images in all is not enough: 7+1 in one severity against 4+4 in the others weighs its classes
    otherwise, and other files are other val images."""
    sets = [("gaussian_noise", s) for s in range(1, 6)]
    for s in range(1, 6):
        for k, n in zip("ab", (7, 1) if s == 3 else (4, 4)):
            for i in range(n):
                _png(tmp_path / "gaussian_noise" / str(s) / k / f"{i}.jpg")
    with pytest.raises(SystemExit, match="^--imagenet-c-dir: .*gaussian_noise/3/a holds 7 images but .*gaussian_noise"
                                         "/1/a holds 4; every corruption and severity needs the same images"):
        robustness_eval.released_corruptions(str(tmp_path), sets, 32, 2, ["a", "b"])
    for i in range(4, 7):
        os.rename(tmp_path / f"gaussian_noise/3/a/{i}.jpg", tmp_path / f"gaussian_noise/3/b/{i - 3}.jpg")
    os.rename(tmp_path / "gaussian_noise/5/b/2.jpg", tmp_path / "gaussian_noise/5/b/9.jpg")
    with pytest.raises(SystemExit, match="^--imagenet-c-dir: .*gaussian_noise/5/b lacks 2.jpg of .*gaussian_noise/1/b "
                                         "and holds 9.jpg instead; every"):
        robustness_eval.released_corruptions(str(tmp_path), sets, 32, 2, ["a", "b"])
    os.rename(tmp_path / "gaussian_noise/5/b/9.jpg", tmp_path / "gaussian_noise/5/b/2.jpg")
    assert len(robustness_eval.released_corruptions(str(tmp_path), sets, 32, 2, ["a", "b"])) == 40


def test_released_video_frames_saved_twice_are_refused(tmp_path):
    """1.jpg..3.jpg beside 1.png..3.png in every video would be read as videos of 6 interleaved frames."""
    for k in "ab":
        for f in range(1, 4):
            _png(tmp_path / "rotate" / k / "v0" / f"{f}.png")
            _png(tmp_path / "rotate" / k / "v0" / f"{f}.jpg")
    with pytest.raises(SystemExit, match=r"^--imagenet-p-dir: .*rotate/a/v0 holds frame 1 twice \(1.jpg and 1.png\); "
                                         "keep one file per frame$"):
        robustness_eval.released_sequences(str(tmp_path), "rotate", 1, 32, 2, ["a", "b"])
    for k in "ab":
        for f in range(1, 4):
            (tmp_path / "rotate" / k / "v0" / f"{f}.jpg").unlink()
    assert robustness_eval.released_sequences(str(tmp_path), "rotate", 1, 32, 2, ["a", "b"])[1] == 3


def test_p_normalizers_that_are_no_file_or_no_numbers_are_refused_in_one_line(tmp_path):
    """A FIFO would block open() for good; a number beyond a float overflows and true is no FP of 1."""
    os.mkfifo(tmp_path / "fifo")

    with no_hang("load_normalizers waited on a pipe"):
        with pytest.raises(SystemExit, match="^--p-normalizers: .*fifo is not a regular file .a pipe or a device., so "
                                             "not a JSON file$"):
            robustness_eval.load_normalizers(str(tmp_path / "fifo"), ["rotate"])
    norms = tmp_path / "normalizers.json"
    for fp in ("9" * 400, "true", "[" * 100_000):  # the last too deep for json
        norms.write_text('{"fp": {"rotate": %s}, "t5d": {"rotate": 1}}' % fp)
        with pytest.raises(SystemExit, match="^--p-normalizers .*: need {'fp': {pert: value}, 't5d': {...}} for every"):
            robustness_eval.load_normalizers(str(norms), ["rotate"])
    norms.write_text('{"fp": {"rotate": 0.5}, "t5d": {"rotate": 1}}')
    assert robustness_eval.load_normalizers(str(norms), ["rotate"]) == {"fp": {"rotate": 0.5}, "t5d": {"rotate": 1}}

# ================================================================================================
# detect_eval.py: ViTDet pyramid, Faster R-CNN, COCO mAP
# ================================================================================================

# ----------------------------------------------------------------------------- COCO evaluator
def make_gt(boxes, num_images=None, cats=(1,), size=300):
    """boxes: [(image_id, category_id, [x, y, w, h], area or None, iscrowd)]; area None = box area."""
    ids = range(1, 1 + (num_images or max(b[0] for b in boxes)))
    anns = [{"id": i + 1, "image_id": img, "category_id": c, "bbox": box, "iscrowd": crowd,
             "area": box[2] * box[3] if area is None else area}
            for i, (img, c, box, area, crowd) in enumerate(boxes)]
    return {"images": [{"id": i, "file_name": f"{i}.png", "width": size, "height": size} for i in ids],
            "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in cats]}


def det(image_id, box, score, category_id=1):
    return {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}


def stats(gt, dets):
    return dict(zip(detect_eval.STAT_NAMES, detect_eval.coco_evaluate(gt, dets)))


def test_perfect_detections_score_one():
    boxes = [(1, 1, [10, 10, 10, 10], None, 0), (2, 1, [50, 50, 50, 50], None, 0),
             (3, 2, [0, 0, 120, 120], None, 0), (3, 1, [200, 200, 40, 40], None, 0)]  # small, medium, large
    gt = make_gt(boxes, cats=(1, 2))
    dets = [det(img, box, 0.9, c) for img, c, box, _, _ in boxes]
    # Not bit-exact 1: pycocotools' precision is tp / (tp + fp + eps), 1 - 2e-16 for a single TP.
    assert detect_eval.coco_evaluate(gt, dets) == pytest.approx([1.0] * 12, abs=1e-12)


def test_shifted_box_iou_06_counts_at_three_thresholds():
    gt = make_gt([(1, 1, [0, 0, 10, 10], None, 0)])
    s = stats(gt, [det(1, [0, 0, 6, 10], 0.9)])  # IoU = 60 / 100 = 0.6 exactly
    assert s["AP"] == pytest.approx(3 / 10, abs=1e-12)  # matched at .5, .55, .6 only
    assert s["AP50"] == pytest.approx(1.0, abs=1e-12) and s["AP75"] == 0.0
    assert s["APs"] == pytest.approx(0.3, abs=1e-12) and s["APm"] == -1 and s["APl"] == -1
    assert s["AR100"] == pytest.approx(0.3, abs=1e-12) and s["ARm"] == -1


def test_duplicate_detection_is_a_false_positive():
    gt = make_gt([(1, 1, [0, 0, 20, 20], None, 0), (2, 1, [0, 0, 20, 20], None, 0)])
    dets = [det(1, [0, 0, 20, 20], 0.9), det(1, [0, 0, 20, 20], 0.8), det(2, [0, 0, 20, 20], 0.7)]
    s = stats(gt, dets)
    # TP, FP, TP: precision 1 up to recall .5 (51 recall points), then 2/3 (50 points).
    assert s["AP"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)
    assert (s["AR1"], s["AR100"]) == (1.0, 1.0)


def test_greedy_matching_ties_go_to_the_later_gt():
    gt = make_gt([(1, 1, [0, 0, 10, 10], None, 0), (1, 1, [4, 0, 10, 10], None, 0)])
    # The first detection has IoU 2/3 with both GTs; it takes the later one, which leaves the first
    # GT for the second detection (IoU 1). Had it taken the earlier GT, the second would be a FP.
    dets = [det(1, [2, 0, 10, 10], 0.9), det(1, [0, 0, 10, 10], 0.8)]
    s = stats(gt, dets)
    # IoU thresholds .5-.65: two TPs -> 1. Thresholds .7-.95: FP then TP -> .5 up to recall .5 (51 points).
    assert s["AP"] == pytest.approx((4 + 6 * 0.5 * 51 / 101) / 10, abs=1e-12)
    assert s["AR100"] == pytest.approx((4 + 6 * 0.5) / 10, abs=1e-12)


def test_crowd_region_absorbs_detections():
    boxes = [(1, 1, [0, 0, 100, 100], None, 1), (1, 1, [200, 200, 20, 20], None, 0)]
    inside = [det(1, [10 + 20 * i, 10, 20, 20], 0.9 - 0.1 * i) for i in range(3)]  # IoU 1 with the crowd (den. = det area)
    dets = inside + [det(1, [200, 200, 20, 20], 0.1)]
    assert stats(make_gt(boxes), dets)["AP"] == pytest.approx(1.0, abs=1e-12)  # matched to the crowd -> ignored, not FPs
    not_crowd = make_gt([(1, 1, [0, 0, 100, 100], None, 0), boxes[1]])
    assert stats(not_crowd, dets)["AP"] < 0.5  # as a normal GT the three are FPs (IoU .04)


def test_empty_images_and_missing_ground_truth():
    gt = make_gt([(1, 1, [0, 0, 20, 20], None, 0)], num_images=3, cats=(1, 2))
    # Image 3 has neither GT nor detections (no effect); category 2 has no GT (-1, left out of the means).
    dets = [det(2, [0, 0, 20, 20], 0.9), det(1, [0, 0, 20, 20], 0.5)]  # FP on image 2 ranks first
    s = stats(gt, dets)
    assert s["AP"] == pytest.approx(0.5, abs=1e-12) and s["AR100"] == 1.0 and s["AR1"] == 1.0
    no_gt = make_gt([(1, 1, [0, 0, 20, 20], None, 0)], num_images=3)
    no_gt["annotations"] = []
    assert detect_eval.coco_evaluate(no_gt, dets[:1]) == [-1.0] * 12
    with pytest.raises(ValueError, match="not in the ground truth"):
        detect_eval.coco_evaluate(gt, [det(9, [0, 0, 1, 1], 0.5)])


def test_area_buckets_use_the_gt_area_field_with_inclusive_bounds():
    s = stats(make_gt([(1, 1, [0, 0, 32, 32], None, 0)]), [det(1, [0, 0, 32, 32], 0.9)])
    assert (s["APs"], s["APm"], s["APl"]) == pytest.approx((1.0, 1.0, -1), abs=1e-12)  # area 32^2 is both small and medium
    s = stats(make_gt([(1, 1, [0, 0, 50, 50], 500, 0)]), [det(1, [0, 0, 50, 50], 0.9)])
    assert (s["APs"], s["APm"]) == pytest.approx((1.0, -1), abs=1e-12)  # 'area' field (500), not the 2500 box area
    # An unmatched detection outside the range is ignored for that range only.
    gt = make_gt([(1, 1, [0, 0, 40, 40], None, 0)])
    s = stats(gt, [det(1, [100, 100, 150, 150], 0.9), det(1, [0, 0, 40, 40], 0.5)])
    assert (s["AP"], s["APm"], s["APl"]) == pytest.approx((0.5, 1.0, -1), abs=1e-12)


def test_max_dets_cut():
    gt = make_gt([(1, 1, [0, 0, 20, 20], None, 0), (1, 1, [100, 100, 20, 20], None, 0)])
    s = stats(gt, [det(1, [0, 0, 20, 20], 0.9), det(1, [100, 100, 20, 20], 0.8)])
    assert (s["AR1"], s["AR10"], s["AR100"]) == (0.5, 1.0, 1.0)
    one = make_gt([(1, 1, [0, 0, 20, 20], None, 0)])
    fps = [det(1, [200 + i % 10, 200, 5, 5], 1 - i * 1e-3) for i in range(100)]
    assert stats(one, fps[:99] + [det(1, [0, 0, 20, 20], 1e-4)])["AP"] == pytest.approx(0.01, abs=1e-12)  # TP at rank 100
    s = stats(one, fps + [det(1, [0, 0, 20, 20], 1e-4)])  # rank 101: cut
    assert s["AP"] == 0.0 and s["AR100"] == 0.0


# ----------------------------------------------------------------------------- data
def test_synthetic_json_round_trips_and_boxes_lie_inside(tmp_path):
    synth = detect_eval.SyntheticDetection(12, img_size=64, seed=3, split="val")
    coco = synth.coco()
    path = tmp_path / "synthetic_val.json"
    path.write_text(json.dumps(coco))
    loaded = detect_eval.load_coco(str(path))
    assert loaded == coco and len(coco["annotations"]) >= 12
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w > 0 and h > 0 and 0 < a["area"] <= w * h + 1e-6
    assert detect_eval.SyntheticDetection(12, 64, seed=3, split="val").coco() == coco  # a function of (seed, index)
    assert detect_eval.SyntheticDetection(12, 64, seed=3, split="train").coco() != coco
    assert np.array_equal(np.asarray(synth.render(5)), np.asarray(synth.render(5)))
    assert detect_eval.SyntheticDetection(50, img_size=16).coco()["annotations"]  # --synthetic-size's minimum
    ds = detect_eval.CocoDetection(loaded, render=synth.render)
    img, target = ds[4]
    assert img.shape == (3, 64, 64) and img.dtype == torch.uint8 and target["image_id"] == 5
    n = sum(a["image_id"] == 5 for a in coco["annotations"])
    assert target["boxes"].shape == (n, 4) and set(target["labels"].tolist()) <= {1, 2, 3, 4}


def _write(tmp_path, coco):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return str(path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["annotations"][0].pop("bbox"), "lacks key"),
    (lambda c: c.pop("categories"), "missing top-level list 'categories'"),
    (lambda c: c["annotations"][0].update(bbox=[1, 1, 0, 5]), "non-positive size"),
    (lambda c: c["annotations"][0].update(bbox=[1, 1, -3, 5]), "non-positive size"),
    (lambda c: c["annotations"][0].update(image_id=999), "image id 999"),
    (lambda c: c["annotations"][0].update(category_id=77), "unknown category id 77"),
])
def test_bad_annotation_files_raise_clear_errors(tmp_path, edit, message):
    coco = detect_eval.SyntheticDetection(3, 64).coco()
    edit(coco)
    with pytest.raises(ValueError, match=message):
        detect_eval.load_coco(_write(tmp_path, coco))


def test_missing_invalid_degenerate_and_missing_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        detect_eval.load_coco(str(tmp_path / "nope.json"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        detect_eval.load_coco(str(tmp_path / "broken.json"))
    coco = detect_eval.SyntheticDetection(3, 64).coco()
    coco["annotations"][0]["bbox"][3] = 0
    kept = detect_eval.load_coco(_write(tmp_path, coco), allow_degenerate=True)  # kept for scoring, not for training
    assert kept["annotations"][0]["bbox"][3] == 0
    assert len(detect_eval.CocoDetection(kept, render=lambda i: None).targets[1]) == \
        sum(a["image_id"] == 1 for a in coco["annotations"]) - 1
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="image file"):
        detect_eval.load_coco(_write(tmp_path, detect_eval.SyntheticDetection(3, 64).coco()), str(tmp_path / "images"))
    # The script turns bad data into a one-line exit naming the file.
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train2017.json").write_text("[]")
    with pytest.raises(SystemExit, match="instances_train2017.json"):
        detect_eval.main(["--data", str(root), "--random-init", "--arch", "vit_tiny", "--output-dir", str(tmp_path / "out")])



def _edit_box(i, value):
    def edit(c):
        c["annotations"][0]["bbox"][i] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_edit_box(2, float("nan")), "finite numbers"),
    (_edit_box(2, float("inf")), "finite numbers"),
    (_edit_box(0, True), "finite numbers"),
    (_edit_box(0, 60.0), "leaves its 64x64 image"),
    # within BOX_TOLERANCE of the image, but (next to) nothing of them inside it: torchvision would assert in training
    *((lambda c, box=box: c["annotations"][0].update(bbox=box), "under 0.001 px wide or high inside its 64x64 image 1 "
       "\\(pass --allow-degenerate-boxes") for box in ([64, 10, 0.5, 16], [-1, 10, 0.5, 16], [30, 10, 1e-6, 16],
                                                        [10, 63.9999, 16, 1])),
    (lambda c: c["annotations"][0].update(category_id="1"), "category_id must be an integer, got '1' \\(str\\)"),
    (lambda c: c["images"][0].update(width=0), "width must be a positive integer"),
    (lambda c: c["annotations"][0].update(area=float("nan")), "area must be a finite number"),
    # every area range would ignore it: AP -1
    (lambda c: c["annotations"][0].update(area=1e11), "annotation 1 area 100000000000.0 exceeds the 4096 px of its "
                                                      "64x64 image 1: check the area"),
    (lambda c: c["annotations"][0].update(area=66 * 66 + 1), "exceeds the 4096 px"),
    (lambda c: c.update(annotations=[]), "no annotated boxes"),
    (lambda c: c["images"][0].update(file_name=None), "images\\[0\\] file_name must be a non-empty string, got None"),
    (lambda c: c["images"][1].update(file_name=7), "images\\[1\\] file_name must be a non-empty string, got 7"),
    (lambda c: c["categories"].append({"id": 1, "name": "again"}), "duplicate ids in 'categories'"),
    (lambda c: c["categories"].append({"id": 9, "name": "circle"}), "category name\\(s\\) \\['circle'\\] listed under "
                                                                     "more than one id"),
    (lambda c: c["categories"][0].update(name=None), "categories\\[0\\] name must be a non-empty string"),
])
def test_hostile_annotations_are_refused(tmp_path, edit, message):
    coco = detect_eval.SyntheticDetection(3, 64).coco()
    edit(coco)
    with pytest.raises(ValueError, match=message):
        detect_eval.load_coco(_write(tmp_path, coco))


def test_unusable_output_dir_and_coco_paths_end_in_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    ann = tmp_path / "coco" / "annotations" / "instances_train2017.json"
    ann.mkdir(parents=True)

    def run(*flags):
        flags = ["--random-init", "--arch", "vit_tiny", "--depth", "1", "--output-dir", tmp_path / "out", *flags]
        detect_eval.main(list(map(str, flags)))

    for out in (afile, afile / "x"):  # refused before any work
        with pytest.raises(SystemExit, match="^detect_eval.py: --output-dir .*afile.*: cannot write there"):
            run("--output-dir", out)
    with pytest.raises(SystemExit, match="^detect_eval.py: --data .*afile is not a folder"):
        run("--data", afile)
    with pytest.raises(SystemExit, match="cannot read annotation file .*instances_train2017.json: Is a directory"):
        run("--data", tmp_path / "coco")
    ann.rmdir()
    ann.write_bytes(b'{"images": "\xe9"}')  # Latin-1, not UTF-8
    with pytest.raises(SystemExit, match="instances_train2017.json is not valid JSON: 'utf-8' codec"):
        run("--data", tmp_path / "coco")


def _coco_root(root, coco, size=(64, 64)):
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / split).mkdir()
        for im in coco["images"]:
            Image.new("RGB", size).save(root / split / im["file_name"])
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def test_image_size_must_match_the_file_and_infinite_boxes_do_not_crash(tmp_path):
    coco = detect_eval.SyntheticDetection(2, 64).coco()
    _coco_root(tmp_path / "wrong", coco, size=(80, 64))
    with pytest.raises(ValueError, match="is 64x64 in the JSON but .* is 80x64"):
        detect_eval.load_coco(str(tmp_path / "wrong/annotations/instances_val2017.json"), str(tmp_path / "wrong/val2017"))
    ann = tmp_path / "wrong/annotations/instances_val2017.json"
    for name in ("../train2017/x.png", str(tmp_path / "wrong/train2017/x.png")):  # val scored on train's images
        ann.write_text(json.dumps({**coco, "images": [{**coco["images"][0], "file_name": name}, *coco["images"][1:]]}))
        with pytest.raises(ValueError, match="1 file_name\\(s\\) outside .*val2017, e.g. .*; give names relative"):
            detect_eval.load_coco(str(ann), str(tmp_path / "wrong/val2017"))
    Image.new("RGB", (64, 64)).save(tmp_path / "wrong/val2017/..dots.png")  # a name, not a step up
    ann.write_text(json.dumps({**coco, "images": [{**coco["images"][0], "file_name": "..dots.png"}, *coco["images"][1:]]}))
    Image.new("RGB", (64, 64)).save(tmp_path / "wrong/val2017" / coco["images"][1]["file_name"])  # the JSON's size
    assert len(detect_eval.load_coco(str(ann), str(tmp_path / "wrong/val2017"))["images"]) == 2
    thin = {**coco["images"][1], "width": 1001, "height": 1}  # load_rgb refuses it: before training, not after
    Image.new("RGB", (1001, 1)).save(tmp_path / "wrong/val2017" / thin["file_name"])
    boxes = [a for a in coco["annotations"] if a["image_id"] != thin["id"]]
    dots = {**coco["images"][0], "file_name": "..dots.png"}
    ann.write_text(json.dumps({**coco, "images": [dots, thin], "annotations": boxes}))
    with pytest.raises(ValueError, match="cannot read image file .*: 1001x1 px, an aspect ratio above 1000:1"):
        detect_eval.load_coco(str(ann), str(tmp_path / "wrong/val2017"))
    coco["annotations"][0]["bbox"] = [10, 10, float("inf"), 20]  # json writes Infinity, Python reads it back
    _coco_root(tmp_path / "inf", coco)
    code, last, _ = run_script("detect_eval.py", "--data", tmp_path / "inf", "--random-init", "--arch", "vit_tiny",
                               "--iters", "1", "--warmup-iters", "0", "--num-workers", "0",
                               "--output-dir", tmp_path / "out")
    assert code == 1 and "instances_train2017.json: annotation 1 bbox must be [x, y, w, h] of finite numbers" in last


def _coco_args(root, *flags):
    return detect_eval.get_args_parser().parse_args(["--data", str(root), "--output-dir", str(root / "out"), *flags])


def test_train_and_val_must_give_each_category_id_the_same_name(tmp_path):
    coco = detect_eval.SyntheticDetection(2, 64).coco()
    _coco_root(tmp_path, coco)
    val = tmp_path / "annotations" / "instances_val2017.json"
    swapped = [{**c, "name": {"circle": "square", "square": "circle"}.get(c["name"], c["name"])}
               for c in coco["categories"]]  # same ids, ids 1 and 3 mean the other shape: AP would score nonsense
    val.write_text(json.dumps({**coco, "categories": swapped}))
    with pytest.raises(ValueError, match="^train and val annotation files list different categories \\(.*"
                                         "instances_train2017.json vs .*instances_val2017.json: id 1: 'circle' vs "
                                         "'square', id 3: 'square' vs 'circle'\\); give both files the same"):
        detect_eval.build_data(_coco_args(tmp_path))
    val.write_text(json.dumps({**coco, "categories": coco["categories"][:3]}))
    with pytest.raises(ValueError, match="id 4: 'star' vs absent\\)"):
        detect_eval.build_data(_coco_args(tmp_path))
    val.write_text(json.dumps(coco))
    train, val = detect_eval.build_data(_coco_args(tmp_path))
    assert train.cat_ids == val.cat_ids == [1, 2, 3, 4]


def test_an_image_the_resize_would_make_0_px_high_is_refused_before_training(tmp_path):
    _coco_root(tmp_path, detect_eval.SyntheticDetection(2, 64).coco())
    Image.new("RGB", (400, 4)).save(tmp_path / "val2017" / "thin.png")
    thin = {"images": [{"id": 1, "file_name": "thin.png", "width": 400, "height": 4}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 0, 50, 4], "area": 200}],
            "categories": detect_eval.SyntheticDetection(2, 64).coco()["categories"]}
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(thin))
    # scale min(64 / 4, 64 / 400) = 0.16: 4 px -> 0.64 px, which torch's interpolate refuses after all the training
    with pytest.raises(ValueError, match="instances_val2017.json: image 1 \\(thin.png\\) is 400x4: --min-size 32 64 "
                                         "and --max-size 64 scale its short side to under 1 px; pass --max-size 100 "
                                         "or more, or leave the image out"):
        detect_eval.build_data(_coco_args(tmp_path, "--min-size", "32", "64", "--max-size", "64"))
    detect_eval.build_data(_coco_args(tmp_path, "--min-size", "32", "64", "--max-size", "100"))  # 1 px



def test_an_annotation_file_that_is_a_pipe_or_nested_too_deep_is_refused_in_one_line(tmp_path):
    """open() would wait on a FIFO for a writer for good; json.load recurses once per nesting level."""
    _coco_root(tmp_path / "coco", detect_eval.SyntheticDetection(2, 64).coco())
    ann = tmp_path / "coco" / "annotations" / "instances_train2017.json"
    ann.unlink()
    os.mkfifo(ann)
    (tmp_path / "to_fifo.json").symlink_to(ann)

    with no_hang("load_coco waited on a pipe"):
        for path in (ann, tmp_path / "to_fifo.json"):
            with pytest.raises(ValueError, match=f"^{path} is not a regular file \\(a pipe or a device\\), so not an "
                                                 "annotation file$"):
                detect_eval.load_coco(str(path))
        with pytest.raises(SystemExit, match="^detect_eval.py: .*instances_train2017.json is not a regular file"):
            detect_eval.main(["--data", str(tmp_path / "coco"), "--random-init", "--arch", "vit_tiny", "--depth", "1",
                              "--output-dir", str(tmp_path / "out")])
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="deep.json is not valid JSON: maximum recursion depth exceeded"):
        detect_eval.load_coco(str(deep))


def test_one_image_file_listed_under_two_ids_is_refused(tmp_path):
    """It would train twice as often; in val the copy's detections would all count as false positives."""
    for name in ("000000.png", "./000000.png"):
        coco = detect_eval.SyntheticDetection(3, 64).coco()
        coco["images"][2]["file_name"] = name
        with pytest.raises(ValueError, match=f"instances.json: images 1 and 3 share file_name '{name}'; "
                                             "list each image once$"):
            detect_eval.load_coco(_write(tmp_path, coco))


def test_val_images_linked_to_train_images_are_refused(tmp_path):
    """Names stay inside val2017, but a linked folder or image leads to the very files the detector trained on."""
    coco = detect_eval.SyntheticDetection(2, 64).coco()
    _coco_root(tmp_path, coco)
    val = tmp_path / "val2017"
    (val / "000001.png").unlink()
    (val / "000001.png").symlink_to(tmp_path / "train2017" / "000001.png")
    message = (f"^{tmp_path}/annotations/instances_val2017.json: image 2 \\(000001.png\\) is the file "
               f"{tmp_path}/train2017/000001.png, which .*instances_train2017.json lists too: the detector would be "
               "scored on an image it trained on; give val images of its own$")
    with pytest.raises(ValueError, match=message):
        detect_eval.build_data(_coco_args(tmp_path))
    for f in val.iterdir():
        f.unlink()
    val.rmdir()
    val.symlink_to(tmp_path / "train2017")
    with pytest.raises(ValueError, match=message.replace("image 2 \\(000001", "image 1 \\(000000")
                       .replace("train2017/000001", "train2017/000000")):
        detect_eval.build_data(_coco_args(tmp_path))
    # One folder holding both splits' images is fine as long as no image is in both.
    held_out = {**coco, "images": [{**im, "file_name": "v" + im["file_name"]} for im in coco["images"]]}
    for im in held_out["images"]:
        Image.new("RGB", (64, 64)).save(val / im["file_name"])
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(held_out))
    train, val = detect_eval.build_data(_coco_args(tmp_path))
    assert len(train) == len(val) == 2


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("patch_size", [16, 8])
def test_pyramid_strides_shapes_and_frozen_backbone(patch_size):
    backbone = tiny_vit(img_size=64, patch_size=patch_size, depth=2, num_heads=2)
    pyramid = detect_eval.SimpleFeaturePyramid(backbone, out_channels=32).train()
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    layouts = []  # each gradient as autograd makes it has its weight's layout: DDP would copy it and warn otherwise
    for p in pyramid.levels.parameters():
        p.register_hook(lambda grad, p=p: layouts.append(grad.stride() == p.stride()))
    x = torch.randn(2, 3, 64, 96)
    feats = pyramid(x)
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    for (name, f), stride in zip(feats.items(), pyramid.strides):
        assert f.shape == (2, 32, -(-64 // stride), -(-96 // stride)), name  # ceil: k=1, s=2 pooling keeps odd edges
    assert pyramid.strides == (patch_size // 4, patch_size // 2, patch_size, 2 * patch_size, 4 * patch_size)
    convs = [m for m in pyramid.levels.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8 and all(c.bias is None for c in convs)  # every conv is followed by an LN
    sum(f.square().mean() for f in feats.values()).backward()
    assert all(p.grad is not None for p in pyramid.levels.parameters())
    assert all(layouts) and len(layouts) == len(list(pyramid.levels.parameters()))
    assert all(p.grad is None for p in backbone.parameters())
    with pytest.raises(ValueError, match="power of two"):
        detect_eval.SimpleFeaturePyramid(tiny_vit(img_size=60, patch_size=12, depth=1, num_heads=2))


def test_learning_rate_schedule():
    args = detect_eval.get_args_parser().parse_args(["--lr", "1.0", "--iters", "100", "--warmup-iters", "10"])
    assert detect_eval.learning_rate(0, args) == pytest.approx(0.001)
    assert detect_eval.learning_rate(10, args) == 1.0 and detect_eval.learning_rate(67, args) == pytest.approx(0.1)
    assert detect_eval.learning_rate(89, args) == pytest.approx(0.01)
    args.schedule = "cosine"
    assert detect_eval.learning_rate(55, args) == pytest.approx(0.5)
    assert detect_eval.learning_rate(100, args) == pytest.approx(0.0)


@pytest.mark.parametrize("flag", ["--lr -1", "--lr inf", "--momentum 1.5", "--momentum -0.1", "--weight-decay nan",
                                  "--depth 0", "--num-workers -1", "--decay-at 1", "--iters 0", "--warmup-iters -1",
                                  "--synthetic-size 15", "--data-seed -1"])
def test_out_of_range_detect_eval_flags_are_refused(flag):
    with pytest.raises(SystemExit, match=f"^detect_eval.py: {flag.split()[0]} must be "):
        detect_eval.check_args(detect_eval.get_args_parser().parse_args(flag.split()))


def test_detect_eval_flags_the_run_would_ignore_are_refused(tmp_path):
    def check(flags):
        detect_eval.check_args(detect_eval.get_args_parser().parse_args(flags.format(coco=tmp_path).split()))

    for flags, message in [
            ("--allow-degenerate-boxes", "--allow-degenerate-boxes is read only with a COCO --data"),
            ("--train-split foo", "--train-split is read only with a COCO --data"),
            ("--val-split bar", "--val-split is read only with a COCO --data"),
            ("--data {coco} --synthetic-size 64", "--synthetic-size is read only with --data synthetic"),
            ("--schedule cosine --decay-at 0.5", "--decay-at is read only with --schedule step"),
            ("--momentum 0.5", "--momentum is read only with --optimizer sgd"),
            ("--random-init --arch vit_tiny --checkpoint-key student", "--checkpoint-key is read only with --pretrained"),
            ("--iters 4", "--warmup-iters 30 \\(the default\\) must be below --iters 4: pass a smaller --warmup-iters"),
            ("--iters 4 --warmup-iters 4", "--warmup-iters 4 must be below --iters 4"),
            ("--data-seed 4294967296", "--data-seed must be in 0..2\\^31-1"),
            ("--out-channels 1", "--out-channels must be at least 2"),
            ("--min-size 64 256", "--min-size must be in 1..--max-size \\(128\\), got 256"),
            ("--max-size 0", "--max-size must be in 1..8192, got 0"), ("--max-size 8193", "--max-size must be in 1..8192"),
            ("--synthetic-size 100000", "--synthetic-size must be in 16..8192"),
            ("--data {coco} --train-split val2017", "--train-split val2017 and --val-split val2017 read one "
             "annotation file, so the detector would be scored on its training images")]:
        with pytest.raises(SystemExit, match=f"^detect_eval.py: {message}"):
            check(flags)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").symlink_to(tmp_path / "annotations" / "instances_train.json")
    with pytest.raises(SystemExit, match="--train-split train and --val-split val read one annotation file"):
        check("--data {coco} --train-split train --val-split val")  # one file under two names
    (tmp_path / "annotations" / "instances_val.json").unlink()
    (tmp_path / "annotations" / "instances_val.json").write_text("{}")
    os.symlink(tmp_path / "train", tmp_path / "val")  # held-out images of one folder: two files select them
    check("--data {coco} --train-split train --val-split val")
    for flags in ("", "--schedule cosine", "--optimizer sgd --momentum 0.5", "--iters 31", "--iters 1 --warmup-iters 0",
                  "--data {coco} --train-split foo --val-split bar --allow-degenerate-boxes"):
        check(flags)  # defaults, and flags the run uses


# ----------------------------------------------------------------------------- end to end
def tiny_run_args(backbone_path, output_dir, iters, extra=()):
    synthetic = [] if "--data" in extra else ["--synthetic-train", "8", "--synthetic-val", "5",
                                              "--synthetic-size", "64"]
    return ["--pretrained", str(backbone_path), "--output-dir", str(output_dir), "--iters", str(iters), *synthetic,
            "--min-size", "64", "--max-size", "64", "--batch-size", "2", "--eval-batch-size", "2", "--num-workers", "0",
            "--out-channels", "32", "--box-head-dim", "64", "--rpn-batch", "32", "--roi-batch", "32",
            "--proposals-train", "64", "--proposals-test", "32", "--warmup-iters", "0", "--decay-at",
            "--log-every", "1", *extra]


@pytest.fixture
def backbone_path(tmp_path):
    torch.manual_seed(0)
    model = tiny_vit(img_size=64, patch_size=16, depth=2, num_heads=2)
    path = tmp_path / "backbone.pth"
    torch.save({"arch": model.arch, "backbone": model.state_dict()}, path)
    return path


def test_tiny_end_to_end_run(tmp_path, backbone_path):
    out = tmp_path / "run"
    results = detect_eval.main(tiny_run_args(backbone_path, out, 3))  # raises if the frozen backbone changed
    saved = json.loads((out / "detect_results.json").read_text())
    assert list(saved["stats"]) == list(detect_eval.STAT_NAMES) and saved["stats"] == results["stats"]
    assert all(-1 <= v <= 1 for v in saved["stats"].values())
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ckpt["iteration"] == 3 and not any(k.startswith("backbone.backbone.") for k in ckpt["model"])
    assert set(ckpt["optimizer"]["state"])  # optimizer moments are saved
    assert (out / "synthetic_val.json").exists()


def test_an_image_is_detected_alike_in_any_batch(backbone_path):
    """Every image is padded to one --max-size square: batched with a larger one, or alone, it gives the same
    detections (a ViT attends to the padding, so a batch padded to its largest image would not)."""
    args = detect_eval.get_args_parser().parse_args(tiny_run_args(backbone_path, "unused", 1) + ["--max-size", "96"])
    torch.manual_seed(0)
    model = detect_eval.build_detector(vit.load_backbone(str(backbone_path)), 3, args).eval()
    model.rpn.score_thresh, model.roi_heads.score_thresh = 0.0, 0.0
    small, large = torch.rand(3, 64, 64), torch.rand(3, 64, 96)  # alone, small would be padded to 64 x 64 only
    with torch.no_grad():
        alone, together = model([small])[0], model([small, large])[0]
    assert len(alone["boxes"]) > 0
    torch.testing.assert_close(alone["boxes"], together["boxes"])
    torch.testing.assert_close(alone["scores"], together["scores"])


def test_loading_a_backbone_leaves_the_random_generator_alone(backbone_path):
    """detect_eval seeds its heads after loading: passing an --arch that agrees with the checkpoint (which builds a
    second ViT to compare) must not change them."""
    state = torch.get_rng_state()
    vit.load_backbone(str(backbone_path))
    vit.load_backbone(str(backbone_path), dict(name="vit_tiny", patch_size=16, depth=2, num_heads=2, embed_dim=64))
    assert torch.equal(torch.get_rng_state(), state)


def test_refused_or_diverged_detection_runs_leave_their_files(tmp_path, backbone_path):
    out = tmp_path / "run"
    detect_eval.main(tiny_run_args(backbone_path, out, 1))
    files = {f: (out / f).read_bytes() for f in ("synthetic_train.json", "synthetic_val.json", "checkpoint.pth")}
    with pytest.raises(SystemExit, match="different settings: --synthetic-train 8 \\(now 16\\)"):
        detect_eval.main(tiny_run_args(backbone_path, out, 1, ["--synthetic-train", "16"]))
    assert all((out / f).read_bytes() == data for f, data in files.items())  # the refused run wrote nothing
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    del ckpt["padding"]  # as an earlier detect_eval.py wrote it, its images padded per batch
    torch.save(ckpt, out / "checkpoint.pth")
    with pytest.raises(SystemExit, match="holds heads trained on images padded per batch, not to one --max-size square"):
        detect_eval.main(tiny_run_args(backbone_path, out, 1))
    diverged = tmp_path / "diverged"  # checkpoints between log steps: the loss is not looked at there
    with pytest.raises(SystemExit, match="non-finite weights by iteration 2; lower --lr .*checkpoint.pth was not "
                                         "replaced"):
        detect_eval.main(tiny_run_args(backbone_path, diverged, 4, ["--lr", "1e30", "--log-every", "100",
                                                                    "--ckpt-every", "1"]))
    assert torch.load(diverged / "checkpoint.pth", weights_only=True)["iteration"] == 1
    with pytest.raises(SystemExit, match=f"--output-dir {tmp_path} holds a pretraining run \\(backbone.pth\\); "
                                         "pass another"):
        detect_eval.main(tiny_run_args(backbone_path, tmp_path, 1))  # its log.jsonl would be replaced


def test_resume_continues_at_the_saved_iteration(tmp_path, backbone_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    detect_eval.main(tiny_run_args(backbone_path, straight, 4))
    detect_eval.main(tiny_run_args(backbone_path, resumed, 2))  # an "interrupted" run...
    with pytest.raises(SystemExit, match="checkpoint.pth holds heads trained for 2 iterations, more than --iters 1"):
        detect_eval.main(tiny_run_args(backbone_path, resumed, 1))  # would evaluate 2 iterations, say 1
    capsys.readouterr()
    detect_eval.main(tiny_run_args(backbone_path, resumed, 4))  # ...picked up from its output dir
    log = capsys.readouterr().out
    assert "resumed from" in log and "at iteration 2" in log and "it 3/4" in log and "it 1/4" not in log
    a = torch.load(straight / "checkpoint.pth", weights_only=False)
    b = torch.load(resumed / "checkpoint.pth", weights_only=False)
    assert a["iteration"] == b["iteration"] == 4
    for k in a["model"]:  # same batches, flips and samplings: the resumed run retraces the straight one
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)


def test_a_signal_checkpoints_the_detection_heads_and_the_rerun_resumes(tmp_path, backbone_path, capsys, monkeypatch):
    """SIGTERM (preemption) after iteration 2 of 4, between checkpoints: the heads are saved there, the run exits 143
    with a line saying so, and the same command goes on from iteration 2 to the heads of a run never stopped."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    detect_eval.main(tiny_run_args(backbone_path, straight, 4, ["--ckpt-every", "100"]))
    polls = iter([0, signal.SIGTERM])
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as stop:
        patch.setattr(augment.Interrupt, "poll", lambda self: next(polls))
        detect_eval.main(tiny_run_args(backbone_path, stopped, 4, ["--ckpt-every", "100"]))
    assert stop.value.code == 143 and torch.load(stopped / "checkpoint.pth", weights_only=True)["iteration"] == 2
    assert "stopped at iteration 2 on SIGTERM, exit status 143; checkpoint saved to" in capsys.readouterr().out
    detect_eval.main(tiny_run_args(backbone_path, stopped, 4, ["--ckpt-every", "100"]))
    a, b = (torch.load(d / "checkpoint.pth", weights_only=True) for d in (straight, stopped))
    assert a["iteration"] == b["iteration"] == 4
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)


def test_detect_log_holds_each_iteration_once_after_a_resume_or_a_fresh_start(tmp_path, backbone_path):
    out = tmp_path / "run"

    def logged():
        with open(out / "log.jsonl") as f:
            return [json.loads(line)["iteration"] for line in f]

    detect_eval.main(tiny_run_args(backbone_path, out, 2))
    vit.append_jsonl(out / "log.jsonl", {"iteration": 3, "lr": 1.0})  # a crash's, after the checkpoint at 2
    detect_eval.main(tiny_run_args(backbone_path, out, 4))
    assert logged() == [1, 2, 3, 4]
    (out / "checkpoint.pth").unlink()  # a fresh start in the same folder: the old run's records go
    detect_eval.main(tiny_run_args(backbone_path, out, 1))
    assert logged() == [1]


def test_resume_refuses_an_iters_that_changes_the_lr_already_trained(tmp_path, backbone_path):
    out = tmp_path / "run"
    detect_eval.main(tiny_run_args(backbone_path, out, 2, ["--decay-at", "0.5"]))  # iteration 1 at 0.1 x --lr
    with pytest.raises(SystemExit, match="checkpoint.pth: --iters 4 \\(was 2\\) changes the lr of the 2 iterations "
                                         "already trained; pass --iters 2, or use another --output-dir"):
        detect_eval.main(tiny_run_args(backbone_path, out, 4, ["--decay-at", "0.5"]))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    torch.save({**ckpt, "iteration": 1}, out / "checkpoint.pth")  # interrupted before the decay: 4 changes nothing
    assert detect_eval.main(tiny_run_args(backbone_path, out, 4, ["--decay-at", "0.5"]))["iterations"] == 4


def test_resume_keeps_the_global_batch_at_another_world_size(tmp_path, backbone_path):
    out = tmp_path / "run"
    detect_eval.main(tiny_run_args(backbone_path, out, 2))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert (ckpt["global_batch"], ckpt["world_sizes"]) == (2, [1]) and ckpt["train_time_s"] > 0
    # as if 2 processes of --batch-size 1 had trained 1 iteration for 1000 s
    torch.save({**ckpt, "args": {**ckpt["args"], "batch_size": 1}, "world_sizes": [2], "iteration": 1,
                "train_time_s": 1000.0}, out / "checkpoint.pth")
    with pytest.raises(SystemExit, match="trained at a global batch of 2 images, this run's is 1 \\(--batch-size 1 "
                                         "per process x 1\\); resume at a global batch of 2"):
        detect_eval.main(tiny_run_args(backbone_path, out, 2, ["--batch-size", "1"]))
    results = detect_eval.main(tiny_run_args(backbone_path, out, 2))  # --batch-size 2 on 1 process: the same
    assert (results["global_batch_size"], results["train_world_sizes"], results["world_size"]) == (2, [1, 2], 1)
    assert results["train_time_s"] > 1000  # the time of every invocation that trained these heads



def test_a_broken_checkpoint_link_is_not_a_fresh_start(tmp_path, backbone_path):
    (tmp_path / "run").mkdir()
    os.symlink(tmp_path / "gone.pth", tmp_path / "run" / "checkpoint.pth")  # a fresh run would replace the link
    with pytest.raises(SystemExit, match="checkpoint not found: .*move it away or use another --output-dir"):
        detect_eval.main(tiny_run_args(backbone_path, tmp_path / "run", 1))


def test_resume_refuses_another_backbone_and_reports_progress(tmp_path, backbone_path, capsys, monkeypatch):
    out = tmp_path / "run"
    detect_eval.main(tiny_run_args(backbone_path, out, 1))
    assert "evaluation: batch 3/3, " in capsys.readouterr().out
    torch.manual_seed(1)
    other = tiny_vit(img_size=64, patch_size=16, depth=2, num_heads=2)
    torch.save({"arch": other.arch, "backbone": other.state_dict()}, tmp_path / "other.pth")
    with pytest.raises(SystemExit, match="holds the detect_results.json of .*backbone.pth, this run's .*other.pth"):
        detect_eval.main(tiny_run_args(tmp_path / "other.pth", out, 1))
    with pytest.raises(SystemExit, match="different settings: --out-channels 32 \\(now 16\\)"):
        detect_eval.main(tiny_run_args(backbone_path, out, 1, ["--out-channels", "16"]))
    coco = detect_eval.SyntheticDetection.coco
    with monkeypatch.context() as m:  # the annotations under the same --data gained a category since
        m.setattr(detect_eval.SyntheticDetection, "coco", lambda self: {
            **coco(self), "categories": coco(self)["categories"] + [{"id": 5, "name": "ring"}]})
        with pytest.raises(SystemExit, match="checkpoint.pth holds heads trained for 4 categories .*now list 5 "
                                             ".*Use another --output-dir"):
            detect_eval.main(tiny_run_args(backbone_path, out, 1))
    torch.save({"arch": other.arch, "backbone": other.state_dict()}, backbone_path)  # the file was overwritten
    with pytest.raises(SystemExit, match="other backbone weights"):
        detect_eval.main(tiny_run_args(backbone_path, out, 1))


def test_boxes_with_no_extent_inside_their_image_score_but_do_not_train(tmp_path, backbone_path):
    coco = detect_eval.SyntheticDetection(4, 64).coco()
    edge = [[64, 10, 0.5, 16], [-1, 20, 0.5, 16], [30, 10, 1e-6, 16], [10, 63.9999, 16, 1]]
    for image_id, box in enumerate(edge, start=1):  # one per image: every training batch holds one
        coco["annotations"].append({"id": 100 + image_id, "image_id": image_id, "category_id": 1, "bbox": box,
                                    "area": box[2] * box[3], "iscrowd": 0})
    _coco_root(tmp_path / "coco", coco)
    out = tmp_path / "run"
    results = detect_eval.main(tiny_run_args(backbone_path, out, 2, ["--data", str(tmp_path / "coco"),
                                                                     "--allow-degenerate-boxes"]))
    assert results["iterations"] == 2  # trained on every image without torchvision's degenerate-box assertion
    val = detect_eval.load_coco(str(tmp_path / "coco/annotations/instances_val2017.json"), allow_degenerate=True)
    assert sum(a["id"] > 100 for a in val["annotations"]) == 4  # kept as ground truth for scoring
    targets = detect_eval.CocoDetection(val, render=lambda i: None).targets
    assert sum(map(len, targets.values())) == len(val["annotations"]) - 4


def test_resume_refuses_a_train_annotation_file_changed_in_place(tmp_path, backbone_path):
    coco = detect_eval.SyntheticDetection(4, 64).coco()
    _coco_root(tmp_path / "coco", coco)
    out, extra = tmp_path / "run", ["--data", str(tmp_path / "coco")]
    detect_eval.main(tiny_run_args(backbone_path, out, 1, extra))
    assert detect_eval.main(tiny_run_args(backbone_path, out, 1, extra))["iterations"] == 1  # unchanged: resumes
    train = tmp_path / "coco" / "annotations" / "instances_train2017.json"
    for a in coco["annotations"]:  # same categories, same images, other labels: the heads would learn a mix
        a["category_id"] = a["category_id"] % 4 + 1
    train.write_text(json.dumps(coco))
    with pytest.raises(SystemExit, match="checkpoint.pth holds heads trained on another .*instances_train2017.json: "
                                         "the file changed since the checkpoint; use another --output-dir"):
        detect_eval.main(tiny_run_args(backbone_path, out, 2, extra))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    del ckpt["train_ann_digest"]  # a checkpoint from before the check
    torch.save(ckpt, out / "checkpoint.pth")
    assert detect_eval.main(tiny_run_args(backbone_path, out, 2, extra))["iterations"] == 2


def test_resume_refuses_non_finite_or_misshapen_heads_in_one_line(tmp_path, backbone_path):
    out = tmp_path / "run"
    detect_eval.main(tiny_run_args(backbone_path, out, 1))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    name = "roi_heads.box_predictor.cls_score.weight"
    for edit, message in [
            (lambda t: torch.full_like(t, float("nan")),  # would score AP 0.0 as if trained
             f"checkpoint.pth holds non-finite weights .*{name}.*use another --output-dir to train again$"),
            (lambda t: t[:-1], "checkpoint.pth does not match this detector \\(different flags\\?\\): size mismatch "
                               f"for {name}: .*; move it away or use another --output-dir$")]:
        torch.save({**ckpt, "model": {**ckpt["model"], name: edit(ckpt["model"][name])}}, out / "checkpoint.pth")
        with pytest.raises(SystemExit, match=f"^detect_eval.py: .*{message}") as e:
            detect_eval.main(tiny_run_args(backbone_path, out, 1))
        assert "\n" not in str(e.value)


def test_truncated_coco_image_ends_the_run_in_one_line(tmp_path, backbone_path):
    _coco_root(tmp_path / "coco", detect_eval.SyntheticDetection(2, 64).coco())
    bad = tmp_path / "coco" / "train2017" / "000001.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])  # the header still reads: it fails in training
    code, last, _ = run_script("detect_eval.py", *tiny_run_args(backbone_path, tmp_path / "out", 1,
                                                                ["--data", tmp_path / "coco"]))
    assert code == 1 and last.startswith(f"error: cannot read image file {bad}: image file is truncated")


def detect_ddp_worker(rank, world, argv):
    detect_eval.main(argv)


@pytest.mark.slow
def test_two_process_run_gathers_every_prediction(tmp_path, backbone_path):
    out = tmp_path / "ddp"
    argv = tiny_run_args(backbone_path, out, 2, ["--batch-size", "1"])
    spawn(detect_ddp_worker, argv)
    ddp_stats = json.loads((out / "detect_results.json").read_text())
    assert ddp_stats["world_size"] == 2
    # A single process resuming the finished run at its global batch only evaluates: 5 val images over 2 ranks
    # (one padded duplicate) must give the same detections and stats.
    with pytest.raises(SystemExit, match="global batch of 2 images, this run's is 1"):
        detect_eval.main(argv)  # --batch-size is per process
    single = detect_eval.main(argv + ["--batch-size", "2"])
    assert single["num_detections"] == ddp_stats["num_detections"]
    assert single["stats"] == pytest.approx(ddp_stats["stats"], abs=1e-6)


def test_detect_results_of_another_backbone_are_kept(tmp_path, backbone_path, capsys, monkeypatch):
    """detect_results.json records its backbone's resolved path: a rerun of that file, however written, resumes and
    replaces it; another backbone's run is refused before any training, also where only the checkpoint is there."""
    monkeypatch.chdir(tmp_path)
    detect_eval.main(tiny_run_args("backbone.pth", "run", 1))
    source = json.loads((tmp_path / "run" / "detect_results.json").read_text())["source"]
    assert source == [os.path.realpath(backbone_path)]
    for written in ("./backbone.pth", backbone_path):  # the same file: its digest, not its spelling, is checked
        capsys.readouterr()
        assert detect_eval.main(tiny_run_args(written, "run", 2))["iterations"] == 2
        assert "resumed from" in capsys.readouterr().out
    torch.manual_seed(1)
    other = tiny_vit(img_size=64, patch_size=16, depth=2, num_heads=2)
    torch.save({"arch": other.arch, "backbone": other.state_dict()}, tmp_path / "other.pth")
    (tmp_path / "run" / "checkpoint.pth").unlink()  # a fresh start in the folder would replace the results
    files = {f: f.read_bytes() for f in (tmp_path / "run").iterdir() if f.is_file()}
    with pytest.raises(SystemExit, match=f"^detect_eval.py: --output-dir run holds the detect_results.json of "
                                         f"{os.path.realpath(backbone_path)}, this run's \\(.*other.pth\\) would "
                                         "replace it: choose another --output-dir") as e:
        detect_eval.main(tiny_run_args("other.pth", "run", 2))
    assert "\n" not in str(e.value) and "it 1/2" not in capsys.readouterr().out
    assert {f: f.read_bytes() for f in (tmp_path / "run").iterdir() if f.is_file()} == files
    detect_eval.main(tiny_run_args("backbone.pth", "part", 2))
    (tmp_path / "part" / "detect_results.json").unlink()  # stopped before its results: the checkpoint refuses
    with pytest.raises(SystemExit, match="part/checkpoint.pth holds heads trained on other backbone weights than "
                                         "other.pth has now \\(they came from backbone.pth, or the file changed"):
        detect_eval.main(tiny_run_args("other.pth", "part", 2))


def test_resume_refuses_an_altered_iteration_count(tmp_path, backbone_path):
    out = tmp_path / "run"
    detect_eval.main(tiny_run_args(backbone_path, out, 2))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    for iteration in (-2, "3", 2.5, True):  # -2 trained 4 more iterations, at a negative lr; "3", 2.5 a TypeError
        torch.save({**ckpt, "iteration": iteration}, out / "checkpoint.pth")
        with pytest.raises(SystemExit, match=f"^detect_eval.py: {out}/checkpoint.pth holds iteration "
                                             f"{iteration!r}, not a count of iterations trained: the "
                                             "file was altered; move it away or use another --output-dir$"):
            detect_eval.main(tiny_run_args(backbone_path, out, 2))
    torch.save({**ckpt, "iteration": 10**12}, out / "checkpoint.pth")  # refused before its lr is compared
    with pytest.raises(SystemExit, match="holds heads trained for 1000000000000 iterations, more than --iters 2"):
        detect_eval.main(tiny_run_args(backbone_path, out, 2))


def test_small_scale_defaults_and_the_real_data_recipe(tmp_path):
    """The built-in data gets MoCo v3's initialisation for every method and DINO's BatchNorm head with its
    last layer trained from step 0; --data keeps each method's official choice; explicit flags win."""
    small = config("--method dino", tmp_path)
    assert (small.weight_init, small.use_bn_in_head, small.freeze_last_layer, small.momentum) == ("moco", True, 0, 0.99)
    assert (small.weight_decay, small.weight_decay_end) == (0.1, 0.1)
    assert small.ser_ratio == 0.25 and config("--method mocov3", tmp_path).ser_ratio == 0.01  # SER's b2 share
    assert (small.teacher_temp, small.warmup_teacher_temp) == (0.01, 0.01)
    dino, mocov3 = (pretrain.resolve_config(pretrain.get_args_parser().parse_args(["--method", m]))
                    for m in ("dino", "mocov3"))
    assert dino.epochs == 16 and mocov3.epochs == 10  # no --epochs: the built-in run's own
    assert dino.knn_every == 2 and pretrain.resolve_config(pretrain.get_args_parser().parse_args(
        "--data /datasets/imagenet".split())).knn_every == 1
    assert config("--method byol", tmp_path).momentum == 0.96 and config("--method mocov3", tmp_path).momentum == 0.99
    student, _ = pretrain.build_models(small)
    assert student.backbone.arch["weight_init"] == "moco" and student.backbone.arch["pos_embed"] == "sincos"
    assert any(isinstance(m, losses.GlobalBatchNorm1d) for m in student.projector.modules())
    plain = config("--method dino --no-use-bn-in-head --weight-init trunc_normal", tmp_path)
    student, _ = pretrain.build_models(plain)
    assert student.backbone.arch["weight_init"] == "trunc_normal" and student.backbone.arch["pos_embed"] == "learned"
    assert not any(isinstance(m, losses.GlobalBatchNorm1d) for m in student.projector.modules())
    assert config("--method simclr", tmp_path).use_bn_in_head is False  # DINO's head only
    real = pretrain.resolve_config(pretrain.get_args_parser().parse_args("--method dino --data /datasets/imagenet".split()))
    assert (real.weight_init, real.use_bn_in_head, real.freeze_last_layer, real.momentum) == (None, False, 1, 0.996)
    assert (real.weight_decay, real.weight_decay_end) == (0.04, 0.4)
    assert real.ser_ratio == 0.01  # the release's 3 of 256
    assert (real.teacher_temp, real.warmup_teacher_temp, real.epochs) == (0.04, 0.04, 100)  # DINO's ViT-S recipe
    assert config("--method dino --teacher-temp 0.07", tmp_path).teacher_temp == 0.07
    assert pretrain.resolve_config(pretrain.get_args_parser().parse_args(
        "--method byol --data /datasets/imagenet".split())).momentum == 0.99


def test_a_partial_or_malformed_torchrun_environment_is_refused_in_one_line(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert losses.launch_env() == (0, 1, 0)
    master = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with monkeypatch.context() as m:  # the second node of two, 4 processes each
        for name, value in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", **master}.items():
            m.setenv(name, value)
        assert losses.launch_env() == (5, 8, 1)
    for env in ({"RANK": "1"}, {"WORLD_SIZE": "2"}, {"RANK": "0", "WORLD_SIZE": "abc", "LOCAL_RANK": "0", **master},
                {"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0", **master},
                {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", **master},
                {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                                                                      "MASTER_ADDR": "h", "MASTER_PORT": "abc"}):
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            with pytest.raises(SystemExit, match="^error: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT = "
                                                 ".*: launch with torchrun"):
                augment.run_script(lambda: linear_eval.main(["--random-init", "--arch", "vit_tiny"]))  # said, not hidden


@pytest.mark.parametrize("cores,world,cuda,workers", [(2, 1, False, 0), (4, 2, False, 0), (3, 1, False, 3),
                                                      (32, 1, False, 8), (2, 1, True, 2), (16, 8, True, 2)])
def test_default_loader_workers(cores, world, cuda, workers, monkeypatch):
    """Loader workers default to this rank's share of the cores (at most 8), but none on a CPU with 2 cores
    or fewer per rank, where they would slow the step by taking its cores (README, Cost)."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    args = pretrain.resolve_config(pretrain.get_args_parser().parse_args(["--method", "mocov3"]))
    assert args.num_workers == workers
    explicit = pretrain.resolve_config(pretrain.get_args_parser().parse_args(["--method", "mocov3", "--num-workers", "1"]))
    assert explicit.num_workers == 1


def _torchrun_env(monkeypatch, rank, world, local_rank, addr, port):
    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank), ("MASTER_ADDR", addr),
                        ("MASTER_PORT", port)):
        monkeypatch.setenv(name, str(value))


def test_torchrun_variables_for_one_process_run_as_a_plain_run(tmp_path, monkeypatch):
    """WORLD_SIZE=1 needs no rendezvous: on an unreachable MASTER_ADDR one used to retry for half an hour."""
    flags = ["--random-init", "--arch", "vit_tiny", "--depth", "1", "--patch-size", "8", "--img-size", "32",
             "--train-length", "40", "--val-length", "20", "--batch-size", "20", "--cached", "--epochs", "1",
             "--knn-k", "0", "--lrs", "0.1", "1", "--num-workers", "0"]
    runs = []
    for name in ("plain", "torchrun"):
        if name == "torchrun":
            _torchrun_env(monkeypatch, 0, 1, 0, "no.such.host.invalid", 29521)
        code, last, _ = run_script("linear_eval.py", *flags, "--output-dir", tmp_path / name, timeout=90)
        assert code == 0, last
        with open(tmp_path / name / "linear_eval.json") as f:
            runs.append({k: v for k, v in json.load(f).items() if k not in ("args", "time_s")})  # wall clock
    assert runs[0] == runs[1]


def test_a_taken_master_port_is_said_in_one_line(monkeypatch):
    """Rank 0's store cannot listen on a port in use: said as such at once, not as another rank's stop."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _torchrun_env(monkeypatch, 0, 2, 0, "127.0.0.1", port)
        code, last, out = run_script("-c", "import augment, losses; augment.run_script(losses.init_distributed)",
                                     timeout=60)
    assert code == 1 and last.startswith(f"error: cannot start the process group at 127.0.0.1:{port} (") \
        and "EADDRINUSE" in last and last.endswith("); choose a free MASTER_PORT"), last
    assert f"rank 0: waiting for the other 1 of 2 ranks at 127.0.0.1:{port} (torchrun variables)" in out  # said


def test_a_local_rank_beyond_the_gpus_is_refused_by_its_own_rank(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device reached"))
    _torchrun_env(monkeypatch, 2, 4, 2, "127.0.0.1", 29500)  # rank 0 is fine: only this rank can say it
    with pytest.raises(SystemExit) as stop:
        augment.run_script(losses.init_distributed)
    assert stop.value.code == 1
    assert capsys.readouterr().err == ("error: LOCAL_RANK 2, but this machine has 2 GPUs: "
                                       "launch at most 2 processes per node\n")


def test_readme_tables_are_whole_and_ci_runs_the_readme_test_command():
    """Every README table row has its header's cells (a stray row in the results table once mixed costs into
    accuracies), and .ci/run runs the test command the README gives."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "README.md")) as f:
        lines = f.read().splitlines()
    tables, current = [], []
    for line in lines + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables, current = tables + [current], []
    assert len(tables) >= 3
    for table in tables:
        header = table[0]
        assert all(row.count("|") == header.count("|") for row in table), header
    with open(os.path.join(here, ".ci", "run")) as f:
        ci_command = f.read().splitlines()[-1]
    readme_command = next(line.split("#")[0].strip() for line in lines if line.startswith("python -m pytest"))
    assert ci_command == readme_command

import pytest
import torch

import vit


def tiny(**kw):
    return vit.VisionTransformer(**{**dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4), **kw})


def test_vit_small_state_dict_contract():
    """The 150 keys, shapes and order of timm vit_small_patch16_224(num_classes=0) / DINO vit_small."""
    sd = vit.vit_small(patch_size=16).state_dict()
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
    m = vit.vit_small(patch_size=16)
    assert m.num_heads == 6 and m.blocks[0].attn.head_dim == 64
    assert m.blocks[0].norm1.eps == 1e-6


def test_ser_mode_keys_and_shapes():
    m = vit.vit_small(patch_size=16, cls_after_block=3)
    sd = m.state_dict()
    assert tuple(sd["pos_embed"].shape) == (1, 196, 384)  # no [CLS] slot, as the release
    assert "norm_equiv.weight" in sd and len(sd) == 152


def test_state_dict_roundtrip_and_export_loading(tmp_path):
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    fresh = tiny()
    fresh.load_state_dict(m.state_dict(), strict=True)
    assert torch.equal(fresh.eval()(x), m(x))
    torch.save({"arch": m.arch, "backbone": m.state_dict()}, tmp_path / "export.pth")
    loaded = vit.load_backbone(tmp_path / "export.pth")
    assert not loaded.training and loaded.arch == m.arch
    assert torch.equal(loaded(x), m(x))


def test_prefix_stripping_released_formats(tmp_path):
    torch.manual_seed(0)
    m = tiny().eval()
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


def test_mismatched_checkpoints_raise(tmp_path):
    m = tiny()
    torch.save(m.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="records no architecture"):
        vit.load_backbone(tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="missing"):
        vit.load_backbone(tmp_path / "bare.pth", arch={**m.arch, "depth": 5})
    with pytest.raises(ValueError, match="shape mismatch"):
        vit.load_backbone(tmp_path / "bare.pth", arch={**m.arch, "embed_dim": 32, "num_heads": 2})
    sd = {**m.state_dict(), "extra.weight": torch.zeros(1)}
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="unexpected: \\['extra.weight'\\]"):
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
        m = tiny(**kw).eval()
        x = torch.randn(2, 3, 32, 48)
        with torch.no_grad():
            cls, maps = m.forward_with_attention(x)
            assert torch.allclose(m(x), cls, atol=1e-5)
        assert len(maps) == 4 and maps[-1].shape == (2, 4, 25, 25)
        n_first = 24 if kw else 25  # SER: no [CLS] in block 1
        assert torch.allclose(maps[0].sum(-1), torch.ones(2, 4, n_first), atol=1e-5)


def test_pos_embed_resampling():
    m = tiny()
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
    m = tiny(pos_embed="sincos", weight_init="moco", stop_grad_conv1=True)
    assert not m.pos_embed.requires_grad and torch.equal(m.pos_embed[0, 0], torch.zeros(64))
    assert not m.patch_embed.proj.weight.requires_grad and not m.patch_embed.proj.bias.requires_grad
    assert m.cls_token.std() < 1e-4  # MoCo v3: normal(std=1e-6)


def test_ser_split_token_map_and_late_cls():
    torch.manual_seed(0)
    m = tiny(cls_after_block=2)
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
        tiny(cls_after_block=4)


def test_token_map_layout_is_row_major():
    m = tiny()
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
    m = tiny(drop_path_rate=0.1)
    m(torch.randn(2, 3, 32, 32)).square().sum().backward()  # not .sum(): LayerNorm outputs sum to a constant
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters() if p.requires_grad)
    s = tiny(cls_after_block=2)
    s.forward_features(torch.randn(2, 3, 32, 32), layer=2)["token_map"].square().mean().backward()
    assert s.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0 and s.norm_equiv.weight.grad is not None
    assert s.blocks[2].mlp.fc1.weight.grad is None  # f2 is not on the token map's path


def test_grad_checkpointing_same_output():
    torch.manual_seed(0)
    m = tiny()
    x = torch.randn(2, 3, 32, 32)
    y = m(x)
    m.grad_checkpointing = True
    assert torch.allclose(m(x), y, atol=1e-6)


def test_input_not_divisible_raises():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        tiny()(torch.randn(1, 3, 30, 32))

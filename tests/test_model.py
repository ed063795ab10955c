"""CCNet model: output contract, attention module, recurrence, backbones, export."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import ops
from ccnet.attention import CrissCrossAttention
from ccnet.backbone import BACKBONES, TinyBackbone, build_backbone
from ccnet.export import export_model
from ccnet.heads import RCCAHead
from ccnet.model import build_ccnet, convert_sync_batchnorm
from ccnet.non_local import NonLocal2d, dense_attention

# the ResNets are slow to build on 2 cores: one input size, and R varied on the small ones
CASES = [(b, r) for b in ("tiny", "resnet18") for r in (0, 1, 2)] + [("resnet50", 2), ("resnet101", 2)]


def set_gammas(model: nn.Module, value: float) -> None:
    for m in model.modules():
        if isinstance(m, CrissCrossAttention):
            nn.init.constant_(m.gamma, value)


@pytest.mark.parametrize("backbone,recurrence", CASES)
def test_output_contract_and_gradients(backbone, recurrence):
    torch.manual_seed(0)
    model = build_ccnet(5, backbone=backbone, recurrence=recurrence, head_channels=64)
    # gamma = 0 and timm's zero-initialised last BN of each residual block would give the
    # layers behind them an exactly zero gradient: start from non-zero values
    set_gammas(model, 0.5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    x = torch.randn(2, 3, 40, 48)
    out = model(x)
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == out["aux"].shape == (2, 5, 5, 6)  # output stride 8
    assert all(torch.isfinite(t).all() for t in out.values())
    (out["out"].square().mean() + out["aux"].square().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} received a zero gradient"


def test_aux_head_is_optional():
    model = build_ccnet(3, backbone="tiny", aux=False)
    assert set(model(torch.randn(1, 3, 32, 32))) == {"out"}


def test_fresh_attention_is_identity():
    module = CrissCrossAttention(16)
    x = torch.randn(2, 16, 7, 9)
    torch.testing.assert_close(module(x), x, rtol=0, atol=0)


def test_attention_module_matches_its_definition():
    torch.manual_seed(0)
    module = CrissCrossAttention(16)
    nn.init.constant_(module.gamma, 0.7)
    x = torch.randn(2, 16, 5, 6)
    q, k, v = module.query(x), module.key(x), module.value(x)
    assert q.shape[1] == k.shape[1] == 2 and v.shape[1] == 16  # C / 8 and C
    expected = 0.7 * ops.reference.criss_cross_attention(q, k, v) + x
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)


def test_recurrence_zero_equals_the_baseline_head():
    """R = 0 has no attention; with fresh attention (gamma = 0) any R gives the same output."""
    torch.manual_seed(0)
    with_attention = RCCAHead(32, 4, channels=16, recurrence=2).eval()
    baseline = RCCAHead(32, 4, channels=16, recurrence=0).eval()
    missing, unexpected = baseline.load_state_dict(with_attention.state_dict(), strict=False)
    assert not missing and all(k.startswith("attention.") for k in unexpected)
    assert len(baseline.attention) == 0
    x = torch.randn(2, 32, 6, 7)
    torch.testing.assert_close(baseline(x), with_attention(x), rtol=0, atol=0)
    set_gammas(with_attention, 0.5)
    assert not torch.allclose(baseline(x), with_attention(x))


def test_recurrence_shares_weights_unless_asked_not_to():
    torch.manual_seed(0)
    shared = RCCAHead(32, 4, channels=16, recurrence=3)
    separate = RCCAHead(32, 4, channels=16, recurrence=3, share_weights=False)
    assert len(shared.attention) == 1 and len(separate.attention) == 3
    n_attn = sum(p.numel() for p in shared.attention.parameters())
    assert sum(p.numel() for p in separate.attention.parameters()) == 3 * n_attn
    # the shared module really runs R times: count its calls
    calls = []
    shared.attention[0].register_forward_hook(lambda *a: calls.append(1))
    shared(torch.randn(1, 32, 5, 5))
    assert len(calls) == 3


def test_separate_weights_are_used_per_pass():
    torch.manual_seed(0)
    head = RCCAHead(32, 4, channels=16, recurrence=2, share_weights=False).eval()
    set_gammas(head, 0.5)
    x = torch.randn(1, 32, 5, 5)
    before = head(x)
    with torch.no_grad():
        head.attention[1].value.weight.mul_(2)  # touch only the second pass
    assert not torch.allclose(before, head(x))


def test_non_local_block_is_dense_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), torch.randn(2, 6, 4, 5)
    out = dense_attention(q, k, v)
    # per pixel: softmax over all 20 pixels of q_p . k_p', weights on v
    qf, kf, vf = q.flatten(2), k.flatten(2), v.flatten(2)
    for n in range(2):
        for p in (0, 7, 19):
            w = torch.softmax(qf[n, :, p] @ kf[n], dim=0)
            torch.testing.assert_close(out[n].flatten(1)[:, p], vf[n] @ w)
    block = NonLocal2d(16)
    x = torch.randn(1, 16, 4, 5)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)  # gamma = 0, like the CCA module
    model = build_ccnet(3, backbone="tiny", attention="non_local")
    assert isinstance(model.head.attention[0], NonLocal2d)
    assert model(torch.randn(1, 3, 32, 32))["out"].shape == (1, 3, 4, 4)


def test_sync_batchnorm_conversion():
    model = convert_sync_batchnorm(build_ccnet(3, backbone="tiny"))
    kinds = {type(m) for m in model.modules()}
    assert nn.SyncBatchNorm in kinds and nn.BatchNorm2d not in kinds


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_ccnet(3, backbone="resnet7")
    with pytest.raises(ValueError, match="recurrence"):
        build_ccnet(3, backbone="tiny", recurrence=-1)
    with pytest.raises(ValueError, match="attention"):
        build_ccnet(3, backbone="tiny", attention="dense")
    with pytest.raises(FileNotFoundError, match="weights"):
        build_backbone("resnet18", pretrained="/nonexistent/weights.pth")


def test_backbone_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    classifier = timm.create_model("resnet18")  # the published format: a classifier's state dict
    path = tmp_path / "resnet18.pth"
    torch.save(classifier.state_dict(), path)
    backbone = build_backbone("resnet18", pretrained=path)
    torch.testing.assert_close(backbone.conv1.weight, classifier.conv1.weight)
    torch.testing.assert_close(backbone.layer4[1].conv2.weight, classifier.layer4[1].conv2.weight)

    tiny = TinyBackbone()
    torch.save(tiny.state_dict(), tmp_path / "tiny.pth")
    loaded = build_backbone("tiny", pretrained=tmp_path / "tiny.pth")
    torch.testing.assert_close(loaded.layer4[0][0].weight, tiny.layer4[0][0].weight)


def test_backbone_registry_channels_match():
    for name in ("tiny", "resnet18"):
        c3, c4 = build_backbone(name)(torch.randn(1, 3, 32, 32))
        assert (c3.shape[1], c4.shape[1]) == BACKBONES[name].channels


def test_export_matches_eager():
    torch.manual_seed(0)
    model = build_ccnet(4, backbone="tiny").eval()
    set_gammas(model, 0.5)
    exported = export_model(model, torch.randn(2, 3, 64, 64))
    for shape in [(2, 3, 64, 64), (1, 3, 48, 80)]:  # dynamic batch, height and width
        x = torch.randn(*shape)
        expected = nn.functional.interpolate(model(x)["out"], size=shape[-2:], mode="bilinear",
                                             align_corners=False)
        torch.testing.assert_close(exported.module()(x), expected, rtol=1e-4, atol=1e-4)


def test_flop_count_of_the_attention_module():
    """FlopCounterMode sees the compiled op through its registered formulas."""
    from ccnet.efficiency import forward_flops

    C, H, W = 64, 9, 11
    module = CrissCrossAttention(C)
    convs = 2 * H * W * C * (C // 8 + C // 8 + C)  # query, key, value 1x1 convs
    attention = 2 * H * W * (H + W - 1) * (C // 8 + C)  # energy + aggregation
    for impl in ("compiled", "reference"):
        with ops.use_implementation(impl):
            flops = forward_flops(module, torch.randn(1, C, H, W))
        if impl == "compiled":
            assert flops == convs + attention
        else:  # the einsum form also scores the masked centre slot of the column: one more slot
            assert flops == convs + attention + 2 * H * W * (C // 8 + C)


def test_attention_maps_match_the_op_with_one_hot_values():
    """``attention_maps``: after pass 1, the op's own weights for the pixel (read out by
    aggregating one-hot values, one channel per pixel); after pass 2, the product of the two
    passes' dense weight matrices. Each map sums to 1."""
    import ops.reference as ref
    from ccnet import attention_maps

    torch.manual_seed(0)
    model = build_ccnet(5, backbone="tiny", recurrence=2).eval()
    for m in model.head.attention:
        m.gamma.data.fill_(0.7)  # pass 2 sees a different input than pass 1
    images = torch.randn(2, 3, 64, 80)
    inputs = []
    hook = model.head.attention[0].register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
    model(images)
    hook.remove()
    module = model.head.attention[0]
    _, _, H, W = inputs[0].shape
    onehot = torch.eye(H * W, dtype=torch.float64).view(H * W, H, W).expand(2, -1, -1, -1)

    def dense(x):  # (N, HW, HW): row p holds pixel p's weights over every pixel u
        with torch.no_grad():
            out = ref.criss_cross_attention(module.query(x).double(), module.key(x).double(), onehot)
        return out.reshape(2, H * W, H * W).transpose(1, 2)

    a1, a2 = dense(inputs[0]), dense(inputs[1])
    y, x = 3, 5
    maps = attention_maps(model, images, (y, x))
    assert len(maps) == 2 and maps[0].shape == (2, H, W)
    p = y * W + x
    torch.testing.assert_close(maps[0].double().reshape(2, -1), a1[:, p], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps[1].double().reshape(2, -1), torch.bmm(a2, a1)[:, p], rtol=1e-5, atol=1e-6)
    for m in maps:
        torch.testing.assert_close(m.sum((1, 2)), torch.ones(2))
    assert (maps[0].reshape(2, H, W)[:, y + 1:, :x] == 0).all()  # off the cross after one pass
    assert (maps[1] > 0).all()  # the whole image after two


@pytest.mark.parametrize("attention", ["cca", "non_local"])
def test_gamma_init_reaches_every_attention_module(attention):
    """model.gamma_init sets the residual scale of each pass's module (build_ccnet's default: 0, the
    paper's code; the pipeline config's: 1)."""
    from pipeline.checkpoint import model_from_config
    from pipeline.config import load_config

    for value, share in ((0.0, True), (1.0, True), (0.25, False)):
        cfg = load_config("default", [f"model.attention={attention}", f"model.gamma_init={value}",
                                      f"model.share_weights={share}", "model.recurrence=2"])
        modules = [m for m in model_from_config(cfg, 5, pretrained=False).modules()
                   if isinstance(m, CrissCrossAttention)]
        assert len(modules) == (1 if share else 2)
        assert all(float(m.gamma.detach()) == value for m in modules)
    assert float(build_ccnet(5, backbone="tiny").head.attention[0].gamma.detach()) == 0.0

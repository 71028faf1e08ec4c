import pickle

import pytest
import torch
import torch.nn.functional as F

from genseg.config import SegConfig
from genseg.models import FCN, build_segmenter
from genseg.models.fcn import Upsample

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("arch", ["fcn32s", "fcn16s", "fcn8s"])
@pytest.mark.parametrize("upsample", ["learned", "bilinear"])
@pytest.mark.parametrize("size", [(37, 53), (64, 64)])
def test_compact_fcn_output_shape(arch, upsample, size):
    model = FCN(5, arch, "compact", width=8, upsample=upsample).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50"])
def test_resnet_fcn8s_odd_size(backbone):
    model = FCN(3, "fcn8s", backbone).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 37, 53))
    assert out.shape == (1, 3, 37, 53)
    assert model.encode(torch.randn(1, 3, 64, 64)).shape == (1, model.backbone.channels[2])


def test_learned_upsampling_starts_as_bilinear():
    up = Upsample(2, 2, learned=True)
    x = torch.ones(1, 2, 6, 6)
    y = up(x, (12, 12))
    assert y.shape == (1, 2, 12, 12)
    assert torch.allclose(y[..., 1:-1, 1:-1], torch.ones(1, 2, 10, 10))   # constant stays constant inside


def test_skip_scores_start_at_zero_so_fcn8s_begins_as_fcn32s():
    torch.manual_seed(0)
    m8 = FCN(4, "fcn8s", "compact", 8, "bilinear").eval()
    m32 = FCN(4, "fcn32s", "compact", 8, "bilinear").eval()
    m32.load_state_dict(m8.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        coarse = m32(x)
        # FCN-8s with zero skips = the stride-32 score upsampled in three bilinear steps
        c3, c4, c5 = m8.backbone(x)
        s = m8.score_fr(m8.head(c5))
        expected = F.interpolate(F.interpolate(F.interpolate(s, c4.shape[-2:], mode="bilinear"),
                                               c3.shape[-2:], mode="bilinear"), (64, 64), mode="bilinear")
        assert torch.allclose(m8(x), expected, atol=1e-5)
        assert coarse.shape == m8(x).shape


def test_build_from_config_and_unknown_names():
    m = build_segmenter(SegConfig(num_classes=7, arch="fcn16s", width=8))
    assert m.arch == "fcn16s" and m.score_fr.out_channels == 7
    with pytest.raises(ValueError, match="unknown backbone"):
        FCN(3, "fcn8s", "vgg99")
    with pytest.raises(ValueError, match="unknown FCN variant"):
        FCN(3, "fcn4s")


def _settle(model: torch.nn.Module, seed: int = 0, shape: tuple[int, ...] = (4, 3, 48, 64)) -> torch.nn.Module:
    """An eval-mode network (or block, fed inputs of ``shape``) whose signal reaches its output, as
    after training: random affine parameters in every norm layer (the zero-initialised residual norms
    included), and BatchNorm running statistics those of inputs like the test's."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)) and m.affine:
            m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=g)
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None                   # a plain average of the batches below
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(*shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("backbone", ["compact", "resnet18", "resnet50"])
def test_ibn_b_makes_each_image_s_prediction_invariant_to_its_own_contrast_and_bn_does_not(backbone):
    """IBN-b's InstanceNorm right after the (bias-free) first conv removes a positive per-image
    scaling of the normalised input: the logits of an image whose contrast about mid-grey is halved
    or doubled are those of the original (up to IN's epsilon).
    Measured against how much the logits change for another image, so a network whose output does
    not depend on its input cannot pass."""
    torch.manual_seed(0)
    x, other = torch.randn(2, 3, 48, 64), torch.randn(2, 3, 48, 64)    # normalised images
    scaled = x * torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    for norm, invariant in (("ibn_b", True), ("bn", False)):
        model = _settle(FCN(5, "fcn8s", backbone, width=8, norm=norm))
        with torch.no_grad():
            a, b, c = model(x), model(scaled), model(other)
        rel = float((a - b).abs().max() / (a - c).abs().max())
        assert (rel < 0.1) if invariant else (rel > 1), (norm, rel)


def test_ibn_a_normalises_half_the_channels_per_image_and_half_over_the_batch():
    from genseg.models.backbones import IBN

    torch.manual_seed(0)
    ibn = IBN(6).train()
    x = torch.randn(2, 6, 8, 8) * 3 + 1
    y = ibn(x)
    # the first half: each image's channel on its own, mean 0 and std 1 (affine parameters at init)
    assert torch.allclose(y[:, :3].mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(y[:, :3].std(dim=(2, 3), unbiased=False), torch.ones(2, 3), atol=1e-3)
    # changing the second image changes the first image's BN half (batch statistics), not its IN half
    x2 = x.clone()
    x2[1] = x2[1] * 5 + 2
    y2 = ibn(x2)
    assert torch.allclose(y2[0, :3], y[0, :3], atol=1e-5)
    assert not torch.allclose(y2[0, 3:], y[0, 3:], atol=1e-2)


@pytest.mark.parametrize("backbone, where", [
    ("compact", {"layer1": 1, "layer2": 2, "layer3": 2, "layer4": 0}),
    ("resnet18", {"layer1": 2, "layer2": 2, "layer3": 2, "layer4": 0}),
])
def test_ibn_a_sits_in_the_first_three_stages_only(backbone, where):
    from genseg.models.backbones import IBN

    model = FCN(5, "fcn8s", backbone, width=8, norm="ibn_a")
    b = model.backbone            # a ResNet's layer1 is the end of its stem
    layers = {"layer1": b.layer1 if backbone == "compact" else b.stem[-1], "layer2": b.layer2, "layer3": b.layer3,
              "layer4": b.layer4}
    found = {k: sum(isinstance(m, IBN) for m in layers[k].modules()) for k in where}
    assert found == where


def _keys_digest(model: torch.nn.Module) -> tuple[int, str]:
    import hashlib

    sd = model.state_dict()
    return len(sd), hashlib.sha256("\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(sd.items())).encode()
                                   ).hexdigest()[:16]


def test_norm_is_a_config_field_and_old_checkpoints_keep_batchnorm():
    """A config without ``norm`` (every checkpoint saved before it existed) builds the BatchNorm
    network with exactly the parameter names and shapes of before (digests taken from the code
    before ``norm`` existed); an unknown norm is one clear error."""
    from genseg.config import ConfigError

    before = {"compact": (129, "306b132886d6e163"), "resnet18": (135, "083b03d98df89d93"),
              "resnet50": (333, "033f0e69fde7db07")}
    for backbone, digest in before.items():
        assert _keys_digest(FCN(5, "fcn8s", backbone, width=8)) == digest, backbone
    bn = build_segmenter(SegConfig(num_classes=4, width=8))
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) for m in bn.modules())
    with pytest.raises(ConfigError, match="norm"):
        SegConfig(norm="groupnorm")
    with pytest.raises(ValueError, match="unknown norm"):
        FCN(3, "fcn8s", "compact", norm="ln")


def test_ibn_b_sits_on_the_stem_and_after_the_last_sum_of_the_first_two_stages():
    from genseg.models.backbones import InstanceNorm

    b = FCN(5, "fcn8s", "compact", width=8, norm="ibn_b").backbone
    assert isinstance(b.stem[0][1], InstanceNorm) and isinstance(b.stem[1][1], torch.nn.BatchNorm2d)
    assert [blk.IN is not None for blk in (*b.layer1, *b.layer2, *b.layer3, *b.layer4)] == \
        [True, False, True, False, False, False, False]
    assert sum(isinstance(m, InstanceNorm) for m in b.modules()) == 3
    for backbone, blocks in (("resnet18", (2, 2)), ("resnet50", (3, 4))):
        b = FCN(5, "fcn8s", backbone, norm="ibn_b").backbone
        layer1 = b.stem[-1]
        assert isinstance(b.stem[1], InstanceNorm), backbone            # the stem's norm
        assert [hasattr(blk, "IN") for blk in layer1] == [False] * (blocks[0] - 1) + [True]
        assert [hasattr(blk, "IN") for blk in b.layer2] == [False] * (blocks[1] - 1) + [True]
        assert sum(isinstance(m, InstanceNorm) for m in b.modules()) == 3, backbone
        assert f"stem.4.{blocks[0] - 1}.IN.weight" in b.state_dict()       # named ...IN.weight, as in IBN-Net


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_ibn_b_resnet_blocks_compute_the_torchvision_block_with_in_before_the_last_relu(kind):
    """With its InstanceNorm made the identity, a block changed for IBN-b computes exactly what the
    torchvision block did (a downsampling block, so the shortcut path is covered too)."""
    import copy

    from torchvision.models.resnet import BasicBlock, Bottleneck

    from genseg.models.backbones import _add_in_after_sum

    torch.manual_seed(0)
    cin, planes = 8, 16
    cls, cout = (BasicBlock, planes) if kind == "basic" else (Bottleneck, planes * 4)
    down = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, 2, bias=False), torch.nn.BatchNorm2d(cout))
    block = _settle(cls(cin, planes, stride=2, downsample=down), shape=(4, cin, 12, 16))
    changed = copy.deepcopy(block)
    _add_in_after_sum(changed)
    x = torch.randn(2, cin, 12, 16)
    changed.IN = torch.nn.Identity()
    with torch.no_grad():
        assert torch.allclose(changed(x), block(x), atol=1e-6)
    # and the changed block runs its InstanceNorm, on its residual sum: each image's channels come out
    # with the norm's own mean (bias) and spread (weight), whatever the input's scale
    changed = copy.deepcopy(block)
    _add_in_after_sum(changed)
    torch.nn.init.normal_(changed.IN.weight, 1.0, 0.1)
    torch.nn.init.normal_(changed.IN.bias, 0.0, 0.1)
    seen = []
    changed.IN.register_forward_hook(lambda m, i, o: seen.append(o.clone()))     # before the in-place ReLU
    with torch.no_grad():
        changed(x * 7)
    assert len(seen) == 1
    out = seen[0]
    assert torch.allclose(out.mean(dim=(2, 3)), changed.IN.bias.expand(2, -1), atol=1e-4)
    assert torch.allclose(out.std(dim=(2, 3), unbiased=False), changed.IN.weight.abs().expand(2, -1), atol=1e-3)
    fresh = copy.deepcopy(block)
    _add_in_after_sum(fresh)
    assert type(pickle.loads(pickle.dumps(fresh))) is type(fresh)   # its class is importable by name


def test_instance_norm_keeps_channels_last_and_gives_a_one_pixel_map_its_bias():
    from genseg.models.backbones import IBN, InstanceNorm

    norm = InstanceNorm(4)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    y = norm(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, _plain_in(norm)(x.contiguous()), atol=1e-6)      # the same values
    assert IBN(4)(x).is_contiguous(memory_format=torch.channels_last)
    one = norm(torch.randn(2, 4, 1, 1, requires_grad=True))
    assert torch.equal(one, norm.bias.detach().view(1, 4, 1, 1).expand(2, 4, 1, 1))
    one.sum().backward()        # every parameter gets a gradient (zero for the weight): DDP needs one
    assert torch.equal(norm.weight.grad, torch.zeros(4)) and torch.equal(norm.bias.grad, torch.full((4,), 2.0))
    # a tiny image through ibn_a's stride-16 IN layers (1x1 there) is scored, not refused
    model = FCN(3, "fcn8s", "compact", width=8, norm="ibn_a").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 16)).shape == (1, 3, 16, 16)


def _plain_in(norm) -> torch.nn.Module:
    plain = torch.nn.InstanceNorm2d(norm.num_features, affine=True)
    plain.load_state_dict(norm.state_dict())
    return plain

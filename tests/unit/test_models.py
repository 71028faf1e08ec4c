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


def _settle(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """An eval-mode network whose signal reaches the logits, as after training: random affine
    parameters in every norm layer (the zero-initialised residual norms included), and BatchNorm
    running statistics those of images like the test's."""
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
            model(torch.randn(4, 3, 48, 64, generator=g))
    return model.eval()


@pytest.mark.parametrize("backbone", ["compact", "resnet18", "resnet50"])
def test_ibn_b_makes_each_image_s_prediction_invariant_to_its_own_contrast_and_bn_does_not(backbone):
    """IBN-b's InstanceNorm right after the (bias-free) first conv removes a per-image scaling of
    the input: the logits of an image darkened or brightened by a factor are those of the original.
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
    y2 = IBN(6).train()(x2)
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


def test_norm_is_a_config_field_and_old_checkpoints_keep_batchnorm():
    """A config without ``norm`` (every checkpoint saved before it existed) builds the BatchNorm
    network with the same parameter names as before; an unknown norm is one clear error."""
    from genseg.config import ConfigError

    bn = build_segmenter(SegConfig(num_classes=4, width=8))
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) for m in bn.modules())
    assert "backbone.layer1.0.conv1.1.running_mean" in bn.state_dict()
    ibn = build_segmenter(SegConfig(num_classes=4, width=8, norm="ibn_b"))
    assert sum(isinstance(m, torch.nn.InstanceNorm2d) for m in ibn.modules()) == 3   # stem + end of layer1, layer2
    with pytest.raises(ConfigError, match="norm"):
        SegConfig(norm="groupnorm")
    with pytest.raises(ValueError, match="unknown norm"):
        FCN(3, "fcn8s", "compact", norm="ln")

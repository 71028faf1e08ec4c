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

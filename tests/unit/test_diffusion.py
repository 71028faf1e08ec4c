import math

import numpy as np
import pytest
import torch

from genseg import config as C
from genseg.config import ConfigError, DiffusionConfig
from genseg.diffusion.conditioning import drop_condition, encode_labels, null_condition
from genseg.diffusion.ema import EMA
from genseg.diffusion.guidance import guide, guided_output
from genseg.diffusion.inpaint import composite, feather, inpaint
from genseg.diffusion.sampling import from_uint8, sample, to_uint8
from genseg.diffusion.schedules import alpha_bar, make_train_scheduler
from genseg.diffusion.training import diffusion_loss, train_step
from genseg.models.unet import build_diffusion_model

pytestmark = pytest.mark.unit

T, B0, B1 = 1000, 1e-4, 0.02


def _hand_alpha_bar(name: str) -> np.ndarray:
    t = np.arange(T, dtype=np.float64)
    if name == "linear":
        betas = np.linspace(B0, B1, T)
    elif name == "scaled_linear":
        betas = np.linspace(B0 ** 0.5, B1 ** 0.5, T) ** 2
    elif name == "sigmoid":
        betas = 1 / (1 + np.exp(-np.linspace(-6, 6, T))) * (B1 - B0) + B0
    else:  # cosine, Nichol & Dhariwal eq. 17 with s = 0.008, beta capped at 0.999
        f = lambda u: math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f(i + 1) / f(i), 0.999) for i in t])
    return np.cumprod(1 - betas)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "sigmoid"])
def test_alpha_bar_exact_and_monotonic(name):
    ab = alpha_bar(DiffusionConfig(schedule=name, timesteps=T, beta_start=B0, beta_end=B1)).double().numpy()
    hand = _hand_alpha_bar(name)
    for t in (0, 1, 10, 250, 500, 999):
        assert ab[t] == pytest.approx(hand[t], rel=2e-4, abs=1e-7), (name, t)
    assert (np.diff(ab) < 0).all() and 0 < ab[-1] < ab[0] <= 1


def test_linear_alpha_bar_by_hand_at_small_t():
    ab = alpha_bar(DiffusionConfig(schedule="linear", timesteps=T, beta_start=B0, beta_end=B1))
    beta1 = B0 + (B1 - B0) / (T - 1)
    assert ab[0].item() == pytest.approx(1 - B0, rel=1e-6)
    assert ab[1].item() == pytest.approx((1 - B0) * (1 - beta1), rel=1e-6)


def test_add_noise_at_t0_is_nearly_x0_and_at_T_nearly_noise():
    sched = make_train_scheduler(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    x_t0 = sched.add_noise(x0, eps, torch.zeros(4, dtype=torch.long))
    ab0 = sched.alphas_cumprod[0]
    assert torch.allclose(x_t0, ab0.sqrt() * x0 + (1 - ab0).sqrt() * eps, atol=1e-6)
    assert (x_t0 - x0).abs().max() <= 0.011 * eps.abs().max()     # sqrt(1 - alpha_bar_0) = 0.01
    x_T = sched.add_noise(x0, eps, torch.full((4,), T - 1))
    assert (x_T - eps).abs().max() < 0.02


def test_config_validation_and_round_trip():
    cfg = C.replace(DiffusionConfig(), {"schedule": "cosine", "channels": "16,32", "image_size": "32x48"})
    assert C.from_json(C.to_json(cfg)) == cfg
    with pytest.raises(ConfigError, match="'schedule' must be one of"):
        DiffusionConfig(schedule="quadratic")
    with pytest.raises(ConfigError, match="divisible by 4"):
        DiffusionConfig(channels=(16, 32, 64), image_size=(30, 48))


def test_guidance_is_exact():
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    assert torch.equal(guide(u, c, 0.0), u)
    assert torch.equal(guide(u, c, 1.0), c)
    assert torch.allclose(guide(u, c, 3.0), u + 3 * (c - u))


class _Recorder(torch.nn.Module):
    """eps = (mean of the condition channels but the null one) - null channel: distinguishes branches."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x_t, t, cond=None):
        self.batches.append(x_t.shape[0])
        signal = cond[:, :-1].sum(1, keepdim=True) - 5 * cond[:, -1:]
        return x_t * 0 + signal


def test_guided_output_uses_one_batched_pass():
    model = _Recorder()
    x = torch.zeros(2, 3, 4, 4)
    cond = encode_labels(torch.zeros(2, 4, 4, dtype=torch.long), 3)
    out = guided_output(model, x, 5, cond, 3.0)
    assert model.batches == [4]                       # both branches, one forward of 2B
    # cond branch gives 1, null branch gives -5: -5 + 3 * (1 - -5) = 13
    assert torch.allclose(out, torch.full_like(out, 13.0))
    assert torch.allclose(guided_output(model, x, 5, cond, 0.0), torch.full_like(out, -5.0))
    assert torch.allclose(guided_output(model, x, 5, cond, 1.0), torch.full_like(out, 1.0))


def test_condition_encoding_and_dropout():
    mask = torch.tensor([[[0, 2], [255, 1]]])
    c = encode_labels(mask, 3)
    assert c.shape == (1, 4, 2, 2)
    assert c[0, :, 0, 1].tolist() == [0, 0, 1, 0] and c[0, :, 1, 0].tolist() == [0, 0, 0, 0]
    n = null_condition(c)
    assert n[:, -1].eq(1).all() and n[:, :-1].eq(0).all()
    batch = encode_labels(torch.zeros(8, 2, 2, dtype=torch.long), 3)
    assert torch.equal(drop_condition(batch, 0.0), batch)
    assert torch.equal(drop_condition(batch, 0.999999), null_condition(batch))


def _tiny(cond="mask", prediction="epsilon"):
    cfg = DiffusionConfig(cond=cond, num_classes=3, channels=(16, 32), layers_per_block=1, timesteps=100,
                          prediction=prediction, p_uncond=0.1)
    torch.manual_seed(0)
    return cfg, build_diffusion_model(cfg), make_train_scheduler(cfg)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_tiny_model_overfits_one_batch(prediction):
    cfg, model, sched = _tiny(prediction=prediction)
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 16, 16, dtype=torch.long)
    mask[:, 8:] = 1
    x0 = torch.where(mask[:, None] == 1, 0.8, -0.6).expand(4, 3, 16, 16).contiguous()
    cond = encode_labels(mask, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ema = EMA(model, 0.9)
    p_init = torch.cat([p.detach().flatten() for p in model.parameters()])
    losses = [train_step(model, opt, x0, cond, sched, cfg.p_uncond, ema, generator=g) for _ in range(150)]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.35 * first, (first, last)
    # the EMA (decay 0.9: ~10 steps of memory) tracks the trained weights, far closer to them than the init
    p_model = torch.cat([p.detach().flatten() for p in model.parameters()])
    p_ema = torch.cat([p.flatten() for p in ema.model.parameters()])
    assert ema.updates == 150
    assert (p_ema - p_model).norm() < 0.2 * (p_init - p_model).norm()


def test_loss_rejects_condition_mismatch():
    cfg, model, sched = _tiny(cond="none")
    with pytest.raises(ValueError, match="unconditional"):
        diffusion_loss(model, torch.zeros(1, 3, 16, 16), torch.zeros(1, 4, 16, 16), sched)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_sampling_shapes_dtypes_and_seeding(sampler):
    cfg, model, sched = _tiny()
    model.eval()
    cond = encode_labels(torch.zeros(2, 16, 16, dtype=torch.long), 3)
    kw = dict(cond=cond, w=2.0, sampler=sampler, steps=4)
    a = sample(model, sched, (2, 3, 16, 16), generator=torch.Generator().manual_seed(1), **kw)
    b = sample(model, sched, (2, 3, 16, 16), generator=torch.Generator().manual_seed(1), **kw)
    c = sample(model, sched, (2, 3, 16, 16), generator=torch.Generator().manual_seed(2), **kw)
    assert a.shape == (2, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    img = to_uint8(a)
    assert img.dtype == torch.uint8 and img.shape == (2, 16, 16, 3)
    assert (from_uint8(img) - a).abs().max() <= 1 / 127.5 + 1e-6
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(model, sched, (1, 3, 16, 16), sampler="euler")


@pytest.mark.parametrize("resample", [1, 2])
def test_inpainting_keeps_the_known_region(resample):
    cfg, model, sched = _tiny(cond="none")
    model.eval()
    x_known = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:10, 4:12] = 1
    out = inpaint(model, sched, x_known, mask, steps=5, resample=resample, generator=torch.Generator().manual_seed(0))
    keep = mask.expand_as(out) == 0
    assert torch.equal(out[keep], x_known.clamp(-1, 1)[keep])
    assert not torch.allclose(out[~keep], x_known[~keep])


def test_composite_is_bit_identical_outside_the_mask_and_feathered_inside():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:15, 8:22] = True
    out = composite(original, generated, mask, radius=3)
    assert np.array_equal(out[~mask], original[~mask])
    assert np.array_equal(out[10, 15], generated[10, 15])      # deep inside: fully generated
    soft = feather(mask, 3)
    assert soft[~mask].max() == 0 and soft[10, 15] == 1 and 0 < soft[5, 15] < 1


# ---------------------------------------------------------------- EMA: exact values, devices, DDP

class _Tiny(torch.nn.Module):
    """One weight and an integer buffer (like BatchNorm's counter)."""

    def __init__(self, w: float = 1.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([w]))
        self.register_buffer("count", torch.tensor(0))


def _updates(ema, model, values):
    for n, v in enumerate(values, 1):
        with torch.no_grad():
            model.w.fill_(v)
            model.count.fill_(10 * n)
        ema.update(model)


def test_ema_is_the_hand_computed_warm_up_average():
    # d_n = min(decay, (1 + n) / (10 + n)); ema_n = d_n * ema_{n-1} + (1 - d_n) * w_n, ema_0 = 1
    model = _Tiny(1.0)
    ema = EMA(model, decay=0.5)                 # warm-up dominates: d = 2/11, 3/12, 4/13
    _updates(ema, model, [3.0, -1.0, 5.0])
    e1 = 2 / 11 * 1.0 + 9 / 11 * 3.0            # 29/11
    e2 = 3 / 12 * e1 + 9 / 12 * -1.0            # -1/11
    e3 = 4 / 13 * e2 + 9 / 13 * 5.0             # 491/143
    assert (e1, e2, e3) == pytest.approx((29 / 11, -1 / 11, 491 / 143))
    assert ema.model.w.item() == pytest.approx(491 / 143, rel=1e-6) and ema.updates == 3
    assert ema.model.count.item() == 30          # integer buffers are copied, not averaged

    capped = EMA(_Tiny(1.0), decay=0.1)          # decay below the warm-up value: d = 0.1 throughout
    _updates(capped, model, [3.0, 5.0])
    assert capped.model.w.item() == pytest.approx(0.1 * (0.1 * 1.0 + 0.9 * 3.0) + 0.9 * 5.0, rel=1e-6)


def test_ema_resumes_from_its_update_count():
    # a resumed EMA (weights + updates restored) continues exactly like one that never stopped
    model = _Tiny(1.0)
    straight = EMA(model, decay=0.5)
    _updates(straight, model, [3.0, -1.0, 5.0, 2.0])
    first = EMA(_Tiny(1.0), decay=0.5)
    _updates(first, model, [3.0, -1.0])
    resumed = EMA(_Tiny(0.0), decay=0.5)
    resumed.model.load_state_dict(first.model.state_dict())
    resumed.updates = first.updates
    _updates(resumed, model, [5.0, 2.0])
    assert resumed.model.w.item() == straight.model.w.item()


def test_ema_follows_the_model_to_its_device_and_keeps_its_dtype():
    # "meta" stands in for a GPU here: a second device the averages must follow
    model = _Tiny(1.0)
    ema = EMA(model, decay=0.5)
    model.to("meta")
    ema.update(model)
    assert {t.device.type for t in ema.model.state_dict().values()} == {"meta"}
    assert ema.device.type == "meta"
    moved = EMA(_Tiny(1.0), decay=0.5).to("meta")      # explicit move, as the training loop does
    assert {t.device.type for t in moved.model.state_dict().values()} == {"meta"}
    # a float64 model: the EMA keeps its own float32 average and takes the cast update
    m64 = _Tiny(3.0).double()
    e = EMA(_Tiny(1.0), decay=0.5)
    e.update(m64)
    assert e.model.w.dtype == torch.float32 and e.model.w.item() == pytest.approx(2 / 11 + 27 / 11, rel=1e-6)


def test_ema_and_train_step_through_a_ddp_wrapper(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = _Tiny(1.0)
        ddp = DDP(model)
        ema = EMA(ddp, decay=0.5)                      # copies the inner module: no "module." prefix
        assert set(ema.model.state_dict()) == {"w", "count"}
        with torch.no_grad():
            model.w.fill_(3.0)
        ema.update(ddp)
        assert ema.model.w.item() == pytest.approx(29 / 11, rel=1e-6)

        cfg, unet, sched = _tiny()
        wrapped = DDP(unet)
        ema2 = EMA(wrapped, 0.9)
        before = [p.detach().clone() for p in ema2.model.parameters()]
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
        cond = encode_labels(torch.zeros(2, 16, 16, dtype=torch.long), 3)
        loss = train_step(wrapped, opt, torch.zeros(2, 3, 16, 16), cond, sched, 0.1, ema2,
                          generator=torch.Generator().manual_seed(0))
        assert np.isfinite(loss) and ema2.updates == 1
        d = 2 / 11                                     # first update: ema = d * before + (1 - d) * trained
        for b, e, p in zip(before, ema2.model.parameters(), unet.parameters()):
            assert torch.allclose(e, d * b + (1 - d) * p.detach(), atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_loss_and_samplers_keep_every_tensor_on_the_model_device():
    # the model on a second device ("meta": shapes only, no CUDA needed); a CPU generator drives
    # the noise, as in training; every result must come back on that device
    import copy

    cfg, model, sched = _tiny()
    meta = copy.deepcopy(model).eval().to("meta")
    cond = encode_labels(torch.zeros(2, 16, 16, dtype=torch.long), 3)
    g = torch.Generator().manual_seed(0)
    loss = diffusion_loss(meta, torch.zeros(2, 3, 16, 16, device="meta"), cond.to("meta"), sched, 0.5, g)
    assert loss.device.type == "meta"
    for sampler in ("ddpm", "ddim", "dpmpp"):
        x = sample(meta, sched, (2, 3, 16, 16), cond=cond, w=2.0, sampler=sampler, steps=3, generator=g, device="meta")
        assert x.device.type == "meta" and x.shape == (2, 3, 16, 16)
    x = inpaint(meta, sched, torch.zeros(1, 3, 16, 16), torch.ones(1, 1, 16, 16), cond=cond[:1], steps=3, resample=2,
                generator=g, device="meta")
    assert x.device.type == "meta"


def test_train_step_takes_an_autocast_factory_or_context():
    # a fresh context per step from a factory, or one reusable context; the CPU path ignores neither
    import contextlib

    cfg, model, sched = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cond = encode_labels(torch.zeros(1, 16, 16, dtype=torch.long), 3)
    entered = []

    @contextlib.contextmanager
    def ctx():
        entered.append(1)
        yield

    x0 = torch.zeros(1, 3, 16, 16)
    a = train_step(model, opt, x0, cond, sched, 0.0, autocast=ctx, generator=torch.Generator().manual_seed(0))
    b = train_step(model, opt, x0, cond, sched, 0.0, autocast=contextlib.nullcontext(),
                   generator=torch.Generator().manual_seed(0))
    assert entered == [1] and a == b

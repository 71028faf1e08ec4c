"""The GAN step under real DDP (2 gloo processes): both networks wrapped, the gradient penalty's
double backward through the plain module, and the result equal to what averaging every gradient
by hand gives.  If DDP dropped or double-counted the penalty's share of D's gradient, or G's
gradient were not synchronised, the two runs would part."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [pytest.mark.integration]


class AveragedAdam(torch.optim.Adam):
    """Adam that all-reduces (averages) the gradients itself before stepping: the reference."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
        return super().step(closure)


def _worker(rank: int, world: int, port: int, loss: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from genseg.config import GANConfig
    from genseg.models.dcgan import build_discriminator, build_generator, label_condition
    from genseg.gan.training import train_step

    cfg = GANConfig(image_size=(16, 24), num_classes=3, g_channels=8, d_channels=8, z_dim=8, loss=loss,
                    r1_weight=2.0 if loss == "hinge" else 0.0)
    torch.manual_seed(0)                                  # same initial weights on every rank
    g, d = build_generator(cfg), build_discriminator(cfg)
    g_ref, d_ref = build_generator(cfg), build_discriminator(cfg)
    g_ref.load_state_dict(g.state_dict())
    d_ref.load_state_dict(d.state_dict())
    gd, dd = DDP(g), DDP(d)
    betas = (cfg.beta1, cfg.beta2)
    og, od = torch.optim.Adam(g.parameters(), cfg.g_lr, betas), torch.optim.Adam(d.parameters(), cfg.d_lr, betas)
    og_r, od_r = AveragedAdam(g_ref.parameters(), cfg.g_lr, betas), AveragedAdam(d_ref.parameters(), cfg.d_lr, betas)
    data = torch.Generator().manual_seed(100 + rank)      # every rank its own batch
    for step in range(3):
        x = torch.rand(4, 3, 16, 24, generator=data) * 2 - 1
        seg = label_condition(torch.randint(0, 3, (4, 16, 24), generator=data), cfg)
        a = train_step(gd, dd, og, od, x, seg, cfg, torch.Generator().manual_seed(10 * step + rank))
        b = train_step(g_ref, d_ref, og_r, od_r, x, seg, cfg, torch.Generator().manual_seed(10 * step + rank))
    # BatchNorm running stats are per rank in the reference (DDP broadcasts rank 0's): compare parameters
    params = {f"g.{k}": v for k, v in g.named_parameters()} | {f"d.{k}": v for k, v in d.named_parameters()}
    ref = {f"g.{k}": v for k, v in g_ref.named_parameters()} | {f"d.{k}": v for k, v in d_ref.named_parameters()}
    torch.save({"params": {k: v.detach() for k, v in params.items()},
                "ref": {k: v.detach() for k, v in ref.items()}, "last": (a, b)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("loss", ["wgan-gp", "hinge"])
def test_gan_step_under_ddp_equals_hand_averaged_gradients(tmp_path, loss):
    mp.spawn(_worker, args=(2, _free_port(), loss, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), f"{k} differs between ranks: DDP did not keep them in sync"
        assert torch.allclose(v, r0["ref"][k], atol=1e-5, rtol=1e-4), f"{k}: DDP step != hand-averaged step"
    # and training moved the weights at all (the comparison is not between two untouched copies)
    from genseg.config import GANConfig
    from genseg.models.dcgan import build_discriminator

    from genseg.models.dcgan import build_generator

    torch.manual_seed(0)
    cfg = GANConfig(image_size=(16, 24), num_classes=3, g_channels=8, d_channels=8, z_dim=8, loss=loss)
    build_generator(cfg)                  # the same draws as in the worker: G first, then D
    d0 = dict(build_discriminator(cfg).named_parameters())
    assert any(not torch.allclose(v, r0["params"][f"d.{k}"]) for k, v in d0.items())

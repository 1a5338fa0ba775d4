"""docs/lightning.md's GAN recipe: manual optimization with two optimizers, one loss_fn."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradwatch import GradientHealthWarning
from gradwatch.lightning import GradWatch
from tests.helpers.lightning_models import loader, trainer

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:lightning")]


def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


class GAN(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.latent_dim = 4
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 12))
        self.discriminator = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        real, _ = batch
        g_opt, d_opt = self.optimizers()
        fake = self.generator(torch.randn(real.shape[0], self.latent_dim))
        d_loss = bce(self.discriminator(real), 1.0) + bce(self.discriminator(fake.detach()), 0.0)
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        g_loss = bce(self.discriminator(fake), 1.0)
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.generator.parameters(), 1e-3),
            torch.optim.Adam(self.discriminator.parameters(), 1e-3),
        )


def gan_loss(module, batch):  # the recipe: no .detach(), both players' losses summed
    real, _ = batch
    fake = module.generator(torch.randn(real.shape[0], module.latent_dim, device=real.device))
    d_real, d_fake = module.discriminator(real), module.discriminator(fake)
    return bce(d_real, 1.0) + bce(d_fake, 0.0) + bce(d_fake, 1.0)


def discriminator_loss(module, batch):  # the trap: the training loss with fake.detach()
    real, _ = batch
    fake = module.generator(torch.randn(real.shape[0], module.latent_dim, device=real.device))
    return bce(module.discriminator(real), 1.0) + bce(module.discriminator(fake.detach()), 0.0)


def test_the_documented_gan_loss_fn_passes():
    cb = GradWatch(loss_fn=gan_loss, check_every_n_steps=1)
    trainer(callbacks=[cb], max_steps=4).fit(GAN(), loader())
    assert cb.reports and all(r.verdict == "pass" for r in cb.reports)
    assert cb.events == []


def test_a_detached_fake_makes_the_generator_disconnected_in_one_line():
    cb = GradWatch(loss_fn=discriminator_loss, check_every_n_steps=1)
    with pytest.warns(GradientHealthWarning, match="disconnected in 4 tensors of generator"):
        trainer(callbacks=[cb], max_steps=2).fit(GAN(), loader())
    assert {e.param.split(".")[0] for e in cb.events} == {"generator"}

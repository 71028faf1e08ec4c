"""DCGAN family: generator and discriminator (genseg.gan.models), the losses and penalties
(genseg.gan.losses), one training step (genseg.gan.training) and the GAN as a
:class:`genseg.generation.Generator` (genseg.gan.generator)."""

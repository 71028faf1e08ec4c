"""The GAN family's training side: losses and penalties (genseg.gan.losses), one training step
(genseg.gan.training), and a trained GAN as a :class:`genseg.generation.Generator`
(genseg.gan.generator).  The networks are in genseg.models.dcgan."""

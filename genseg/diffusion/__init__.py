"""DDPM diffusion: noise schedules, the training loss, samplers, guidance and inpainting.

Schedules and samplers are diffusers' schedulers; genseg adds mask conditioning,
classifier-free guidance, EMA and inpainting around them.
"""

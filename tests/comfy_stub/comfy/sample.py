"""Stand-in for comfy.sample.prepare_noise: seeded noise drawn on the CPU from the global generator."""

from __future__ import annotations

import torch


def prepare_noise(latent_image, seed, noise_inds=None):
    generator = torch.manual_seed(seed)
    return torch.randn(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout,
                       generator=generator, device="cpu")

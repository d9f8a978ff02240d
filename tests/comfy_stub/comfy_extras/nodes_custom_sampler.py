"""Stand-in for the guider and noise classes of comfy_extras/nodes_custom_sampler.py."""

from __future__ import annotations

import comfy.sample
import comfy.samplers


class Noise_RandomNoise:
    def __init__(self, seed):
        self.seed = seed

    def generate_noise(self, input_latent):
        return comfy.sample.prepare_noise(input_latent["samples"], self.seed, input_latent.get("batch_index"))


class Guider_Basic(comfy.samplers.CFGGuider):
    def set_conds(self, positive):
        self.inner_set_conds({"positive": positive})

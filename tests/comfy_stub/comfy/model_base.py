"""Stand-in for comfy.model_base.BaseModel: the diffusion model, its model sampling and latent format.

``apply_model`` does what ComfyUI's does for an SD-style model: scale the input by the model
sampling, cast to the compute dtype (``manual_cast_dtype`` when set), turn sigma into a
timestep, call ``diffusion_model(x, t, context=...)`` and return the denoised x0.
"""

from __future__ import annotations

import torch
from comfy.model_sampling import ModelSamplingEPS


class LatentFormatSD15:
    scale_factor = 0.18215

    def process_in(self, latent):
        return latent * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor


class BaseModel(torch.nn.Module):
    def __init__(self, diffusion_model: torch.nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.model_sampling = ModelSamplingEPS()
        self.latent_format = LatentFormatSD15()
        self.manual_cast_dtype = None

    def get_dtype(self):
        return next(self.diffusion_model.parameters()).dtype

    def process_latent_in(self, latent):
        return self.latent_format.process_in(latent)

    def process_latent_out(self, latent):
        return self.latent_format.process_out(latent)

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        transformer_options = transformer_options or {}
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        dtype = self.manual_cast_dtype if self.manual_cast_dtype is not None else self.get_dtype()
        xc = xc.to(dtype)
        t = self.model_sampling.timestep(t).float()
        context = None if c_crossattn is None else c_crossattn.to(xc.device, dtype)
        out = self.diffusion_model(xc, t, context=context, control=control,
                                   transformer_options=transformer_options).float()
        return self.model_sampling.calculate_denoised(sigma, out, x)

"""Stand-in for the sampling path of comfy.samplers: ``Sampler`` and ``CFGGuider``.

What the training node relies on, as in ComfyUI a125cd84: ``sample`` loads the model, copies
the conditioning (``convert_cond``: the tensor becomes ``cross_attn``, a fresh dict per entry),
processes the latent with the model's latent format, encodes each cond for the model
(``model_conds['c_crossattn']``) and hands itself to ``sampler.sample`` as ``model_wrap``.
Calling the guider predicts x0: with cfg 1 only the positive conds run, each over the whole
batch, and their predictions are averaged (``calc_cond_batch``).  Hooks, areas, masks,
control and the uncond batch are not reproduced.
"""

from __future__ import annotations

import uuid

import comfy.model_management
import torch


class Sampler:
    def sample(self):
        pass

    def max_denoise(self, model_wrap, sigmas):
        return False


class CONDCrossAttn:
    def __init__(self, cond):
        self.cond = cond

    def process_cond(self, batch_size, device, **kwargs):
        cond = self.cond
        if cond.shape[0] != batch_size:
            cond = cond.repeat([batch_size // cond.shape[0]] + [1] * (cond.ndim - 1))
        return CONDCrossAttn(cond.to(device))


def convert_cond(cond):
    out = []
    for c in cond:
        temp = c[1].copy()
        model_conds = temp.get("model_conds", {})
        if c[0] is not None:
            temp["cross_attn"] = c[0]
        temp["model_conds"] = model_conds
        temp["uuid"] = uuid.uuid4()
        out.append(temp)
    return out


def process_conds(model, noise, conds, device):
    for key in conds:
        for c in conds[key]:
            if "cross_attn" in c:
                c["model_conds"] = dict(c["model_conds"], c_crossattn=CONDCrossAttn(c["cross_attn"]))
    return conds


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    out = torch.zeros_like(x_in)
    count = 0
    for c in conds:
        extra = {k: v.process_cond(batch_size=x_in.shape[0], device=x_in.device).cond
                 for k, v in c["model_conds"].items()}
        out = out + model.apply_model(x_in, timestep, transformer_options=model_options.get("transformer_options", {}),
                                      **extra)
        count += 1
    return out / max(count, 1)


class CFGGuider:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.original_conds = {}
        self.cfg = 1.0

    def set_conds(self, positive, negative):
        self.inner_set_conds({"positive": positive, "negative": negative})

    def set_cfg(self, cfg):
        self.cfg = cfg

    def inner_set_conds(self, conds):
        for k in conds:
            self.original_conds[k] = convert_cond(conds[k])

    def __call__(self, *args, **kwargs):
        return self.predict_noise(*args, **kwargs)

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        model_options = model_options or {}
        if self.cfg != 1.0 and self.conds.get("negative"):
            raise NotImplementedError("the stand-in samples with cfg 1 only")
        return calc_cond_batch(self.inner_model, self.conds.get("positive", []), x, timestep, model_options)

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        if sigmas.shape[-1] == 0:
            return latent_image
        self.conds = {k: [c.copy() for c in v] for k, v in self.original_conds.items()}
        comfy.model_management.load_models_gpu([self.model_patcher])
        self.inner_model = self.model_patcher.model
        device = self.model_patcher.load_device
        noise, latent_image, sigmas = noise.to(device), latent_image.to(device), sigmas.to(device)
        if torch.count_nonzero(latent_image) > 0:
            latent_image = self.inner_model.process_latent_in(latent_image)
        self.conds = process_conds(self.inner_model, noise, self.conds, device)
        extra_args = {"model_options": dict(self.model_options), "seed": seed}
        try:
            samples = sampler.sample(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        finally:
            del self.inner_model
        output = self.model_patcher.model.process_latent_out(samples.to(torch.float32))
        del self.conds
        return output

"""The "Train LyCORIS" node: ComfyUI's sampling machinery around ``lycoris_core.train``.

The node gathers its inputs, lets ComfyUI load the model and prepare the conditioning
(through ``Guider_Basic.sample`` with a sampler that trains instead of sampling, as
ComfyUI's own ``TrainLoraNode`` does), draws noise and sigmas from the model's own
``model_sampling`` and hands each micro-batch's loss to ``lycoris_core.train.train_loop``.
Everything about adapters (modules, custom backward, names, saving) is the core's.

- Latents whose captions differ are run per caption, so each latent meets its own text
  (ComfyUI's trainer averages every caption of a batch over every latent).
- The input MODEL is never changed: training runs on a clone, the model's layers get their
  own forwards back afterwards, and the MODEL output is a clone of the input with the saved
  file applied through the project's patch engine (exact LyCORIS math, DoRA and (IA)³ too).
- The file goes to ``models/loras/<file_name>.safetensors``, atomically; an existing file is
  an error unless ``overwrite`` is on, and is checked before training starts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time

import torch

from lycoris_core import load_adapter
from lycoris_core.io.writer import check_output, save_tensors
from lycoris_core.keymap import Target as WeightTarget
from lycoris_core.keymap import detect_model
from lycoris_core.patch import Contribution
from lycoris_core.train import (
    ALGORITHMS,
    LOSSES,
    OPTIMIZERS,
    PRESETS,
    SAVE_DTYPES,
    AdapterConfig,
    checkpoint_blocks,
    create_network,
    file_tensors,
    find_targets,
    frozen_base,
    make_loss,
    make_optimizer,
    train_loop,
    training_metadata,
    unet_naming,
)

from . import glue

log = logging.getLogger("comfyui-lycoris")

CATEGORY = "training"
NONE = "[None]"
UNET_PRESETS = [name for name in PRESETS if name.startswith(("unet", "dit"))]  # the diffusion model's presets
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.()+-]{0,120}")


def _int(default, lo, hi, tip):
    return ("INT", {"default": default, "min": lo, "max": hi, "tooltip": tip})


def _float(default, lo, hi, step, tip):
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tip})


def _bool(default, tip):
    return ("BOOLEAN", {"default": default, "tooltip": tip})


def output_path(file_name: str, overwrite: bool):
    """models/loras/<file_name>.safetensors, refused early if it exists (unless overwrite) or is not a plain name."""
    import folder_paths

    name = file_name.strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _FILE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"file_name {file_name!r}: use a plain name (letters, digits, space, _ . ( ) + -), no folders")
    folders = folder_paths.get_folder_paths(glue.LORA_FOLDER)
    if not folders:
        raise ValueError("ComfyUI has no models/loras folder configured")
    return check_output(os.path.join(folders[0], f"{name}.safetensors"), overwrite)


def _normal_copies(value):
    """Conditioning made under inference mode, as normal tensors autograd may save."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, dict):
        for k, v in list(value.items()):
            value[k] = _normal_copies(v)
        return value
    if isinstance(value, list):
        return [_normal_copies(v) for v in value]
    if hasattr(value, "cond") and isinstance(value.cond, torch.Tensor):  # comfy.conds.CONDRegular & co
        value.cond = _normal_copies(value.cond)
    return value


def _caption_groups(positive, n: int) -> tuple[list, list[int]]:
    """(distinct conditionings, index of each latent's one): one prompt for all, or one per latent."""
    if len(positive) == 1:
        return list(positive), [0] * n
    if len(positive) != n:
        raise ValueError(f"{len(positive)} positive conditionings for {n} latents: give one, or one per latent")
    distinct, index, seen = [], [], {}
    for entry in positive:
        key = id(entry[0])
        if key not in seen:
            seen[key] = len(distinct)
            distinct.append(entry)
        index.append(seen[key])
    return distinct, index


def loss_graph(losses: list[float], width: int = 800, height: int = 480) -> torch.Tensor:
    """The loss curve as a ComfyUI IMAGE (1, H, W, 3), drawn like ComfyUI's "Plot Loss Graph"."""
    from PIL import Image, ImageDraw, ImageFont

    margin = 40
    img = Image.new("RGB", (width + margin, height + margin), "white")
    draw = ImageDraw.Draw(img)
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    points = [(margin + int(i / max(len(losses) - 1, 1) * width), height - int((v - lo) / span * height))
              for i, v in enumerate(losses)]
    if len(points) > 1:
        draw.line(points, fill="blue", width=2)
    draw.line([(margin, 0), (margin, height)], fill="black", width=2)
    draw.line([(margin, height), (width + margin, height)], fill="black", width=2)
    font = ImageFont.load_default()
    draw.text((5, height // 2), "Loss", font=font, fill="black")
    draw.text((width // 2, height + 10), "Steps", font=font, fill="black")
    draw.text((margin - 38, 0), f"{hi:.3g}", font=font, fill="black")
    draw.text((margin - 38, height - 10), f"{lo:.3g}", font=font, fill="black")
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(img.height, img.width, 3).to(torch.float32).div_(255.0).unsqueeze(0)


def apply_trained(model, path, targets):
    """A clone of ``model`` with the saved file applied at strength 1 by the project's patch engine.

    The trained layers' keys are known exactly, so no key mapping is needed (DiT layouts too).
    """
    adapter = load_adapter(path)
    cls = glue.patch_class()
    patches = {}
    for target in targets:
        module = adapter.modules.get(target.name)
        if module is None:
            continue
        key = f"diffusion_model.{target.path}.weight"
        shape = tuple(target.layer.weight.shape)
        bias_key = f"diffusion_model.{target.path}.bias" if getattr(target.layer, "bias", None) is not None else None
        where = WeightTarget(key, bias_key if module.has_bias else None, None, shape, None, "unet")
        patches[key] = cls(key, shape, [Contribution(module, where, 1.0)], glue.DELTAS)
        if module.has_bias and bias_key is not None:
            patches[bias_key] = cls(bias_key, (shape[0],), [Contribution(module, where, 1.0, bias=True)], glue.DELTAS)
    patched = model.clone()
    patched.add_patches(patches, 1.0)
    return patched


def _sampler(run):
    import comfy.samplers

    class LycorisTrainSampler(comfy.samplers.Sampler):
        """ComfyUI hands the prepared model and conditioning to ``sample``; we train there."""

        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            run(model_wrap, extra_args, latent_image)
            return torch.zeros_like(latent_image)

    return LycorisTrainSampler()


class TrainLycoris:
    DESCRIPTION = ("Train a LyCORIS adapter (LoRA/LoCon, LoHa, LoKr, (IA)3, full; Tucker and DoRA) on the diffusion "
                   "model from latents and their conditioning. Saves a kohya/LyCORIS file to models/loras that "
                   "ComfyUI's LoraLoader, this pack's loaders and lycoris-lora all read.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "LORA_MODEL", "IMAGE", "LOSS_MAP", "STRING")
    RETURN_NAMES = ("model", "lycoris", "loss_graph", "loss", "file")
    OUTPUT_TOOLTIPS = ("The input model with the trained adapter applied.",
                       "The trained adapter's tensors (kohya names), for Load LoRA Model / Save LoRA Weights.",
                       "The loss curve.", "The loss per step, for Plot Loss Graph.", "Path of the saved file.")
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to train the adapter on."}),
                "latents": ("LATENT", {"tooltip": "The training images, VAE-encoded."}),
                "positive": ("CONDITIONING", {"tooltip": "One conditioning for all latents, or one per latent."}),
                "batch_size": _int(1, 1, 10000, "Latents per step."),
                "grad_accumulation_steps": _int(1, 1, 1024, "Micro-batches averaged into each optimizer step."),
                "steps": _int(16, 1, 100000, "Optimizer steps."),
                "learning_rate": _float(0.0005, 1e-7, 1.0, 1e-6, "Optimizer learning rate."),
                "algorithm": (list(ALGORITHMS), {"default": "lora", "tooltip": "lora/locon: low rank; loha: "
                              "Hadamard product of two low-rank pairs; lokr: Kronecker product; ia3: per-channel "
                              "scale; full: the whole weight difference."}),
                "rank": _int(8, 1, 1024, "Rank (LyCORIS lora_dim) of linear and 1×1 conv layers."),
                "alpha": _float(1.0, 0.0, 1024.0, 0.01, "Scale alpha/rank; 0 means alpha = rank."),
                "conv_rank": _int(4, 0, 1024, "Rank of k×k convs (presets with convs); 0 leaves them out."),
                "conv_alpha": _float(1.0, 0.0, 1024.0, 0.01, "Alpha of k×k convs."),
                "preset": (UNET_PRESETS, {"default": "unet-attn", "tooltip": "Which layers get an adapter."}),
                "optimizer": (list(OPTIMIZERS), {"default": "AdamW"}),
                "loss_function": (list(LOSSES), {"default": "MSE"}),
                "seed": _int(0, 0, 0xFFFFFFFFFFFFFFFF, "Seed of the initialisation, batches, sigmas and noise."),
                "training_dtype": (list(DTYPES), {"default": "bf16", "tooltip": "Dtype of the model's math."}),
                "lora_dtype": (list(DTYPES), {"default": "fp32", "tooltip": "Dtype of the rebuilt ΔW math (LoHa, LoKr, "
                               "full, DoRA); the LoRA/LoCon bypass runs in the training dtype. The trained factors "
                               "are always float32 master weights."}),
                "gradient_checkpointing": _bool(True, "Recompute block activations in backward (less memory)."),
                "existing_adapter": (folder_paths.get_filename_list(glue.LORA_FOLDER) + [NONE],
                                     {"default": NONE, "tooltip": "Continue training this file (its layers keep "
                                      "their algorithm, rank and alpha)."}),
                "file_name": ("STRING", {"default": "lycoris_trained", "tooltip": "Saved as "
                              "models/loras/<file_name>.safetensors."}),
                "save_dtype": (list(SAVE_DTYPES), {"default": "fp16"}),
            },
            "optional": {
                "use_tucker": _bool(False, "CP/Tucker form for k×k convs (lora_mid, hada_t, lokr_t2)."),
                "dora": _bool(False, "Weight decomposition (DoRA) on lora/loha/lokr."),
                "dora_on_output": _bool(False, "DoRA per output channel (LyCORIS's default) instead of per input "
                                        "channel; ComfyUI's own loader reproduces only the input axis exactly."),
                "lokr_factor": _int(-1, -1, 1024, "LoKr factorisation factor; -1 picks the most balanced."),
                "decompose_both": _bool(False, "LoKr: low-rank w1 too."),
                "full_matrix": _bool(False, "LoKr: both Kronecker blocks full."),
                "dropout": _float(0.0, 0.0, 0.99, 0.01, "Drop elements of the adapter's output."),
                "rank_dropout": _float(0.0, 0.0, 0.99, 0.01, "Drop rank channels (lora) or rows of ΔW."),
                "module_dropout": _float(0.0, 0.0, 0.99, 0.01, "Skip a layer's adapter for a step."),
                "overwrite": _bool(False, "Replace an existing file of that name."),
            },
        }

    def train(self, model, latents, positive, batch_size, grad_accumulation_steps, steps, learning_rate, algorithm,
              rank, alpha, conv_rank, conv_alpha, preset, optimizer, loss_function, seed, training_dtype, lora_dtype,
              gradient_checkpointing, existing_adapter, file_name, save_dtype, use_tucker=False, dora=False,
              dora_on_output=False, lokr_factor=-1, decompose_both=False, full_matrix=False, dropout=0.0,
              rank_dropout=0.0, module_dropout=0.0, overwrite=False):
        import comfy.model_management
        import comfy.sample
        import comfy.utils
        import comfy_extras.nodes_custom_sampler as custom_sampler

        path = output_path(file_name, overwrite)
        config = AdapterConfig(
            algo=algorithm, rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha, use_tucker=use_tucker,
            dora=dora, dora_on_output=dora_on_output, factor=lokr_factor, decompose_both=decompose_both,
            full_matrix=full_matrix, dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
            factor_dtype=DTYPES[lora_dtype],
        )
        existing = load_adapter(glue.adapter_path(existing_adapter)) if existing_adapter not in (NONE, "", None) else None
        if existing is not None:
            algos = {m.algo.replace("locon", "lora") for m in existing.modules.values()}
            if len(algos) == 1 and algos != {algorithm.replace("locon", "lora")} and algos <= set(ALGORITHMS):
                # continuing: the file's algorithm wins (its layers keep it; new layers and the metadata follow)
                log.info("[LyCORIS] %s is a %s adapter: continuing it as one", existing_adapter, *algos)
                config = dataclasses.replace(config, algo=next(iter(algos)))
        dtype = DTYPES[training_dtype]
        started = time.time()

        mp = model.clone()
        mp.set_model_compute_dtype(dtype)
        distinct, caption_of = _caption_groups(positive, latents["samples"].shape[0])
        # patch and load as ComfyUI would (in its inference mode: patch engines' buffers are made there)
        comfy.model_management.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
        with torch.inference_mode(False):
            samples = _normal_copies(latents["samples"]).to(torch.float32)
            n = samples.shape[0]
            diffusion = mp.model.diffusion_model
            shapes = {f"diffusion_model.{k}": tuple(v.shape) for k, v in diffusion.state_dict().items()}
            arch = detect_model(shapes).arch
            targets = find_targets(diffusion, preset, "lora_unet", rename=unet_naming(arch))
            net = create_network(targets, config, seed=seed, existing=existing)
            opt = make_optimizer(net.parameters(), optimizer, learning_rate)
            criterion = make_loss(loss_function)
            pbar = comfy.utils.ProgressBar(steps)
            losses: list[float] = []

            def progress(step, total, loss):
                pbar.update_absolute(step, total)
                comfy.model_management.throw_exception_if_processing_interrupted()
                if step == 1 or step % 50 == 0 or step == total:
                    log.info("[LyCORIS] train step %d/%d: loss %.5f", step, total, loss)

            def run(model_wrap, extra_args, latent_image):
                sampling = model_wrap.inner_model.model_sampling
                conds = _normal_copies(model_wrap.conds["positive"])
                images = latent_image.clone() if latent_image.is_inference() else latent_image
                groups = torch.tensor(caption_of)
                gen = torch.Generator().manual_seed(seed)
                device = images.device

                def loss_of(i):
                    chosen = torch.randperm(n, generator=gen)[:batch_size]
                    # one draw for the whole step, so caption groups get different noise
                    noise_all = comfy.sample.prepare_noise(images[chosen.to(device)],
                                                           (seed + i * 1000) & 0xFFFF_FFFF_FFFF_FFFF)
                    total = 0.0
                    for g in groups[chosen].unique().tolist():
                        in_group = groups[chosen] == g
                        picked = chosen[in_group]
                        x0 = images[picked.to(device)]
                        noise = noise_all[in_group.to(noise_all.device)].to(device, x0.dtype)
                        percents = torch.rand(len(picked), generator=gen).clamp_(1e-4, 1 - 1e-4)
                        sigmas = torch.tensor([sampling.percent_to_sigma(float(p)) for p in percents], device=device)
                        xt = sampling.noise_scaling(sigmas, noise, x0, False)
                        target = sampling.noise_scaling(torch.zeros_like(sigmas), torch.zeros_like(noise), x0, False)
                        model_wrap.conds["positive"] = [conds[g]]
                        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                            pred = model_wrap(xt, sigmas, **extra_args)
                        total = total + criterion(pred.float(), target.float()) * (len(picked) / len(chosen))
                    return total

                losses.extend(train_loop(loss_of, opt, steps, grad_accumulation_steps, progress))

            guider = custom_sampler.Guider_Basic(mp)
            guider.set_conds(distinct)
            undo = checkpoint_blocks(diffusion) if gradient_checkpointing else (lambda: None)
            try:
                with frozen_base(mp.model), net.attached():
                    guider.sample(torch.zeros_like(samples), samples, _sampler(run), torch.ones(2), seed=seed)
            finally:
                undo()
            net.eval()
            resolution = tuple(int(s) * 8 for s in samples.shape[-2:][::-1])
            meta = training_metadata(config, arch=arch if arch != "unknown" else None, title=path.stem,
                                     resolution=resolution, steps=steps, learning_rate=learning_rate,
                                     optimizer=optimizer, seed=seed, batch_size=batch_size,
                                     grad_accumulation=grad_accumulation_steps, mixed_precision=training_dtype,
                                     preset=preset, started=started)
            lora = file_tensors(net, SAVE_DTYPES[save_dtype])  # the file's tensors, also the LORA output
            save_tensors(lora, path, meta, overwrite=overwrite)
        patched = apply_trained(model, path, targets)
        first, last = losses[0], sum(losses[-5:]) / len(losses[-5:])
        text = (f"{path.name}: {config.algo} on {len(net)} layers ({preset}), {steps} steps, loss {first:.4g} -> "
                f"{last:.4g}{'' if math.isfinite(last) else ' (not finite)'}")
        log.info("[LyCORIS] %s", text)
        return {"ui": {"lycoris": [text]},
                "result": (patched, lora, loss_graph(losses), {"loss": losses}, str(path))}


"""Subprocess script: the Train LyCORIS node inside a real ComfyUI, checked by ComfyUI's own LoraLoader.

Run as ``python train_comfy_oracle.py <comfyui dir> <project root> <work dir> <algo:preset> ...``.
Prints ``ready`` once ComfyUI imports, then one JSON line per run.  A subprocess keeps ComfyUI's
import-time globals (CPU mode, folder paths, its ``nodes`` module) out of the test session.

Each run: a random-weight SD1.5 UNet (ComfyUI's own ``UNetModel``, SD1.5 config, built
through ``comfy.sd.load_diffusion_model_state_dict`` under inference mode, as a node would),
a few training steps of our node, then ComfyUI's ``LoraLoaderModelOnly`` on the saved file.
Reported: modules in the file, weights ComfyUI changed, "lora key not loaded" lines, and the
largest difference between ComfyUI's patched weights and our node's MODEL output.
"""

import importlib.util
import json
import logging
import os
import sys
import time

from log_lines import WarningLines  # tests/ is this script's folder, first on sys.path

SD15 = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320,
            use_spatial_transformer=True, legacy=False, use_temporal_attention=False, use_temporal_resblock=False,
            num_res_blocks=[2] * 4, channel_mult=[1, 2, 4, 4], context_dim=768, num_heads=8,
            transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_linear_in_transformer=False,
            adm_in_channels=None)




def random_sd15(torch, UNetModel, ops):
    """SD1.5 UNet keys and shapes from ComfyUI's class on meta; seeded N(0, 1/fan_in) weights, unit norms, zero biases."""
    with torch.device("meta"):
        unet = UNetModel(**SD15, dtype=torch.float32, device="meta", operations=ops.disable_weight_init)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, meta in unet.state_dict().items():
        shape = tuple(meta.shape)
        if len(shape) >= 2:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            sd[f"model.diffusion_model.{key}"] = (torch.randn(shape, generator=g) / fan_in ** 0.5).half()
        elif key.endswith("bias"):
            sd[f"model.diffusion_model.{key}"] = torch.zeros(shape, dtype=torch.float16)
        else:
            sd[f"model.diffusion_model.{key}"] = torch.ones(shape, dtype=torch.float16)
    return sd


def main(comfy_dir, root, work, runs):
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import comfy.ops
    import comfy.sd
    import folder_paths
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    import nodes as comfy_nodes  # ComfyUI's own nodes.py, imported before our pack (as ComfyUI does)

    print("ready", flush=True)
    torch.set_num_threads(2)
    loras = os.path.join(work, "loras")
    os.makedirs(loras, exist_ok=True)
    folder_paths.folder_names_and_paths["loras"] = ([loras], folder_paths.supported_pt_extensions)

    spec = importlib.util.spec_from_file_location("comfyui_lycoris_pack", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    node = pack.NODE_CLASS_MAPPINGS["LycorisTrain"]

    started = time.time()
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model_state_dict(random_sd15(torch, UNetModel, comfy.ops))
        g = torch.Generator().manual_seed(1)
        latents = {"samples": torch.randn(2, 4, 8, 8, generator=g)}
        positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    built = time.time() - started
    warnings = WarningLines()
    logging.getLogger().addHandler(warnings)

    for run in runs:
        algo, preset = run.split(":")
        t0 = time.time()
        with torch.inference_mode():
            out = node().train(model, latents, positive, batch_size=1, grad_accumulation_steps=1, steps=2,
                               learning_rate=1e-3, algorithm=algo, rank=4, alpha=4.0, conv_rank=2, conv_alpha=2.0,
                               preset=preset, optimizer="AdamW", loss_function="MSE", seed=0, training_dtype="fp32",
                               lora_dtype="fp32", gradient_checkpointing=False, existing_adapter="[None]",
                               file_name=f"comfy_{algo}", save_dtype="fp16")
        trained = time.time() - t0
        ours, _lora, _image, loss, path = out["result"]
        warnings.lines.clear()
        with torch.inference_mode():
            mm.unload_all_models()
            base = {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}
            (theirs,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, os.path.basename(path), 1.0)
            mm.load_models_gpu([theirs])
            state_theirs = {k: v.detach().clone() for k, v in theirs.model.diffusion_model.state_dict().items()
                            if not torch.equal(v, base[k])}
            mm.load_models_gpu([ours])
            state_ours = {k: v.detach().clone() for k, v in ours.model.diffusion_model.state_dict().items()
                          if not torch.equal(v, base[k])}
            mm.unload_all_models()
            restored = all(torch.equal(v, base[k]) for k, v in model.model.diffusion_model.state_dict().items())
        worst = 0.0
        for key in set(state_theirs) | set(state_ours):
            effect = (state_theirs.get(key, base[key]) - base[key]).abs().max().item()
            diff = (state_theirs.get(key, base[key]) - state_ours.get(key, base[key])).abs().max().item()
            worst = max(worst, diff / max(effect, 1e-12))
        from lycoris_core import load_adapter

        adapter = load_adapter(path)
        with torch.inference_mode():  # the patch engine's buffers were made in inference mode, like ComfyUI's
            nonzero = sum(1 for m in adapter.modules.values() if m.delta(None if not m.uses_weight else torch.ones(m.shape))
                          .abs().max() > 0)  # a 1×1 mid-block self-attention gives q and k no gradient
        print(json.dumps({
            "run": run, "modules": len(adapter.modules), "nonzero": nonzero, "changed_theirs": len(state_theirs), "changed_ours": len(state_ours),
            "same_keys": sorted(state_theirs) == sorted(state_ours), "not_loaded": [w for w in warnings.lines
                                                                                   if "not loaded" in w.lower()],
            "worst_relative": worst, "losses": loss["loss"], "restored": restored, "build_s": round(built, 1),
            "train_s": round(trained, 1),
        }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])

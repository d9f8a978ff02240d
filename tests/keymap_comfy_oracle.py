"""Subprocess script: ComfyUI's own LDM UNet key shapes and diffusers->LDM map, as JSON.

Run as `python keymap_comfy_oracle.py <comfyui dir>`; prints one JSON line per architecture. A subprocess keeps ComfyUI's
import-time global settings out of the test session. Configs are ComfyUI's published
`supported_models` values for SD1.5, SD2.1 and SDXL.
"""

import json
import sys

COMMON = dict(
    use_checkpoint=False,
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    use_spatial_transformer=True,
    legacy=False,
    use_temporal_attention=False,
    use_temporal_resblock=False,
)
CONFIGS = {
    "sd1": dict(
        num_res_blocks=[2] * 4,
        channel_mult=[1, 2, 4, 4],
        context_dim=768,
        num_heads=8,
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_middle=1,
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        use_linear_in_transformer=False,
        adm_in_channels=None,
    ),
    "sd2": dict(
        num_res_blocks=[2] * 4,
        channel_mult=[1, 2, 4, 4],
        context_dim=1024,
        num_head_channels=64,
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_middle=1,
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        use_linear_in_transformer=True,
        adm_in_channels=None,
    ),
    "sdxl": dict(
        num_res_blocks=[2] * 3,
        channel_mult=[1, 2, 4],
        context_dim=2048,
        num_head_channels=64,
        transformer_depth=[0, 0, 2, 2, 10, 10],
        transformer_depth_middle=10,
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
        use_linear_in_transformer=True,
        adm_in_channels=2816,
        num_classes="sequential",
    ),
}


def main(comfy_dir: str) -> None:
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args
    import torch

    comfy.cli_args.args.cpu = True
    import comfy.ops
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    result = {}
    for arch, specific in CONFIGS.items():
        config = {**COMMON, **specific}
        with torch.device("meta"):
            unet = UNetModel(
                **config,
                dtype=torch.float32,
                device="meta",
                operations=comfy.ops.disable_weight_init,
            )
        shapes = {k: list(v.shape) for k, v in unet.state_dict().items()}
        result[arch] = {"shapes": shapes, "diffusers_to_ldm": comfy.utils.unet_to_diffusers(config)}
    print("ORACLE " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])

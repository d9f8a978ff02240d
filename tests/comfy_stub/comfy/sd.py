"""Stand-in for comfy.sd.CLIP: a text encoder module behind its own ModelPatcher."""

from __future__ import annotations

import comfy.model_management
import torch
from comfy.model_patcher import ModelPatcher


class CLIP:
    def __init__(self, target=None, embedding_directory=None, no_init=False, tokenizer_data=None, parameters=0,
                 model_options=None, cond_stage_model=None):
        if no_init:
            return
        # real ComfyUI builds target.clip(...); the stand-in takes the module directly
        self.cond_stage_model = cond_stage_model
        self.tokenizer = None
        device = torch.device("cpu")
        self.patcher = ModelPatcher(self.cond_stage_model, load_device=device, offload_device=device)
        self.patcher.is_clip = True
        self.layer_idx = None
        self.use_clip_schedule = False
        self.tokenizer_options = {}
        self.apply_hooks_to_conds = None

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        n.layer_idx = self.layer_idx
        n.tokenizer_options = self.tokenizer_options.copy()
        n.use_clip_schedule = self.use_clip_schedule
        n.apply_hooks_to_conds = self.apply_hooks_to_conds
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def get_key_patches(self):
        return self.patcher.get_key_patches()

    def load_model(self):
        comfy.model_management.load_model_gpu(self.patcher)
        return self.patcher

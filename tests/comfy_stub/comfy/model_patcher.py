"""Stand-in for comfy.model_patcher.ModelPatcher: patch lists, backups, full load, exact unpatch.

Faithful points (see /work/notes/comfyui.md section 1): clones share the module and the
``backup`` dict and copy the patches_uuid; ``add_patches`` accepts any state-dict key
(buffers too), tuple keys with offset/function, appends 5-tuples under the plain key,
always draws a new uuid and returns the accepted original keys; patching takes an fp32
copy, runs ``comfy.lora.calculate_weight``, rounds with ``comfy.float.stochastic_rounding``
seeded by crc32(key) and installs a new ``Parameter(requires_grad=False)``, backing up the
original object on the first patch; only direct parameters of leaf-ish modules are
patched; unpatch puts the backed-up tensors back and clears the shared backup.
``LowVramPatch`` is the per-forward patch of low-VRAM loading (a125cd84): the weight arrives
in the compute dtype and is patched in it (fp8 storage through float32).  Hooks,
injections and wrappers are not reproduced.
"""

from __future__ import annotations

import collections
import copy
import uuid
import zlib

import comfy.float
import comfy.lora
import comfy.model_management
import comfy.utils
import torch

BackupEntry = collections.namedtuple("Dimension", ["weight", "inplace_update"])


def string_to_seed(data: str) -> int:
    return zlib.crc32(data.encode())


class LowVramPatch:
    """What ComfyUI puts in ``weight_function`` of a module that did not fit: patch on every forward."""

    def __init__(self, key, patches, convert_func=None, set_func=None):
        self.key = key
        self.patches = patches
        self.convert_func = convert_func
        self.set_func = set_func

    def __call__(self, weight):
        intermediate_dtype = weight.dtype
        if self.convert_func is not None:
            weight = self.convert_func(weight.to(dtype=torch.float32, copy=True), inplace=True)
        if intermediate_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            intermediate_dtype = torch.float32
            out = comfy.lora.calculate_weight(self.patches[self.key], weight.to(intermediate_dtype), self.key,
                                              intermediate_dtype=intermediate_dtype)
            if self.set_func is None:
                return comfy.float.stochastic_rounding(out, weight.dtype, seed=string_to_seed(self.key))
            return self.set_func(out, seed=string_to_seed(self.key), return_weight=True)
        out = comfy.lora.calculate_weight(self.patches[self.key], weight, self.key, intermediate_dtype=intermediate_dtype)
        if self.set_func is not None:
            return self.set_func(out, seed=string_to_seed(self.key), return_weight=True).to(dtype=intermediate_dtype)
        return out


def get_key_weight(model, key):
    op_name, param = key.rsplit(".", 1)
    op = comfy.utils.get_attr(model, op_name)
    weight = getattr(op, param)
    set_func = getattr(op, f"set_{param}", None)
    convert_func = getattr(op, f"convert_{param}", None)
    return weight, set_func, convert_func


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
        if getattr(self.model, "device", None) is None:
            self.model.device = offload_device
        self.patches = {}
        self.backup = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.weight_wrapper_patches = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.force_cast_weights = False
        self.patches_uuid = uuid.uuid4()
        self.parent = None
        self.is_clip = False
        for attr, default in (("model_loaded_weight_memory", 0), ("lowvram_patch_counter", 0),
                              ("model_lowvram", False), ("current_weight_patches_uuid", None)):
            if not hasattr(self.model, attr):
                setattr(self.model, attr, default)

    def model_size(self):
        return self.size

    def model_dtype(self):
        if hasattr(self.model, "get_dtype"):
            return self.model.get_dtype()

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def set_model_compute_dtype(self, dtype):
        self.add_object_patch("manual_cast_dtype", dtype)
        if dtype is not None:
            self.force_cast_weights = True
        self.patches_uuid = uuid.uuid4()

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self.object_patches_backup:
            return self.object_patches_backup[name]
        return comfy.utils.get_attr(self.model, name)

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size,
                           weight_inplace_update=self.weight_inplace_update)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.weight_wrapper_patches = self.weight_wrapper_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.backup = self.backup
        n.object_patches_backup = self.object_patches_backup
        n.parent = self
        n.is_clip = self.is_clip
        return n

    def is_clone(self, other) -> bool:
        return hasattr(other, "model") and self.model is other.model

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        accepted = set()
        model_sd = self.model.state_dict()
        for k in patches:
            offset = function = None
            if isinstance(k, str):
                key = k
            else:
                key, offset = k[0], k[1]
                if len(k) > 2:
                    function = k[2]
            if key in model_sd:
                accepted.add(k)
                self.patches.setdefault(key, []).append((strength_patch, patches[k], strength_model, offset, function))
        self.patches_uuid = uuid.uuid4()
        return list(accepted)

    def model_state_dict(self, filter_prefix=None):
        sd = self.model.state_dict()
        if filter_prefix is not None:
            sd = {k: v for k, v in sd.items() if k.startswith(filter_prefix)}
        return sd

    def get_key_patches(self, filter_prefix=None):
        out = {}
        for k in self.model_state_dict(filter_prefix):
            if k in self.backup:
                weight = self.backup[k].weight
            else:
                weight = comfy.utils.get_attr(self.model, k)
            out[k] = [(weight, lambda a, **kwargs: a)] + self.patches.get(k, [])
        return out

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return
        weight, set_func, convert_func = get_key_weight(self.model, key)
        inplace_update = self.weight_inplace_update or inplace_update
        if key not in self.backup:
            self.backup[key] = BackupEntry(weight.to(device=self.offload_device, copy=inplace_update), inplace_update)
        temp = comfy.model_management.cast_to_device(weight, device_to or weight.device, torch.float32, copy=True)
        if convert_func is not None:
            temp = convert_func(temp, inplace=True)
        out = comfy.lora.calculate_weight(self.patches[key], temp, key)
        if set_func is None:
            out = comfy.float.stochastic_rounding(out, weight.dtype, seed=string_to_seed(key))
            if inplace_update:
                comfy.utils.copy_to_param(self.model, key, out)
            else:
                comfy.utils.set_attr_param(self.model, key, out)
        else:
            set_func(out, inplace_update=inplace_update, seed=string_to_seed(key))

    def _load_list(self):
        """Modules all of whose parameters are their own direct parameters."""
        out = []
        for name, module in self.model.named_modules():
            direct = list(module.named_parameters(recurse=False))
            if direct and len(direct) == len(list(module.parameters())):
                out.append((name, module, [p for p, _ in direct]))
        return out

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=True):
        for name, module, params in self._load_list():
            if getattr(module, "comfy_patched_weights", False):
                continue
            for param in params:
                self.patch_weight_to_device(f"{name}.{param}" if name else param, device_to)
            module.comfy_patched_weights = True
        if device_to is not None:
            self.model.to(device_to)
            self.model.device = device_to
        self.model.current_weight_patches_uuid = self.patches_uuid

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        for k, obj in self.object_patches.items():
            old = comfy.utils.set_attr(self.model, k, obj)
            self.object_patches_backup.setdefault(k, old)
        if load_weights:
            self.load(device_to, lowvram_model_memory, force_patch_weights, full_load=lowvram_model_memory == 0)
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for k, bk in self.backup.items():
                if bk.inplace_update:
                    comfy.utils.copy_to_param(self.model, k, bk.weight)
                else:
                    comfy.utils.set_attr_param(self.model, k, bk.weight)
            self.model.current_weight_patches_uuid = None
            self.backup.clear()
            if device_to is not None:
                self.model.to(device_to)
                self.model.device = device_to
            self.model.model_loaded_weight_memory = 0
            for module in self.model.modules():
                if hasattr(module, "comfy_patched_weights"):
                    del module.comfy_patched_weights
        for k, old in self.object_patches_backup.items():
            comfy.utils.set_attr(self.model, k, old)
        self.object_patches_backup.clear()

"""Stand-in for comfy.lora.calculate_weight: applies one key's patch list in order."""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.weight_adapter as weight_adapter
import torch


def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None):
    for strength, v, strength_model, offset, function in patches:
        if function is None:
            function = lambda a: a  # noqa: E731  adapters always receive a callable

        old_weight = None
        if offset is not None:
            old_weight = weight
            weight = weight.narrow(offset[0], offset[1], offset[2])

        if strength_model != 1.0:
            weight *= strength_model

        if isinstance(v, list):  # model-merge form [(base_weight, convert_func), *patches]
            base, convert = v[0]
            start = convert(comfy.model_management.cast_to_device(base, weight.device, intermediate_dtype, copy=True),
                            inplace=True)
            v = (calculate_weight(v[1:], start, key, intermediate_dtype=intermediate_dtype),)

        if isinstance(v, weight_adapter.WeightAdapterBase):
            output = v.calculate_weight(weight, key, strength, strength_model, offset, function,
                                        intermediate_dtype, original_weights)
            if output is None:
                logging.warning("Calculate Weight Failed: %s %s", v.name, key)
            else:
                weight = output
                if old_weight is not None:
                    weight = old_weight  # the returned tensor is discarded under an offset
            continue

        if len(v) == 1:
            patch_type = "diff"
        elif len(v) == 2:
            patch_type, v = v[0], v[1]

        if patch_type == "diff":
            diff = v[0]
            if len(v) > 1 and v[1].get("pad_weight", False) and diff.shape != weight.shape:
                padded = torch.zeros(diff.shape, dtype=weight.dtype, device=weight.device)
                padded[tuple(slice(0, s) for s in weight.shape)] = weight
                weight = padded
            if strength != 0.0:
                if diff.shape != weight.shape:
                    logging.warning("WARNING SHAPE MISMATCH %s WEIGHT NOT MERGED %s != %s", key, diff.shape, weight.shape)
                else:
                    weight += function(strength * comfy.model_management.cast_to_device(diff, weight.device, weight.dtype))
        elif patch_type == "set":
            weight.copy_(v[0])
        elif patch_type == "model_as_lora":
            target = v[0]
            original = original_weights[key][0][0]
            weight += function(strength * (target.to(weight) - original.to(weight)))
        else:
            logging.warning("patch type not recognized %s %s", patch_type, key)

        if old_weight is not None:
            weight = old_weight
    return weight

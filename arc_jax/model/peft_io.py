"""LoRA trees <-> PEFT adapter directories (adapter_config.json + adapter_model.safetensors).

PEFT stores `lora_A.weight [r, in]` and `lora_B.weight [out, r]` (torch layout) under
`base_model.model.<HF module name>`; our tree holds `a [in, r]`, `b [r, out]`.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from arc_jax.atomic import atomic_write
from arc_jax.model.convert import (
    CheckpointError,
    flatten,
    from_hf_name,
    to_hf_name,
    unflatten,
)
from arc_jax.model.lora import LoraConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")


def save_peft(path: str | os.PathLike, lora: Mapping, config: LoraConfig,
              base_model_name_or_path: str | None = None) -> None:
    """Writes one (unstacked) adapter so `peft.PeftModel.from_pretrained` loads it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for leaf_path, leaf in flatten(lora).items():
        site, ab = leaf_path.rsplit("/", 1)
        weight_name, _ = to_hf_name(f"{site}/kernel")
        module = weight_name.removesuffix(".weight")
        array = np.asarray(jax.device_get(leaf))
        key = f"{_PREFIX}{module}.lora_{ab.upper()}.weight"
        tensors[key] = np.ascontiguousarray(array.T)
    present = {name.split("/")[-2] for name in flatten(lora)}
    targets = [t for t in config.targets if t in present] + sorted(present - set(config.targets))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
    }
    atomic_write(path / WEIGHTS_NAME,
                  lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write(path / CONFIG_NAME,
                  lambda tmp: tmp.write_text(json.dumps(adapter_config, indent=2) + "\n"))


MANIFEST_NAME = "adapters.json"


def save_peft_adapters(root: str | os.PathLike, adapters: Mapping[str, Mapping],
                       config: LoraConfig, base_model_name_or_path: str) -> dict:
    """One PEFT directory per task, `<root>/<task_id>/`, all over one base, and the manifest
    `<root>/adapters.json` = {"base": base path, "tasks": {task_id: adapter dir}} (what a
    multi-LoRA server is given: the base once, one adapter per task). Returns the manifest."""
    root = Path(root)
    for task_id, lora in adapters.items():
        save_peft(root / task_id, lora, config, base_model_name_or_path=base_model_name_or_path)
    manifest = {"base": base_model_name_or_path,
                "tasks": {t: str((root / t).resolve()) for t in adapters}}
    atomic_write(root / MANIFEST_NAME,
                 lambda tmp: tmp.write_text(json.dumps(manifest, indent=1) + "\n"))
    return manifest


def load_peft(path: str | os.PathLike, dtype=jnp.float32) -> tuple[dict, LoraConfig]:
    """Reads a PEFT LoRA directory back into `(lora tree, LoraConfig)`."""
    path = Path(path)
    raw = json.loads((path / CONFIG_NAME).read_text())
    if raw.get("peft_type", "LORA") != "LORA" or raw.get("use_dora"):
        raise CheckpointError(f"{path / CONFIG_NAME}: only plain LoRA adapters are supported")
    if raw.get("rank_pattern") or raw.get("alpha_pattern") or raw.get("bias", "none") != "none":
        raise CheckpointError(f"{path / CONFIG_NAME}: rank/alpha patterns and biases unsupported")
    flat = {}
    file = path / WEIGHTS_NAME
    with safe_open(file, framework="numpy") as f:
        for key in f.keys():
            match = _KEY.fullmatch(key)
            try:
                site, _ = from_hf_name(f"{match['module']}.weight") if match else (None, None)
            except KeyError:
                site = None
            if site is None or not site.endswith("/kernel"):
                raise CheckpointError(f"unexpected tensor {key} in {file}")
            array = f.get_tensor(key).T
            ab = match["ab"].lower()
            if array.shape[1 if ab == "a" else 0] != raw["r"]:
                raise CheckpointError(f"tensor {key} in {file} has shape {array.T.shape}, "
                                      f"which does not have rank r={raw['r']}")
            flat[f"{site.removesuffix('/kernel')}/{ab}"] = jnp.asarray(array, dtype)
    sites = {p.rsplit("/", 1)[0] for p in flat}
    for site in sorted(sites):
        for ab in "ab":
            if f"{site}/{ab}" not in flat:
                raise CheckpointError(f"{file}: {site} has no lora_{ab.upper()}")
    config = LoraConfig(
        rank=raw["r"],
        alpha=raw["lora_alpha"],
        dropout=raw.get("lora_dropout", 0.0),
        targets=_targets(raw.get("target_modules"), {s.rsplit("/", 1)[-1] for s in sites}),
        use_rslora=raw.get("use_rslora", False),
    )
    return unflatten(flat), config


def _targets(listed, present: set[str]) -> tuple[str, ...]:
    """Target names in the order the config lists them (it may also be a regex string)."""
    listed = [t for t in listed if t in present] if isinstance(listed, list) else []
    return tuple(listed) + tuple(sorted(present - set(listed)))

"""HF Phi-3 checkpoint directories <-> our parameter tree, via one name table.

Only safetensors are read (no pickle, no torch). Every checkpoint is validated against the
abstract tree of the model its config describes before a single tensor is loaded.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from arc_jax.atomic import atomic_write
from arc_jax.model.phi3 import Phi3, Phi3Config, abstract_params

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint does not match the model its config describes."""


_identity = lambda x: x
_transpose = lambda x: x.T
_TRANSFORMS: dict[str, tuple[Callable, Callable]] = {  # (HF -> ours, ours -> HF)
    "identity": (_identity, _identity),
    "transpose": (_transpose, _transpose),
}

# HF tensor name, our tree path ("/"-separated), transform. "{i}" is the layer index.
TABLE: tuple[tuple[str, str, str], ...] = (
    ("model.embed_tokens.weight", "model/embed_tokens/embedding", "identity"),
    ("model.layers.{i}.self_attn.qkv_proj.weight", "model/layers_{i}/self_attn/qkv_proj/kernel",
     "transpose"),
    ("model.layers.{i}.self_attn.o_proj.weight", "model/layers_{i}/self_attn/o_proj/kernel",
     "transpose"),
    ("model.layers.{i}.mlp.gate_up_proj.weight", "model/layers_{i}/mlp/gate_up_proj/kernel",
     "transpose"),
    ("model.layers.{i}.mlp.down_proj.weight", "model/layers_{i}/mlp/down_proj/kernel",
     "transpose"),
    ("model.layers.{i}.input_layernorm.weight", "model/layers_{i}/input_layernorm/weight",
     "identity"),
    ("model.layers.{i}.post_attention_layernorm.weight",
     "model/layers_{i}/post_attention_layernorm/weight", "identity"),
    ("model.norm.weight", "model/norm/weight", "identity"),
    ("lm_head.weight", "lm_head/kernel", "transpose"),
)
# Non-persistent buffers some older exports contain; carry no information.
IGNORED = (re.compile(r".*\.rotary_emb\.inv_freq"),)


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_HF_TO_OURS = [(_pattern(hf), ours, t) for hf, ours, t in TABLE]
_OURS_TO_HF = [(_pattern(ours), hf, t) for hf, ours, t in TABLE]


def _lookup(name: str, rules) -> tuple[str, str]:
    for pattern, target, transform in rules:
        match = pattern.fullmatch(name)
        if match:
            return target.format(**match.groupdict()), transform
    raise KeyError(name)


def to_hf_name(path: str) -> tuple[str, str]:
    """Our "/"-path -> (HF tensor name, transform)."""
    return _lookup(path, _OURS_TO_HF)


def from_hf_name(name: str) -> tuple[str, str]:
    """HF tensor name -> (our "/"-path, transform)."""
    return _lookup(name, _HF_TO_OURS)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
    """{"a/b/c": leaf} -> nested dict."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _hf_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    return tuple(reversed(shape)) if transform == "transpose" else tuple(shape)


@contextlib.contextmanager
def open_safetensors(file: str | os.PathLike) -> Iterator[Any]:
    """`safe_open(file)` (numpy), raising `CheckpointError` naming `file` when it cannot be read:
    safetensors itself reports a truncated file as a bare "invalid header length"."""
    try:
        handle = safe_open(file, framework="numpy")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({err}): truncated or corrupt, e.g. by "
            "an interrupted download or copy; fetch or export it again") from err
    with handle as f:
        yield f


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}): truncated or corrupt?") from err


def read_config(path: str | os.PathLike) -> Phi3Config:
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} not found")
    return Phi3Config.from_hf(_read_json(config_file))


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file holding it."""
    single, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if single.is_file():
        with open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        for file in sorted(set(weight_map.values())):
            if not (path / file).is_file():
                raise CheckpointError(f"{index} lists shard {file}, which is missing")
        return {name: path / file for name, file in weight_map.items()}
    raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {path} (only safetensors load)")


def validate(path: str | os.PathLike, model: Phi3) -> dict[str, tuple[Path, str, str]]:
    """Checks names and shapes against the model; returns HF name -> (file, our path, transform).

    Raises `CheckpointError` naming any missing, unexpected or mis-shaped tensor.
    """
    files = _weight_files(Path(path))
    expected = {}
    for ours, leaf in flatten(abstract_params(model)).items():
        name, transform = to_hf_name(ours)
        expected[name] = (ours, transform, _hf_shape(leaf.shape, transform))
    found = {}
    for file in sorted(set(files.values())):
        with open_safetensors(file) as f:
            for name in f.keys():
                found[name] = (file, tuple(f.get_slice(name).get_shape()))
    problems = []
    for name in sorted(set(expected) - set(found)):
        problems.append(f"missing tensor {name} (expected shape {expected[name][2]})")
    for name in sorted(set(found) - set(expected)):
        # Some exports keep a copy of the tied head; it is the embedding, so it is skipped.
        tied = name == "lm_head.weight" and model.config.tie_word_embeddings
        if not tied and not any(p.fullmatch(name) for p in IGNORED):
            problems.append(f"unexpected tensor {name} in {found[name][0].name}")
    for name in sorted(set(found) & set(expected)):
        file, shape = found[name]
        if shape != expected[name][2]:
            problems.append(f"tensor {name} in {file.name} has shape {shape}, "
                            f"expected {expected[name][2]}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match its config:\n  "
                              + "\n  ".join(problems))
    return {name: (found[name][0], ours, t) for name, (ours, t, _) in expected.items()}


def load_pretrained(path: str | os.PathLike, dtype: Any = jnp.float32,
                    compute_dtype: Any = None) -> tuple[Phi3, dict]:
    """Model and params from a transformers directory (config.json + safetensors).

    dtype: parameter dtype; compute_dtype: activation dtype (defaults to `dtype`).
    """
    config = read_config(path)
    model = Phi3(config, dtype=compute_dtype or dtype, param_dtype=dtype)
    plan = validate(path, model)
    flat = {}
    for file in sorted({file for file, _, _ in plan.values()}):
        with open_safetensors(file) as f:
            for name, (src, ours, transform) in plan.items():
                if src == file:
                    array = _TRANSFORMS[transform][0](f.get_tensor(name))
                    flat[ours] = jnp.asarray(array, dtype=dtype)
    return model, unflatten(flat)



def save_pretrained(path: str | os.PathLike, model: Phi3, params: Mapping) -> None:
    """Writes config.json + model.safetensors that `transformers` loads (each file atomically)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, dtypes = {}, set()
    for ours, leaf in flatten(params).items():
        try:
            name, transform = to_hf_name(ours)
        except KeyError:
            raise CheckpointError(f"parameter {ours} has no HF name in convert.TABLE") from None
        array = np.asarray(jax.device_get(leaf))
        dtypes.add(array.dtype)
        tensors[name] = np.ascontiguousarray(_TRANSFORMS[transform][1](array))
    config = model.config.to_hf_dict()
    config["dtype"] = "bfloat16" if dtypes == {jnp.dtype(jnp.bfloat16)} else "float32"
    atomic_write(path / WEIGHTS_NAME,
                  lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    (path / INDEX_NAME).unlink(missing_ok=True)  # left by an earlier sharded save
    atomic_write(path / CONFIG_NAME,
                  lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))

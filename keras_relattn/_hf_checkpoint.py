"""Hugging Face checkpoint folders, read and written without torch or
transformers: `config.json` and the weights (`model.safetensors`, sharded
safetensors with their index, or `pytorch_model.bin`, which needs torch).

Arrays only: what the tensors mean is `deberta`'s business. Every tensor is
read as float32 (float16 and bfloat16 included: NumPy has no bfloat16 and the
safetensors NumPy reader refuses it, so those are widened from their bytes).
"""

import dataclasses
import json
import os

import numpy as np

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_INDEX)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder's contents."""

    config: dict  # config.json
    tensors: dict  # name -> float32 np.ndarray
    weights_file: str  # the file (or index) the tensors came from
    stored_dtypes: tuple  # the dtypes found in the files, e.g. ("BF16",)


def read_folder(path, check_config=None):
    """The `Checkpoint` of a folder written by `save_pretrained`, or a
    `ValueError` saying what the folder holds instead. `check_config(config)`
    runs before any weight is read."""
    path = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(path, str):
        raise TypeError("`path` must be a folder (a str or os.PathLike) written by "
                        f"`save_pretrained`. Received: path={path!r}")
    if not os.path.isdir(path):
        raise ValueError("`path` must be a folder written by `save_pretrained` (config.json and "
                         f"model.safetensors). Received: path={path!r}, which is not a folder")
    found = sorted(os.listdir(path))
    if CONFIG not in found:
        raise ValueError(f"`path` has no config.json, so it is not a Hugging Face checkpoint "
                         f"folder. Received: path={path!r}, holding {found}")
    with open(os.path.join(path, CONFIG)) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{os.path.join(path, CONFIG)} is not valid JSON: {error}") from None
    if check_config is not None:
        check_config(config)
    if SAFETENSORS in found:
        tensors, dtypes = _read_safetensors(os.path.join(path, SAFETENSORS))
        source = SAFETENSORS
    elif SAFETENSORS_INDEX in found:
        tensors, dtypes = {}, set()
        for shard in _shards(path, SAFETENSORS_INDEX):
            more, more_dtypes = _read_safetensors(shard)
            tensors.update(more)
            dtypes |= set(more_dtypes)
        source = SAFETENSORS_INDEX
    elif PYTORCH_BIN in found or PYTORCH_INDEX in found:
        files = ([os.path.join(path, PYTORCH_BIN)] if PYTORCH_BIN in found
                 else _shards(path, PYTORCH_INDEX))
        tensors, dtypes = {}, set()
        for file in files:
            more, more_dtypes = _read_pytorch_bin(file)
            tensors.update(more)
            dtypes |= set(more_dtypes)
        source = PYTORCH_BIN if PYTORCH_BIN in found else PYTORCH_INDEX
    else:
        raise ValueError(f"`path` holds no weights: expected {SAFETENSORS}, "
                         f"{SAFETENSORS_INDEX} with its shards, or {PYTORCH_BIN}. "
                         f"Received: path={path!r}, holding {found}")
    return Checkpoint(config, tensors, source, tuple(sorted(dtypes)))


def _shards(path, index_name):
    with open(os.path.join(path, index_name)) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{os.path.join(path, index_name)} has no `weight_map`.")
    shards = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise ValueError(f"{index_name} names shards that are not in the folder: {missing}")
    return shards


def _safetensors_module():
    try:
        import safetensors  # noqa: F401
        import safetensors.numpy  # noqa: F401
    except ImportError:
        raise ImportError("Reading and writing Hugging Face folders needs the `safetensors` "
                          "package (no torch, no transformers): `pip install safetensors`."
                          ) from None
    return safetensors


def _read_safetensors(file):
    """Each tensor of one safetensors file, as float32, by name; and the
    dtypes found. Through the NumPy API, but bfloat16 from its bytes."""
    safetensors = _safetensors_module()
    header, data_start = _safetensors_header(file)
    tensors, dtypes = {}, set()
    with safetensors.safe_open(file, framework="np") as f:
        for name in f.keys():
            dtype = header[name]["dtype"]
            dtypes.add(dtype)
            if dtype == "BF16":  # bfloat16 is float32's upper half
                begin, end = header[name]["data_offsets"]
                half = np.fromfile(file, dtype="<u2", count=(end - begin) // 2,
                                   offset=data_start + begin)
                value = (half.astype("<u4") << 16).view("<f4")
                tensors[name] = value.reshape(header[name]["shape"]).astype("float32")
            else:
                value = f.get_tensor(name)
                if np.issubdtype(value.dtype, np.floating):
                    value = value.astype("float32")
                tensors[name] = value
    return tensors, dtypes


def _safetensors_header(file):
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _read_pytorch_bin(file):
    try:
        import torch
    except ImportError:
        raise ImportError(f"{os.path.basename(file)} is a torch pickle: reading it needs torch "
                          "(`pip install torch`). A folder with model.safetensors needs neither "
                          "torch nor transformers; save it with `save_pretrained(..., "
                          "safe_serialization=True)`.") from None
    state = torch.load(file, map_location="cpu", weights_only=True)
    tensors, dtypes = {}, set()
    for name, value in state.items():
        dtypes.add(str(value.dtype).replace("torch.", ""))
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        tensors[name] = value.numpy()
    return tensors, dtypes


# Writing ----------------------------------------------------------------------

# What makes two DeBERTa checkpoints the same model (for `overwrite`).
IDENTITY = ("model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "intermediate_size", "position_buckets",
            "max_relative_positions", "legacy")


def _identity(config):
    identity = {key: config.get(key) for key in IDENTITY}
    classifier = any("Classification" in name for name in config.get("architectures") or [])
    identity["num_labels"] = ((len(config["id2label"]) if config.get("id2label") else 2)
                              if classifier else None)
    return identity


def check_target(path, config, overwrite):
    """A `ValueError` if `path` holds another model (or weights in another
    layout) and `overwrite` is False; the stale weight files to remove."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`path` must be a folder (new or existing). Received: path={path!r}, "
                         "which is a file")
    if not os.path.isdir(path):
        return []
    found = os.listdir(path)
    stale = [name for name in found if name in WEIGHT_FILES[1:] or
             (name.startswith(("model-", "pytorch_model-")) and
              name.endswith((".safetensors", ".bin")))]
    if overwrite:
        return stale
    if CONFIG in found:
        try:
            with open(os.path.join(path, CONFIG)) as f:
                existing = json.load(f)
        except (OSError, json.JSONDecodeError):
            existing = {}
        differences = {key: (existing_value, _identity(config)[key])
                       for key, existing_value in _identity(existing).items()
                       if existing_value != _identity(config)[key]}
        if differences:
            listed = ", ".join(f"{key}: {old!r} there, {new!r} here"
                               for key, (old, new) in differences.items())
            raise ValueError(f"`path` already holds a different model ({listed}). Pass "
                             f"overwrite=True to replace it. Received: path={path!r}")
    elif any(name in WEIGHT_FILES or name.endswith((".safetensors", ".bin")) for name in found):
        raise ValueError("`path` holds weights but no config.json: not a model this call "
                         f"replaces. Pass overwrite=True to replace them. Received: path={path!r}")
    if stale:
        raise ValueError(f"`path` holds weights in another layout ({sorted(stale)}), which "
                         "transformers could read instead of the new file. Pass overwrite=True "
                         f"to remove them. Received: path={path!r}")
    return []


def write_folder(path, config, tensors, overwrite=False):
    """`config.json` and `model.safetensors` (float32) in `path`: checked
    first, then each written beside its target and moved into place, so a
    failure leaves the folder as it was."""
    safetensors = _safetensors_module()
    path = os.fspath(path)
    stale = check_target(path, config, overwrite)
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    os.makedirs(path, exist_ok=True)
    weights_tmp = os.path.join(path, f".{SAFETENSORS}.partial")
    config_tmp = os.path.join(path, f".{CONFIG}.partial")
    try:
        safetensors.numpy.save_file(arrays, weights_tmp, metadata={"format": "pt"})
        with open(config_tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
    except BaseException:
        for tmp in (weights_tmp, config_tmp):
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for name in stale:
        os.remove(os.path.join(path, name))
    os.replace(weights_tmp, os.path.join(path, SAFETENSORS))
    os.replace(config_tmp, os.path.join(path, CONFIG))

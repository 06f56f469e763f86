"""GGUF files as a model source: a `.gguf` file converted once per node into a HF model directory.

    spec = pin_gguf("runs/models/SmolLM2-135M-Instruct.Q4_1.gguf")   # -> "...gguf#sha256=<hex>"
    gguf_model_dir(spec, dtype="float32")        # ~/.cache/eopd-ray/gguf/<name>-<sha>-float32

`model.student_path`, `model.teacher_path` and `jobs/evaluate.py --model` accept a `.gguf` file,
a local path or an object-store URI (fetched as any URI is, eopd_ray.storage.object_source). The
driver pins it to the file's sha256 (`<spec>#sha256=<hex>`, in config.yaml and every
checkpoint's config), so every worker and a resumed run load the same weights: a worker whose
node has no converted copy yet hashes the file and refuses one that differs from the pin.

The conversion dequantizes every tensor with transformers' GGUF loader (which needs the `gguf`
package), rebuilds the plain model class from the file's config (a GGUF-quantized model refuses
`save_pretrained`), loads the state dict, casts to `model.dtype` and saves safetensors, the
tokenizer (with its chat template) and the generation config. It runs under a file lock, into a
temporary directory renamed into place when complete, with a manifest (the file's sha256, the
dtype and every written file's size) written beside it last; a directory without a matching
manifest is never used. What it checks first, before anything is written:

- the GGUF header parses and the file holds every tensor's bytes (truncated or not a GGUF: an
  error, nothing cached), and every dequantized value is finite;
- the architecture is one of SUPPORTED_ARCHITECTURES and every tensor type one of
  SUPPORTED_TYPES; no rope scaling (llama3/yarn: transformers' GGUF loader drops it);
- every tensor of the file has a place in the model, and every weight of the model a tensor.

Imports neither Ray, vLLM nor DeepSpeed (transformers and gguf only inside the functions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from eopd_ray.storage.object_source import (
    SourceError,
    cache_root,
    local_file,
    manifest_of,
    posix_name,
)
from eopd_ray.storage.run_storage import is_uri, redacted

log = logging.getLogger(__name__)

# general.architecture values converted and tested here (tests/test_gguf_source.py); they are
# also the student architectures jobs/prune_student.py cuts.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# ggml tensor types gguf-py dequantizes with numpy; the common llama.cpp float and quant types.
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

_PIN = re.compile(r"^(?P<source>.+)#sha256=(?P<sha>[0-9a-f]{64})$")


class GgufError(SourceError):
    """A GGUF file cannot be used: not a GGUF, truncated, corrupt or of an unsupported kind."""


def is_gguf(spec: str) -> bool:
    """A `.gguf` file, local or a URI, pinned (`#sha256=`) or not."""
    return split_gguf_pin(spec)[0].split("?")[0].lower().endswith(".gguf")


def split_gguf_pin(spec: str) -> tuple[str, str | None]:
    """(`source`, sha256) of `<source>#sha256=<hex>`; (`spec`, None) when unpinned."""
    match = _PIN.match(spec)
    return (match["source"], match["sha"]) if match else (spec, None)


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# ----------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class GgufInfo:
    """What the checks read from a GGUF header."""

    architecture: str
    name: str
    num_tensors: int
    types: dict[str, int]  # ggml type name -> number of tensors of that type
    metadata: dict[str, object]  # the scalar and string metadata (no token lists)
    tensor_names: tuple[str, ...]


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def inspect_gguf(path: str | Path, key: str = "model") -> GgufInfo:
    """The header of `path`, checked (see the module docstring); GgufError names what is wrong."""
    import gguf

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise GgufError(f"{key} = {str(path)!r}: cannot read it ({exc})") from None
    if magic != b"GGUF":
        raise GgufError(
            f"{key} = {str(path)!r} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
            "give a .gguf file as llama.cpp writes it, or a Hugging Face model directory"
        )
    try:
        reader = gguf.GGUFReader(str(path))
        needed = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except (ValueError, IndexError, KeyError, OSError) as exc:
        needed, reader = None, exc
    if needed is None or needed > size:
        why = f"its header does not parse: {reader}" if needed is None else f"needs {needed:,}"
        raise GgufError(
            f"{key} = {str(path)!r} is truncated or corrupt ({size:,} bytes; {why}); download "
            "or copy it again (compare its sha256 with the publisher's)"
        )
    metadata = {
        name: _field(reader, name)
        for name, f in reader.fields.items()
        if not name.startswith("tokenizer.ggml.") and len(f.data) == 1
    }
    arch = str(metadata.get("general.architecture"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GgufError(
            f"{key} = {str(path)!r}: architecture {arch!r} (general.architecture) is not "
            f"supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}. Convert the original "
            "Hugging Face checkpoint instead, or use a GGUF of a supported architecture"
        )
    types = Counter(t.tensor_type.name for t in reader.tensors)
    bad = sorted(set(types) - set(SUPPORTED_TYPES))
    if bad:
        example = next(t.name for t in reader.tensors if t.tensor_type.name in bad)
        raise GgufError(
            f"{key} = {str(path)!r}: tensor type(s) {', '.join(bad)} are not supported (e.g. "
            f"{example}); supported: {', '.join(SUPPORTED_TYPES)}. Pick a file quantized to one "
            "of those (Q8_0, Q4_K_M ...)"
        )
    names = tuple(t.name for t in reader.tensors)
    scaling = metadata.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none") or "rope_freqs.weight" in names:
        raise GgufError(
            f"{key} = {str(path)!r}: rope scaling ({scaling or 'rope_freqs.weight'}) is not "
            "converted by transformers' GGUF loader, so the model would compute other "
            "positions; use the original Hugging Face checkpoint of this model"
        )
    name = str(metadata.get("general.name", ""))
    return GgufInfo(arch, name, len(names), dict(types), metadata, names)


# ----------------------------------------------------------------------------- conversion


def _dequantized_model(gguf_path: Path, info: GgufInfo, key: str):
    """(model in fp32, tokenizer) from a checked GGUF file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    shown = str(gguf_path)
    # transformers looks for other files beside a gguf_file: load from a folder holding only it
    with tempfile.TemporaryDirectory(prefix="eopd-gguf-") as folder:
        os.symlink(gguf_path.resolve(), Path(folder) / "model.gguf")
        config = AutoConfig.from_pretrained(folder, gguf_file="model.gguf")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf")
    key_length = info.metadata.get(f"{info.architecture}.attention.key_length")
    if key_length:  # transformers reads head_dim from the file for Llama only (Qwen3: 128)
        config.head_dim = int(key_length)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    names = get_gguf_hf_weights_map(model, TensorProcessor())
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    tensors = tensors["tensors"]
    unplaced = [name for name in info.tensor_names if name not in names]
    if unplaced:
        raise GgufError(
            f"{key} = {shown!r}: {len(unplaced)} tensor(s) of the file have no place in "
            f"{type(model).__name__} (e.g. {unplaced[:3]}); this variant of {info.architecture} "
            "is not supported"
        )
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise GgufError(
                f"{key} = {shown!r}: tensor {name} holds NaN or infinite values after "
                "dequantizing; the file is corrupt: download or copy it again"
            )
    result = model.load_state_dict(tensors, strict=False)
    missing = set(result.missing_keys) - (
        {"lm_head.weight"} if config.tie_word_embeddings else set()
    )
    if missing or result.unexpected_keys:
        raise GgufError(
            f"{key} = {shown!r}: the file does not fill {type(model).__name__} (missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(result.unexpected_keys)[:3]})"
        )
    model.tie_weights()
    return model.eval(), tokenizer


def _files_of(directory: Path) -> dict[str, int]:
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def is_converted(target: Path, sha256: str, dtype: str) -> bool:
    """`target` is a complete conversion of the file with this sha256 to this dtype."""
    try:
        manifest = json.loads(manifest_of(target).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("sha256") != sha256 or manifest.get("dtype") != dtype:
        return False
    files = manifest.get("files") or {}
    return bool(files) and all(
        (target / rel).is_file() and (target / rel).stat().st_size == size
        for rel, size in files.items()
    )


def convert_gguf(
    gguf_path: str | Path,
    target: str | Path,
    dtype: str = "float32",
    key: str = "model",
    sha256: str | None = None,
) -> Path:
    """Convert `gguf_path` into the HF model directory `target` (replaced when it exists),
    atomically: a temporary directory renamed into place, then the manifest. Call it under
    the target's lock when other processes may convert the same file."""
    import torch
    from transformers.utils import logging as hf_logging

    gguf_path, target = Path(gguf_path), Path(target)
    info = inspect_gguf(gguf_path, key)
    sha = sha256 or file_sha256(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, tokenizer = _dequantized_model(gguf_path, info, key)
        model.to(getattr(torch, dtype))
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        manifest_of(target).unlink(missing_ok=True)  # stale until the new copy is in place
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        manifest = {"sha256": sha, "dtype": dtype, "source": gguf_path.name, "architecture":
                    info.architecture, "types": info.types, "files": _files_of(target)}  # fmt: skip
        manifest_of(target).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    except (ValueError, KeyError, RuntimeError) as exc:  # transformers on a file it cannot read
        raise GgufError(
            f"{key} = {str(gguf_path)!r}: cannot convert it ({type(exc).__name__}: {exc}); "
            "nothing was cached"
        ) from None
    except OSError as exc:
        raise GgufError(
            f"{key} = {str(gguf_path)!r}: writing the converted model to {target} failed "
            f"({exc}); nothing partial is kept"
        ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        if bars_were_on:
            hf_logging.enable_progress_bar()
    log.info(
        "%s: converted %s (%s) to %s in %s", key, gguf_path.name, info.architecture, target, dtype
    )
    return target


# ----------------------------------------------------------------------------- as a source


def _local_gguf(source: str, key: str) -> Path:
    """The file on this node: a local path as it is, a URI fetched once per node."""
    if is_uri(source):
        return Path(local_file(source, key))
    path = Path(source)
    if not path.is_file():
        raise GgufError(
            f"{key} = {source!r}: no such file. Fetch the real model with "
            "`python jobs/fetch_real_model.py` (docs/real-model.md), or give the path of a .gguf "
            "file, a Hugging Face model directory, a hub id or an object-store URI"
        )
    return path


def _changed_since_pinned(source: str, key: str, pin: str, now: str) -> GgufError:
    return GgufError(
        f"{key} = {redacted(source)!r}: the file changed since the run pinned it (sha256 "
        f"{pin[:16]}..., now {now[:16]}...), so this worker would load other weights than the "
        "rest of the run. Restore the file the run started with, or start a new run; a resumed "
        f"run takes the file there now only with run.allow_config_change=true (and {key} "
        "without its #sha256=... suffix)"
    )


def pin_gguf(spec: str, key: str = "model") -> str:
    """`<source>#sha256=<hex>` of the file at `spec` now; a pinned `spec` is checked (GgufError
    when the file changed) and returned as it is."""
    source, pin = split_gguf_pin(spec)
    now = file_sha256(_local_gguf(source, key))
    if pin is not None and pin != now:
        raise _changed_since_pinned(source, key, pin, now)
    if pin is None:
        log.info("%s = %s: pinned to sha256 %s", key, redacted(source), now)
    return f"{source}#sha256={now}"


def cache_target(source: str, sha256: str, dtype: str) -> Path:
    stem = posix_name(source.split("?")[0])
    stem = stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
    return cache_root() / "gguf" / f"{stem}-{sha256[:16]}-{dtype}"


def gguf_model_dir(spec: str, key: str = "model", dtype: str = "float32") -> Path:
    """A HF model directory converted from the GGUF at `spec` (once per node and dtype). A pinned
    `spec` whose conversion this node holds is used without reading the file again."""
    source, pin = split_gguf_pin(spec)
    if pin is not None and is_converted(cache_target(source, pin, dtype), pin, dtype):
        return cache_target(source, pin, dtype)
    path = _local_gguf(source, key)
    sha = file_sha256(path)
    if pin is not None and pin != sha:
        raise _changed_since_pinned(source, key, pin, sha)
    target = cache_target(source, sha, dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not is_converted(target, sha, dtype):
            convert_gguf(path, target, dtype, key, sha)
    return target

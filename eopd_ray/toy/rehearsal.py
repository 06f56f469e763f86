"""A paper-shaped CPU rehearsal of the Qwen3 EOPD recipes (jobs/configs/rehearsal.yaml).

    student_dir, teacher_dir, prompts = ensure_rehearsal_assets("runs/rehearsal/assets")

Builds, offline and deterministically in a few seconds, a student/teacher pair and a prompt
parquet that take the code paths of the real Qwen3-1.7B-Base / Qwen3-8B setup at toy size:

- Qwen3 architecture (q/k RMSNorms, `head_dim` 32), a 2-layer hidden-64 student with TIED
  embeddings (as Qwen3-1.7B) and a bigger 3-layer hidden-128 teacher with an UNTIED LM head
  (as Qwen3-8B);
- Qwen3's vocabulary layout: 151,936 embedding rows, a tokenizer of 151,669 tokens (a small
  byte-level BPE, reserved filler tokens up to id 151,642, then Qwen3's 26 added tokens at
  their ids: `<|endoftext|>` 151643, `<|im_start|>` 151644, `<|im_end|>` 151645, ...,
  `<think>` 151667, `</think>` 151668), so the 267 padding rows exist and the
  151643 -> 151645 EOS mapping of the teacher is exercised;
- a base student whose EOS is `<|endoftext|>` and a chat teacher whose EOS is `<|im_end|>`,
  with a ChatML template that supports `enable_thinking=False` (`chat_no_think`);
- variable-length responses: the random student's LM is shaped (through one "bias" direction
  of the hidden state, which keeps the embeddings tied) so that the BPE tokens carry almost all
  the probability, the fillers and padding rows almost none, and EOS a moderate share: at
  temperature 1 and 24 new tokens, some responses stop at EOS and some reach the cap;
- a MATH-like parquet (columns `problem`, `answer`) of short arithmetic and word problems.

How the LM is shaped: dimension 0 of every input embedding row holds a constant `a`, so the
residual stream keeps a large positive component there, and the final RMSNorm weight of
dimension 0 (`head_gain`) turns it into a per-token bias: an output row's dimension-0 value is a
logit offset. Live output rows (the 512 BPE tokens and the model's own EOS) get +a, dead ones
(fillers, the other added tokens, padding rows) -a, about 40 nats lower; the EOS row gets
a + `eos_boost`. The other dimensions hold random directions (`embed_std`, `head_std`) scaled
by the final norm (`spread`). Measured (HF, 128 samples of 24 tokens): the student puts ~3% on
EOS per token (56% of the responses stop early; entropy ~5.8 nats, near uniform over the BPE
tokens); the teacher's entropy has a median of ~0.82 nats (about half the positions above
EOPD's 0.8 threshold) and `<|im_end|>` is in its top-16 at ~20% of the positions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from eopd_ray.building import removed_if_stopped
from eopd_ray.toy.rehearsal_text import (
    ENDOFTEXT_ID,
    IM_END_ID,
    QWEN3_REGULAR_TOKENS,
    QWEN3_VOCAB_ROWS,
    TOKENIZER_LEN,
    build_rehearsal_tokenizer,
    corpus_of,
    rehearsal_problems,
    write_prompts_parquet,
)

PROMPTS_FILE = "math_train.parquet"
STAMP_FILE = "rehearsal.json"
FORMAT_VERSION = 1
NUM_PROBLEMS = 64


@dataclass(frozen=True)
class RehearsalModelSpec:
    """A Qwen3 shape plus the LM shaping of the module docstring."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    eos_token_id: int  # the model's own EOS (generation stops there)
    layer_init: float = 0.02  # std of the decoder layers' weights (Qwen3: initializer_range)
    bias_dim_value: float = 1.0  # `a`: dimension 0 of live input rows
    embed_std: float = 0.1  # std of the other dimensions of the input rows
    head_std: float = 0.1  # std of the other dimensions of the output rows (untied only)
    head_gain: float = 3.0  # final norm weight of dimension 0: live-vs-dead logit gap
    spread: float = 1.0  # final norm weight of the other dimensions: logit spread
    eos_boost: float = 0.0  # extra dimension-0 value of the EOS output row


# Qwen3-1.7B-Base in miniature: tied, 2 heads of 32 with one KV head (GQA), MLP 3x hidden.
REHEARSAL_STUDENT = RehearsalModelSpec(
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=32,
    intermediate_size=192,
    tie_word_embeddings=True,
    eos_token_id=ENDOFTEXT_ID,
    eos_boost=0.15,  # P(EOS) ~3% a token: ~55% of 24-token responses stop early
)
# Qwen3-8B in miniature: untied, 4 heads of 32 with 2 KV heads, one more layer, wider.
REHEARSAL_TEACHER = RehearsalModelSpec(
    hidden_size=128,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    intermediate_size=384,
    tie_word_embeddings=False,
    eos_token_id=IM_END_ID,
    head_std=0.8,  # peaked: median entropy ~0.85 nats, about half the positions above 0.8
    eos_boost=0.35,  # <|im_end|> in the top-16 at ~20% of the positions
)


# ----------------------------------------------------------------------------- models


def _qwen3_config(spec: RehearsalModelSpec):
    from transformers import Qwen3Config

    eos = spec.eos_token_id
    return Qwen3Config(
        vocab_size=QWEN3_VOCAB_ROWS,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=4096,
        initializer_range=spec.layer_init,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=eos,
        pad_token_id=ENDOFTEXT_ID,
        dtype="bfloat16",
    )


def _shape_lm(model, spec: RehearsalModelSpec, live_ids: torch.Tensor, seed: int) -> None:
    """Set the embedding, final norm and (untied) LM head as the module docstring says."""
    gen = torch.Generator().manual_seed(seed)
    rows, d = QWEN3_VOCAB_ROWS, spec.hidden_size
    live = torch.zeros(rows, dtype=torch.bool)
    live[live_ids] = True
    a = spec.bias_dim_value

    def table(std: float, random_rows: torch.Tensor, dim0: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(rows, d)
        out[random_rows, 1:] = torch.randn(int(random_rows.sum()), d - 1, generator=gen) * std
        out[:, 0] = dim0
        return out

    bias = torch.where(live, torch.tensor(a), torch.tensor(-a))  # output rows: +-a
    with torch.no_grad():
        if spec.tie_word_embeddings:  # one table: the output rows' bias is also the input's
            embed = table(spec.embed_std, live, bias)
            embed[spec.eos_token_id, 0] += spec.eos_boost
            model.get_input_embeddings().weight.copy_(embed)
        else:  # every token that can be an input (BPE, added tokens) gets a random row
            inputs = live.clone()
            inputs[ENDOFTEXT_ID:TOKENIZER_LEN] = True
            model.get_input_embeddings().weight.copy_(
                table(spec.embed_std, inputs, torch.full((rows,), a))
            )
            head = table(spec.head_std, live, bias)
            head[spec.eos_token_id, 0] += spec.eos_boost
            model.get_output_embeddings().weight.copy_(head)
        norm = model.model.norm.weight
        norm.fill_(spec.spread)
        norm[0] = spec.head_gain


def build_rehearsal_lm(
    out_dir: str | Path, tokenizer, spec: RehearsalModelSpec, live_ids: torch.Tensor, seed: int
) -> Path:
    """Save a shaped random Qwen3 causal LM (bf16 safetensors) with `tokenizer` into out_dir."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from eopd_ray.toy.models import save_model

    out_dir = Path(out_dir)
    config = _qwen3_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _shape_lm(model, spec, live_ids, seed + 1000)
    if spec.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model = model.to(torch.bfloat16)
    # As Qwen3: config.json names the model's EOS; a chat model's generation config stops at
    # both ends (Qwen3-8B: [151645, 151643]).
    stops = (
        spec.eos_token_id
        if spec.eos_token_id == ENDOFTEXT_ID
        else [spec.eos_token_id, ENDOFTEXT_ID]
    )
    model.generation_config = GenerationConfig(
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=stops,
        pad_token_id=ENDOFTEXT_ID,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
    )
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(spec.eos_token_id)
    return save_model(model, tokenizer, out_dir)


# ----------------------------------------------------------------------------- assets


def _build(root: Path, seed: int) -> None:
    rows = rehearsal_problems(NUM_PROBLEMS, seed)
    tokenizer = build_rehearsal_tokenizer(corpus_of(rows))
    regular = sorted(
        i
        for t, i in tokenizer.get_vocab().items()
        if i < QWEN3_REGULAR_TOKENS and not t.startswith("<|reserved_")
    )
    # What each model may say: the BPE tokens and its own EOS. Everything else (fillers, the
    # other added tokens, the 267 padding rows) gets ~40 nats less logit, as in a trained Qwen3.
    student_live = torch.tensor([*regular, ENDOFTEXT_ID])
    teacher_live = torch.tensor([*regular, IM_END_ID])
    build_rehearsal_lm(root / "student", tokenizer, REHEARSAL_STUDENT, student_live, seed)
    build_rehearsal_lm(root / "teacher", tokenizer, REHEARSAL_TEACHER, teacher_live, seed + 1)
    write_prompts_parquet(root / PROMPTS_FILE, rows)


def _stamp(seed: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "student": asdict(REHEARSAL_STUDENT),
        "teacher": asdict(REHEARSAL_TEACHER),
    }


def _is_current(root: Path, stamp: dict) -> bool:
    try:
        return json.loads((root / STAMP_FILE).read_text()) == stamp
    except (OSError, ValueError):
        return False


def ensure_rehearsal_assets(root: str | Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """(student_dir, teacher_dir, prompts_parquet) under `root`, built unless present.

    The build (~3 s) happens in a temporary sibling directory renamed into place, so an
    interrupted build leaves nothing half-made, and of concurrent builders one result wins.
    A `root` holding assets of another recipe version or seed (its `rehearsal.json` differs)
    is replaced."""
    root = Path(root)
    paths = (root / "student", root / "teacher", root / PROMPTS_FILE)
    stamp = _stamp(seed)
    if _is_current(root, stamp):
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.building.", dir=root.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the assets are ordinary files
    trash = None
    try:
        with removed_if_stopped(staging):  # a SIGTERM during the build leaves nothing behind
            _build(staging, seed)
        (staging / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
        if _is_current(root, stamp):  # another process finished first
            return paths
        if root.exists():  # another version: move it aside, then put ours in its place
            trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old.", dir=root.parent))
            os.replace(root, trash / root.name)
        try:
            os.replace(staging, root)
        except OSError:  # another process renamed its build into place in between
            if not _is_current(root, stamp):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return paths


def ensure_rehearsal_for_config(cfg) -> tuple[Path, Path, Path]:
    """Build the assets a config points at: the root is the parent of `model.student_path`,
    which must be `<root>/student`, with `model.teacher_path` = `<root>/teacher` and
    `data.train_path` = `<root>/math_train.parquet` (as jobs/configs/rehearsal.yaml has them)."""
    from eopd_ray.errors import EopdError

    root = Path(cfg.model.student_path).parent
    expected = {
        "model.student_path": root / "student",
        "model.teacher_path": root / "teacher",
        "data.train_path": root / PROMPTS_FILE,
    }
    actual = {
        "model.student_path": cfg.model.student_path,
        "model.teacher_path": cfg.model.teacher_path,
        "data.train_path": cfg.data.train_path,
    }
    wrong = [
        f"{k} = {actual[k]!r} (expected {str(v)!r})"
        for k, v in expected.items()
        if Path(actual[k]) != v
    ]
    if wrong:
        raise EopdError(
            "the rehearsal assets live in one directory: <root>/student, <root>/teacher and "
            f"<root>/{PROMPTS_FILE}; got " + "; ".join(wrong)
        )
    return ensure_rehearsal_assets(root)

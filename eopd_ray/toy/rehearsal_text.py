"""The rehearsal's text side: Qwen3's vocabulary layout, a Qwen3-shaped tokenizer and the
MATH-like prompts (see `eopd_ray.toy.rehearsal` for why each shape matters).

    rows = rehearsal_problems(64, seed=0)           # [{"problem": ..., "answer": "42"}, ...]
    tokenizer = build_rehearsal_tokenizer(corpus_of(rows))
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from eopd_ray.config import PAPER_SUFFIX

QWEN3_VOCAB_ROWS = 151936  # Qwen3's embedding rows (config.vocab_size)
QWEN3_REGULAR_TOKENS = 151643  # ids 0..151642 are BPE tokens; the added tokens follow
# Qwen3's added tokens, in id order from 151643 (the tool and think tags are not special).
QWEN3_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
NON_SPECIAL_ADDED = (
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
THINK_ID, END_THINK_ID = 151667, 151668
TOKENIZER_LEN = QWEN3_REGULAR_TOKENS + len(QWEN3_ADDED_TOKENS)  # 151669, as Qwen3

# Qwen3's chat template reduced to what the pipeline uses: ChatML turns and, with
# enable_thinking=False, the empty think block of Qwen3's non-thinking mode.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


# ----------------------------------------------------------------------------- prompts


_NAMES = ("Ana", "Ben", "Carla", "Dev", "Emma", "Felix", "Grace", "Hugo")
_ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stamps")


def rehearsal_problems(count: int = 64, seed: int = 0) -> list[dict[str, str]]:
    """Short MATH-like problems with their answers (strings, as in the MATH train file)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        kind = i % 8
        if kind == 0:
            problem, answer = f"What is ${a} + {b}$?", a + b
        elif kind == 1:
            problem, answer = f"Compute ${a} \\times {b % 12 + 2}$.", a * (b % 12 + 2)
        elif kind == 2:
            problem, answer = f"What is ${a + b} - {b}$?", a
        elif kind == 3:
            name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
            problem = (
                f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
            )
            answer = a + b
        elif kind == 4:
            problem, answer = f"A rectangle is {a} by {b}. What is its area?", a * b
        elif kind == 5:
            problem, answer = f"If $x + {a} = {a + b}$, what is $x$?", b
        elif kind == 6:
            problem, answer = f"What is the remainder when {a * b + 1} is divided by {a}?", 1 % a
        else:
            name, days = rng.choice(_NAMES), a % 9 + 2
            problem = (
                f"{name} reads {b} pages a day. How many pages does {name} read in {days} days?"
            )
            answer = b * days
        out.append({"problem": problem, "answer": str(answer)})
    return out


def write_prompts_parquet(path: str | Path, rows: list[dict[str, str]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    table = pa.table({key: [r[key] for r in rows] for key in ("problem", "answer")})
    pq.write_table(table, path)
    return path


# ----------------------------------------------------------------------------- tokenizer


def build_rehearsal_tokenizer(corpus: list[str], merges: int = 256):
    """A Qwen3-shaped tokenizer: byte-level BPE (256 bytes + `merges` merges learned on
    `corpus`), reserved fillers up to id 151642, Qwen3's 26 added tokens from id 151643.
    Returns the PreTrainedTokenizerFast (EOS `<|endoftext|>`, as Qwen3-Base)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    trainer = trainers.BpeTrainer(
        vocab_size=256 + merges,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    small = Tokenizer(models.BPE())
    small.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    small.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(small.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merge_pairs = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]
    ]
    for i in range(len(vocab), QWEN3_REGULAR_TOKENS):  # never produced by a merge
        vocab[f"<|reserved_{i}|>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    for text in QWEN3_ADDED_TOKENS:  # one at a time: ids follow in order from 151643
        token = AddedToken(text, special=text not in NON_SPECIAL_ADDED, normalized=False)
        if text in NON_SPECIAL_ADDED:
            tok.add_tokens([token])
        else:
            tok.add_special_tokens([token])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in QWEN3_ADDED_TOKENS[1:] if t not in NON_SPECIAL_ADDED],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 131072
    return fast


def corpus_of(rows: list[dict[str, str]]) -> list[str]:
    """BPE training text: the prompts with the paper's suffix, boxed answers, chat words and
    the blank lines of the chat template (so "\\n\\n" is one token, as in Qwen3)."""
    return [
        f"{r['problem']} {PAPER_SUFFIX}\n\nThe answer is $\\boxed{{{r['answer']}}}$.\n\n"
        for r in rows
    ] + [
        "user\nassistant\nsystem\n\nThe quick brown fox jumps over the lazy dog.\n\n"
        "First, we add the numbers. Then we multiply. So the answer is 0 1 2 3 4 5 6 7 8 9.\n\n"
    ]

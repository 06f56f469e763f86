"""Cut a student from a causal LM by keeping N of its decoder layers (depth pruning).

    python jobs/prune_student.py --source runs/models/SmolLM2-135M-Instruct --layers 10 \
        --out runs/models/SmolLM2-10L-bi [--rule block-influence|every] [--calibration FILE]

`--source` is any model source (a HF directory, a hub id, an object-store URI or a .gguf file;
docs/real-model.md); Llama, Qwen2 and Qwen3 models. Two rules (eopd_ray/core/depth_pruning.py):

- `block-influence` (default; ShortGPT): keep the N layers whose output differs most from their
  input (1 - cosine of the hidden states, averaged over the tokens of calibration sequences:
  the built-in set below, chat-formatted when the tokenizer has a chat template, or
  `--calibration` JSONL with a "prompt" (and optional "response") per line, or plain text lines);
- `every`: evenly spaced layers, floor(i * L / N) (every third layer for 10 of 30).

Writes `<out>/` (safetensors, config, tokenizer with its chat template, generation config) and
`<out>/pruning.json`: the source, the rule, the kept layers (source indices), every layer's block
influence and the parameter counts. The student shares the source's tokenizer, so the source
(or any model of its vocabulary) can be its teacher. N = all layers copies the model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eopd_ray.env import set_job_environment

set_job_environment()

import torch  # noqa: E402

from eopd_ray.core.depth_pruning import (  # noqa: E402
    block_influence,
    check_prunable,
    evenly_spaced,
    most_influential,
    prune_layers,
)
from eopd_ray.errors import EopdError  # noqa: E402
from eopd_ray.storage.sources import local_model_dir  # noqa: E402

# Calibration conversations: questions of the kinds a distilled student is asked (arithmetic,
# word problems, facts, instructions, code) with short answers, so both the prompt and the
# response positions are measured.
CALIBRATION = [
    ("What is 7 + 5?", "7 + 5 = 12."),
    ("What is 23 + 48?", "23 + 48 = 71."),
    ("What is 9 times 6?", "9 times 6 is 54."),
    ("Tom has 3 apples and buys 4 more. How many apples does he have?",
     "Tom has 3 + 4 = 7 apples."),
    ("A train travels 60 km in one hour. How far does it go in 3 hours?",
     "It travels 60 x 3 = 180 km."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name three primary colors.", "Red, blue and yellow."),
    ("Why is the sky blue?",
     "Sunlight is scattered by the air, and blue light is scattered the most."),
    ("Translate 'good morning' into Spanish.", "Buenos días."),
    ("Write a Python function that returns the square of a number.",
     "def square(x):\n    return x * x"),
    ("Summarize in one sentence: The cat sat on the mat all day and watched the birds.",
     "A cat spent the day on a mat watching birds."),
    ("Is 17 a prime number?", "Yes, 17 is prime: its only divisors are 1 and 17."),
    ("Give me a synonym of 'happy'.", "Joyful."),
    ("How many days are there in a leap year?", "A leap year has 366 days."),
    ("Sort these numbers: 5, 2, 9, 1.", "1, 2, 5, 9."),
    ("What is 15% of 200?", "15% of 200 is 30."),
]  # fmt: skip


def calibration_texts(path: str | None) -> list[tuple[str, str]]:
    if path is None:
        return CALIBRATION
    pairs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            row = json.loads(line)
            pairs.append((row["prompt"], row.get("response", "")))
        else:
            pairs.append((line, ""))
    return pairs


def calibration_sequences(tokenizer, pairs, max_tokens: int) -> list[torch.Tensor]:
    """(1, T) token ids per pair: the chat-formatted conversation, or prompt and response."""
    out = []
    for prompt, response in pairs:
        if tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt}]
            if response:
                messages.append({"role": "assistant", "content": response})
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(f"{prompt} {response}".strip())["input_ids"]
        out.append(torch.tensor([ids[:max_tokens]]))
    return out


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Depth-prune a causal LM into a student.")
    parser.add_argument("--source", required=True, help="HF directory, hub id, URI or .gguf")
    parser.add_argument("--layers", type=int, required=True, help="how many layers to keep (N)")
    parser.add_argument("--out", required=True, help="output directory (replaced)")
    parser.add_argument("--rule", choices=["block-influence", "every"], default="block-influence")
    parser.add_argument("--calibration", help="JSONL (prompt[, response]) or text lines")
    parser.add_argument("--max-tokens", type=int, default=256, help="per calibration sequence")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    try:
        source = local_model_dir(args.source, "--source")  # a GGUF: converted in float32
        check_prunable(AutoConfig.from_pretrained(source), args.layers)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        total, before = model.config.num_hidden_layers, num_parameters(model)
        seqs = calibration_sequences(
            tokenizer, calibration_texts(args.calibration), args.max_tokens
        )
        scores = block_influence(model, seqs)
        if args.rule == "every":
            kept = evenly_spaced(total, args.layers)
        else:
            kept = most_influential(scores, args.layers)
        prune_layers(model, kept)
    except (EopdError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        model.to(getattr(torch, args.dtype)).save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        record = {
            "source": args.source,
            "rule": args.rule,
            "source_layers": total,
            "kept_layers": kept,  # indices in the source model, in order
            "block_influence": [round(s, 6) for s in scores],  # per source layer
            "calibration": {
                "file": args.calibration,
                "sequences": len(seqs),
                "tokens": sum(s.numel() for s in seqs),
            },
            "num_parameters": {"source": before, "student": num_parameters(model)},
        }
        (partial / "pruning.json").write_text(json.dumps(record, indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(
        f"{out}: kept {len(kept)} of {total} layers {kept} ({args.rule}); "
        f"{record['num_parameters']['student']:,} of {before:,} parameters; "
        f"{time.perf_counter() - start:.1f} s\n"
        f"block influence per layer: {[round(s, 4) for s in scores]}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

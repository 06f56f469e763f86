"""Teacher scoring: bytes per token that leave the teacher vs full logits, and tokens/s.

    python jobs/bench/teacher_payload.py [--quick] [--out results.json]

Runs the real TeacherWorker (in this process, no Ray) on random responses of B sequences x T
tokens for teachers of growing vocabulary (random-init Llama models built locally), and reports
the payload of TeacherScores per token against the (T, V) logits a naive teacher would ship.
The goal is at most K * 8 + 8 bytes per token.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def build_teacher(root: Path, vocab: int, hidden: int, layers: int) -> Path:
    """A random Llama with a `vocab`-row embedding over the toy tokenizer (rows past the
    tokenizer are padding, as in real checkpoints)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from eopd_ray.toy.models import build_tokenizer

    tok_dir = build_tokenizer(root / "tok")
    tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    out = root / f"teacher-{vocab}"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=max(vocab, len(tok)),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def measure(model_dir: Path, b: int, t: int, k: int, repeats: int) -> dict:
    import torch

    from eopd_ray.config import config_from_dict
    from eopd_ray.core.wire import RolloutBatch
    from eopd_ray.roles.teacher import TeacherWorker

    cfg = config_from_dict(
        {
            "model": {"student_path": str(model_dir), "teacher_path": str(model_dir)},
            "data": {"toy_prompts": 8},
            "teacher": {"top_k": k, "micro_batch_size": b, "chunk_positions": 64},
        }
    )
    worker = TeacherWorker(cfg, 0)
    g = torch.Generator().manual_seed(0)
    batch = RolloutBatch(
        prompt_ids=torch.randint(3, 300, (b, 16), generator=g),
        prompt_mask=torch.ones(b, 16, dtype=torch.bool),
        response_ids=torch.randint(3, 300, (b, t), generator=g),
        response_mask=torch.ones(b, t, dtype=torch.bool),
        sampler_logprobs=torch.zeros(b, t),
        prompt_index=torch.arange(b),
        finish_reason=("length",) * b,
        weight_version=0,
    )
    worker.score(batch)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        scores = worker.score(batch)
    seconds = (time.perf_counter() - start) / repeats
    vocab = worker.vocab_rows
    return {
        "V": vocab,
        "K": k,
        "payload_bytes_per_token": scores.nbytes / (b * t),
        "goal_bytes_per_token": k * 8 + 8,
        "full_logits_fp32_bytes_per_token": vocab * 4,
        "tokens_per_s": b * t / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="write the results as JSON (a path or a URI)")
    args = parser.parse_args(argv)
    vocabs = [320, 32000] if args.quick else [320, 32000, 151936]
    b, t, k = (4, 64, 16) if args.quick else (8, 128, 16)
    rows = []
    print(
        f"{'V':>7} | {'payload B/tok':>13} {'goal':>5} {'logits B/tok':>12} {'x smaller':>9} | "
        f"{'tokens/s':>9}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in vocabs:
            row = measure(
                build_teacher(Path(tmp), vocab, hidden=256, layers=2),
                b,
                t,
                k,
                repeats=2 if args.quick else 3,
            )
            assert row["payload_bytes_per_token"] <= row["goal_bytes_per_token"]
            rows.append(row)
            ratio = row["full_logits_fp32_bytes_per_token"] / row["payload_bytes_per_token"]
            print(
                f"{row['V']:>7} | {row['payload_bytes_per_token']:>13.0f} "
                f"{row['goal_bytes_per_token']:>5} {row['full_logits_fp32_bytes_per_token']:>12} "
                f"{ratio:>9.0f} | {row['tokens_per_s']:>9.0f}"
            )
    if args.out:
        from eopd_ray.storage.outputs import write_json_output

        where = write_json_output(args.out, {"B": b, "T": t, "rows": rows})
        print(f"results: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU check on one card (H100 / H200) with torch + transformers only: no Ray, no vLLM.

    python jobs/bench/gpu_check.py [--out gpu_check.json]          # ~5 minutes on an H100
    python jobs/bench/gpu_check.py --device cpu --quick             # the same code, tiny shapes

Three measurements, each on random-init models built in memory (nothing to download):

1. learner: optimizer steps of a Qwen3-1.7B-shaped student in bf16 autocast (fp32 master weights,
   torch AdamW) on the EOPD loss with synthetic teacher scores; student tokens per second and
   MFU = 6 N tokens / time / the card's dense bf16 peak (N = parameters that multiply);
2. teacher: scoring tokens per second of a Qwen3-8B-shaped teacher in bf16 (one backbone pass,
   LM head on response positions only, exact entropy and top-K: eopd_ray.core.forward's
   `score_response_tokens`, what the TeacherWorker runs);
3. head + loss: time and peak memory of the LM head and the EOPD loss (forward + backward) from
   the hidden states at T = 8,192, V = 151,936, H = 2,048: bf16 logits with the plain or the
   memory-lean log-softmax, against the fused head (loss.fused_head: no logits at all);
4. ragged learner: one optimizer update of the Qwen3-1.7B-shaped student over a ragged batch
   (log-normal response lengths, median cap / 6, ~4% at the 4,096 cap), fixed-count
   micro-batches padded to the step's width vs token-budget micro-batches (core.micro_batches:
   sorted, cut to their own longest, only real positions through the LM head) with the same
   worst-case size: seconds per update, peak memory, padded fraction;
5. the real workers, without Ray: `TeacherWorker.score` of a Qwen3-8B-shaped teacher and
   `LearnerWorker.train_step` of a Qwen3-1.7B-shaped student (DeepSpeed, one rank, bf16, ZeRO-2
   and ZeRO-3, token budgets, the fused head) on synthetic ragged rollouts: tokens/s, MFU, peak
   memory and the verdicts of the run-time invariants (teacher scores, sampler gap). The models
   are random, saved to a scratch directory and loaded as the workers load them.

Prints a table and writes JSON (--out). The card's name is in the output: record it with the
figures (docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# Dense bf16 peak TFLOP/s (no sparsity) by card name substring; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}

QWEN3_1_7B = dict(
    hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
)  # fmt: skip
QWEN3_8B = dict(
    hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
)  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, vocab_size=1024, tie_word_embeddings=True,
)  # fmt: skip


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")


def build(shape: dict, device: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(**shape, max_position_embeddings=8192, torch_dtype="bfloat16")
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def multiplying_parameters(model) -> int:
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return total if model.config.tie_word_embeddings else total - embed


def synthetic_scores(b: int, t: int, v: int, k: int, device: str, gen):
    import torch

    return dict(
        response_ids=torch.randint(0, v, (b, t), generator=gen).to(device),
        response_mask=torch.ones(b, t, dtype=torch.bool, device=device),
        teacher_logprobs=(-torch.rand(b, t, generator=gen) - 4).to(device),
        teacher_entropy=(torch.rand(b, t, generator=gen) * 2).to(device),
        teacher_topk_ids=torch.randint(0, v, (b, t, k), generator=gen).to(device),
        teacher_topk_logprobs=(torch.randn(b, t, k, generator=gen).log_softmax(-1) - 1).to(device),
    )


def learner_check(shape, device, b, prompt_len, t, steps, peak_tflops) -> dict:
    import torch

    from eopd_ray.core.forward import response_logits
    from eopd_ray.core.loss import LossInputs, eopd_loss

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build(shape, device, torch.float32)  # fp32 master weights, bf16 autocast compute
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    n = multiplying_parameters(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.startswith("cuda"))
    v = shape["vocab_size"]
    seq = prompt_len + t
    input_ids = torch.randint(0, v, (b, seq), generator=gen).to(device)
    attention = torch.ones(b, seq, dtype=torch.long, device=device)
    positions = (prompt_len - 1 + torch.arange(t, device=device)).expand(b, t)
    scores = synthetic_scores(b, t, v, 16, device, gen)
    old = torch.full((b, t), -5.0, device=device)
    times = []
    reset_peak(device)
    for step in range(steps + 1):  # step 0 warms up kernels and the allocator
        synchronize(device)
        started = time.perf_counter()
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            logits = response_logits(model, input_ids, attention, positions)  # (B, T, V) bf16
        inputs = LossInputs(student_logits=logits, old_logprobs=old, **scores)
        out = eopd_loss(inputs, chunk_positions=256)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step > 0:
            times.append(time.perf_counter() - started)
    step_s = sum(times) / len(times)
    tokens = b * seq
    achieved = 6 * n * tokens / step_s / 1e12  # attention scores left out: a lower bound
    result = {
        "parameters": n,
        "sequences": b,
        "sequence_tokens": seq,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "tflops": achieved,
        "mfu": achieved / peak_tflops if peak_tflops else float("nan"),
        "peak_mib": peak_mib(device),
    }
    del model, optimizer
    return result


def ragged_learner_check(shape, device, num_seqs, cap, micro, repeats) -> dict:
    """Fixed-count vs token-budget micro-batches on one ragged mini-batch (see the docstring)."""
    import math

    import torch

    from eopd_ray.core.forward import response_logits
    from eopd_ray.core.loss import LossInputs, eopd_loss
    from eopd_ray.core.micro_batches import budget_micro_batches, count_micro_batches

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build(shape, device, torch.float32)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    v, prompt_len = shape["vocab_size"], 64
    lengths = torch.distributions.LogNormal(math.log(cap / 6), 1.0).sample((num_seqs,))
    responses = lengths.round().clamp(1, cap).long().tolist()
    total = [prompt_len + r for r in responses]
    width = max(responses)
    tokens = sum(responses)
    plans = {
        "fixed": count_micro_batches(range(num_seqs), micro),
        "budget": budget_micro_batches(range(num_seqs), total, micro * (prompt_len + cap)),
    }
    out = {"sequences": num_seqs, "response_tokens": tokens, "cap": cap}
    for name, plan in plans.items():
        budgeted = name == "budget"
        times = []
        reset_peak(device)
        computed = 0
        for step in range(repeats + 1):
            synchronize(device)
            started = time.perf_counter()
            for rows in plan:
                t = max(responses[r] for r in rows) if budgeted else width
                seq = prompt_len + t
                ids = torch.randint(0, v, (len(rows), seq), generator=gen).to(device)
                attention = torch.zeros(len(rows), seq, dtype=torch.long)
                mask = torch.zeros(len(rows), t, dtype=torch.bool)
                for i, r in enumerate(rows):
                    attention[i, : prompt_len + responses[r]] = 1
                    mask[i, : responses[r]] = True
                attention, mask = attention.to(device), mask.to(device)
                positions = (prompt_len - 1 + torch.arange(t, device=device)).expand(len(rows), t)
                valid = mask if budgeted else None
                with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
                    logits = response_logits(model, ids, attention, positions, valid=valid)
                n = int(mask.sum()) if budgeted else len(rows) * t
                shape_bt = (1, n) if budgeted else (len(rows), t)
                scores = synthetic_scores(shape_bt[0], shape_bt[1], v, 16, device, gen)
                if not budgeted:
                    scores["response_mask"] = mask
                inputs = LossInputs(
                    student_logits=logits, old_logprobs=torch.full(shape_bt, -5.0, device=device),
                    **scores,
                )  # fmt: skip
                eopd_loss(inputs, num_valid_tokens=tokens, chunk_positions=256).loss.backward()
                if step == 0:
                    computed += len(rows) * (prompt_len + t)
            model.zero_grad(set_to_none=True)
            synchronize(device)
            if step > 0:
                times.append(time.perf_counter() - started)
        real = sum(total)
        out[name] = {
            "micro_batches": len(plan),
            "update_s": sum(times) / len(times),
            "peak_mib": peak_mib(device),
            "padded_fraction": 1 - real / computed,
        }
    out["speedup"] = out["fixed"]["update_s"] / out["budget"]["update_s"]
    del model
    return out


def teacher_check(shape, device, b, prompt_len, t, repeats) -> dict:
    import torch

    from eopd_ray.core.forward import score_response_tokens, scoring_lm_head

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build(shape, device, torch.bfloat16).eval()
    v = shape["vocab_size"]
    seq = prompt_len + t
    input_ids = torch.randint(0, v, (b, seq), generator=gen).to(device)
    attention = torch.ones(b, seq, dtype=torch.long, device=device)
    positions = (prompt_len - 1 + torch.arange(t, device=device)).expand(b, t)
    lm_head = scoring_lm_head(model, v)  # built once, as the TeacherWorker does
    times = []
    reset_peak(device)
    for i in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        score_response_tokens(model, input_ids, attention, positions, 16, 512, v, lm_head=lm_head)
        synchronize(device)
        if i > 0:
            times.append(time.perf_counter() - started)
    step_s = sum(times) / len(times)
    result = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "sequences": b,
        "sequence_tokens": seq,
        "seconds": step_s,
        "response_tokens_per_s": b * t / step_s,
        "peak_mib": peak_mib(device),
    }
    del model
    return result


def loss_check(device, t, v, h, repeats) -> list[dict]:
    """Head + EOPD loss, forward and backward, from the final hidden states (1, T, H) and a bf16
    head weight (V, H): `plain` and `lean` make bf16 logits with the head and run the loss on
    them (full or chunked log-softmax); `fused` is the learner's fused head
    (loss.fused_head: no logits at all). Memory is the peak beyond the hidden states."""
    import torch

    from eopd_ray.core.fused_head import fused_head_logprobs
    from eopd_ray.core.loss import LossInputs, eopd_loss
    from eopd_ray.core.student_logprobs import StudentAtIds, loss_ids

    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(v, h, generator=gen) * h**-0.5).to(device, torch.bfloat16)
    weight.requires_grad_(True)
    rows = []
    for name, chunk in (("plain", 0), ("lean", 256), ("fused", 256)):
        gen = torch.Generator().manual_seed(1)  # the same inputs for every path
        times, losses = [], []
        for i in range(repeats + 1):
            hidden = torch.randn(1, t, h, generator=gen).to(device, torch.bfloat16)
            hidden.requires_grad_(True)
            scores = synthetic_scores(1, t, v, 16, device, gen)
            old = torch.full((1, t), -5.0, device=device)
            weight.grad = None
            synchronize(device)
            reset_peak(device)
            base = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
            started = time.perf_counter()
            if name == "fused":
                ids = loss_ids(scores["response_ids"], scores["teacher_topk_ids"])
                student = StudentAtIds(*fused_head_logprobs(hidden, weight, None, ids, 1.0, chunk))
            else:
                student = hidden @ weight.T  # (1, T, V) bf16 logits, as the plain learner makes
            out = eopd_loss(
                LossInputs(student_logits=student, old_logprobs=old, **scores),
                chunk_positions=chunk,
            )
            out.loss.backward()
            synchronize(device)
            if i > 0:
                times.append(time.perf_counter() - started)
                losses.append(out.loss.item())
            del student, out
        rows.append(
            {
                "path": name,
                "T": t,
                "V": v,
                "H": h,
                "seconds": sum(times) / len(times),
                "peak_mib_beyond_hidden": peak_mib(device) - base / 2**20,
                "logits_mib": t * v * 2 / 2**20,
                "loss": sum(losses) / len(losses),
            }
        )
    plain = rows[0]["seconds"]
    for row in rows:
        row["time_vs_plain"] = row["seconds"] / plain
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _save_model(shape: dict, path: Path, tokenizer_dir: Path) -> None:
    import shutil

    import torch

    model = build(shape, "cpu", torch.bfloat16)
    model.save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, path / f.name)
    del model


def _rollout(b, prompt_len, t, v, seed):
    """Synthetic rollouts with ragged response lengths (t/8 .. t), what a rollout worker hands
    the teacher and the learners."""
    import torch

    from eopd_ray.core.wire import RolloutBatch

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, t // 8), t + 1, (b,), generator=gen)
    mask = torch.arange(t)[None] < lengths[:, None]
    return RolloutBatch(
        prompt_ids=torch.randint(3, v, (b, prompt_len), generator=gen),
        prompt_mask=torch.ones(b, prompt_len, dtype=torch.bool),
        response_ids=torch.randint(3, v, (b, t), generator=gen) * mask,
        response_mask=mask,
        sampler_logprobs=torch.zeros(b, t),
        prompt_index=torch.arange(b),
        finish_reason=("length",) * b,
        weight_version=0,
    )


def workers_check(student, teacher, device, b, prompt_len, t, budget, steps, peak, root) -> dict:
    """The real TeacherWorker.score and LearnerWorker.train_step, without Ray: one DeepSpeed
    rank, bf16, ZeRO-2 and ZeRO-3, token-budget micro-batches and the fused head, on synthetic
    rollouts; tokens/s, MFU, peak memory and the run-time invariants' verdicts."""
    import dataclasses
    import os

    from eopd_ray.config import config_from_dict
    from eopd_ray.core.invariants import InvariantError, check_teacher_scores
    from eopd_ray.core.micro_batches import rank_share, share_step
    from eopd_ray.roles.learner import LearnerWorker
    from eopd_ray.roles.teacher import TeacherWorker
    from eopd_ray.toy.models import build_tokenizer

    on_gpu = int(device.startswith("cuda"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tokenizer(root / "tokenizer"))
    paths = {"student": root / "student", "teacher": root / "teacher"}
    _save_model(student, paths["student"], root / "tokenizer")
    _save_model(teacher, paths["teacher"], root / "tokenizer")
    v = min(student["vocab_size"], teacher["vocab_size"], len(tok))
    cfg = config_from_dict(
        {
            "model": {k + "_path": str(p) for k, p in paths.items()} | {"dtype": "bfloat16"},
            "data": {"toy_prompts": b},
            "rollout": {"prompts_per_step": b},
            "teacher": {
                "gpus_per_worker": on_gpu,
                "top_k": 16,
                "max_tokens_per_micro_batch": budget,
            },
            "learner": {
                "num_workers": 1,
                "gpus_per_worker": on_gpu,
                "mini_batch_size": b,
                "micro_batch_size": 1,
                "max_tokens_per_micro_batch": budget,
                "lr": 1e-6,
            },
            "loss": {"fused_head": True},
        }
    )
    batch = _rollout(b, prompt_len, t, v, seed=0)
    tokens = batch.num_response_tokens
    out: dict = {"sequences": b, "response_tokens": tokens, "token_budget": budget}

    scorer = TeacherWorker(cfg, 0)
    reset_peak(device)
    scorer.score(batch)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    scores = scorer.score(batch)
    synchronize(device)
    seconds = time.perf_counter() - started
    try:
        check_teacher_scores(scores, batch, scorer.vocab_rows, 0, "teacher[0]")
        verdict = "pass"
    except InvariantError as exc:
        verdict = f"FAIL: {exc}"
    out["teacher"] = {
        "seconds": seconds,
        "response_tokens_per_s": tokens / seconds,
        "peak_mib": peak_mib(device),
        "invariants": verdict,
    }
    del scorer
    os.environ.setdefault("DS_BUILD_OPS", "0")
    shares = share_step(batch.sequence_lengths, 1, 1, micro_batch_size=1,
                        max_tokens_per_micro_batch=budget)  # fmt: skip
    rows, plan = rank_share(shares.plan, 0)
    shard, shard_scores = batch.select(rows), scores.select(rows)
    for stage in (2, 3):
        stage_cfg = dataclasses.replace(
            cfg, learner=dataclasses.replace(cfg.learner, zero_stage=stage)
        )
        worker = LearnerWorker(stage_cfg, 0, 1)
        worker.setup("127.0.0.1", _free_port())
        # The sampler's log-probs are the learner's own: the sampler-gap check sees ~0.
        shard = dataclasses.replace(
            shard, sampler_logprobs=worker._recompute_old_logprobs(shard, plan)
        )
        n = multiplying_parameters(worker.engine.module.hf)
        reset_peak(device)
        times, verdict = [], "pass"
        for step in range(steps + 1):
            synchronize(device)
            started = time.perf_counter()
            try:
                metrics = worker.train_step(shard, shard_scores, [tokens], plan)
            except InvariantError as exc:  # the sampler-gap check
                verdict = f"FAIL: {exc}"
                break
            synchronize(device)
            if step > 0:
                times.append(time.perf_counter() - started)
        step_s = sum(times) / max(1, len(times))
        real = sum(batch.sequence_lengths)  # prompt + response tokens through the model
        achieved = 6 * n * real / step_s / 1e12 if times else float("nan")
        out[f"learner_zero{stage}"] = {
            "step_s": step_s,
            "tokens_per_s": real / step_s if times else float("nan"),
            "tflops": achieved,
            "mfu": achieved / peak if peak else float("nan"),
            "peak_mib": peak_mib(device),
            "micro_batches": len(plan[0]),
            "fused_head": worker.fused,
            "loss": metrics[0].get("loss/total") if times else float("nan"),
            "invariants": verdict,
        }
        worker.engine.destroy()
        del worker
    return out


def card_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Learner, teacher and loss figures on one GPU.")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the card")
    parser.add_argument("--out", help="write the results as JSON (a path or a URI)")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu --quick for a smoke test", file=sys.stderr)
        return 2
    name = card_name(args.device)
    peak = args.peak_tflops or next(
        (tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), 0.0
    )
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check."))
    if args.quick:
        learner = learner_check(TINY, args.device, 2, 8, 16, 2, peak)
        teacher = teacher_check(TINY, args.device, 2, 8, 16, 2)
        loss = loss_check(args.device, 64, 1024, 64, 1)
        ragged = ragged_learner_check(TINY, args.device, 8, 48, 2, 1)
        workers = workers_check(TINY, TINY, args.device, 4, 8, 16, 48, 1, peak, scratch)
    else:
        learner = learner_check(QWEN3_1_7B, args.device, 8, 256, 768, 5, peak)
        teacher = teacher_check(QWEN3_8B, args.device, 16, 256, 768, 3)
        loss = loss_check(args.device, 8192, 151936, 2048, 3)
        ragged = ragged_learner_check(QWEN3_1_7B, args.device, 32, 4096, 2, 2)
        workers = workers_check(
            QWEN3_1_7B, QWEN3_8B, args.device, 16, 256, 768, 16384, 2, peak, scratch
        )
    shutil.rmtree(scratch, ignore_errors=True)
    report = {
        "card": name,
        "peak_bf16_tflops": peak,
        "torch": torch.__version__,
        "learner_qwen3_1.7b": learner,
        "teacher_qwen3_8b": teacher,
        "loss_kernel": loss,
        "ragged_learner_qwen3_1.7b": ragged,
        "workers": workers,
        "wall_s": time.perf_counter() - started,
    }
    print(f"card: {name} (dense bf16 peak {peak:.0f} TFLOP/s)")
    print(
        f"learner  {learner['parameters'] / 1e9:.2f}B params: {learner['step_s']:.3f} s/step, "
        f"{learner['tokens_per_s']:.0f} tokens/s, {learner['tflops']:.1f} TFLOP/s, "
        f"MFU {100 * learner['mfu']:.1f}%, peak {learner['peak_mib']:.0f} MiB"
    )
    print(
        f"teacher  {teacher['parameters'] / 1e9:.2f}B params: "
        f"{teacher['response_tokens_per_s']:.0f} response tokens/s scored, "
        f"peak {teacher['peak_mib']:.0f} MiB"
    )
    for row in loss:
        print(
            f"loss     {row['path']:5s} T={row['T']} V={row['V']} H={row['H']}: "
            f"{row['seconds'] * 1e3:.1f} ms ({row['time_vs_plain']:.2f}x plain), peak "
            f"{row['peak_mib_beyond_hidden']:.0f} MiB beyond the hidden states"
        )
    for name in ("fixed", "budget"):
        r = ragged[name]
        print(
            f"ragged   {name:6s} {r['micro_batches']} micro-batches: {r['update_s']:.2f} s/update, "
            f"padded {100 * r['padded_fraction']:.0f}%, peak {r['peak_mib']:.0f} MiB"
        )
    print(f"ragged   token budget: {ragged['speedup']:.2f}x the fixed-count update")
    w = workers["teacher"]
    print(
        f"workers  TeacherWorker.score: {w['response_tokens_per_s']:.0f} response tokens/s, "
        f"peak {w['peak_mib']:.0f} MiB, invariants {w['invariants']}"
    )
    for stage in (2, 3):
        w = workers[f"learner_zero{stage}"]
        print(
            f"workers  LearnerWorker.train_step ZeRO-{stage} (fused head {w['fused_head']}): "
            f"{w['step_s']:.3f} s/update, {w['tokens_per_s']:.0f} tokens/s, MFU "
            f"{100 * w['mfu']:.1f}%, peak {w['peak_mib']:.0f} MiB, invariants {w['invariants']}"
        )
    print(f"total {report['wall_s']:.0f} s")
    if args.out:
        from eopd_ray.storage.outputs import write_json_output

        where = write_json_output(args.out, report)
        print(f"results: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

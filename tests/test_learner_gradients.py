"""The update a real 2-rank LearnerWorker applies is minus the gradient of the global token-mean
loss of the whole mini-batch, for every ZeRO stage, micro-batch count and gradient checkpointing.

Two processes (torch.multiprocessing, gloo on 127.0.0.1, no Ray) each run `LearnerWorker` with
torch AdamW replaced by plain SGD (lr = LR, no momentum, no weight decay), no clipping and a
constant LR, so one `train_step` changes every parameter by exactly -LR * gradient. The same pair
of processes builds a fresh DeepSpeed engine for each configuration (one `init_distributed`).
The reference is the gradient of `eopd_loss` over all 8 sequences in one float64 forward of the
same Hugging Face model in this process: the loss the learner must be minimizing whatever the
sharding (method.md, "Reduction").

The rollout temperature is not 1, so the learner must use the tempered log-probs (pi_old and the
loss's student logits alike). The same processes also check that a DeepSpeed checkpoint and
`export_hf` give the trained weights back under their Hugging Face names (ZeRO-2 and -3), and
that pi_old of a model with dropout is recomputed in eval mode.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

import pytest
import torch

from eopd_ray.ports import free_port

WORLD = 2
MINI_BATCH = 8  # sequences per optimizer update, 4 per rank
MICRO_BATCHES = {4: 1, 2: 2, 1: 4}  # micro_batch_size -> micro-batches per update and rank
TEMPERATURE = 0.7
LR = 1.0
TOP_K = 4
PROBE = [3, 17, 42, 5, 99, 7, 11]

FP32_CASES = [
    (stage, micro, checkpointing)
    for stage in (0, 1, 2, 3)
    for micro in MICRO_BATCHES
    for checkpointing in (False, True)
]
BF16_CASES = [(stage, 2, False) for stage in (0, 1, 2, 3)]
# The learner's LM head runs fused with the loss by default (loss.fused_head, every case above,
# ZeRO-3 gathering its partitioned weight); these run the head on full logits instead.
LOGITS_CASES = [(stage, 2, False) for stage in (0, 1, 2, 3)]
# One update per step: pi_old is the update's own forward by default (every case above); these
# recompute it in a separate eval-mode forward first (learner.old_logprobs_from_update: false).
SEPARATE_OLD_CASES = [(stage, 2, False) for stage in (0, 3)]
# Token-budget plans (core.micro_batches), each micro-batch cut to its own longest sequence:
# "split" (budget 17, ranks by count) gives the ranks 3 and 4 micro-batches, so one splits;
# "balanced" (budget 20, ranks by tokens) deals rows by length; "placeholder" (a hand plan)
# leaves rank 1 with 3 sequences for 5 micro-batches: 2 zero-weight placeholders.
BUDGET_PLANS = ("split", "balanced", "placeholder")
BUDGET_CASES = [(stage, plan) for stage in (0, 1, 2, 3) for plan in BUDGET_PLANS]

# fp32: the update is read back as (weights before - weights after) / LR in fp32, which for a
# norm weight near 1 has a resolution of ~6e-8 against gradients of ~1e-2 (measured 7.4e-6);
# a lost or doubled micro-batch is off by 0.5-1.
FP32_TOL = 1e-4
# bf16: every matmul of the forward and backward rounds its output to 8 significant bits
# (relative 2^-9 = 2e-3 per rounding); through two layers, attention and the LM head these add
# up to about 1e-2 relative error per parameter gradient (measured 1.1e-2), which the float64
# reference has none of. 5e-2 is above that noise and far below what a lost micro-batch does
# (0.5-1). Whether the accumulation and the all-reduce run in fp32 is read from the engine.
BF16_TOL = 5e-2


def _config(
    student: str,
    stage: int,
    micro: int,
    checkpointing: bool,
    dtype: str,
    max_tokens: int | None = None,
    fused_head: bool = True,
    old_from_update: bool = True,
    max_sampler_gap: float | None = 1e9,
):
    from eopd_ray.config import config_from_dict

    return config_from_dict(
        {
            "model": {"student_path": student, "teacher_path": student, "dtype": dtype},
            "data": {"toy_prompts": MINI_BATCH},
            "rollout": {"prompts_per_step": MINI_BATCH, "temperature": TEMPERATURE},
            "learner": {
                "num_workers": WORLD,
                "zero_stage": stage,
                "lr": LR,
                "lr_schedule": "constant",
                "warmup_steps": 0,
                "grad_clip": 0.0,
                "mini_batch_size": MINI_BATCH,
                "micro_batch_size": micro,
                "gradient_checkpointing": checkpointing,
                "max_tokens_per_micro_batch": max_tokens,
                # The synthetic sampler log-probs are random, not the model's: no gap stop.
                "max_sampler_gap": max_sampler_gap,
                "old_logprobs_from_update": old_from_update,
            },
            "loss": {"name": "eopd", "chunk_positions": 3, "fused_head": fused_head},
            "run": {"steps": 1},
        }
    )


def _synthetic_batch(vocab: int, seed: int = 0):
    """8 sequences: ragged prompts (2-7 tokens) and responses (1-9 of T = 9), teacher scores with
    distinct top-K ids and entropies on both sides of tau = 0.8."""
    from eopd_ray.core.wire import RolloutBatch, TeacherScores

    g = torch.Generator().manual_seed(seed)
    b, p, t = MINI_BATCH, 7, 9
    prompt_lens = torch.tensor([2, 7, 4, 5, 3, 6, 7, 2])
    response_lens = torch.tensor([9, 1, 5, 3, 8, 6, 2, 7])
    prompt_mask = torch.arange(p)[None] < prompt_lens[:, None]
    response_mask = torch.arange(t)[None] < response_lens[:, None]
    prompt_ids = torch.randint(0, vocab, (b, p), generator=g) * prompt_mask
    response_ids = torch.randint(0, vocab, (b, t), generator=g) * response_mask
    topk_ids = torch.stack([torch.randperm(vocab, generator=g)[:TOP_K] for _ in range(b * t)]).view(
        b, t, TOP_K
    )
    topk_logprobs = (-torch.rand(b, t, TOP_K, generator=g) * 4 - 0.5).sort(-1, True).values
    m = response_mask
    batch = RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        sampler_logprobs=(-torch.rand(b, t, generator=g) * 5) * m,
        prompt_index=torch.arange(b),
        finish_reason=("stop",) * b,
        weight_version=0,
    )
    scores = TeacherScores(
        token_logprobs=(-torch.rand(b, t, generator=g) * 5) * m,
        entropy=(torch.rand(b, t, generator=g) * 1.6) * m,
        topk_ids=(topk_ids * m[..., None]).to(torch.int32),
        topk_logprobs=topk_logprobs * m[..., None],
    )
    return batch, scores


def _budget_plan(batch, kind: str):
    """(the step's plan, the config's learner.max_tokens_per_micro_batch) for a BUDGET_PLANS
    kind."""
    from eopd_ray.core.micro_batches import equalize_counts, plan_step

    lengths = batch.sequence_lengths
    if kind == "placeholder":
        per_rank = [[[0], [1], [2], [3], [4]], [[5], [6], [7]]]
        return [equalize_counts(per_rank, lengths)], 12
    budget, balance = {"split": (17, False), "balanced": (20, True)}[kind]
    return plan_step(lengths, 1, WORLD, 1, budget, balance=balance), budget


def _shard(batch, scores, rank: int):
    """Rank `rank`'s rows and the per-update valid-token counts, as pipeline._train makes them."""
    m, per_rank = MINI_BATCH, MINI_BATCH // WORLD
    num_updates = batch.num_sequences // m
    rows = [u * m + rank * per_rank + i for u in range(num_updates) for i in range(per_rank)]
    tokens = [int(batch.response_mask[u * m : (u + 1) * m].sum()) for u in range(num_updates)]
    return batch.select(rows), scores.select(rows), tokens


# ----------------------------------------------------------------------------- child processes


def _full_params(worker, dtype: str) -> dict[str, torch.Tensor]:
    """Every parameter in full, by HF name (collective under ZeRO-3: every rank calls it)."""
    import deepspeed

    if dtype == "float32":  # the weight-sync gather: HF names, every ZeRO stage
        return {
            m.name: t.double()
            for index, tensors in worker._gathered_buckets()
            for m, t in zip(worker.buckets[index], tensors, strict=True)
        }
    # bf16: the fp32 master weights (the bf16 copies would round most of the update away)
    return {
        name: deepspeed.utils.safe_get_full_fp32_param(p).detach().double().clone()
        for name, p in worker._named_parameters()
    }


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


def _checkpoint_round_trip(worker, cfg, after, root: Path, rank: int, port: int) -> dict:
    """export_hf and a DeepSpeed save/load into a fresh engine both give back `after`. The run
    storage is a pyarrow sub-tree filesystem: not a LocalFileSystem, so every rank goes the way
    it goes to an object store (node-local scratch, upload; download to load)."""
    import pyarrow.fs as pafs
    from transformers import AutoModelForCausalLM

    from eopd_ray.roles.learner import LearnerWorker
    from eopd_ray.storage.run_storage import RunStorage

    root.mkdir(parents=True, exist_ok=True)
    store = RunStorage("run", filesystem=pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem()))
    assert not store.is_local
    worker.export_hf(store, "hf")
    worker.save_checkpoint(store, "ckpt")
    fresh = LearnerWorker(cfg, rank, WORLD)
    fresh.setup("127.0.0.1", port)
    steps = fresh.load_checkpoint(store, "ckpt")
    out = {"steps": steps, "reload": _max_difference(_full_params(fresh, "float32"), after)}
    fresh.engine.destroy()
    if rank == 0:
        exported = AutoModelForCausalLM.from_pretrained(root / "run" / "hf", dtype=torch.float32)
        out["export"] = _max_difference(dict(exported.named_parameters()), after)
    return out


def _rank_main(rank: int, port: int, student: str, dropout_student: str, out_dir: str) -> None:
    """One data-parallel rank: every configuration in turn; rank 0 saves what it measured."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK="0",
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
    )
    try:
        torch.set_num_threads(1)

        class SGDAsAdamW(torch.optim.SGD):
            """What the learner builds as `torch.optim.AdamW(...)`: plain SGD at the given lr."""

            def __init__(self, params, lr, **_adam_arguments):
                super().__init__(params, lr=lr, momentum=0.0, weight_decay=0.0)

        torch.optim.AdamW = SGDAsAdamW  # this process only
        from transformers import AutoConfig

        from eopd_ray.core.micro_batches import rank_share
        from eopd_ray.roles.learner import LearnerWorker
        from eopd_ray.roles.learner_engine import deepspeed_config
        from eopd_ray.telemetry.step_metrics import reduce_learner_metrics

        batch, scores = _synthetic_batch(AutoConfig.from_pretrained(student).vocab_size)
        shard, shard_scores, tokens = _shard(batch, scores, rank)
        results: dict = {"updates": {}, "checkpoint": {}}
        cases = [(c, "float32") for c in FP32_CASES] + [(c, "bfloat16") for c in BF16_CASES]
        cases += [(c, "logits") for c in LOGITS_CASES]  # loss.fused_head: false, the reference
        cases += [(c, "separate_old") for c in SEPARATE_OLD_CASES]
        for (stage, micro, checkpointing), kind in cases:
            started = time.perf_counter()
            dtype = "float32" if kind in ("logits", "separate_old") else kind
            cfg = _config(
                student,
                stage,
                micro,
                checkpointing,
                dtype,
                fused_head=kind != "logits",
                old_from_update=kind != "separate_old",
            )
            worker = LearnerWorker(cfg, rank, WORLD)
            worker.setup("127.0.0.1", port)  # init_distributed joins the group once
            engine = worker.engine
            before = _full_params(worker, dtype)
            metrics = worker.train_step(shard, shard_scores, tokens)
            after = _full_params(worker, dtype)
            results["updates"][(stage, micro, checkpointing, kind)] = {
                "fused": worker.fused,
                "grad": {n: (before[n] - after[n]) / LR for n in before},
                "grad_accum_dtype": str(engine.get_data_types()[1]),
                "communication_data_type": str(engine.communication_data_type),
                "ds_config": deepspeed_config(cfg, WORLD),
                "boundaries": sum("learner/grad_norm" in m for m in metrics),
                "micro_batches": len(metrics),
                "old_from_update": metrics[0]["learner/old_logprobs_from_update"],
                "checkpointing": engine.module.hf.is_gradient_checkpointing and engine.training,
                "seconds": time.perf_counter() - started,
            }
            if kind == "float32" and micro == 2 and not checkpointing and stage in (2, 3):
                root = Path(out_dir) / f"zero{stage}"
                results["checkpoint"][stage] = _checkpoint_round_trip(
                    worker, cfg, after, root, rank, port
                )
            engine.destroy()
            del worker, engine

        tokens = [int(batch.response_mask.sum())]  # one update: the global valid tokens
        results["valid_tokens"] = tokens[0]
        for stage, kind in BUDGET_CASES:
            plan, budget = _budget_plan(batch, kind)
            rows, rank_plan = rank_share(plan, rank)
            cfg = _config(student, stage, 1, False, "float32", budget)
            worker = LearnerWorker(cfg, rank, WORLD)
            worker.setup("127.0.0.1", port)
            before = _full_params(worker, "float32")
            metrics = worker.train_step(batch.select(rows), scores.select(rows), tokens, rank_plan)
            after = _full_params(worker, "float32")
            # Every rank's metrics through the driver's reduction (pipeline._train).
            every_rank = [None] * WORLD
            torch.distributed.all_gather_object(every_rank, metrics)
            try:
                reduced = reduce_learner_metrics(every_rank, len(rank_plan))
            except Exception as exc:  # reported by the test, not here
                reduced = f"{type(exc).__name__}: {exc}"
            results["updates"][(stage, kind)] = {
                "reduced": reduced,
                "grad": {n: (before[n] - after[n]) / LR for n in before},
                "boundaries": sum("learner/grad_norm" in m for m in metrics),
                "micro_batches": len(rank_plan[0]),
                "placeholders": sum(not mb for mb in rank_plan[0]),
                "seconds": 0.0,
            }
            worker.engine.destroy()
            del worker

        # The sampler-gap check stops the step before its update is applied, whether pi_old is
        # the update's own forward or a separate one (the synthetic sampler log-probs are random).
        from eopd_ray.core.invariants import WeightsOutOfSync

        shard, shard_scores, tokens = _shard(batch, scores, rank)
        results["gap_stop"] = {}
        for from_update in (True, False):
            cfg = _config(student, 0, 2, False, "float32", old_from_update=from_update,
                          max_sampler_gap=None)  # fmt: skip
            worker = LearnerWorker(cfg, rank, WORLD)
            worker.setup("127.0.0.1", port)
            before = _full_params(worker, "float32")
            try:
                worker.train_step(shard, shard_scores, tokens)
                outcome = "trained"
            except WeightsOutOfSync as exc:
                outcome = str(exc)
            after = _full_params(worker, "float32")
            results["gap_stop"][from_update] = {
                "outcome": outcome,
                "changed": _max_difference(before, after),
            }
            worker.engine.destroy()
            del worker

        # pi_old of a model with dropout: recomputed in eval mode, deterministic, and the
        # engine is back in train mode for the updates.
        cfg = _config(dropout_student, 3, 2, False, "float32")
        worker = LearnerWorker(cfg, rank, WORLD)
        # What the driver's streamed step reads (WorkerGroups.student_dropout)
        setup_says_dropout = worker.setup("127.0.0.1", port)
        worker.engine.train()
        fixed = worker._fixed_plan(shard.num_sequences)
        first = worker._recompute_old_logprobs(shard, fixed)
        second = worker._recompute_old_logprobs(shard, fixed)
        results["dropout"] = {
            "path": dropout_student,
            "first": first,
            "second": second,
            "training_after": worker.engine.module.training,
            "setup_says_dropout": setup_says_dropout,
            # a model with dropout never takes pi_old from the (train-mode) update's forward
            "old_from_update": worker._old_from_update(fixed),
            "probe": worker.token_logprobs(PROBE),  # the weight-sync probe, temperature 1
        }
        worker.engine.destroy()
        if rank == 0:
            torch.save(results, Path(out_dir) / "results.pt")
    except BaseException:
        (Path(out_dir) / f"error{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)


def _run_ranks(student: Path, dropout_student: Path, out_dir: Path, timeout_s: float = 600.0):
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, port, str(student), str(dropout_student), str(out_dir)),
        )
        for rank in range(WORLD)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break  # one rank failed: the other may wait forever in a collective
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    errors = [f.read_text() for f in sorted(out_dir.glob("error*.txt"))]
    if errors:
        pytest.fail("a learner rank failed:\n" + "\n".join(errors))
    if not (out_dir / "results.pt").exists():
        pytest.fail(f"learner ranks exited with {[p.exitcode for p in procs]} and no results")
    return torch.load(out_dir / "results.pt", weights_only=False)


# ----------------------------------------------------------------------------- reference


def _tempered_logits(model, batch) -> torch.Tensor:
    from eopd_ray.core.forward import pack, response_logits, rows_of

    ids, attention, positions = pack(
        rows_of(batch.prompt_ids, batch.prompt_mask),
        rows_of(batch.response_ids, batch.response_mask),
        batch.response_ids.shape[1],
    )
    return response_logits(model, ids, attention, positions) / TEMPERATURE  # (B, T, V)


def _reference_gradient(student: Path, batch, scores) -> dict[str, torch.Tensor]:
    """float64 gradient of the eopd token-mean loss over the whole mini-batch, one process."""
    from transformers import AutoModelForCausalLM

    from eopd_ray.core.loss import LossInputs, eopd_loss
    from eopd_ray.core.student_logprobs import student_logprobs_at

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float64)
    model.train()
    logits = _tempered_logits(model, batch)
    old, _ = student_logprobs_at(logits.detach(), batch.response_ids[..., None], 0)
    inputs = LossInputs(
        student_logits=logits,
        response_ids=batch.response_ids,
        response_mask=batch.response_mask,
        old_logprobs=old[..., 0],  # pi_old = the current weights (recomputed): r = 1
        teacher_logprobs=scores.token_logprobs,
        teacher_entropy=scores.entropy,
        teacher_topk_ids=scores.topk_ids,
        teacher_topk_logprobs=scores.topk_logprobs,
    )
    out = eopd_loss(inputs, num_valid_tokens=batch.num_response_tokens)
    assert 0 < out.metrics["gate/frac"] < 1  # both branches of the gate are exercised
    out.loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _with_dropout(student: Path, out: Path, rate: float = 0.5) -> Path:
    """A copy of the student whose attention has dropout."""
    import json
    import shutil

    shutil.copytree(student, out)
    config = json.loads((out / "config.json").read_text())
    config["attention_dropout"] = rate
    (out / "config.json").write_text(json.dumps(config))
    return out


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


@pytest.fixture(scope="module")
def learner_run(tiny_pair, tmp_path_factory):
    """(what rank 0 measured, the float64 reference gradient, the synthetic batch)."""
    from transformers import AutoConfig

    student, _ = tiny_pair
    out_dir = tmp_path_factory.mktemp("learner_gradients")
    dropout_student = _with_dropout(student, out_dir / "dropout_student")
    started = time.perf_counter()
    results = _run_ranks(student, dropout_student, out_dir)
    print(f"\n2-rank learner runs: {time.perf_counter() - started:.1f} s")
    batch, scores = _synthetic_batch(AutoConfig.from_pretrained(student).vocab_size)
    return results, _reference_gradient(student, batch, scores), batch


def _check(results, reference, key, tol) -> float:
    info = results["updates"][key]
    assert set(info["grad"]) == set(reference), "weight-sync names are not the HF names"
    _, micro, checkpointing, kind = key
    assert info["fused"] == (kind != "logits")
    assert info["micro_batches"] == MICRO_BATCHES[micro]
    assert info["checkpointing"] == checkpointing
    assert info["boundaries"] == 1  # one optimizer update per mini-batch
    # One update per step: pi_old is that update's own forward unless a case turns it off.
    assert info["old_from_update"] == float(kind != "separate_old")
    errors = {n: _relative_error(info["grad"][n], reference[n]) for n in reference}
    worst = max(errors, key=errors.get)
    print(f"{key}: max relative error {errors[worst]:.2e} ({worst}), {info['seconds']:.1f} s")
    assert errors[worst] <= tol, f"{key}: {worst} off by {errors[worst]:.3g} (> {tol})"
    return errors[worst]


@pytest.mark.parametrize(
    "stage,micro,checkpointing",
    FP32_CASES,
    ids=[f"zero{s}-micro{MICRO_BATCHES[m]}-gc{int(c)}" for s, m, c in FP32_CASES],
)
def test_applied_update_is_the_global_token_mean_gradient(learner_run, stage, micro, checkpointing):
    results, reference, _ = learner_run
    _check(results, reference, (stage, micro, checkpointing, "float32"), FP32_TOL)


@pytest.mark.parametrize(
    ("stage", "kind"), BUDGET_CASES, ids=[f"zero{s}-{k}" for s, k in BUDGET_CASES]
)
def test_token_budget_plans_apply_the_same_gradient(learner_run, stage, kind):
    """Sorted, trimmed, length-balanced micro-batches, unequal counts equalized by splitting or
    by zero-weight placeholders: still exactly the global token-mean gradient."""
    results, reference, _ = learner_run
    info = results["updates"][(stage, kind)]
    assert info["boundaries"] == 1
    if kind == "placeholder":
        assert info["micro_batches"] == 5 and info["placeholders"] == 0  # rank 0's share
    # Rank 1 of "placeholder" ends its update on a placeholder: the step's metrics still reduce.
    reduced = info["reduced"]
    assert isinstance(reduced, dict), reduced
    assert reduced["tokens/trained"] == results["valid_tokens"]
    assert reduced["learner/grad_norm"] > 0
    errors = {n: _relative_error(info["grad"][n], reference[n]) for n in reference}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= FP32_TOL, f"{stage}, {kind}: {worst} off by {errors[worst]:.3g}"


@pytest.mark.parametrize("stage", [stage for stage, _, _ in LOGITS_CASES])
def test_the_head_on_full_logits_applies_the_same_update(learner_run, stage):
    """loss.fused_head: false, the reference path the fused head replaces."""
    results, reference, _ = learner_run
    _check(results, reference, (stage, 2, False, "logits"), FP32_TOL)


@pytest.mark.parametrize("stage", [stage for stage, _, _ in SEPARATE_OLD_CASES])
def test_pi_old_from_a_separate_forward_applies_the_same_update(learner_run, stage):
    """learner.old_logprobs_from_update: false: pi_old from its own eval-mode forward first."""
    results, reference, _ = learner_run
    _check(results, reference, (stage, 2, False, "separate_old"), FP32_TOL)


def test_the_sampler_gap_stops_the_step_before_its_update(learner_run):
    results, _, _ = learner_run
    for from_update, info in results["gap_stop"].items():
        assert "opd/sampler_gap" in info["outcome"], (from_update, info["outcome"])
        assert info["changed"] == 0.0, (from_update, info["changed"])


@pytest.mark.parametrize("stage", [stage for stage, _, _ in BF16_CASES])
def test_bf16_accumulates_and_reduces_in_fp32(learner_run, stage):
    results, reference, _ = learner_run
    key = (stage, 2, False, "bfloat16")
    info = results["updates"][key]
    assert info["ds_config"]["data_types"]["grad_accum_dtype"] == "fp32"
    assert info["ds_config"]["communication_data_type"] == "fp32"
    # DeepSpeed 0.19.8 refuses fp32 accumulation without ZeRO: stage 0 runs as ZeRO-1.
    assert info["ds_config"]["zero_optimization"]["stage"] == max(stage, 1)
    assert info["grad_accum_dtype"] == "torch.float32"
    assert info["communication_data_type"] == "torch.float32"
    _check(results, reference, key, BF16_TOL)


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_and_export_keep_hf_names_and_weights(learner_run, stage):
    results, _, _ = learner_run
    trip = results["checkpoint"][stage]
    assert trip["steps"] == 1
    assert trip["reload"] == 0.0  # DeepSpeed save -> load into a fresh engine
    assert trip["export"] == 0.0  # export_hf -> AutoModelForCausalLM


def test_old_logprobs_are_recomputed_in_eval_mode(learner_run):
    """With dropout, pi_old is the eval-mode (sampler's) policy, the same at every call."""
    from transformers import AutoModelForCausalLM

    from eopd_ray.core.student_logprobs import student_logprobs_at

    results, _, batch = learner_run
    got = results["dropout"]
    assert got["training_after"], "the updates must run in train mode"
    assert not got["old_from_update"], "a train-mode forward with dropout is not pi_old"
    assert got["setup_says_dropout"] is True, "LearnerWorker.setup must tell the driver"
    assert torch.equal(got["first"], got["second"])
    rank0 = batch.select(list(range(MINI_BATCH // WORLD)))  # rank 0's shard
    model = AutoModelForCausalLM.from_pretrained(results["dropout"]["path"], dtype=torch.float64)
    with torch.no_grad():
        want = {}
        for mode in ("eval", "train"):
            getattr(model, mode)()
            torch.manual_seed(0)
            lp, _ = student_logprobs_at(
                _tempered_logits(model, rank0), rank0.response_ids[..., None], 0
            )
            want[mode] = lp[..., 0].float() * rank0.response_mask
    assert (want["train"] - want["eval"]).abs().max() > 1e-2  # dropout does change pi
    assert torch.allclose(got["first"], want["eval"], atol=1e-5, rtol=0)


def test_weight_sync_probe_scores_at_temperature_one_in_eval_mode(learner_run):
    from transformers import AutoModelForCausalLM

    results, _, _ = learner_run
    model = AutoModelForCausalLM.from_pretrained(results["dropout"]["path"], dtype=torch.float64)
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(torch.tensor([PROBE])).logits[0, :-1], -1)
    want = logp.gather(-1, torch.tensor(PROBE[1:])[:, None])[:, 0]
    got = torch.tensor(results["dropout"]["probe"], dtype=torch.float64)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=0)

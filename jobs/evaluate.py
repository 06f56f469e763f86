"""Avg@k / Pass@k of a model on math benchmarks, in the layout of the paper's table.

    python jobs/evaluate.py --model runs/x/hf --benchmarks data/math500.jsonl data/aime24.jsonl \
        --out runs/x/eval [--config jobs/configs/paper/qwen3-1.7b-eopd.yaml] [eval.key=value ...]

`--out` is a directory or a URI (`s3://bucket/x/eval`, any pyarrow.fs URI).

Samples `eval.samples_per_problem` completions per problem with the vLLM engine (in this
process, no Ray), extracts the last \\boxed{} answer, judges it by mathematical equivalence and
writes `<out>/results.json`, `<out>/results.md` and one `<out>/<benchmark>.samples.jsonl` each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eopd_ray.env import set_job_environment

# In-process vLLM engine (no Ray here); before vLLM is imported.
set_job_environment(VLLM_ENABLE_V1_MULTIPROCESSING="0")

from eopd_ray.config import Config, config_from_dict, load_config  # noqa: E402
from eopd_ray.errors import EopdError  # noqa: E402
from eopd_ray.evaluation.math_answers import load_benchmark, report, score_benchmark  # noqa: E402
from eopd_ray.storage.outputs import output_dir  # noqa: E402
from eopd_ray.storage.run_storage import redacted  # noqa: E402
from eopd_ray.storage.sources import local_file, local_model_dir, pin_model  # noqa: E402


def evaluation_config(args: argparse.Namespace) -> Config:
    # Evaluation reads model.*, rollout.* (engine settings) and eval.*; the training-only keys
    # that must be set for a config to validate get placeholders when no --config is given.
    placeholders = {
        "model": {"student_path": args.model, "teacher_path": args.model},
        "data": {"toy_prompts": 1},
    }
    base = (
        load_config(args.config, args.overrides)
        if args.config
        else config_from_dict(placeholders, args.overrides, "<evaluate>")
    )
    rollout = dataclasses.replace(
        base.rollout,
        engine=args.engine,
        max_model_len=base.data.max_prompt_tokens + base.eval.max_new_tokens,
        num_workers=1,
        prompts_per_step=1,
    )
    return dataclasses.replace(
        base, model=dataclasses.replace(base.model, student_path=args.model), rollout=rollout
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Avg@k / Pass@k on math benchmarks.")
    parser.add_argument(
        "--model",
        required=True,
        help="model to evaluate: a HF model directory, a hub id (org/name[@revision]), a "
        "pyarrow.fs URI (s3://...) or a .gguf file (path or URI; converted once per node)",
    )
    parser.add_argument(
        "--benchmarks", nargs="+", required=True, help="benchmark JSONL files (paths or URIs)"
    )
    parser.add_argument(
        "--out", required=True, help="output directory or URI (s3://bucket/x, gs://..., ...)"
    )
    parser.add_argument("--config", help="config whose eval.*/rollout.* settings to use")
    parser.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.k=4")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after flags
    try:
        out = output_dir(args.out, "--out")  # a bad URI fails now, not after the sampling
        cfg = evaluation_config(args)
        # A hub id is pinned to the commit evaluated, a GGUF file to its sha256; hub ids and URIs
        # are fetched once per node, GGUF files converted once per node (model.dtype).
        spec = pin_model(args.model, "--model")
        model_dir = local_model_dir(spec, "--model", cfg.model.dtype)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, student_path=model_dir))
        benchmarks = {
            Path(p.split("?")[0]).stem: load_benchmark(local_file(p, "--benchmarks"))
            for p in args.benchmarks
        }
    except EopdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    from eopd_ray.core.prompts import render_prompt
    from eopd_ray.roles.rollout_engines import ENGINES, Sampling, prompt_seeds

    e = cfg.eval
    tokenizer = AutoTokenizer.from_pretrained(
        model_dir, trust_remote_code=cfg.model.trust_remote_code
    )
    engine = ENGINES[cfg.rollout.engine](cfg, seed=e.seed)
    sampling = Sampling(e.samples_per_problem, e.temperature, e.top_p, e.max_new_tokens)
    scores = []
    for name, problems in benchmarks.items():
        prompts = [
            render_prompt(f"{p.problem} {e.prompt_suffix}".strip(), e.template, tokenizer)
            for p in problems
        ]
        # A seed per problem (and per sample inside the engine): independent samples.
        seeds = prompt_seeds(f"{e.seed}/{name}", range(len(problems)))
        samples = engine.generate(prompts, sampling, seeds)
        completions = [
            [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in ss]
            for ss in samples
        ]
        score, records = score_benchmark(name, problems, completions, e.k)
        scores.append(score)
        lines = [
            json.dumps({**r, "completions": c}) for r, c in zip(records, completions, strict=True)
        ]
        out.write_text(f"{name}.samples.jsonl", "\n".join(lines) + "\n")
        print(f"{name}: Avg@{e.k} {score.avg_at_k:.2f}  Pass@{e.k} {score.pass_at_k:.2f}")
    data, table = report(scores)
    data["model"] = redacted(spec)  # a URI's credentials never go into a file
    data["settings"] = dataclasses.asdict(e)
    out.write_text("results.json", json.dumps(data, indent=2) + "\n")
    out.write_text("results.md", table)
    print(table)
    print(f"results in {out.uri} (results.json, results.md, <benchmark>.samples.jsonl)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

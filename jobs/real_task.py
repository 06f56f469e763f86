"""The real-model task (`make run-real`, docs/real-model.md): prepare it, and report on a run.

    python jobs/real_task.py prepare --config jobs/configs/real.yaml [section.key=value ...]
    python jobs/distill.py --config jobs/configs/real.yaml
    python jobs/real_task.py report --config jobs/configs/real.yaml

`prepare` renders every question of the bank (eopd_ray/evaluation/question_bank.py) with
`data.teacher_template`, answers it greedily with the teacher (`model.teacher_path`, vLLM in this
process, `eval.max_new_tokens` new tokens), keeps the questions the judge accepts the answer to
(eopd_ray/evaluation/short_answer.py) and splits them by fact, within each family, into
`data.train_path` (training prompts) and `eval.short_answer_path` (held-out facts, never asked
in training), both JSONL of {prompt, answers, rivals, family, fact}, with `task.json` beside the
latter (counts, every teacher answer). Then it measures the teacher and the student before
training on the held-out questions (`baseline.json` there): `eval.samples_per_problem` samples
with the eval.* sampling and the seeds of the evaluation during training, one greedy answer,
and the closeness to the teacher (eopd_ray/evaluation/real_task.py). A second call with the same
bank, models and settings returns at once.

`report` measures the student after training (`<run.output_dir>/hf`) the same way and writes
`<run.output_dir>/report.md` (greedy answers first, the before/after table, the held-out curve
during training, where a step's time goes), `eval.json` and PNG curves in `plots/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eopd_ray.env import set_job_environment

# In-process vLLM engine (no Ray here); before vLLM is imported.
set_job_environment(VLLM_ENABLE_V1_MULTIPROCESSING="0")

from eopd_ray.config import Config, load_config  # noqa: E402
from eopd_ray.driver.locations import resolve_locations  # noqa: E402
from eopd_ray.errors import EopdError  # noqa: E402
from eopd_ray.evaluation.short_answer import ShortAnswer, is_correct  # noqa: E402

HELD_OUT_FRAC = 0.4  # of each family's teacher-correct facts
MIN_HELD_OUT = 20  # fewer held-out questions than this make Avg@k too coarse to read
SHOWN = 10  # held-out questions whose greedy answers the report shows


class TaskError(EopdError):
    """The task cannot be prepared or reported on; says what to run or set."""


def engine_config(cfg: Config, model_path: str) -> Config:
    """`cfg` with `model_path` as the model vLLM serves, sized for one prompt and its answer."""
    rollout = dataclasses.replace(
        cfg.rollout,
        engine="vllm",
        num_workers=1,
        max_model_len=cfg.data.max_prompt_tokens + cfg.eval.max_new_tokens,
    )
    model = dataclasses.replace(cfg.model, student_path=model_path)
    return dataclasses.replace(cfg, model=model, rollout=rollout)


def answer(cfg: Config, model_path: str, prompts: list[list[int]], samples: int, greedy: bool):
    """The model's responses to `prompts` (token ids): per prompt, `samples` samples with the
    eval.* sampling (fixed seeds: those of the held-out evaluation during training), or one
    greedy answer. vLLM in this process; the engine is dropped before returning."""
    from eopd_ray.roles.rollout_engines import ENGINES, Sampling, prompt_seeds

    e = cfg.eval
    sampling = (
        Sampling(1, 0.0, 1.0, e.max_new_tokens)
        if greedy
        else Sampling(samples, e.temperature, e.top_p, e.max_new_tokens)
    )
    seeds = prompt_seeds(f"eval/{e.seed}", range(len(prompts)))
    engine = ENGINES["vllm"](engine_config(cfg, model_path), seed=e.seed)
    try:
        return engine.generate(prompts, sampling, seeds)
    finally:
        del engine
        gc.collect()


def _load(args: argparse.Namespace) -> Config:
    cfg = resolve_locations(load_config(args.config, args.overrides))
    if not cfg.eval.short_answer_path:
        raise TaskError("eval.short_answer_path is not set: the held-out questions go there")
    for key, value in (("data.train_path", cfg.data.train_path),
                       ("eval.short_answer_path", cfg.eval.short_answer_path)):  # fmt: skip
        if "://" in value:
            raise TaskError(f"{key} = {value}: the task is written here, give a local path")
    if not (Path(cfg.model.teacher_path) / "config.json").exists():
        raise TaskError(
            f"no model in model.teacher_path = {cfg.model.teacher_path}: run `make real-model` "
            "(jobs/fetch_real_model.py) first"
        )
    return cfg


# ----------------------------------------------------------------------------------- prepare


def fingerprint(cfg: Config, bank: list[ShortAnswer]) -> str:
    """What the prepared task depends on: the bank, the teacher, the template, the length."""
    from eopd_ray.evaluation.short_answer import to_record

    what = {
        "bank": [to_record(q) for q in bank],
        "teacher": cfg.model.teacher_path,
        "template": cfg.data.teacher_template,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "held_out_frac": HELD_OUT_FRAC,
        "seed": cfg.data.seed,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _by_family(questions: list[ShortAnswer]) -> dict[str, int]:
    out: dict[str, int] = {}
    for q in questions:
        out[q.family] = out.get(q.family, 0) + 1
    return out


def prepare(cfg: Config) -> int:
    from transformers import AutoTokenizer

    from eopd_ray.core.prompts import render_prompt
    from eopd_ray.evaluation.question_bank import question_bank, split_by_fact
    from eopd_ray.evaluation.short_answer import read_questions, write_questions

    train_path, eval_path = Path(cfg.data.train_path), Path(cfg.eval.short_answer_path)
    task_file = eval_path.parent / "task.json"
    bank = question_bank()
    key = fingerprint(cfg, bank)
    prepared = train_path.exists() and eval_path.exists() and task_file.exists()
    if prepared and json.loads(task_file.read_text()).get("fingerprint") == key:
        print(f"task already prepared: {train_path}, {eval_path} ({task_file})")
        baseline(cfg, read_questions(eval_path), key)
        return 0
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.teacher_path)
    prompts = [render_prompt(q.prompt, cfg.data.teacher_template, tokenizer) for q in bank]
    if (longest := max(map(len, prompts))) > cfg.data.max_prompt_tokens:
        raise TaskError(
            f"a question renders to {longest} tokens > data.max_prompt_tokens = "
            f"{cfg.data.max_prompt_tokens}: raise it"
        )
    samples = answer(cfg, cfg.model.teacher_path, prompts, 1, greedy=True)
    texts = [tokenizer.decode(s[0].response_ids, skip_special_tokens=True) for s in samples]
    kept = [q for q, t in zip(bank, texts, strict=True) if is_correct(q, t)]
    train, held_out = split_by_fact(kept, HELD_OUT_FRAC, cfg.data.seed)
    if len(held_out) < MIN_HELD_OUT:
        raise TaskError(
            f"the teacher answered only {len(kept)} of {len(bank)} questions correctly, leaving "
            f"{len(held_out)} held out (< {MIN_HELD_OUT}): is model.teacher_path = "
            f"{cfg.model.teacher_path} an instruction-tuned model, data.teacher_template right?"
        )
    for path in (train_path, eval_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_questions(train_path, train)
    write_questions(eval_path, held_out)
    summary = {
        "fingerprint": key,
        "teacher": cfg.model.teacher_path,
        "student": cfg.model.student_path,
        "bank": len(bank),
        "kept": len(kept),
        "train": len(train),
        "held_out": len(held_out),
        **{f"{name}_by_family": _by_family(qs) for name, qs in
           (("bank", bank), ("kept", kept), ("train", train), ("held_out", held_out))},
        "seconds": round(time.perf_counter() - started, 1),
        "teacher_answers": [
            {"prompt": q.prompt, "answer": t, "correct": is_correct(q, t)}
            for q, t in zip(bank, texts, strict=True)
        ],
    }  # fmt: skip
    tmp = task_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(task_file)
    print(f"teacher correct on {len(kept)} of {len(bank)} questions (greedy):")
    for family, n in summary["bank_by_family"].items():
        print(
            f"  {family:9s} {summary['kept_by_family'].get(family, 0):3d} / {n:3d}"
            f"  -> train {summary['train_by_family'].get(family, 0):3d}, "
            f"held out {summary['held_out_by_family'].get(family, 0):3d}"
        )
    print(f"train: {train_path} ({len(train)}), held out: {eval_path} ({len(held_out)}); "
          f"{summary['seconds']} s")  # fmt: skip
    baseline(cfg, held_out, key)
    return 0


# ------------------------------------------------------------------------------- evaluation


def evaluate_models(
    cfg: Config,
    questions: list[ShortAnswer],
    models: dict[str, str],
    teacher_answers: list[list[int]] | None = None,
) -> dict[str, dict]:
    """Each model (name -> path) on the held-out questions: {"metrics": ..., "greedy": texts,
    "greedy_ids": ids}. Metrics: the held-out evaluation's (eval.* sampling, the same seeds as
    during training), greedy accuracy, and closeness to the teacher on the teacher's greedy
    answers (`teacher_answers`, or the greedy answers of the model named "teacher")."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eopd_ray.core.prompts import render_prompt
    from eopd_ray.evaluation.real_task import Answered, answer_metrics, closeness, greedy_accuracy

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or 1)))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.student_path)
    prompts = [render_prompt(q.prompt, cfg.data.student_template, tokenizer) for q in questions]
    k, n = cfg.eval.k, cfg.eval.samples_per_problem

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    out, sampled_ids = {}, {}
    for name, path in models.items():
        started = time.perf_counter()
        sampled = answer(cfg, path, prompts, n, greedy=False)
        greedy = [s[0] for s in answer(cfg, path, prompts, 1, greedy=True)]
        answered = Answered(
            texts=[[decode(s.response_ids) for s in ss] for ss in sampled],
            stopped=[[s.finish_reason == "stop" for s in ss] for ss in sampled],
            lengths=[[len(s.response_ids) for s in ss] for ss in sampled],
        )
        texts = [decode(s.response_ids) for s in greedy]
        metrics = answer_metrics(questions, answered, k)
        metrics["greedy/accuracy"] = greedy_accuracy(questions, texts)
        out[name] = {"metrics": metrics, "greedy": texts,
                     "greedy_ids": [list(s.response_ids) for s in greedy]}  # fmt: skip
        sampled_ids[name] = [[list(s.response_ids) for s in ss] for ss in sampled]
        print(f"{name}: avg@{k} {metrics[f'eval/avg@{k}']:.3f}, greedy accuracy "
              f"{metrics['greedy/accuracy']:.3f}, eos rate {metrics['eval/eos_rate']:.3f} "
              f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    # Closeness on the teacher's greedy answers, EOS appended where it stopped (stopping counts).
    if teacher_answers is None:
        eos, cap = tokenizer.eos_token_id, cfg.eval.max_new_tokens
        teacher_answers = [
            ids if ids[-1:] == [eos] or len(ids) >= cap else [*ids, eos]
            for ids in out["teacher"]["greedy_ids"]
        ]
    load, tau = {"dtype": torch.float32}, cfg.loss.entropy_threshold
    teacher = AutoModelForCausalLM.from_pretrained(cfg.model.teacher_path, **load).eval()
    for name, path in models.items():
        model = teacher
        if name != "teacher":
            model = AutoModelForCausalLM.from_pretrained(path, **load).eval()
        measured = closeness(teacher, model, prompts, teacher_answers, sampled_ids[name], tau)
        out[name]["metrics"].update(measured)
    out.setdefault("teacher", {})["answer_ids"] = teacher_answers
    return out


def baseline(cfg: Config, questions: list[ShortAnswer], task_fingerprint: str) -> None:
    """The teacher and the student before training on the held-out questions, once per task,
    student and eval.* settings: `baseline.json` beside eval.short_answer_path."""
    path = Path(cfg.eval.short_answer_path).parent / "baseline.json"
    e = cfg.eval
    what = [task_fingerprint, cfg.model.student_path, e.samples_per_problem, e.k,
            e.temperature, e.top_p, e.seed, cfg.data.student_template]  # fmt: skip
    key = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]
    if path.exists() and json.loads(path.read_text()).get("fingerprint") == key:
        print(f"baseline already measured: {path}")
        return
    models = {"teacher": cfg.model.teacher_path, "student before": cfg.model.student_path}
    result = {"fingerprint": key, **evaluate_models(cfg, questions, models)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result) + "\n")
    tmp.replace(path)


def report(cfg: Config, command: str) -> int:
    from eopd_ray.evaluation.plots import plot_run
    from eopd_ray.evaluation.real_task import comparison_table, samples_section, write_report
    from eopd_ray.evaluation.short_answer import read_questions
    from eopd_ray.storage.outputs import output_dir

    started = time.perf_counter()
    store = output_dir(cfg.run.output_dir, "run.output_dir")
    task_dir = Path(cfg.eval.short_answer_path).parent
    if not store.exists("hf/config.json"):
        raise TaskError(
            f"no exported student in {store.show('hf')}: run jobs/distill.py with this config "
            "first (and run.export_hf=true)"
        )
    if not (task_dir / "baseline.json").exists():
        raise TaskError(f"no {task_dir / 'baseline.json'}: run `jobs/real_task.py prepare` first")
    questions = read_questions(cfg.eval.short_answer_path)
    before = json.loads((task_dir / "baseline.json").read_text())
    after_name = f"student after {cfg.loss.name}"
    after = evaluate_models(
        cfg, questions, {after_name: str(store.fetch("hf"))}, before["teacher"]["answer_ids"]
    )
    models = {"teacher": before["teacher"], "student before": before["student before"],
              after_name: after[after_name]}  # fmt: skip
    columns = {name: m["metrics"] for name, m in models.items()}
    run_dir = store.staging("")  # the run directory itself, or a scratch one to upload
    (run_dir / "eval.json").write_text(json.dumps(columns, indent=2))
    rows = [json.loads(line) for line in store.read_text("metrics.jsonl").splitlines() if line]
    plots = [p for p in plot_run(rows, run_dir / "plots") if p.stem in ("overview", "eval")]
    if store.exists("timeline.json"):  # the last step: which role holds a step
        from eopd_ray.evaluation.plots import plot_timeline
        from eopd_ray.telemetry.timeline import Timeline

        timeline = Timeline.from_json(store.read_text("timeline.json"))
        plots.append(plot_timeline(timeline, run_dir / "plots" / "timeline.png"))
    task_file = task_dir / "task.json"
    task = json.loads(task_file.read_text()) if task_file.exists() else {}
    task |= {"teacher": cfg.model.teacher_path, "student": cfg.model.student_path}
    k = cfg.eval.k
    table = comparison_table(columns, k, cfg.eval.max_new_tokens)
    samples = samples_section(questions, {n: m["greedy"] for n, m in models.items()}, SHOWN)
    write_report(run_dir, command=command, table=table, samples=samples, rows=rows, task=task,
                 k=k, plots=plots)  # fmt: skip
    store.publish(run_dir, "")
    print(f"\nheld-out questions ({len(questions)}), {cfg.eval.samples_per_problem} samples each:"
          f"\n\n{table}")  # fmt: skip
    print(f"\nreport: {store.show('report.md')} ({time.perf_counter() - started:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The real-model short-answer task.")
    parser.add_argument("action", choices=["prepare", "report"])
    parser.add_argument("--config", required=True, help="the run's config, e.g. real.yaml")
    parser.add_argument("overrides", nargs="*", help="the run's dotted overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after flags
    try:
        cfg = _load(args)
        if args.action == "prepare":
            return prepare(cfg)
        command = " ".join(["python jobs/distill.py --config", args.config, *args.overrides])
        return report(cfg, command)
    except EopdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

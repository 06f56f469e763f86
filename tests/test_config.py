"""Config: defaults, YAML + dotted overrides, all errors at once, round trip, every shipped file."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest

from eopd_ray.config import Config, config_from_dict, config_to_yaml, load_config
from eopd_ray.errors import ConfigError
from eopd_ray.storage.run_storage import RunStorage

REPO = Path(__file__).resolve().parents[1]
PATHS = {"model": {"student_path": "s", "teacher_path": "t"}, "data": {"toy_prompts": 16}}


def issues_of(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return {i.path: i.message for i in exc.value.issues}


def test_defaults_live_in_the_dataclasses_and_yaml_only_changes_what_it_names():
    cfg = config_from_dict(PATHS)
    assert cfg.loss == Config().loss
    assert (cfg.loss.clip_eps, cfg.loss.entropy_threshold, cfg.loss.fkl_coef) == (0.2, 0.8, 1.0)
    assert cfg.teacher.top_k == 16


def test_dotted_overrides_are_parsed_as_yaml_scalars():
    cfg = config_from_dict(
        PATHS,
        [
            "loss.entropy_threshold=0.5",
            "learner.lr=3e-6",
            "run.num_cpus=2",
            "teacher.student_eos_token_id=151643",
            "teacher.teacher_eos_token_id=151645",
            "data.shuffle=false",
        ],
    )
    assert cfg.loss.entropy_threshold == 0.5
    assert cfg.learner.lr == 3e-6  # YAML 1.1 would read '3e-6' as a string; we read a float
    assert cfg.run.num_cpus == 2 and cfg.data.shuffle is False
    assert cfg.teacher.teacher_eos_token_id == 151645


def test_config_is_frozen():
    cfg = config_from_dict(PATHS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.loss.entropy_threshold = 0.1  # type: ignore[misc]


def test_unknown_keys_get_did_you_mean_everywhere():
    with pytest.raises(ConfigError) as exc:
        config_from_dict(
            {**PATHS, "loss": {"entropy_treshold": 0.5}, "entropy_threshold": 1, "runn": {}},
            ["learner.mini_bach_size=4"],
        )
    found = issues_of(exc)
    assert "did you mean 'loss.entropy_threshold'" in found["loss.entropy_treshold"]
    assert "did you mean 'loss.entropy_threshold'" in found["entropy_threshold"]
    assert "did you mean 'run'" in found["runn"]
    assert "did you mean 'learner.mini_batch_size'" in found["learner.mini_bach_size"]


def test_wrong_types_and_cross_field_violations_are_reported_together():
    with pytest.raises(ConfigError) as exc:
        config_from_dict(
            {
                "model": {"student_path": "s"},  # teacher_path missing
                "loss": {"clip_eps": "0.2", "name": "eopd2", "entropy_threshold": -1},
                "learner": {"zero_stage": 4, "mini_batch_size": 3, "lr": True},
                "rollout": {"max_new_tokens": 2000},
            }
        )
    found = issues_of(exc)
    assert set(found) >= {
        "loss.clip_eps",
        "loss.name",
        "loss.entropy_threshold",
        "learner.zero_stage",
        "learner.lr",
        "learner.mini_batch_size",
        "rollout.max_model_len",
        "model.teacher_path",
    }
    assert "got '0.2'" in found["loss.clip_eps"]
    assert "rollout.prompts_per_step" in found["learner.mini_batch_size"]
    message = str(exc.value)
    assert "loss.clip_eps" in message and "rollout.max_model_len" in message


def test_cross_field_rule_is_skipped_when_its_input_has_a_type_error():
    with pytest.raises(ConfigError) as exc:
        config_from_dict(PATHS, ["learner.mini_batch_size=three"])
    assert list(issues_of(exc)) == ["learner.mini_batch_size"]


@pytest.mark.parametrize(
    "override, path, words",
    [
        ("learner.lr.x=1", "learner.lr", "not a section"),
        ("loss", "loss", "key.path=value"),
        ("loss.name=[unclosed", "loss.name", "cannot parse"),
    ],
)
def test_malformed_overrides(override, path, words):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(PATHS, [override])
    assert words in issues_of(exc)[path]


def test_yaml_syntax_error_and_duplicate_keys_name_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  name: eopd\n  name: opd\n")
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    assert "duplicate key 'name'" in str(exc.value) and "line 3" in str(exc.value)
    assert str(bad) in str(exc.value)
    bad.write_text("loss: [\n")
    with pytest.raises(ConfigError, match="YAML error at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_resolved_yaml_reloads_identically(tmp_path):
    cfg = load_config(REPO / "jobs/configs/tiny.yaml", ["loss.name=jsd", "loss.jsd_beta=0.25"])
    out = tmp_path / "sub" / "config.yaml"
    RunStorage(str(out.parent)).write_text(out.name, config_to_yaml(cfg))
    again = load_config(out)
    assert again == cfg
    assert config_to_yaml(again) == out.read_text()
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left


def test_config_error_pickles_with_its_issues():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({}, ["loss.nam=x"])
    clone = pickle.loads(pickle.dumps(exc.value))
    assert clone.issues == exc.value.issues and str(clone) == str(exc.value)


def test_every_shipped_config_loads_and_validates():
    files = sorted((REPO / "jobs" / "configs").rglob("*.yaml"))
    assert files, "no configs found under jobs/configs"
    for path in files:
        cfg = load_config(path)
        assert load_config(path, []) == cfg, path


def test_paper_configs_checkpoint_within_bounded_time():
    """A paper step (30-100 s) outlasts run.stop_grace_s: a preemption abandons it, so without
    periodic checkpoints a stopped paper run would start again at step 0 (issue 31, finding
    11). Every paper config, and the rehearsal built on them, checkpoints every 10 minutes."""
    files = sorted((REPO / "jobs" / "configs" / "paper").rglob("*.yaml"))
    assert len(files) == 6
    for path in [*files, REPO / "jobs" / "configs" / "rehearsal.yaml"]:
        run = load_config(path).run
        assert (run.checkpoint_every_s, run.checkpoint_every) == (600.0, 0), path


@pytest.mark.parametrize(
    "value, shown", [("-1", "-1.0"), ("-0.5", "-0.5"), (".nan", "nan"), (".inf", "inf")]
)
def test_checkpoint_every_s_must_be_a_finite_non_negative_duration(value, shown):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(PATHS, [f"run.checkpoint_every_s={value}"])
    message = issues_of(exc)["run.checkpoint_every_s"]
    assert "must be finite and >= 0" in message and "0 turns them off" in message
    assert message.endswith(f"got {shown}")
    with pytest.raises(ConfigError) as exc:
        config_from_dict(PATHS, ["run.checkpoint_every_s=ten"])
    assert list(issues_of(exc)) == ["run.checkpoint_every_s"]  # a type error, reported once
    cfg = config_from_dict(PATHS, ["run.checkpoint_every_s=0", "run.checkpoint_every=5"])
    assert (cfg.run.checkpoint_every_s, cfg.run.checkpoint_every) == (0.0, 5)
    assert config_from_dict(PATHS, ["run.checkpoint_every_s=600"]).run.checkpoint_every_s == 600


def test_a_served_teacher_is_named():
    for stream in ("true", "false"):  # both steps send their rows to a served teacher
        cfg = config_from_dict(PATHS, ["teacher.serve=teacher", f"rollout.stream={stream}"])
        assert cfg.teacher.serve == "teacher"
    assert config_from_dict(PATHS).teacher.serve is None  # default: the job's own workers
    with pytest.raises(ConfigError) as exc:
        config_from_dict(PATHS, ["teacher.serve=' '"])
    assert "name of a running teacher application" in issues_of(exc)["teacher.serve"]
    with pytest.raises(ConfigError) as exc:
        config_from_dict(PATHS, ["teacher.serve=3"])
    assert list(issues_of(exc)) == ["teacher.serve"]  # a type error, reported once


def test_every_loss_name_the_config_accepts_exists_in_the_loss_module():
    from typing import get_args, get_type_hints

    from eopd_ray.config import LossConfig
    from eopd_ray.core.loss import LOSSES

    names = get_args(get_type_hints(LossConfig)["name"])
    assert set(names) == set(LOSSES)


def test_base_files_merge_and_cycles_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "model: {student_path: s, teacher_path: t}\ndata: {toy_prompts: 8}\nloss: {name: eopd}\n"
    )
    (tmp_path / "b.yaml").write_text("base: a.yaml\nloss: {name: opd}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.loss.name == "opd" and cfg.model.student_path == "s"
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("size", ["0.6b", "1.7b", "4b"])
def test_paper_recipes_mirror_method_md(size):
    eopd = load_config(REPO / f"jobs/configs/paper/qwen3-{size}-eopd.yaml")
    opd = load_config(REPO / f"jobs/configs/paper/qwen3-{size}-opd.yaml")
    assert (eopd.loss.name, opd.loss.name) == ("eopd", "opd")
    assert dataclasses.replace(opd, loss=eopd.loss, run=eopd.run) == eopd  # twins otherwise
    assert eopd.model.student_path.endswith(f"Qwen3-{size.upper()}-Base")
    assert eopd.model.teacher_path.endswith("Qwen3-8B")
    assert eopd.rollout.prompts_per_step == 128 and eopd.learner.mini_batch_size == 32
    assert eopd.rollout.samples_per_prompt == 1 and eopd.rollout.max_new_tokens == 4096
    assert (eopd.rollout.temperature, eopd.rollout.top_p) == (1.0, 1.0)
    assert (eopd.learner.lr, eopd.learner.lr_schedule) == (3e-6, "cosine")
    assert eopd.teacher.top_k == 16
    assert (eopd.loss.entropy_threshold, eopd.loss.fkl_coef, eopd.loss.clip_eps) == (0.8, 1.0, 0.2)
    assert (eopd.teacher.student_eos_token_id, eopd.teacher.teacher_eos_token_id) == (
        151643,
        151645,
    )
    assert (eopd.data.student_template, eopd.data.teacher_template) == ("raw", "chat_no_think")
    assert "\\boxed{}" in eopd.data.prompt_suffix and eopd.model.dtype == "bfloat16"
    assert (eopd.eval.samples_per_problem, eopd.eval.top_p, eopd.eval.max_new_tokens) == (
        8,
        0.8,
        8192,
    )


def test_async_rollout_needs_the_samplers_logprobs_and_lag_is_bounded():
    with pytest.raises(ConfigError) as exc:
        config_from_dict(PATHS, ["rollout.async_lag=1"])
    assert "sampler" in issues_of(exc)["learner.old_logprobs"]
    with pytest.raises(ConfigError) as exc:
        config_from_dict(PATHS, ["rollout.async_lag=2", "learner.old_logprobs=sampler"])
    assert "rollout.async_lag" in issues_of(exc)
    cfg = config_from_dict(PATHS, ["rollout.async_lag=1", "learner.old_logprobs=sampler"])
    assert cfg.rollout.async_lag == 1


def test_training_refuses_nucleus_sampling_but_keeps_the_temperature():
    with pytest.raises(ConfigError) as exc:
        config_from_dict(PATHS, ["rollout.top_p=0.9"])
    message = issues_of(exc)["rollout.top_p"]
    assert "must be 1.0" in message and "got 0.9" in message and "eval.top_p" in message
    cfg = config_from_dict(PATHS, ["rollout.temperature=0.7", "eval.top_p=0.8"])
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.eval.top_p) == (0.7, 1.0, 0.8)


def test_removed_teacher_engine_key_says_why():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({**PATHS, "teacher": {"engine": "vllm"}})
    assert issues_of(exc)["teacher.engine"].startswith("removed: the teacher always runs")
    with pytest.raises(ConfigError) as exc:
        config_from_dict(PATHS, ["teacher.engine=hf"])
    assert "removed" in issues_of(exc)["teacher.engine"]

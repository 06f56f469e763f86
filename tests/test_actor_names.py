"""Actors of a resumed attempt are told apart from the dead ones of the attempt before, in
their names and in the Repr the dashboard shows (issue 26)."""

from __future__ import annotations

from eopd_ray.config import config_from_dict
from eopd_ray.driver.actors import _Identified, actor_name

CFG = config_from_dict(
    {
        "model": {"student_path": "s", "teacher_path": "t"},
        "data": {"toy_prompts": 8},
        "run": {"id": "toy-20261204-120000-abcd"},
    }
)


def test_a_resumed_attempt_has_names_of_its_own():
    assert actor_name(CFG, "learner", 0) == "toy-20261204-120000-abcd/learner-0"
    assert actor_name(CFG, "learner", 0, 60) == "toy-20261204-120000-abcd/learner-0.from-60"


def test_the_repr_says_where_the_attempt_resumed():
    class Learner(_Identified):
        ROLE = "learner"

        def __init__(self, from_step: int) -> None:
            self.cfg, self.rank, self.step = CFG, 0, 0
            self.FROM_STEP = from_step

    assert repr(Learner(0)) == "learner-0 trained 0 steps [toy-20261204-120000-abcd]"
    assert repr(Learner(60)) == "learner-0 resumed at step 60 [toy-20261204-120000-abcd]"

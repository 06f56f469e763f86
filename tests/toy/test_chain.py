"""The chain task: dictionary, prompt pool, checker (every correct order, each kind of error),
generator; and what the two tasks share (the interface, settings round-trips, keys)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from collections import Counter

import pytest

from eopd_ray.toy.chain import CODE_CHARS, ChainTask, ChainVerdict
from eopd_ray.toy.prepare import (
    SETTINGS_FILE,
    TASKS,
    ToySettings,
    default_settings,
    load_settings,
)
from eopd_ray.toy.task import GraphTask

TASK = ChainTask()
PROMPT = TASK.prompt("DAC")  # "ACD:"

# The key of the default graph settings before the chain task existed: preparations cached under
# runs/toy/prepared/<key> stay valid only while it is unchanged.
GRAPH_DEFAULT_KEY = "c3c7c9ee83e6"


def codes(items: str) -> str:
    return "".join(TASK.codewords[item] for item in items)


def test_codewords_are_fixed_by_the_seed_and_start_with_their_item():
    assert list(TASK.codewords) == list("ABCDEFGHIJKLMNOP")
    for item, code in TASK.codewords.items():
        assert len(code) == 4 and code[0] == item and all(ch in CODE_CHARS for ch in code[1:])
    assert ChainTask(seed=3).codewords == ChainTask(seed=3).codewords
    assert ChainTask(seed=3).codewords != ChainTask(seed=4).codewords
    assert len(ChainTask(code_length=6).codewords["B"]) == 6


def test_prompts_are_sorted_sets_and_parse_back():
    assert PROMPT == "ACD:"
    assert TASK.parse_prompt(" ACD:\n") == ("A", "C", "D")
    for prompt in ["", ":", "ACD", "CAD:", "AAC:", "ACZ:", "AC:x", "A>C:", "acd:"]:
        assert TASK.parse_prompt(prompt) is None, prompt
    with pytest.raises(ValueError, match="items"):
        TASK.prompt("AZ")


def test_the_prompt_pool_is_fixed_distinct_and_split_disjointly():
    assert len(set(TASK.prompts)) == len(TASK.prompts) == TASK.num_prompts
    train, held_out = TASK.split(0.2)
    assert not set(train) & set(held_out)
    assert len(train) + len(held_out) == TASK.num_prompts and len(held_out) == 400
    assert (train, held_out) == ChainTask().split(0.2)  # a fresh object: the same split
    assert ChainTask(seed=1).split(0.2) != (train, held_out)
    sizes = Counter(len(TASK.parse_prompt(p)) for p in TASK.prompts)
    assert set(sizes) == set(range(5, 10))  # every size in [min_items, max_items] ...
    assert max(sizes.values()) - min(sizes.values()) < 0.1 * TASK.num_prompts  # ... about equally
    # The answers (with the EOS) are 21 to 37 tokens long.
    assert TASK.max_answer_tokens == 36


def test_a_small_pool_can_hold_every_prompt():
    task = ChainTask(items=5, min_items=2, max_items=3, num_prompts=20)  # C(5,2) + C(5,3) = 20
    assert len(set(task.prompts)) == 20
    with pytest.raises(ValueError, match="num_prompts"):
        ChainTask(items=5, min_items=2, max_items=3, num_prompts=21)
    with pytest.raises(ValueError, match="max_items"):
        ChainTask(items=5, max_items=6)


@pytest.mark.parametrize("items", ["B", "ACD", "BDFH", "ABCEG"])
def test_every_order_is_correct_and_the_count_agrees(items):
    prompt = TASK.prompt(items)
    answers = {codes(order) for order in itertools.permutations(items)}
    assert len(answers) == TASK.count_answers(prompt) == math.factorial(len(items))
    assert all(TASK.check(prompt, a) is ChainVerdict.CORRECT for a in answers)
    # Brute force over every sequence of len(items) codewords, any items: exactly the orders.
    if len(items) <= 3:
        words = list(TASK.codewords.values())
        accepted = {
            "".join(seq)
            for seq in itertools.product(words, repeat=len(items))
            if TASK.is_correct(prompt, "".join(seq))
        }
        assert accepted == answers


def test_checker_names_the_first_error():
    a, c, d = (TASK.codewords[item] for item in "ACD")
    other = TASK.codewords["B"]
    typo = c[:3] + next(ch for ch in CODE_CHARS if ch != c[3])
    cases = {
        c + a + d: ChainVerdict.CORRECT,
        f"  {d}{c}{a}\n": ChainVerdict.CORRECT,  # surrounding whitespace
        "": ChainVerdict.MALFORMED,
        "  ": ChainVerdict.MALFORMED,
        c + " " + a + d: ChainVerdict.MALFORMED,  # a separator inside
        c + a + d + "!": ChainVerdict.MALFORMED,
        c + a + d[:2]: ChainVerdict.BAD_LENGTH,
        c + a + d + "x": ChainVerdict.BAD_LENGTH,
        a + typo + d: ChainVerdict.NOT_A_CODEWORD,
        a + c[1:] + c[0] + d: ChainVerdict.NOT_A_CODEWORD,  # starts with a code character
        (c + a + d).lower(): ChainVerdict.NOT_A_CODEWORD,
        a + other + d: ChainVerdict.NOT_IN_PROMPT,
        a + c + a: ChainVerdict.REPEATED,
        a + c + a + d: ChainVerdict.REPEATED,
        a + d: ChainVerdict.MISSING,
        typo + other: ChainVerdict.NOT_A_CODEWORD,  # the first error wins
        other + a + a: ChainVerdict.NOT_IN_PROMPT,
    }
    for answer, verdict in cases.items():
        assert TASK.check(PROMPT, answer) is verdict, answer
        assert TASK.is_correct(PROMPT, answer) == (verdict is ChainVerdict.CORRECT)
    assert TASK.check("not a prompt", c + a + d) is ChainVerdict.MALFORMED
    assert not TASK.is_correct("CAD:", c + a + d)  # an unsorted prompt is not this task's


def test_explain_says_where_and_what():
    a, c, d = (TASK.codewords[item] for item in "ACD")
    typo = c[:3] + next(ch for ch in CODE_CHARS if ch != c[3])
    assert TASK.explain(PROMPT, a + c + d) == "correct"
    message = TASK.explain(PROMPT, a + typo + d)
    assert "block 1" in message and repr(c) in message  # which block, and what C's code is
    assert "block 1" in TASK.explain(PROMPT, a + TASK.codewords["B"] + d)
    assert "item A again" in TASK.explain(PROMPT, a + a)
    assert TASK.explain(PROMPT, a + d).endswith("C")
    assert "block 2" in TASK.explain(PROMPT, a + c + d[:3])


def test_generator_answers_are_correct_and_uniform_over_orders():
    rng = random.Random(0)
    for prompt in TASK.prompts[:200]:
        assert TASK.is_correct(prompt, TASK.sample_answer_for(prompt, rng))
    orders = Counter(TASK.sample_answer("ACD", rng) for _ in range(3000))
    assert set(orders) == {codes(order) for order in itertools.permutations("ACD")}
    assert max(orders.values()) / min(orders.values()) < 1.3  # 500 each, give or take
    with pytest.raises(ValueError, match="prompt"):
        TASK.sample_answer_for("K>d:", rng)


@pytest.mark.parametrize("task", [GraphTask(), ChainTask()], ids=["graph", "chain"])
def test_both_tasks_offer_the_common_interface(task):
    train, held_out = task.split(0.2)
    rng = random.Random(1)
    for prompt in train[:20] + held_out[:20]:
        answer = task.sample_answer_for(prompt, rng)
        assert task.is_correct(prompt, answer) and task.count_answers(prompt) >= 1
        assert len(answer) <= task.max_answer_tokens
        assert set(prompt + answer) <= set(task.alphabet)
    assert task.kind in TASKS and TASKS[task.kind] is type(task)


def test_graph_count_answers_is_the_number_of_shortest_paths():
    task = GraphTask()
    for source, target in task.pairs[:20]:
        prompt = task.prompt(source, target)
        assert task.count_answers(prompt) == task.count_shortest_paths(source, target)


@pytest.mark.parametrize("kind", ["graph", "chain"])
def test_settings_round_trip_through_settings_json(tmp_path, kind):
    settings = dataclasses.replace(default_settings(kind), seed=7)
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(settings.as_dict()))
    loaded = load_settings(tmp_path)
    assert loaded == settings and loaded.task.kind == kind
    assert loaded.key() == settings.key()


def test_graph_settings_written_before_the_chain_task_still_load(tmp_path):
    raw = ToySettings().as_dict()
    del raw["task"]["kind"]  # what settings.json held before
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(raw))
    assert load_settings(tmp_path) == ToySettings()


def test_the_default_graph_key_is_unchanged_and_the_kinds_differ():
    assert ToySettings().key() == default_settings("graph").key() == GRAPH_DEFAULT_KEY
    assert default_settings("chain").key() != GRAPH_DEFAULT_KEY
    assert default_settings("chain").task == ChainTask()
    with pytest.raises(ValueError, match="toy task"):
        default_settings("maze")


def test_a_config_for_one_task_refuses_a_preparation_of_the_other(tmp_path):
    from types import SimpleNamespace

    from eopd_ray.toy.prepare import ToyTaskMismatch, ensure_toy_for_config

    prepared = tmp_path / "prepared" / "current"
    (prepared / "student").mkdir(parents=True)
    (prepared / "student" / "config.json").write_text("{}")
    (prepared / SETTINGS_FILE).write_text(json.dumps(ToySettings().as_dict()))  # a graph task
    model = SimpleNamespace(student_path=str(prepared / "student"), toy_task="graph")
    assert ensure_toy_for_config(SimpleNamespace(model=model)) == prepared.resolve()
    model.toy_task = "chain"
    with pytest.raises(ToyTaskMismatch, match=r"'chain'.*'graph'"):
        ensure_toy_for_config(SimpleNamespace(model=model))

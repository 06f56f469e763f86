"""RolloutWorker with the HF reference engine (in-process): batch layout, logprobs, versions."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from eopd_ray.config import config_from_dict
from eopd_ray.core.weight_checksum import weights_checksum
from eopd_ray.roles.rollout import RolloutWorker
from eopd_ray.roles.rollout_engines import Sampling, prompt_seeds


def test_generate_builds_a_prompt_major_batch_with_sampler_logprobs(tiny_pair):
    cfg = config_from_dict(
        {
            "model": {"student_path": str(tiny_pair[0]), "teacher_path": str(tiny_pair[1])},
            "data": {"toy_prompts": 8},
            "rollout": {"engine": "hf", "samples_per_prompt": 2, "max_new_tokens": 6},
        }
    )
    worker = RolloutWorker(cfg, rank=0)
    prompts = [[5, 6, 7], [8, 9]]
    batch = worker.generate(prompts, [11, 12], seeds=[0, 1])
    assert batch.num_sequences == 4 and batch.weight_version == 0
    assert batch.prompt_index.tolist() == [11, 11, 12, 12]
    assert batch.prompt_mask.sum(1).tolist() == [3, 3, 2, 2]
    assert batch.finish_reason == ("length",) * 4 and batch.response_mask.all()
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0]).eval()
    for row in range(4):
        prompt = prompts[row // 2]
        response = batch.response_ids[row].tolist()
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0], -1)
        expected = logp[len(prompt) - 1 : -1].gather(-1, torch.tensor(response)[:, None])[:, 0]
        torch.testing.assert_close(batch.sampler_logprobs[row], expected, atol=1e-5, rtol=0)
    again = worker.generate(prompts, [11, 12], seeds=[0, 1])
    assert torch.equal(again.response_ids, batch.response_ids)  # seeded


def test_loaded_weights_change_greedy_output_and_version(tiny_pair):
    cfg = config_from_dict(
        {
            "model": {"student_path": str(tiny_pair[0]), "teacher_path": str(tiny_pair[1])},
            "data": {"toy_prompts": 8},
            "rollout": {"engine": "hf"},
        }
    )
    worker = RolloutWorker(cfg, rank=0)
    greedy = Sampling(temperature=0.0, max_new_tokens=8)
    before = worker.generate([[5, 6, 7]], [0], [0], greedy).response_ids
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair[0])
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(-1.0)
    bucket = [("lm_head.weight", teacher.get_output_embeddings().weight.detach())]
    loaded, times = worker.load_weights([bucket], version=1)
    assert set(times) == {"load_s", "receive_s", "reload_s", "cache_reset_s", "checksum_s"}
    assert min(times.values()) >= 0 and times["receive_s"] == 0.0  # object store: an argument
    # The checksum read back is that of the full new weights; the version waits for the
    # driver's confirmation that it is what the learner sent (review finding 7).
    assert loaded == weights_checksum(teacher.parameters())
    assert worker.version == 0
    assert worker.confirm_weights(1, loaded ^ 1) == (0, loaded)  # not what was sent: stays
    worker.load_weights([bucket], version=1)
    assert worker.confirm_weights(1, loaded) == (1, loaded)
    after = worker.generate([[5, 6, 7]], [0], [0], greedy)
    assert after.weight_version == 1 and not torch.equal(after.response_ids, before)


def test_every_request_has_its_own_random_stream(tiny_pair):
    """Identical prompts in one call, and the samples of one prompt, are independent draws;
    the seeds of a prompt do not depend on what else is in the call."""
    cfg = config_from_dict(
        {
            "model": {"student_path": str(tiny_pair[0]), "teacher_path": str(tiny_pair[1])},
            "data": {"toy_prompts": 8},
            "rollout": {"engine": "hf", "samples_per_prompt": 2, "max_new_tokens": 8},
        }
    )
    worker = RolloutWorker(cfg, rank=0)
    seeds = prompt_seeds("0/3", range(4))
    assert len(set(seeds)) == 4
    batch = worker.generate([[5, 6, 7]] * 4, [0, 1, 2, 3], seeds)
    responses = {tuple(r) for r in batch.response_ids.tolist()}
    assert len(responses) == 8  # 4 identical prompts x 2 samples: 8 different responses
    alone = worker.generate([[5, 6, 7]], [2], seeds[2:3])  # prompt 2 without the others
    assert torch.equal(alone.response_ids, batch.response_ids[4:6])


def test_sampler_logprobs_are_those_of_the_tempered_distribution(tiny_pair):
    cfg = config_from_dict(
        {
            "model": {"student_path": str(tiny_pair[0]), "teacher_path": str(tiny_pair[1])},
            "data": {"toy_prompts": 8},
            "rollout": {"engine": "hf", "temperature": 0.7, "max_new_tokens": 6},
        }
    )
    batch = RolloutWorker(cfg, rank=0).generate([[5, 6, 7]], [0], [3])
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0]).eval()
    response = batch.response_ids[0].tolist()
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, *response]])).logits[0, 2:-1].double()
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(response)[:, None])
    torch.testing.assert_close(
        batch.sampler_logprobs[0].double(), expected[:, 0], atol=1e-5, rtol=0
    )


def test_generate_stream_hands_out_groups_that_add_up_to_generate(tiny_pair):
    cfg = config_from_dict(
        {
            "model": {"student_path": str(tiny_pair[0]), "teacher_path": str(tiny_pair[1])},
            "data": {"toy_prompts": 8},
            "rollout": {"engine": "hf", "samples_per_prompt": 2, "max_new_tokens": 6},
        }
    )
    worker = RolloutWorker(cfg, rank=0)
    prompts, index, seeds = [[5, 6, 7], [8, 9], [10]], [11, 12, 13], [0, 1, 2]
    whole = worker.generate(prompts, index, seeds)
    groups = list(worker.generate_stream(prompts, index, seeds, group_tokens=10))
    # >= 10 response tokens per group (6 per response: two responses each), the rest at the end.
    assert [len(rows) for rows, *_ in groups] == [2, 2, 2]
    for rows, batch, started, at in groups:
        assert started <= at
        assert torch.equal(batch.response_ids, whole.response_ids[rows])
        assert torch.equal(batch.sampler_logprobs, whole.sampler_logprobs[rows])
        assert batch.prompt_index.tolist() == whole.prompt_index[rows].tolist()
    assert sorted(r for rows, *_ in groups for r in rows) == list(range(6))
    # Only some rows (a redo after the worker was lost): the same samples as in the whole.
    ((rows, batch, *_),) = worker.generate_stream(
        prompts, index, seeds, rows=[5, 0], group_tokens=99
    )
    assert rows == [5, 0]
    assert torch.equal(batch.response_ids, whole.response_ids[[5, 0]])

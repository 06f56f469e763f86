"""The fused LM head + log-softmax + gather (eopd_ray/core/fused_head.py): against a float64 brute
force, and against today's path (head -> (N, V) logits -> loss) for every loss variant, tied and
untied heads, padded and packed ragged rows: loss, every metric and the gradients with respect to
the hidden states and the head weight within 1e-6 relative in fp32."""

from __future__ import annotations

import pytest
import torch

from eopd_ray.core.fused_head import FusedLMHead, fused_head_logprobs, install_fused_head
from eopd_ray.core.loss import LOSSES, LossInputs, loss_hyperparameters
from eopd_ray.core.student_logprobs import StudentAtIds, loss_ids

TEMPERATURE = 0.7
REL = 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_a_float64_brute_force(seed, with_bias):
    g = torch.Generator().manual_seed(seed)
    n, h, v, j = 23, 12, 40, 5
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = (
        torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    )
    ids = torch.randint(0, v, (n, j), generator=g)
    upstream = torch.randn(n, j, generator=g, dtype=torch.float64)

    logits = hidden @ weight.T + (0 if bias is None else bias)
    logp = torch.log_softmax(logits / TEMPERATURE, -1)
    want, want_entropy = logp.gather(-1, ids), -(logp.exp() * logp).sum(-1)
    want_grads = torch.autograd.grad(
        (want * upstream).sum(), [hidden, weight, *([bias] * with_bias)]
    )

    got, entropy = fused_head_logprobs(hidden, weight, bias, ids, TEMPERATURE, chunk=6)
    grads = torch.autograd.grad((got * upstream).sum(), [hidden, weight, *([bias] * with_bias)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, want_entropy, rtol=0, atol=1e-12)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def _inputs(b: int, t: int, v: int, k: int, seed: int):
    """Ragged rows (1..t valid tokens), teacher scores with entropies on both sides of tau."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    teacher = torch.log_softmax(torch.randn(b, t, v, generator=g) * 2, -1)
    top = teacher.topk(k, -1)
    return {
        "response_ids": torch.randint(0, v, (b, t), generator=g) * mask,
        "response_mask": mask,
        "old_logprobs": -torch.rand(b, t, generator=g) * 4 * mask,
        "teacher_logprobs": -torch.rand(b, t, generator=g) * 4 * mask,
        "teacher_entropy": (torch.rand(b, t, generator=g) * 1.6) * mask,
        "teacher_topk_ids": top.indices * mask[..., None],
        "teacher_topk_logprobs": top.values * mask[..., None],
    }


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.fixture(scope="module")
def heads(tiny_pair, tmp_path_factory):
    """{"untied": Llama student head, "tied": a Qwen3 head shared with its embedding}."""
    from transformers import AutoModelForCausalLM

    from eopd_ray.toy.models import TinyModelSpec, build_causal_lm, build_tokenizer

    root = tmp_path_factory.mktemp("fused_heads")
    spec = TinyModelSpec(arch="qwen3", hidden_size=64, num_heads=2, tie_word_embeddings=True)
    tied = build_causal_lm(root / "tied", build_tokenizer(root / "tok"), spec, seed=3)
    out = {}
    for name, path in (("untied", tiny_pair[0]), ("tied", tied)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        out[name] = model
    assert out["tied"].lm_head.weight is out["tied"].model.embed_tokens.weight
    return out


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("head", ["untied", "tied"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_variant_equals_the_logits_path(heads, name, head, packed):
    model = heads[head]
    linear = model.get_output_embeddings()
    weight = linear.weight
    v, width = weight.shape
    b, t, k = 5, 9, 4
    x = _inputs(b, t, v, k, seed=len(name) + 7 * packed)
    mask = x["response_mask"]
    g = torch.Generator().manual_seed(11)
    hidden0 = torch.randn(b, t, width, generator=g)
    if packed:  # what the learner does under a token budget: only the valid positions, (1, N)
        x = {key: value[mask][None] for key, value in x.items()}
        hidden0 = hidden0[mask][None]
    fn = LOSSES[name]
    kwargs = loss_hyperparameters(
        fn,
        clip_eps=0.2,
        entropy_threshold=0.8,
        fkl_coef=0.5,
        jsd_beta=0.3,
        chunk_positions=4,
        num_valid_tokens=int(mask.sum()) + 3,  # a global count, larger than this shard's
    )

    def run(fused: bool):
        hidden = hidden0.clone().requires_grad_(True)
        weight.grad = None
        if name == "eopd_random":
            kwargs["generator"] = torch.Generator().manual_seed(5)
        if fused:
            ids = loss_ids(x["response_ids"], x["teacher_topk_ids"])
            student = StudentAtIds(
                *fused_head_logprobs(hidden, weight, None, ids, TEMPERATURE, chunk=3)
            )
        else:
            student = linear(hidden) / TEMPERATURE
        out = fn(LossInputs(student_logits=student, **x), **kwargs)
        out.loss.backward()
        return out, hidden.grad.clone(), weight.grad.clone()

    want, want_dh, want_dw = run(fused=False)
    got, dh, dw = run(fused=True)
    assert abs(got.loss.item() - want.loss.item()) <= REL * abs(want.loss.item())
    assert got.metrics.keys() == want.metrics.keys()
    for key, value in want.metrics.items():
        assert abs(got.metrics[key] - value) <= REL * max(abs(value), 1e-3), key
    assert torch.equal(got.gate, want.gate)
    assert _relative(dh, want_dh) <= REL
    assert _relative(dw, want_dw) <= REL


def test_the_fused_head_module_keeps_parameters_names_and_plain_calls(heads):
    model = heads["tied"]
    before = dict(model.named_parameters())
    hidden = torch.randn(3, model.config.hidden_size)
    logits = model.get_output_embeddings()(hidden)
    assert install_fused_head(model)
    head = model.get_output_embeddings()
    assert isinstance(head, FusedLMHead) and head.weight is model.model.embed_tokens.weight
    assert dict(model.named_parameters()).keys() == before.keys()
    torch.testing.assert_close(head(hidden), logits, rtol=0, atol=0)
    assert not install_fused_head(model)  # already fused: not an nn.Linear any more


def test_a_bf16_head_makes_the_bf16_logits_of_the_plain_head(heads):
    """With bf16 weights the fused head rounds its logits to bf16 as the plain head does, and as
    the sampler's engine does: fp32 logits would move the learner's log-probs ~0.03 nats per
    token away from the sampler's (the bf16 rehearsal's opd/sampler_gap)."""
    linear = heads["untied"].get_output_embeddings()
    weight = linear.weight.detach().bfloat16()
    v, width = weight.shape
    g = torch.Generator().manual_seed(2)
    hidden = (torch.randn(2, 6, width, generator=g) * 3).bfloat16()
    ids = torch.randint(0, v, (2, 6, 5), generator=g)
    plain = torch.log_softmax((hidden @ weight.T).float() / TEMPERATURE, -1).gather(-1, ids)
    fused, _ = fused_head_logprobs(hidden, weight, None, ids, TEMPERATURE, chunk=4)
    exact = torch.log_softmax((hidden.double() @ weight.double().T) / TEMPERATURE, -1)
    assert (fused - plain).abs().max() < 1e-5  # the same bf16 logits
    assert (fused.double() - exact.gather(-1, ids)).abs().max() > 1e-3  # not the fp32 ones


def test_a_bf16_head_divides_by_the_temperature_in_fp32_as_the_sampler_does(heads):
    """The engine upcasts its bf16 logits to fp32 and then divides by the temperature (vLLM's
    sampler); the fused head must score that distribution (a float64 brute force from the same
    bf16 logits), forward and through the backward's recomputed softmax, not z / T rounded to
    bf16 (issue 31, finding 8)."""
    linear = heads["untied"].get_output_embeddings()
    weight = linear.weight.detach().bfloat16()
    v, width = weight.shape
    g = torch.Generator().manual_seed(4)
    hidden = (torch.randn(3, 7, width, generator=g) * 3).bfloat16()
    ids = torch.randint(0, v, (3, 7, 5), generator=g)
    logits = torch.nn.functional.linear(hidden, weight)  # (B, T, V) bf16, the engine's logits
    exact = torch.log_softmax(logits.double() / TEMPERATURE, -1)  # (B, T, V)
    want, want_entropy = exact.gather(-1, ids), -(exact.exp() * exact).sum(-1)
    upstream = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    # d/dh of sum(upstream * logp[ids]), the bf16 rounding taken as the identity (as autograd
    # through the plain bf16 head does): (scatter(upstream) - softmax * sum(upstream)) @ W / T.
    gz = (-exact.exp() * upstream.sum(-1, keepdim=True)).scatter_add(-1, ids, upstream)
    want_dh = gz @ weight.double() / TEMPERATURE  # (B, T, H)
    h = hidden.clone().requires_grad_(True)
    got, entropy = fused_head_logprobs(h, weight, None, ids, TEMPERATURE, chunk=4)
    (got.double() * upstream).sum().backward()
    assert (got.double() - want).abs().max() < 1e-5
    assert (entropy.double() - want_entropy).abs().max() < 1e-5
    # The old order (z / T in bf16) is off by far more than the bound: the test can fail.
    bf16_divide = torch.log_softmax((logits / TEMPERATURE).double(), -1).gather(-1, ids)
    assert (bf16_divide - want).abs().max() > 1e-3
    # The gradient comes back in the hidden states' dtype: within bf16's rounding (2^-9 relative).
    assert ((h.grad.double() - want_dh).abs() <= want_dh.abs() * 2**-8 + 1e-12).all()

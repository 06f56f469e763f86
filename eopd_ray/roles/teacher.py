"""TeacherWorker: scores every response position of a RolloutBatch with the frozen teacher.

For each position t it returns the teacher's logprob of the sampled token, its entropy over the
FULL vocabulary (exact, in nats), and its top-K ids and raw logprobs, all of the distribution
softmax(logits / rollout.temperature) (method.md: teacher logits divided by the rollout
temperature). The engine is a batched transformers forward: the response positions' hidden
states go through the LM head `teacher.chunk_positions` at a time with fp32 logits (an fp32
copy of the head on CPU; on CUDA the bf16 head in a GEMM that accumulates and writes fp32:
forward.scoring_lm_head) and each (chunk, V) block is reduced at once in fp32, so no
(B, T, V) tensor is ever kept and only K * 8 + 8 bytes per token leave the worker.

The teacher's context is its own rendering of the prompt (`data.teacher_template`, e.g. a chat
template) followed by the student's response tokens, with the student's EOS mapped to the
teacher's (`teacher.student_eos_token_id` -> `teacher.teacher_eos_token_id`). The student's one
end token stands for both of the teacher's end tokens: the two are scored as one token under the
student's id (log-probs merged with logsumexp, in the top-K and at the sampled token), so an id
never appears twice in a top-K. The entropy stays that of the teacher's own vocabulary.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from eopd_ray.config import Config
from eopd_ray.core.forward import pack, rows_of, score_response_tokens, scoring_lm_head
from eopd_ray.core.micro_batches import budget_micro_batches, count_micro_batches
from eopd_ray.core.prompts import render_prompt
from eopd_ray.core.wire import RolloutBatch, TeacherScores
from eopd_ray.errors import EopdError
from eopd_ray.startup_heap import built_with_collector_paused
from eopd_ray.storage.sources import with_local_models
from eopd_ray.telemetry.ray_gauges import WorkerMetrics


class VocabularyMismatch(EopdError):
    """Student and teacher tokenizers differ: token-level distillation would compare wrong ids."""


def check_shared_vocabulary(student_tok, teacher_tok, cfg: Config) -> None:
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab == t_vocab:
        return
    differing = sorted(set(s_vocab.items()) ^ set(t_vocab.items()))[:5]
    raise VocabularyMismatch(
        f"student ({cfg.model.student_path}, {len(s_vocab)} tokens) and teacher "
        f"({cfg.model.teacher_path}, {len(t_vocab)} tokens) tokenizers differ, e.g. {differing}; "
        "token-level distillation needs one shared vocabulary: pick a teacher of the student's "
        "model family (model.teacher_path)"
    )


def check_model_pair(cfg: Config) -> None:
    """Start-up checks, run by the driver before any worker starts: both model directories
    exist, the tokenizers share one vocabulary, each embedding table covers its tokenizer, and a
    chat template exists wherever a chat prompt template is configured."""
    from transformers import AutoConfig, AutoTokenizer

    m, remote = cfg.model, cfg.model.trust_remote_code
    tokenizers = {}
    for key, path, template in (
        ("model.student_path", m.student_path, cfg.data.student_template),
        ("model.teacher_path", m.teacher_path, cfg.data.teacher_template),
    ):
        if not (Path(path) / "config.json").is_file():
            raise EopdError(
                f"{key} = {path!r} is not a Hugging Face model directory (no "
                "config.json); point it at a local copy of the checkpoint"
            )
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
            rows = AutoConfig.from_pretrained(path, trust_remote_code=remote).vocab_size
        except Exception as exc:  # transformers raises many types for a broken directory
            raise EopdError(
                f"{key} = {path!r}: cannot load the model's config or tokenizer "
                f"({type(exc).__name__}: {exc}); is the directory complete?"
            ) from None
        if cfg.teacher.top_k > rows:
            raise EopdError(
                f"teacher.top_k = {cfg.teacher.top_k} exceeds the vocabulary of "
                f"{key} ({rows} rows); lower teacher.top_k"
            )
        if rows < len(tok):
            raise EopdError(
                f"{key}: the embedding has {rows} rows but the tokenizer has "
                f"{len(tok)} tokens; the checkpoint and its tokenizer do not match"
            )
        if template != "raw" and not tok.chat_template:
            raise EopdError(
                f"{key}: the tokenizer has no chat template, but data."
                f"{'student' if 'student' in key else 'teacher'}_template = "
                f"{template!r}; use 'raw' or a chat model"
            )
        tokenizers[key] = tok
    check_shared_vocabulary(tokenizers["model.student_path"], tokenizers["model.teacher_path"], cfg)


def teacher_responses(batch: RolloutBatch, cfg: Config) -> list[list[int]]:
    """The batch's responses as the teacher reads them: the student's EOS
    (`teacher.student_eos_token_id`) mapped to the teacher's (`teacher.teacher_eos_token_id`)."""
    responses = rows_of(batch.response_ids, batch.response_mask)
    src, dst = cfg.teacher.student_eos_token_id, cfg.teacher.teacher_eos_token_id
    if src is None:
        return responses
    return [[dst if tok == src else tok for tok in r] for r in responses]


def merged_ids_of(cfg: Config) -> tuple[int, int] | None:
    """(student EOS, teacher EOS) when the two differ: scored as one token under the student's."""
    src, dst = cfg.teacher.student_eos_token_id, cfg.teacher.teacher_eos_token_id
    return None if src is None or src == dst else (src, dst)


class TeacherWorker:
    """Holds the frozen teacher; `score(batch)` returns TeacherScores (one Ray actor each)."""

    @built_with_collector_paused  # less CPU to start (eopd_ray.startup_heap)
    def __init__(self, cfg: Config, rank: int) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        cfg = with_local_models(cfg)  # hub ids and URIs: downloaded once per node
        self.cfg, self.rank = cfg, rank
        remote = cfg.model.trust_remote_code
        self.student_tokenizer = AutoTokenizer.from_pretrained(
            cfg.model.student_path, trust_remote_code=remote
        )
        self.tokenizer = AutoTokenizer.from_pretrained(
            cfg.model.teacher_path, trust_remote_code=remote
        )
        check_shared_vocabulary(self.student_tokenizer, self.tokenizer, cfg)
        self.model = AutoModelForCausalLM.from_pretrained(
            cfg.model.teacher_path, dtype=getattr(torch, cfg.model.dtype), trust_remote_code=remote
        ).eval()
        # Embedding tables are often padded past the tokenizer (Qwen: 151936 vs 152064 rows);
        # score over the student's rows so every top-K id is one the student can produce.
        student_rows = AutoConfig.from_pretrained(
            cfg.model.student_path, trust_remote_code=remote
        ).vocab_size
        self.vocab_rows = min(student_rows, self.model.config.vocab_size)
        t_cfg = cfg.teacher
        src, dst = t_cfg.student_eos_token_id, t_cfg.teacher_eos_token_id
        self.merged_ids = merged_ids_of(cfg)
        usable = self.vocab_rows - (self.merged_ids is not None)  # a merged id leaves the top-K
        if t_cfg.top_k > usable:
            raise EopdError(
                f"teacher.top_k = {t_cfg.top_k} exceeds the {usable} ids the teacher can rank; "
                "lower teacher.top_k"
            )
        for key, token in (("student", src), ("teacher", dst)):
            if token is not None and token >= self.vocab_rows:
                raise EopdError(
                    f"teacher.{key}_eos_token_id = {token} is outside the shared vocabulary "
                    f"({self.vocab_rows} ids); check the EOS ids of model.student_path and "
                    "model.teacher_path"
                )
        self.device = torch.device("cuda" if t_cfg.gpus_per_worker > 0 else "cpu")
        self.metrics = WorkerMetrics("teacher", rank, cfg.run.id)
        self.model.to(self.device)
        # The head as it scores (forward.scoring_lm_head), made once: the teacher never changes.
        self.lm_head = scoring_lm_head(self.model, self.vocab_rows)

    def _teacher_prompts(self, batch: RolloutBatch) -> list[list[int]]:
        prompts = rows_of(batch.prompt_ids, batch.prompt_mask)
        d = self.cfg.data
        if d.teacher_template == d.student_template:
            return prompts
        # The student's prompt is raw text (config rule): re-render it with the teacher template.
        texts = self.student_tokenizer.batch_decode(prompts)
        return [render_prompt(t, d.teacher_template, self.tokenizer) for t in texts]

    def _teacher_responses(self, batch: RolloutBatch) -> list[list[int]]:
        return teacher_responses(batch, self.cfg)

    @property
    def _budgeted(self) -> bool:
        return self.cfg.teacher.max_tokens_per_micro_batch is not None

    def _micro_batches(
        self, prompts: list[list[int]], responses: list[list[int]]
    ) -> list[list[int]]:
        """Rows of each forward: `teacher.max_tokens_per_micro_batch` tokens (padded, sorted by
        length) when set, else `teacher.micro_batch_size` rows in order."""
        t_cfg = self.cfg.teacher
        rows = range(len(prompts))
        if not self._budgeted:
            return count_micro_batches(rows, t_cfg.micro_batch_size)
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
        return budget_micro_batches(rows, lengths, t_cfg.max_tokens_per_micro_batch)

    @torch.no_grad()
    def score(self, batch: RolloutBatch) -> TeacherScores:
        started = time.perf_counter()
        scores = self.score_rows(
            self._teacher_prompts(batch),
            self._teacher_responses(batch),
            batch.response_mask,
            temperature=self.cfg.rollout.temperature,
            merged_ids=self.merged_ids,
        )
        self.metrics.throughput("teacher", batch.num_response_tokens, started)
        return scores

    @torch.no_grad()
    def score_rows(
        self,
        prompts: list[list[int]],
        responses: list[list[int]],
        response_mask: torch.Tensor,
        temperature: float,
        merged_ids: tuple[int, int] | None,
    ) -> TeacherScores:
        """Scores of teacher-side rows: `prompts` rendered with the teacher's template,
        `responses` with the student's EOS already mapped, `response_mask` (B, T) bool right-padded
        with row b's first len(responses[b]) positions True. What `score` runs, and what the
        served teacher (eopd_ray.serving) runs on the rows its requests carry."""
        t_cfg = self.cfg.teacher
        b, t = response_mask.shape
        k = t_cfg.top_k
        token_logprobs = torch.zeros(b, t)
        entropy = torch.zeros(b, t)
        topk_ids = torch.zeros(b, t, k, dtype=torch.int32)
        topk_logprobs = torch.zeros(b, t, k)
        for rows in self._micro_batches(prompts, responses):
            # Under a token budget each forward is cut to its own longest response.
            width = max(len(responses[r]) for r in rows) if self._budgeted else t
            # Under a token budget only the real response positions reach the LM head.
            valid = response_mask[rows, : max(1, width)] if self._budgeted else None
            input_ids, attention, positions = pack(
                [prompts[r] for r in rows], [responses[r] for r in rows], max(1, width)
            )
            scored = score_response_tokens(
                self.model,
                input_ids.to(self.device),
                attention.to(self.device),
                positions.to(self.device),
                top_k=k,
                chunk_positions=t_cfg.chunk_positions,
                vocab_rows=self.vocab_rows,
                temperature=temperature,
                lm_head=self.lm_head,
                merged_ids=merged_ids,
                valid=valid.to(self.device) if valid is not None else None,
            )
            index = torch.tensor(rows)
            w = positions.shape[1]
            for out, value in zip(
                (token_logprobs, entropy, topk_ids, topk_logprobs), scored, strict=True
            ):
                if valid is None:
                    out[index, :w] = value.cpu()
                else:  # packed (1, N, ...): back to the rows' valid positions
                    block = out[index, :w]
                    block[valid] = value[0].cpu()
                    out[index, :w] = block
        mask = response_mask
        return TeacherScores(  # padding is 0 (torch.where: a non-finite value there stays out)
            token_logprobs=torch.where(mask, token_logprobs, 0.0),
            entropy=torch.where(mask, entropy, 0.0),
            topk_ids=torch.where(mask[..., None], topk_ids, 0),
            topk_logprobs=torch.where(mask[..., None], topk_logprobs, 0.0),
        )

"""The served teacher's request, answer and identity, and what makes a request well-formed.

A request holds B rows. Each row is either a teacher-side context and the span of it to score
(`context_ids`, `response_starts`: the client rendered the prompt with the teacher's template and
mapped the student's EOS), or a prompt text with a template name and the response ids (the
teacher renders the text with its own tokenizer). The answer holds, for every response position
of every row, what `TeacherWorker.score` computes: the log-prob of the token, the exact entropy
over the full vocabulary, the top-K ids and raw log-probs, all of softmax(logits / temperature).

Shape legend: B rows, N tokens of all rows packed end to end, K the served top-K. Rows travel
packed (values + offsets, no padding): row b is values[offsets[b]:offsets[b + 1]].

The encodings on the wire (binary safetensors and JSON) are eopd_ray.serving.codec; Ray handles
(the way in for jobs on the cluster) carry these dataclasses themselves.

Nothing a client sends names a file or a model to load: the request has no such field, the
templates are names of the teacher tokenizer's own templates, and a `model` field, when given,
must equal the served model's pin or the request is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from eopd_ray.core.wire import TeacherScores
from eopd_ray.errors import EopdError

FORMAT = "eopd-teacher/1"  # in every identity and binary body (codec.py): one version of all this
TEMPLATES = ("raw", "chat", "chat_no_think")
# What the numbers mean: the driver refuses a served teacher whose semantics differ from its own.
TEMPERATURE_SEMANTICS = "log_softmax(logits[:vocab_rows] / temperature), fp32; raw top-K log-probs"


class RequestError(EopdError):
    """A request the teacher refuses: `field` names what is wrong, `status` the HTTP status
    (400 malformed, 401 no or wrong token, 413 over a limit, 415 unknown content type)."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status

    def __reduce__(self):
        return (type(self), (self.field, self.message, self.status))


def row_offsets(lengths: list[int]) -> np.ndarray:
    """(B + 1,) int64 offsets of B packed rows of these lengths."""
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


def unpack_rows(values: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    """Packed values as one list per row."""
    return [values[a:b].tolist() for a, b in itertools.pairwise(offsets)]


@dataclass(frozen=True, eq=False)
class ScoreRequest:
    """B rows to score, in one of two forms (the other form's fields stay None)."""

    context_ids: np.ndarray | None = None  # (N,) int32, each row's prompt + response, packed
    context_offsets: np.ndarray | None = None  # (B + 1,) int64
    response_starts: np.ndarray | None = None  # (B,) int64, where each row's response begins
    prompt_texts: tuple[str, ...] | None = None  # (B,) or: prompt texts the teacher renders ...
    template: str | None = None  # ... with this template (TEMPLATES)
    response_ids: np.ndarray | None = None  # (N,) int32, with prompt_texts, packed
    response_offsets: np.ndarray | None = None  # (B + 1,) int64
    temperature: float = 1.0  # logits are divided by it (the student sampler's temperature)
    merged_ids: tuple[int, int] | None = None  # (keep, drop): scored as one token `keep`
    model: str | None = None  # when given: must be the served model (a guard, never a choice)

    @classmethod
    def from_rows(
        cls,
        prompts: list[list[int]],
        responses: list[list[int]],
        temperature: float = 1.0,
        merged_ids: tuple[int, int] | None = None,
        model: str | None = None,
    ) -> ScoreRequest:
        """Teacher-side prompts and responses as a context-and-span request."""
        contexts = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
        return cls(
            context_ids=np.array([t for c in contexts for t in c], dtype=np.int32),
            context_offsets=row_offsets([len(c) for c in contexts]),
            response_starts=np.array([len(p) for p in prompts], dtype=np.int64),
            temperature=float(temperature),
            merged_ids=merged_ids,
            model=model,
        )

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        template: str,
        responses: list[list[int]],
        temperature: float = 1.0,
        merged_ids: tuple[int, int] | None = None,
        model: str | None = None,
    ) -> ScoreRequest:
        return cls(
            prompt_texts=tuple(texts),
            template=template,
            response_ids=np.array([t for r in responses for t in r], dtype=np.int32),
            response_offsets=row_offsets([len(r) for r in responses]),
            temperature=float(temperature),
            merged_ids=merged_ids,
            model=model,
        )

    @property
    def by_text(self) -> bool:
        return self.prompt_texts is not None

    @property
    def num_rows(self) -> int:
        offsets = self.response_offsets if self.by_text else self.context_offsets
        return 0 if offsets is None else len(offsets) - 1

    def rows(self) -> tuple[list[list[int]], list[list[int]]]:
        """(prompts, responses) of the id form, checked by `check_shape` first."""
        contexts = unpack_rows(self.context_ids, self.context_offsets)
        starts = self.response_starts.tolist()
        return [c[:s] for c, s in zip(contexts, starts, strict=True)], [
            c[s:] for c, s in zip(contexts, starts, strict=True)
        ]

    def responses(self) -> list[list[int]]:
        return unpack_rows(self.response_ids, self.response_offsets)

    def check_shape(self) -> None:
        """Raise RequestError naming the first malformed field (no model needed for this)."""
        if self.by_text == (self.context_ids is not None):
            raise RequestError(
                "context_ids",
                "give either context_ids + context_offsets + response_starts, or prompt_texts "
                "+ template + response_ids + response_offsets",
            )
        other = (
            ("context_ids", "context_offsets", "response_starts")
            if self.by_text
            else ("template", "response_ids", "response_offsets")
        )
        stray = [name for name in other if getattr(self, name) is not None]
        if stray:
            raise RequestError(stray[0], "belongs to the other form of request; send one form")
        if not (isinstance(self.temperature, float) and 0 < self.temperature < math.inf):
            raise RequestError("temperature", f"must be a number > 0, got {self.temperature!r}")
        if self.merged_ids is not None and (
            len(self.merged_ids) != 2 or self.merged_ids[0] == self.merged_ids[1]
        ):
            raise RequestError("merged_ids", f"must be two different ids, got {self.merged_ids}")
        if self.by_text:
            self._check_text_form()
        else:
            self._check_id_form()

    def _check_id_form(self) -> None:
        ids, offsets = _ints("context_ids", self.context_ids), self.context_offsets
        _check_offsets("context_offsets", offsets, len(ids))
        starts = _ints("response_starts", self.response_starts, length=len(offsets) - 1)
        lengths = np.diff(offsets)
        bad = np.flatnonzero((starts < 1) | (starts > lengths))
        if bad.size:
            b = int(bad[0])
            raise RequestError(
                "response_starts",
                f"row {b}: {int(starts[b])} is outside 1..{int(lengths[b])} (the row's context "
                "length); a response needs at least one prompt token before it",
            )

    def _check_text_form(self) -> None:
        if self.template not in TEMPLATES:
            raise RequestError("template", f"must be one of {TEMPLATES}, got {self.template!r}")
        if not all(isinstance(t, str) for t in self.prompt_texts):
            raise RequestError("prompt_texts", "must be a list of strings")
        ids = _ints("response_ids", self.response_ids)
        _check_offsets("response_offsets", self.response_offsets, len(ids))
        if len(self.response_offsets) - 1 != len(self.prompt_texts):
            raise RequestError(
                "response_offsets",
                f"describes {len(self.response_offsets) - 1} rows, prompt_texts has "
                f"{len(self.prompt_texts)}",
            )


def _ints(name: str, values: Any, length: int | None = None) -> np.ndarray:
    if not isinstance(values, np.ndarray) or values.ndim != 1 or values.dtype.kind not in "iu":
        raise RequestError(name, "must be a 1-D array of integers")
    if length is not None and len(values) != length:
        raise RequestError(name, f"must have {length} entries, got {len(values)}")
    if (values < 0).any():
        raise RequestError(name, f"negative value {int(values.min())}")
    return values


def _check_offsets(name: str, offsets: Any, num_values: int) -> None:
    offsets = _ints(name, offsets)
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != num_values:
        raise RequestError(name, f"must run from 0 to {num_values} with at least one row")
    if (np.diff(offsets) < 0).any():
        raise RequestError(name, "must not decrease")


@dataclass(frozen=True, eq=False)
class ScoreAnswer:
    """The teacher's view of every response position of every row, packed."""

    model: str  # the served model's pin (hub commit, URI listing or GGUF sha256, or a path)
    temperature: float
    offsets: np.ndarray  # (B + 1,) int64: row b's positions are [offsets[b], offsets[b + 1])
    token_logprobs: np.ndarray  # (N,) float32, log pi_te(y_t | c_t)
    entropy: np.ndarray  # (N,) float32, full-vocabulary entropy in nats
    topk_ids: np.ndarray  # (N, K) int32
    topk_logprobs: np.ndarray  # (N, K) float32, raw full-vocabulary log-probs, descending
    entropy_is_exact: bool = True

    @classmethod
    def from_scores(
        cls, scores: TeacherScores, lengths: list[int], model: str, temperature: float
    ) -> ScoreAnswer:
        """The first lengths[b] positions of each row of padded `scores`, packed."""
        mask = torch.arange(scores.entropy.shape[1])[None] < torch.tensor(lengths)[:, None]
        return cls(
            model=model,
            temperature=temperature,
            offsets=row_offsets(lengths),
            token_logprobs=scores.token_logprobs[mask].numpy(),
            entropy=scores.entropy[mask].numpy(),
            topk_ids=scores.topk_ids[mask].numpy(),
            topk_logprobs=scores.topk_logprobs[mask].numpy(),
            entropy_is_exact=scores.entropy_is_exact,
        )

    @property
    def lengths(self) -> list[int]:
        return np.diff(self.offsets).tolist()

    def to_scores(self, num_positions: int | None = None, top_k: int | None = None):
        """Padded TeacherScores (B, T, K) with T = `num_positions` (default: the longest row)
        and the first `top_k` of the served top-K (it is sorted descending)."""
        lengths = self.lengths
        t = max(lengths, default=0) if num_positions is None else num_positions
        k = self.topk_ids.shape[1] if top_k is None else top_k
        mask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]  # (B, T)
        b = len(lengths)

        def padded(values: np.ndarray, *tail: int) -> torch.Tensor:
            out = torch.zeros(b, t, *tail, dtype=torch.from_numpy(values[:0]).dtype)
            out[mask] = torch.from_numpy(np.ascontiguousarray(values))
            return out

        return TeacherScores(
            token_logprobs=padded(self.token_logprobs),
            entropy=padded(self.entropy),
            topk_ids=padded(self.topk_ids[:, :k], k),
            topk_logprobs=padded(self.topk_logprobs[:, :k], k),
            entropy_is_exact=self.entropy_is_exact,
        )

    @classmethod
    def concat(cls, parts: list[ScoreAnswer]) -> ScoreAnswer:
        lengths = [n for p in parts for n in p.lengths]
        return dataclasses.replace(
            parts[0],
            offsets=row_offsets(lengths),
            **{
                f: np.concatenate([getattr(p, f) for p in parts])
                for f in ("token_logprobs", "entropy", "topk_ids", "topk_logprobs")
            },
            entropy_is_exact=all(p.entropy_is_exact for p in parts),
        )


@dataclass(frozen=True)
class TeacherIdentity:
    """What a served teacher is: every answer's `model`, and what the driver checks at start-up
    against its own configuration (eopd_ray.serving.adapter.check_served_teacher)."""

    model: str  # pinned spec of model.teacher_path
    vocab_rows: int  # ids scored over: min(the two models' embedding rows)
    vocab_digest: str  # sha256 of the teacher tokenizer's vocabulary (vocab_digest())
    top_k: int
    dtype: str
    default_temperature: float  # of the served config's rollout.temperature (not applied)
    max_request_tokens: int  # a request over it is refused (413); clients split
    max_positions: int  # the longest row the model takes
    temperature_semantics: str = TEMPERATURE_SEMANTICS
    entropy_is_exact: bool = True
    format: str = FORMAT

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TeacherIdentity:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def vocab_digest(tokenizer: Any) -> str:
    """A tokenizer's vocabulary, as one hash: equal digests, one shared vocabulary."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()

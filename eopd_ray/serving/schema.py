"""The served teacher's request, answer and identity, and their encodings on the wire.

A request holds B rows. Each row is either a teacher-side context and the span of it to score
(`context_ids`, `response_starts`: the client rendered the prompt with the teacher's template and
mapped the student's EOS), or a prompt text with a template name and the response ids (the
teacher renders the text with its own tokenizer). The answer holds, for every response position
of every row, what `TeacherWorker.score` computes: the log-prob of the token, the exact entropy
over the full vocabulary, the top-K ids and raw log-probs, all of softmax(logits / temperature).

Shape legend: B rows, N tokens of all rows packed end to end, K the served top-K. Rows travel
packed (values + offsets, no padding): row b is values[offsets[b]:offsets[b + 1]].

Two encodings over HTTP (docs/running.md, "Sharing one teacher between jobs"):
- binary, `Content-Type: application/x-eopd-teacher`: a safetensors file (an 8-byte header
  length, a JSON header, raw little-endian arrays; readable from any language) whose metadata
  holds the scalar fields;
- JSON: one list per row. At the bench shapes the binary answer is ~3x smaller (jobs/bench/
  served_teacher.py measures it): floats as decimal text cost 9-20 bytes instead of 4.
Ray handles (the way in for jobs on the cluster) carry the dataclasses themselves.

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
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from eopd_ray.core.wire import TeacherScores
from eopd_ray.errors import EopdError

FORMAT = "eopd-teacher/1"
BINARY_TYPE = "application/x-eopd-teacher"
JSON_TYPE = "application/json"
TEMPLATES = ("raw", "chat", "chat_no_think")
# What the numbers mean: the driver refuses a served teacher whose semantics differ from its own.
TEMPERATURE_SEMANTICS = "log_softmax(logits[:vocab_rows] / temperature), fp32; raw top-K log-probs"
MAX_HEADER_BYTES = 1 << 24  # a safetensors header this long is not a request


class RequestError(EopdError):
    """A request the teacher refuses: `field` names what is wrong, `status` the HTTP status
    (400 malformed, 401 no or wrong token, 413 over a limit, 415 unknown content type)."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status

    def __reduce__(self):
        return (type(self), (self.field, self.message, self.status))


def _offsets(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


def _split(values: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
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
            context_offsets=_offsets([len(c) for c in contexts]),
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
            response_offsets=_offsets([len(r) for r in responses]),
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
        contexts = _split(self.context_ids, self.context_offsets)
        starts = self.response_starts.tolist()
        return [c[:s] for c, s in zip(contexts, starts, strict=True)], [
            c[s:] for c, s in zip(contexts, starts, strict=True)
        ]

    def responses(self) -> list[list[int]]:
        return _split(self.response_ids, self.response_offsets)

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
            offsets=_offsets(lengths),
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
            offsets=_offsets(lengths),
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


# ----------------------------------------------------------------------------- binary encoding

_ANSWER_ARRAYS = ("offsets", "token_logprobs", "entropy", "topk_ids", "topk_logprobs")
_REQUEST_ARRAYS = (
    "context_ids",
    "context_offsets",
    "response_starts",
    "response_ids",
    "response_offsets",
)
_REQUEST_SCALARS = ("prompt_texts", "template", "temperature", "merged_ids", "model")


def _save(arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> bytes:
    from safetensors.numpy import save

    meta = {"format": FORMAT, **{k: json.dumps(v) for k, v in metadata.items()}}
    return save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=meta)


def _load(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from safetensors.numpy import load

    if len(data) < 8:
        raise RequestError("body", "too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
        raise RequestError("body", f"safetensors header of {header_len} bytes does not fit")
    try:
        header = json.loads(data[8 : 8 + header_len])
        arrays = load(data)
        meta = {
            k: json.loads(v) for k, v in (header.get("__metadata__") or {}).items() if k != "format"
        }
    except Exception as exc:  # safetensors and json raise several types for a broken body
        raise RequestError("body", f"not a readable safetensors file ({exc})") from None
    fmt = (header.get("__metadata__") or {}).get("format")
    if fmt != FORMAT:
        raise RequestError("format", f"expected {FORMAT!r}, got {fmt!r}")
    return arrays, meta


def _known(fields: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise RequestError(unknown[0], f"unknown field; expected some of {sorted(allowed)}")


def encode_request(request: ScoreRequest) -> bytes:
    arrays = {k: getattr(request, k) for k in _REQUEST_ARRAYS if getattr(request, k) is not None}
    meta = {k: getattr(request, k) for k in _REQUEST_SCALARS if getattr(request, k) is not None}
    return _save(arrays, meta)


def decode_request(data: bytes) -> ScoreRequest:
    arrays, meta = _load(data)
    _known(arrays, _REQUEST_ARRAYS)
    _known(meta, _REQUEST_SCALARS)
    return _request_of({**arrays, **meta})


def encode_answer(answer: ScoreAnswer) -> bytes:
    meta = {"model": answer.model, "temperature": answer.temperature}
    meta["entropy_is_exact"] = answer.entropy_is_exact
    return _save({k: getattr(answer, k) for k in _ANSWER_ARRAYS}, meta)


def decode_answer(data: bytes) -> ScoreAnswer:
    arrays, meta = _load(data)
    return ScoreAnswer(**arrays, **meta)


# ----------------------------------------------------------------------------- JSON encoding


def request_to_json(request: ScoreRequest) -> dict[str, Any]:
    """One list per row: `contexts` + `response_starts`, or `prompt_texts` + `template` +
    `responses`; the scalar fields as they are."""
    out: dict[str, Any] = {k: getattr(request, k) for k in _REQUEST_SCALARS}
    if request.by_text:
        out["responses"] = request.responses()
    else:
        out["contexts"] = _split(request.context_ids, request.context_offsets)
        out["response_starts"] = request.response_starts.tolist()
    return {k: v for k, v in out.items() if v is not None}


def request_from_json(data: Any) -> ScoreRequest:
    if not isinstance(data, dict):
        raise RequestError("body", "must be a JSON object")
    _known(data, ("contexts", "response_starts", "responses", *_REQUEST_SCALARS))
    fields = {k: data[k] for k in _REQUEST_SCALARS if k in data}
    for rows_key, ids_key, offsets_key in (
        ("contexts", "context_ids", "context_offsets"),
        ("responses", "response_ids", "response_offsets"),
    ):
        if rows_key in data:
            rows = data[rows_key]
            if not isinstance(rows, list) or not all(_int_list(r) for r in rows):
                raise RequestError(rows_key, "must be a list of lists of integers")
            fields[ids_key] = np.array([t for r in rows for t in r], dtype=np.int64)
            fields[offsets_key] = _offsets([len(r) for r in rows])
    if "response_starts" in data:
        if not _int_list(data["response_starts"]):
            raise RequestError("response_starts", "must be a list of integers")
        fields["response_starts"] = np.array(data["response_starts"], dtype=np.int64)
    return _request_of(fields)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def _request_of(fields: dict[str, Any]) -> ScoreRequest:
    """Scalars typed as the dataclass wants them, or a RequestError naming the field."""
    if "temperature" in fields:
        t = fields["temperature"]
        if type(t) not in (int, float):
            raise RequestError("temperature", f"must be a number, got {t!r}")
        fields["temperature"] = float(t)
    if "merged_ids" in fields:
        m = fields["merged_ids"]
        if m is not None and not (_int_list(m) and len(m) == 2):
            raise RequestError("merged_ids", f"must be two integer ids, got {m!r}")
        fields["merged_ids"] = tuple(m) if m is not None else None
    if "prompt_texts" in fields:
        texts = fields["prompt_texts"]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise RequestError("prompt_texts", "must be a list of strings")
        fields["prompt_texts"] = tuple(texts)
    for key in ("template", "model"):
        if key in fields and not isinstance(fields[key], str | None):
            raise RequestError(key, f"must be a string, got {fields[key]!r}")
    request = ScoreRequest(**fields)
    request.check_shape()
    return request


def answer_to_json(answer: ScoreAnswer) -> dict[str, Any]:
    o = answer.offsets
    rows = lambda a: [a[i:j].tolist() for i, j in itertools.pairwise(o)]  # noqa: E731
    return {
        "model": answer.model,
        "temperature": answer.temperature,
        "entropy_is_exact": answer.entropy_is_exact,
        "token_logprobs": rows(answer.token_logprobs),
        "entropy": rows(answer.entropy),
        "topk_ids": rows(answer.topk_ids),
        "topk_logprobs": rows(answer.topk_logprobs),
    }


def answer_from_json(data: dict[str, Any]) -> ScoreAnswer:
    lengths = [len(r) for r in data["entropy"]]
    k = next((len(r[0]) for r in data["topk_ids"] if r), 0)

    def flat(key: str, dtype, *tail: int) -> np.ndarray:
        return np.array([v for r in data[key] for v in r], dtype=dtype).reshape(-1, *tail)

    return ScoreAnswer(
        model=data["model"],
        temperature=data["temperature"],
        offsets=_offsets(lengths),
        token_logprobs=flat("token_logprobs", np.float32),
        entropy=flat("entropy", np.float32),
        topk_ids=flat("topk_ids", np.int32, k),
        topk_logprobs=flat("topk_logprobs", np.float32, k),
        entropy_is_exact=data["entropy_is_exact"],
    )

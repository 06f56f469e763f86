"""The served teacher's request and answer on the wire: two encodings over HTTP
(docs/running.md, "Sharing one teacher between jobs").

- binary, `Content-Type: application/x-eopd-teacher`: a safetensors file (an 8-byte header
  length, a JSON header, raw little-endian arrays; readable from any language) whose metadata
  holds the scalar fields;
- JSON: one list per row. At the bench shapes the binary answer is ~3x smaller (jobs/bench/
  served_teacher.py measures it): floats as decimal text cost 9-20 bytes instead of 4.

Decoding a request ends in ScoreRequest.check_shape (eopd_ray.serving.schema), so whatever a
decoder returns is well-formed; a request body it cannot read raises RequestError naming the field.
"""

from __future__ import annotations

import itertools
import json
import struct
from typing import Any

import numpy as np

from eopd_ray.serving.schema import (
    FORMAT,
    RequestError,
    ScoreAnswer,
    ScoreRequest,
    row_offsets,
    unpack_rows,
)

BINARY_TYPE = "application/x-eopd-teacher"
JSON_TYPE = "application/json"
MAX_HEADER_BYTES = 1 << 24  # a safetensors header this long is not a request

_ANSWER_ARRAYS = ("offsets", "token_logprobs", "entropy", "topk_ids", "topk_logprobs")
_REQUEST_ARRAYS = (
    "context_ids",
    "context_offsets",
    "response_starts",
    "response_ids",
    "response_offsets",
)
_REQUEST_SCALARS = ("prompt_texts", "template", "temperature", "merged_ids", "model")

# ----------------------------------------------------------------------------- binary


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


# ----------------------------------------------------------------------------- JSON


def request_to_json(request: ScoreRequest) -> dict[str, Any]:
    """One list per row: `contexts` + `response_starts`, or `prompt_texts` + `template` +
    `responses`; the scalar fields as they are."""
    out: dict[str, Any] = {k: getattr(request, k) for k in _REQUEST_SCALARS}
    if request.by_text:
        out["responses"] = request.responses()
    else:
        out["contexts"] = unpack_rows(request.context_ids, request.context_offsets)
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
            fields[offsets_key] = row_offsets([len(r) for r in rows])
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
        offsets=row_offsets(lengths),
        token_logprobs=flat("token_logprobs", np.float32),
        entropy=flat("entropy", np.float32),
        topk_ids=flat("topk_ids", np.int32, k),
        topk_logprobs=flat("topk_logprobs", np.float32, k),
        entropy_is_exact=data["entropy_is_exact"],
    )

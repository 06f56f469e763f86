"""Prompts: where they come from, how they are rendered, and a resumable stream over them.

    texts = load_prompt_texts(cfg.data)
    stream = PromptStream(len(texts), seed=cfg.data.seed, shuffle=True, epochs=1)
    indices = stream.take(8)

Prompt files are JSONL or parquet, read with pyarrow. Prompts longer than
`data.max_prompt_tokens` are skipped and counted, or rejected, never truncated. Imports neither
Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

from eopd_ray.config import Config, DataConfig
from eopd_ray.errors import EopdError

log = logging.getLogger(__name__)


class DataError(EopdError):
    """A prompt file or prompt is unusable; the message names the file, row and column."""


def toy_prompts(count: int, seed: int) -> list[str]:
    """Synthetic arithmetic questions, for tests and the tiny config (no dataset needed)."""
    rng = random.Random(seed)
    return [
        f"question: what is {rng.randint(0, 99)} + {rng.randint(0, 99)}? answer:"
        for _ in range(count)
    ]


def _read_table(path: str, fmt: str):
    """A local path or any URI pyarrow's filesystems understand (s3://, gs://, hdfs://, file://)."""
    import pyarrow.fs as pafs
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    kind = fmt if fmt != "auto" else ("parquet" if path.endswith(".parquet") else "jsonl")
    try:
        fs, inner = (
            pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
        )
        if fs.get_file_info(inner).type != pafs.FileType.File:
            raise FileNotFoundError(path)
        with fs.open_input_file(inner) as fh:
            return pq.read_table(fh) if kind == "parquet" else pj.read_json(fh)
    except FileNotFoundError:
        raise DataError(f"{path}: no such prompt file (data.train_path)") from None
    except Exception as exc:  # pyarrow raises several types for malformed input
        raise DataError(f"{path}: cannot read as {kind}: {exc}") from None


def load_prompt_texts(cfg: DataConfig) -> list[str]:
    """All prompt texts of the configured source, with `data.prompt_suffix` appended."""
    if cfg.toy_prompts > 0:
        texts = toy_prompts(cfg.toy_prompts, cfg.seed)
    else:
        path = cfg.train_path
        table = _read_table(path, cfg.format)
        if cfg.prompt_column not in table.column_names:
            raise DataError(
                f"{path}: no column {cfg.prompt_column!r} (data.prompt_column); "
                f"columns are {table.column_names}"
            )
        texts = table.column(cfg.prompt_column).to_pylist()
        for row, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise DataError(
                    f"{path}: row {row}, column {cfg.prompt_column!r}: empty or non-text prompt "
                    f"({text!r})"
                )
    if cfg.prompt_suffix:
        texts = [f"{t} {cfg.prompt_suffix}" for t in texts]
    return texts


def render_prompt(text: str, template: str, tokenizer: Any) -> list[int]:
    """Token ids of `text` under a prompt template: `raw` (as is), `chat` (the tokenizer's chat
    template, one user turn), `chat_no_think` (the same with Qwen3's empty think block)."""
    if template == "raw":
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    kwargs = {"enable_thinking": False} if template == "chat_no_think" else {}
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, **kwargs
    )
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def tokenize_prompts(cfg: Config) -> tuple[list[list[int]], int]:
    """Every prompt rendered with the student template, and how many over-long ones were skipped
    (or a DataError naming the first, with data.overlong_prompts: error). Refuses data too short
    for run.steps x rollout.prompts_per_step over data.epochs."""
    from transformers import AutoTokenizer

    d = cfg.data
    tok = AutoTokenizer.from_pretrained(
        cfg.model.student_path, trust_remote_code=cfg.model.trust_remote_code
    )
    kept, skipped = [], 0
    for row, text in enumerate(load_prompt_texts(d)):
        ids = render_prompt(text, d.student_template, tok)
        if len(ids) <= d.max_prompt_tokens:
            kept.append(ids)
        elif d.overlong_prompts == "error":
            raise DataError(
                f"prompt row {row} has {len(ids)} tokens > data.max_prompt_tokens = "
                f"{d.max_prompt_tokens}; raise the limit or set data.overlong_prompts: skip"
            )
        else:
            skipped += 1
    if skipped:
        log.warning("skipped %d prompts longer than data.max_prompt_tokens", skipped)
    needed = cfg.run.steps * cfg.rollout.prompts_per_step
    if len(kept) * d.epochs < needed:
        # Synthetic prompts: more of them is the natural fix (a larger epoch count repeats them).
        more = (
            f"raise data.toy_prompts to at least {-(-needed // d.epochs)} or data.epochs"
            if d.toy_prompts
            else "raise data.epochs"
        )
        raise DataError(
            f"run.steps x rollout.prompts_per_step = {needed} prompts, but the data holds "
            f"{len(kept)} usable prompts x data.epochs = {d.epochs}: lower run.steps or {more}"
        )
    return kept, skipped


@dataclass
class PromptStream:
    """Indices into the prompt list, epoch after epoch, shuffled per epoch with a seed.

    The position is two integers (`epoch`, `offset`), so a checkpoint can resume it exactly.
    """

    num_prompts: int
    seed: int = 0
    shuffle: bool = True
    epochs: int = 1
    epoch: int = 0
    offset: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def _epoch_order(self) -> list[int]:
        order = list(range(self.num_prompts))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        """The next `count` prompt indices; crosses epoch boundaries; StopIteration at the end."""
        out: list[int] = []
        while len(out) < count:
            if self.epoch >= self.epochs:
                raise StopIteration("the prompt stream is exhausted (data.epochs)")
            if not self._order:
                self._order = self._epoch_order()
            need = count - len(out)
            out += self._order[self.offset : self.offset + need]
            self.offset += need
            if self.offset >= self.num_prompts:
                self.epoch, self.offset, self._order = self.epoch + 1, 0, []
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset, self._order = state["epoch"], state["offset"], []

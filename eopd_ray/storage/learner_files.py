"""What the learner ranks write into a checkpoint, and what each of them loads back.

    files = learner_file_sizes(per_rank)  # the ranks' reports, for checkpoint.commit
    local = store.fetch(rel, keep=files_of_rank(rank))  # a resuming rank: its part only

Each rank's `save_checkpoint` reports the files it wrote (with their sizes), so the commit can
check that every one arrived whole. On resume from an object store, each rank downloads only
what DeepSpeed reads for it: its own ZeRO shard and the files every rank shares, not every
rank's optimizer state (R times the whole checkpoint per node otherwise).

Imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from eopd_ray.storage.checkpoint import CheckpointError


def learner_file_sizes(per_rank: list[list[str] | dict[str, int]]) -> dict[str, int | None]:
    """What every learner rank's `save_checkpoint` wrote, merged: file -> size in bytes (None
    where a rank reported names only). On a shared disk ranks list each other's files too,
    after DeepSpeed's closing barrier: two sizes for one file mean it changed under them."""
    merged: dict[str, int | None] = {}
    for rank, files in enumerate(per_rank):
        sizes = files if isinstance(files, dict) else dict.fromkeys(files)
        for name, size in sizes.items():
            known = merged.get(name)
            if size is not None and known is not None and known != size:
                raise CheckpointError(
                    f"learner rank {rank} reports {name} with {size} bytes, an earlier rank "
                    f"with {known}: another process is writing the same run.output_dir (give "
                    "each run its own); not marking the checkpoint complete"
                )
            merged[name] = size if size is not None else known
    return merged


# DeepSpeed's per-rank files (engine._get_rank_zero_ckpt_name, _get_ckpt_name under ZeRO-3):
# {bf16_}zero_pp_rank_{r}_mp_rank_{m}_optim_states.pt, zero_pp_rank_{r}_mp_rank_{m}_model_states.pt
_PER_RANK = re.compile(
    r"(?:^|/)(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(?:optim|model)_states\.pt$"
)


def files_of_rank(rank: int) -> Callable[[str], bool]:
    """Which learner files (paths relative to a checkpoint) rank `rank` loads: every file but
    the other ranks' ZeRO shards. DeepSpeed (without `elastic_checkpoint`, which this project
    never sets) reads only its own rank's `zero_pp_rank_{rank}_...` files, plus the files all
    ranks share (`mp_rank_00_model_states.pt` below ZeRO-3, `latest`); resuming refuses another
    `learner.num_workers`, so rank r reads what rank r wrote. A file this does not know is kept."""

    def keep(path: str) -> bool:
        match = _PER_RANK.search(path)
        return match is None or int(match.group(1)) == rank

    return keep

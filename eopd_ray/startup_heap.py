"""A worker's start-up without CPython's garbage collector walking the heap over and over.

Building a worker imports torch, transformers and vLLM or DeepSpeed and loads a model: millions
of objects that live as long as the process. While they are made, the cyclic collector's full
pass runs again and again over everything made so far, and vLLM calls `gc.collect()` itself
five times while it loads. Measured on this project's 2-core CI box (docs/performance.md,
"Start-up"): a rollout worker's vLLM import and engine build took 6.4 CPU-s, 3.7-4.1 with the
collector paused and the imported heap frozen.

`gc.freeze()` moves every object alive into a permanent generation the collector never walks;
reference counting still frees them. What it costs: a reference cycle made during start-up and
dropped before the freeze is never collected; start-up makes few, once.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import Any


def freeze_heap() -> None:
    """Leave everything alive now out of every later collection (explicit ones included)."""
    gc.freeze()


def built_with_collector_paused(build_method: Callable[..., Any]) -> Callable[..., Any]:
    """`build_method` (a worker's __init__, or the learner's setup, whose answer the driver
    reads) run with automatic collection off, then what it built frozen and collection back
    on, also when it raises; its return value is passed through."""

    @functools.wraps(build_method)
    def build(self: Any, *args: Any, **kwargs: Any) -> Any:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return build_method(self, *args, **kwargs)
        finally:
            freeze_heap()
            if was_enabled:
                gc.enable()

    return build

"""Waiting for the workers' placement group, out loud.

Ray keeps a placement group pending, silently, for as long as the cluster cannot host all its
bundles. Instead of one silent `ray.wait(..., timeout=run.step_timeout_s)`, `wait_for_placement`
waits in slices and after each pending slice logs one line: what is asked (per role and in
total), what the cluster has and has free, and which config keys to change.

`describe_demand` builds that line from plain dicts, so it is tested without Ray.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

Bundles = list[tuple[str, dict[str, float]]]  # (role, resources) per worker, as `_bundles` gives

_log = logging.getLogger(__name__)

# The config field that sets each resource kind per worker; any other kind is a custom resource.
_RESOURCE_KEYS = {"CPU": "cpus_per_worker", "GPU": "gpus_per_worker"}


def _fmt_number(x: float) -> str:
    """0.5000001 -> '0.5', 2.0 -> '2', 1234567.0 -> '1234567' (never scientific notation)."""
    text = f"{x:.3f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _ordered_kinds(kinds) -> list[str]:
    """GPU and CPU first (what usually runs short), then custom resources sorted by name."""
    kinds = set(kinds)
    return [k for k in ("GPU", "CPU") if k in kinds] + sorted(kinds - {"GPU", "CPU"})


def _fmt_resources(resources: dict[str, float], kinds: list[str] | None = None) -> str:
    """`{GPU: 1, CPU: 0.5}`; with `kinds`, exactly those kinds (absent ones as 0)."""
    kinds = _ordered_kinds(resources) if kinds is None else kinds
    return "{" + ", ".join(f"{k}: {_fmt_number(resources.get(k, 0.0))}" for k in kinds) + "}"


def _group_by_role(bundles: Bundles) -> dict[str, list[dict[str, float]]]:
    by_role: dict[str, list[dict[str, float]]] = defaultdict(list)
    for role, bundle in bundles:
        by_role[role].append(bundle)
    return by_role


def _fix_hint(by_role: dict[str, list[dict[str, float]]], short: list[str]) -> str:
    """The config keys that lower the demand for the `short` resource kinds. With none short
    in total, a single bundle fits on no node: fewer workers would not help, smaller ones would."""
    any_short = bool(short)
    keys = []
    for role, role_bundles in by_role.items():
        kinds = _ordered_kinds(k for b in role_bundles for k, v in b.items() if v > 0)
        wanted = [k for k in kinds if k in short] if any_short else kinds
        if not wanted:
            continue
        if any_short:
            keys.append(f"{role}.num_workers")
        keys += [f"{role}.{_RESOURCE_KEYS.get(kind, 'resources')}" for kind in wanted]
    keys = list(dict.fromkeys(keys))  # several custom kinds share `<role>.resources`
    more = "add nodes or start them" if any_short else "start nodes"
    return (
        f"lower {', '.join(keys)}; or {more} with more resources "
        f"(`ray start --num-cpus N --num-gpus N --resources '{{...}}'`)"
    )


def describe_demand(
    bundles: Bundles,
    total: dict[str, float],
    free: dict[str, float],
    *,
    num_nodes: int | None = None,
) -> str:
    """What the placement group asks for, what the cluster has (`total`, as
    `ray.cluster_resources()`) and has free (`free`, as `ray.available_resources()`), and which
    config keys to change. Only the resource kinds asked for are shown."""
    by_role = _group_by_role(bundles)
    asked: dict[str, float] = defaultdict(float)
    for _, bundle in bundles:
        for kind, amount in bundle.items():
            asked[kind] += amount
    kinds = _ordered_kinds(k for k, v in asked.items() if v > 0)

    per_role = []
    for role, role_bundles in by_role.items():
        # Workers of one role share one bundle shape today; list each shape in case they don't.
        shapes: dict[str, int] = {}
        for b in role_bundles:
            shape = _fmt_resources(b)
            shapes[shape] = shapes.get(shape, 0) + 1
        per_role += [f"{role} {n} x {shape}" for shape, n in shapes.items()]

    # Ray leaves a kind out of available_resources() when none of it is free: absent means 0.
    short = [k for k in kinds if asked[k] > free.get(k, 0.0) + 1e-9]
    if short:
        verdict = f"short of {', '.join(short)}"
    else:  # Each bundle must fit on one node; PACK only prefers to put them on the same one.
        verdict = "enough free in total, but a bundle fits on no single node"
    nodes = "" if num_nodes is None else f" on {_plural(num_nodes, 'node')}"
    return (
        f"asked {'; '.join(per_role)} = {_fmt_resources(asked, kinds)} in "
        f"{_plural(len(bundles), 'bundle')} | "
        f"cluster has {_fmt_resources(total, kinds)}{nodes}, free {_fmt_resources(free, kinds)} | "
        f"{verdict} | fix: {_fix_hint(by_role, short)}"
    )


def wait_for_placement(
    pg,
    bundles: Bundles,
    timeout_s: float,
    *,
    interval_s: float = 10.0,
    log: logging.Logger | None = None,
) -> bool:
    """Wait up to `timeout_s` for `pg` to be placed, logging one warning per `interval_s` it is
    still pending. True when placed; False on timeout (the caller removes `pg` and raises)."""
    import ray

    log = log or _log
    ready_ref = pg.ready()
    start = time.monotonic()
    while True:
        remaining = timeout_s - (time.monotonic() - start)
        if remaining <= 0:
            return False
        ready, _ = ray.wait([ready_ref], timeout=min(interval_s, remaining))
        if ready:
            return True
        # Read the cluster afresh each time: nodes may join (autoscaler) or free up meanwhile.
        demand = describe_demand(
            bundles,
            ray.cluster_resources(),
            ray.available_resources(),
            num_nodes=len([n for n in ray.nodes() if n["Alive"]]),
        )
        log.warning(
            "placement group still pending after %.1fs (timeout %ss): %s",
            time.monotonic() - start,
            _fmt_number(timeout_s),
            demand,
        )

"""Ray plumbing: connecting, placement, actor groups with identities, and waits that time out.

Every role's count and resources come from config (`<role>.num_workers`, `.cpus_per_worker`,
`.gpus_per_worker`). All workers share one placement group, created here with a timeout; if the
cluster cannot host it the error names what was asked for and what the cluster has.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from eopd_ray.config import Config
from eopd_ray.driver.heartbeats import HEARTBEAT_S, Heartbeats, beat
from eopd_ray.driver.job_head import address_to_join
from eopd_ray.driver.placement import wait_for_placement
from eopd_ray.errors import EopdError, WorkerReplaced

# Every Ray port listens on 127.0.0.1 for the embedded local instance (Ray 2.60 otherwise binds
# to the machine's address even when told 127.0.0.1). Must be set before `import ray`.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

# The worker's process is gone (or restarting, or replaced by a fresh one): what a restartable
# role recovers from.
GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, WorkerReplaced)


class WorkerError(EopdError):
    """A worker failed or did not answer in time; names the worker and how to go on.
    `died` is True when the worker's process is gone (a restartable role can be recovered);
    `role` is the role of the worker(s) concerned."""

    def __init__(self, message: str, died: bool = False, role: str | None = None) -> None:
        super().__init__(message)
        self.died, self.role = died, role

    def __reduce__(self):
        return (type(self), (str(self), self.died, self.role))


# After one worker of a call fails: how long to let the others resolve before judging the group.
PEER_DEATH_WAIT_S = 5.0


@dataclass(frozen=True)
class WorkerIdentity:
    role: str
    rank: int
    node_ip: str
    pid: int

    def __str__(self) -> str:
        return f"{self.role}[{self.rank}] (node {self.node_ip}, pid {self.pid})"


class _Identified:
    """Mixed into every worker class made remote here."""

    ROLE = "worker"
    FROM_STEP = 0  # > 0: this attempt resumed a run at that step
    rank: int  # set by every worker class it is mixed into
    _beating = False  # heartbeats started (by the first identity() call)

    def identity(self) -> WorkerIdentity:
        """Answered once the worker is built; from then on it beats (`Heartbeats`)."""
        if not self._beating:
            self._beating = True
            name = ray.get_runtime_context().get_actor_name()
            threading.Thread(target=beat, args=(name,), daemon=True, name="heartbeat").start()
        return WorkerIdentity(self.ROLE, self.rank, ray.util.get_node_ip_address(), os.getpid())

    def timed(self, method: str, *args: Any) -> tuple[Any, float, float]:
        """(self.method(*args), wall-clock start, end): a call placed on the step timeline."""
        started = time.time()
        result = getattr(self, method)(*args)
        return result, started, time.time()

    def __repr__(self) -> str:
        """What the dashboard's Actors page (Repr) and the worker log prefixes show."""
        # Ray records it once, when the actor starts: say what holds from the start on.
        cfg = getattr(self, "cfg", None)
        version = getattr(self, "version", None)  # a rollout worker's
        trained = getattr(self, "step", None)  # a learner's
        if self.FROM_STEP:
            state = f" resumed at step {self.FROM_STEP}"
        elif version is not None:
            state = f" weights v{version}"
        elif trained is not None:
            state = f" trained {trained} steps"
        else:
            state = ""
        return f"{self.ROLE}-{getattr(self, 'rank', '?')}{state} [{cfg.run.id if cfg else '?'}]"


# Credentials (HF_TOKEN, AWS_*) are NOT passed here: a runtime env is shown in the dashboard.
# Workers read them from their own environment (the pod's, or the local Ray's, inherited).
WORKER_ENV = {
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also silences transformers' weight-loading bars
    "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
}
if "HF_HUB_OFFLINE" in os.environ:  # the driver's choice (hub ids: download or cache only)
    WORKER_ENV["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]


def _threads(resources) -> dict[str, str]:
    """A worker given 2+ CPUs (`<role>.cpus_per_worker`) runs that many torch threads: stages run
    one after another, so the active one can use the cores the idle ones leave. Idle OpenMP
    threads then sleep at once instead of spinning on the cores the next stage needs."""
    threads = int(resources.cpus_per_worker)
    if threads < 2:
        return {}
    return {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}


def connect(cfg: Config) -> None:
    """Join the cluster in RAY_ADDRESS (what `ray job submit` sets; in a submitted job, the head
    that runs it: `job_head.address_to_join`), else start a local Ray on 127.0.0.1 sized to hold
    every worker."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"] = address_to_join()
        _check_reachable(address)
        ray.init(address=address, log_to_driver=cfg.run.worker_logs)
        return
    needed = sum(c.num_workers * c.cpus_per_worker for _, c in worker_roles(cfg))
    num_cpus = cfg.run.num_cpus or max(os.cpu_count() or 1, math.ceil(needed))
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=cfg.run.worker_logs,
        runtime_env={"env_vars": WORKER_ENV},
    )


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when RAY_ADDRESS points nowhere (ray.init retries ~2 min)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise WorkerError(
            f"RAY_ADDRESS={address!r} is not reachable ({exc}); start the cluster, fix the "
            "address (host:port of the Ray head's GCS), or unset RAY_ADDRESS to run locally"
        ) from None


def worker_roles(cfg: Config) -> list[tuple[str, Any]]:
    """(role, its config section) of the workers this job starts, in bundle order: no teacher
    workers when `teacher.serve` names a running application."""
    roles = [("rollout", cfg.rollout), ("teacher", cfg.teacher), ("learner", cfg.learner)]
    return [(role, c) for role, c in roles if not (role == "teacher" and cfg.teacher.serve)]


def _bundles(cfg: Config) -> list[tuple[str, dict[str, float]]]:
    out = []
    for role, c in worker_roles(cfg):
        bundle = {"CPU": c.cpus_per_worker, **c.resources}
        if c.gpus_per_worker:
            bundle["GPU"] = float(c.gpus_per_worker)
        out += [(role, bundle)] * c.num_workers
    return out


def create_placement_group(cfg: Config):
    """One bundle per worker (rollout workers first, then teachers, then learners)."""
    named = _bundles(cfg)
    bundles = [b for _, b in named]
    pg = placement_group(bundles, strategy="PACK")
    # Logs what is asked, what the cluster has and what is free every ~10 s while pending.
    if not wait_for_placement(pg, named, cfg.run.step_timeout_s):
        remove_placement_group(pg)
        asked: dict[str, float] = {}
        for b in bundles:
            for k, v in b.items():
                asked[k] = asked.get(k, 0.0) + v
        raise WorkerError(
            f"the cluster cannot place the workers within run.step_timeout_s = "
            f"{cfg.run.step_timeout_s}s: asked for {asked} in {len(bundles)} bundles "
            f"(rollout/teacher/learner .num_workers x .cpus_per_worker / .gpus_per_worker); the "
            f"cluster has {ray.cluster_resources()} of which {ray.available_resources()} are free"
        )
    return pg


class ActorGroup:
    """The workers of one role; calls fan out to all of them (or to chosen ones)."""

    def __init__(
        self,
        role: str,
        handles: list[Any],
        identities: list[WorkerIdentity],
        names: list[str] | None = None,
        worker_timeout_s: float | None = None,
    ) -> None:
        self.role, self.handles, self.identities = role, handles, identities
        self.names = names or []  # actor names: their heartbeat keys
        self.heartbeats = Heartbeats(worker_timeout_s) if worker_timeout_s and names else None
        self.num_calls = 0  # remote calls made, for tests that bound the calls per step
        self.starting: list = []  # the identity calls spawn() made, for wait_started()

    def __len__(self) -> int:
        return len(self.handles)

    def call_async(self, method: str, *args: Any, ranks: list[int] | None = None) -> list:
        """The same call on every worker (or on `ranks`); returns ObjectRefs."""
        ranks = list(range(len(self.handles))) if ranks is None else ranks
        self.num_calls += len(ranks)
        return [getattr(self.handles[r], method).remote(*args) for r in ranks]

    def call_each_async(self, method: str, per_worker_args: list[tuple]) -> list:
        """Worker i gets `per_worker_args[i]` (the first len(per_worker_args) workers); returns
        ObjectRefs."""
        self.num_calls += len(per_worker_args)
        handles = self.handles[: len(per_worker_args)]
        return [
            getattr(h, method).remote(*a) for h, a in zip(handles, per_worker_args, strict=True)
        ]

    def get(
        self,
        refs: list,
        timeout_s: float,
        what: str,
        ranks: list[int] | None = None,
        watch: bool = True,
    ) -> list:
        """ray.get with a timeout; failures and timeouts name the worker. While waiting, a
        worker whose heartbeat stopped for `run.worker_timeout_s` (SIGSTOP, a frozen node) is
        killed (Ray restarts a restartable role) and reported as died, so the step's recovery
        takes over instead of waiting out `timeout_s`; so is a failure of any one worker.
        `watch=False` while workers are (re)starting: they beat only once built."""
        ranks = list(range(len(refs))) if ranks is None else ranks
        deadline = time.monotonic() + timeout_s
        checked: set = set()  # ready refs already looked at (each result is fetched once more)
        try:
            while True:
                left = deadline - time.monotonic()
                ready, pending = ray.wait(
                    refs, num_returns=len(refs), timeout=max(0.0, min(HEARTBEAT_S, left))
                )
                if not pending:
                    return ray.get(refs)  # raises the first failure
                # One worker's failure ends the wait: the others may be waiting on it.
                for ref in ready:
                    if ref not in checked:
                        checked.add(ref)
                        if _failed(ref):
                            ray.get(ref)
                if left <= 0:
                    raise ray.exceptions.GetTimeoutError()
                if watch:
                    self.kill_silent(
                        [r for r, ref in zip(ranks, refs, strict=True) if ref in pending], what
                    )
        except ray.exceptions.GetTimeoutError:
            _, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
            late = [
                str(self.identities[r])
                for r, ref in zip(ranks, refs, strict=True)
                if ref in pending
            ]
            raise WorkerError(
                f"{what}: no answer from {', '.join(late)} within {timeout_s}s "
                "(run.step_timeout_s / sync.timeout_s); raise it if the step is legitimately slow",
                role=self.role,
            ) from None
        except ray.exceptions.RayError as exc:
            # A worker's error is often the echo of a peer's death (a collective whose peer is
            # gone fails at once, before Ray reports the death): give the others a moment to
            # resolve, and call the group's loss a death if any worker died.
            ray.wait(refs, num_returns=len(refs), timeout=PEER_DEATH_WAIT_S)
            failed = [
                str(self.identities[r]) for r, ref in zip(ranks, refs, strict=True) if _failed(ref)
            ]
            died = isinstance(exc, GONE) or any(call_died(ref) for ref in refs)
            raise WorkerError(
                f"{what}: {self.role} worker(s) {', '.join(failed) or '?'} failed: {exc}",
                died=died,
                role=self.role,
            ) from exc

    def kill_silent(self, ranks: list[int], what: str) -> None:
        """Kill the workers among `ranks` whose heartbeat stopped; raise WorkerError(died)."""
        if self.heartbeats is None:
            return
        silent = [r for r in ranks if self.names[r] in self.heartbeats.silent([self.names[r]])]
        if not silent:
            return
        for r in silent:
            ray.kill(self.handles[r], no_restart=False)  # Ray restarts a restartable role
        who = ", ".join(str(self.identities[r]) for r in silent)
        raise WorkerError(
            f"{what}: {who} stopped answering (no heartbeat for over "
            f"{self.heartbeats.timeout_s:g}s, run.worker_timeout_s: stopped, frozen or its node "
            "unreachable): killed",
            died=True,
            role=self.role,
        )

    def replaced(self, timeout_s: float, what: str) -> list[int]:
        """The ranks whose process is not the one recorded: Ray restarted them between calls (a
        crash while idle), so they lack what the driver set up (the weight-sync group, the
        current weights). Records the new identities."""
        now = self.get(self.call_async("identity"), timeout_s, what)
        fresh = [
            r
            for r, (old, new) in enumerate(zip(self.identities, now, strict=True))
            if (old.pid, old.node_ip) != (new.pid, new.node_ip)
        ]
        self.identities = now
        return fresh

    def refresh_identities(self, timeout_s: float) -> None:
        """Wait until every worker answers (restarted ones included) and record their pids."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.identities = self.get(
                    self.call_async("identity"),
                    timeout_s,
                    f"waiting for {self.role} workers to restart",
                    watch=False,
                )
                return
            except WorkerError as exc:  # calls fail while an actor is still restarting
                if not exc.died or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def call_died(ref) -> bool:
    """Whether `ref` failed because its worker's process is gone."""
    try:
        ray.get(ref, timeout=0)
    except GONE:
        return True
    except Exception:
        return False
    return False


def _failed(ref) -> bool:
    try:
        ray.get(ref, timeout=0)
        return False
    except ray.exceptions.GetTimeoutError:
        return False
    except Exception:
        return True


def actor_name(cfg: Config, role: str, rank: int, from_step: int = 0, attempt: int = 0) -> str:
    """`<run id>/<role>-<rank>`; an attempt that resumed the run at step N adds `.from-N`, so
    its actors are told apart from the dead ones of the attempt before; a group restarted
    within the run (`attempt` > 0: the learners after a loss) adds `.restart-<attempt>`."""
    name = f"{cfg.run.id or cfg.run.name}/{role}-{rank}"
    name = f"{name}.from-{from_step}" if from_step else name
    return f"{name}.restart-{attempt}" if attempt else name


def spawn(
    role: str,
    cls: type,
    cfg: Config,
    pg,
    first_bundle: int,
    count: int,
    args: list[tuple],
    env: dict[str, str] | None = None,
    from_step: int = 0,
    attempt: int = 0,
) -> ActorGroup:
    """Create `count` actors of `cls` (a plain worker class) in bundles starting at
    `first_bundle`; worker i is built with `args[i]`. `from_step` > 0: this attempt resumes
    the run at that step (names and Repr say so)."""
    resources = {"rollout": cfg.rollout, "teacher": cfg.teacher, "learner": cfg.learner}[role]
    attributes = {"ROLE": role, "FROM_STEP": from_step}
    remote_cls = ray.remote(type(cls.__name__, (cls, _Identified), attributes))
    handles = []
    for i in range(count):
        handles.append(
            remote_cls.options(
                num_cpus=resources.cpus_per_worker,
                num_gpus=resources.gpus_per_worker,
                resources=dict(resources.resources),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=first_bundle + i
                ),
                runtime_env={"env_vars": {**WORKER_ENV, **_threads(resources), **(env or {})}},
                # Rollout and teacher workers hold no state between steps: Ray restarts them
                # and the driver redoes their lost work. Learners hold optimizer state: no.
                max_restarts=cfg.run.max_worker_restarts if role != "learner" else 0,
                # Named for the dashboard and `ray list actors`: <run id>/<role>-<rank>.
                name=actor_name(cfg, role, i, from_step, attempt),
            ).remote(*args[i])
        )
    pending = [WorkerIdentity(role, i, "?", 0) for i in range(count)]
    names = [actor_name(cfg, role, i, from_step, attempt) for i in range(count)]
    group = ActorGroup(role, handles, pending, names, cfg.run.worker_timeout_s)
    group.starting = group.call_async("identity")  # answered once the worker is built
    return group


def wait_started(groups: list[ActorGroup], timeout_s: float) -> None:
    """Wait until every worker of `groups` is built (they build concurrently: vLLM, the teacher
    and DeepSpeed start at the same time) and record who and where each one is."""
    for group in groups:
        group.identities = group.get(
            group.starting, timeout_s, f"starting {group.role} workers", watch=False
        )

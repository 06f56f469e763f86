"""Which Ray head runs this driver, when it runs as a submitted job (`ray job submit`).

Ray's job supervisor gives the driver `RAY_ADDRESS` read from `ray_current_cluster` in the head's
temp dir, the file the *latest* `ray start --head` with that temp dir wrote: on a machine with two
heads sharing a temp dir (Ray's default `/tmp/ray`: a second head of ours, another user's) it
names the other head, and a job submitted to one head ran on the other, or hung in `ray.init`
once that head was gone. The driver instead joins the head whose raylet started its supervisor:
the raylet is among the driver's parent processes and its command line holds the GCS address.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping

import psutil

logger = logging.getLogger(__name__)

# Set by Ray's job supervisor in every submitted driver's environment.
JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_GCS_FLAG = re.compile(r"--gcs-address=([^\s'\"]+)")


def gcs_address_of_raylet(cmdline: list[str]) -> str | None:
    """The GCS address in a raylet's command line (`.../raylet ... --gcs-address=host:port ...`,
    inside its `--python_worker_command`), or None if `cmdline` is not a raylet's."""
    if not cmdline or os.path.basename(cmdline[0]) != "raylet":
        return None
    match = _GCS_FLAG.search(" ".join(cmdline))
    return match.group(1) if match else None


def _ancestor_cmdlines() -> Iterable[list[str]]:
    for parent in psutil.Process().parents():
        try:
            yield parent.cmdline()
        except (psutil.Error, OSError):
            continue


def job_head_address(
    environ: Mapping[str, str] | None = None, ancestors: Iterable[list[str]] | None = None
) -> str | None:
    """The GCS address (host:port) of the head whose job supervisor started this process, or
    None outside a submitted job (or when no raylet is among the parents: the supervisor died)."""
    environ = os.environ if environ is None else environ
    if JOB_ENV_VAR not in environ:
        return None
    for cmdline in _ancestor_cmdlines() if ancestors is None else ancestors:
        if address := gcs_address_of_raylet(cmdline):
            return address
    return None


def address_to_join(environ: Mapping[str, str] | None = None) -> str:
    """RAY_ADDRESS, unless this driver is a job whose head is another one: then that head's GCS
    address (with a warning naming both)."""
    environ = os.environ if environ is None else environ
    given = environ["RAY_ADDRESS"]
    head = job_head_address(environ)
    if head and head != given:
        logger.warning(
            "RAY_ADDRESS=%s is not the Ray head that runs this job (%s): Ray's job supervisor "
            "read it from ray_current_cluster in a temp dir that another `ray start --head` "
            "shares; joining %s. Give each head its own --temp-dir (cluster/local-head.sh does)",
            given,
            head,
            head,
        )
        return head
    return given

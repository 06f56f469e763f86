"""Peak memory and time of the EOPD loss: plain vs memory-lean student log-softmax vs fused head.

    python jobs/bench/loss_memory.py [--quick] [--out results.json]

Each (T, V, path) runs in a fresh process on bf16 logits of shape (1, T, V) with K = 16: forward
and backward of `eopd_loss`. Peak memory is the process's peak resident set size during the loss
(VmHWM, reset through /proc/self/clear_refs just before it) minus its size just before, so it
counts the loss's own allocations: the logits' gradient, and for the plain path the fp32 (T, V)
log-softmax and its backward buffers; not the set-up. Prints a table; `peak_ratio` in the JSON is
plain peak over lean peak, per shape. The fused case (loss.fused_head) starts from bf16 hidden
states (1, T, --hidden) and a bf16 head (V, --hidden) instead of logits and includes the head's
GEMMs; its peak holds the head's and the hidden states' gradients, no logits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[4])
from eopd_ray.core.loss import LossInputs, eopd_loss
from eopd_ray.core.fused_head import fused_head_logprobs
from eopd_ray.core.student_logprobs import StudentAtIds, loss_ids
T, V, chunk, H = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[5])
fused = H > 0
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
if fused:  # from the hidden states and a bf16 head: no logits
    hidden = torch.randn(1, T, H, generator=g, dtype=torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * H**-0.5).to(torch.bfloat16).requires_grad_(True)
    logits = None
else:
    logits = torch.randn(1, T, V, generator=g, dtype=torch.bfloat16).requires_grad_(True)
teacher = torch.randn(1, T, 16, generator=g).log_softmax(-1) - 1.0
inputs = LossInputs(
    student_logits=logits, response_ids=torch.randint(0, V, (1, T), generator=g),
    response_mask=torch.ones(1, T, dtype=torch.bool), old_logprobs=-torch.rand(1, T) - 5,
    teacher_logprobs=-torch.rand(1, T) - 4, teacher_entropy=torch.rand(1, T) * 2,
    teacher_topk_ids=torch.randint(0, V, (1, T, 16), generator=g, dtype=torch.int32),
    teacher_topk_logprobs=teacher)
def status_kib(field):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith(field + ":"))
before = status_kib("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak (VmHWM) to the current RSS: set-up peaks do not count
start = time.perf_counter()
if fused:
    ids = loss_ids(inputs.response_ids, inputs.teacher_topk_ids)
    student = StudentAtIds(*fused_head_logprobs(hidden, weight, None, ids, 1.0, chunk))
    inputs = inputs._replace(student_logits=student)
out = eopd_loss(inputs, chunk_positions=chunk)
out.loss.backward()
elapsed = time.perf_counter() - start
peak = status_kib("VmHWM")
print(json.dumps({"peak_mib": (peak - before) / 1024, "seconds": elapsed,
                  "loss": out.loss.item()}))
"""

REPO = Path(__file__).resolve().parents[2]


def measure(t: int, v: int, chunk: int, hidden: int = 0) -> dict:
    """One case in a fresh process; `hidden` > 0: the fused head from (1, T, hidden) states."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(t), str(v), str(chunk), str(REPO), str(hidden)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, about a minute")
    parser.add_argument("--out", help="write the results as JSON (a path or a URI)")
    parser.add_argument("--chunk", type=int, default=256, help="lean path chunk (positions)")
    parser.add_argument(
        "--hidden", type=int, default=256, help="hidden size for the fused head (its GEMMs)"
    )
    args = parser.parse_args(argv)
    shapes = (
        [(512, 32000), (512, 151936), (1024, 151936)]
        if args.quick
        else [(512, 32000), (2048, 32000), (512, 151936), (2048, 151936), (4096, 151936)]
    )
    rows = []
    print(
        f"{'T':>6} {'V':>8} | {'plain MiB':>10} {'lean MiB':>9} {'ratio':>6} | "
        f"{'plain s':>8} {'lean s':>7} | logits MiB | {'fused MiB':>9} {'fused s':>8}"
    )
    for t, v in shapes:
        plain, lean = measure(t, v, 0), measure(t, v, args.chunk)
        fused = measure(t, v, args.chunk, args.hidden)
        assert abs(plain["loss"] - lean["loss"]) < 1e-4 * max(1.0, abs(plain["loss"]))
        ratio = plain["peak_mib"] / max(lean["peak_mib"], 1e-9)
        logits_mib = t * v * 2 / 2**20
        rows.append(
            {
                "T": t,
                "V": v,
                "plain_peak_mib": plain["peak_mib"],
                "lean_peak_mib": lean["peak_mib"],
                "peak_ratio": ratio,
                "plain_s": plain["seconds"],
                "lean_s": lean["seconds"],
                "logits_bf16_mib": logits_mib,
                "fused_peak_mib": fused["peak_mib"],
                "fused_s": fused["seconds"],
            }
        )
        print(
            f"{t:>6} {v:>8} | {plain['peak_mib']:>10.0f} {lean['peak_mib']:>9.0f} "
            f"{ratio:>6.2f} | {plain['seconds']:>8.2f} {lean['seconds']:>7.2f} | "
            f"{logits_mib:>10.0f} | {fused['peak_mib']:>9.0f} {fused['seconds']:>8.2f}"
        )
    if args.out:
        summary = {"chunk_positions": args.chunk, "fused_hidden": args.hidden, "shapes": rows}
        from eopd_ray.storage.outputs import write_json_output

        where = write_json_output(args.out, summary)
        print(f"results: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

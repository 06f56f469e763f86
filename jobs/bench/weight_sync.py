"""Weight-sync time against the cost of moving the same bytes, for students of 1M to 300M params.

    python jobs/bench/weight_sync.py [--quick] [--repeats 3] [--out FILE]

For each size, a Llama-shaped parameter list (fp32) is sent from this process (playing learner
rank 0) to a rollout-side Ray actor that copies every received tensor into its own parameters
(what the rollout engine's reload does), through both transports of eopd_ray.roles.weight_sync:

- `collective`: the product's WeightSender / WeightReceiver (gloo group, the buckets of
  `sync.bucket_bytes`, one flat broadcast per bucket, unflatten, copy into the parameters);
- `object_store`: the buckets put in Ray's object store and fetched by the actor, then copied.

Floors, measured in the same run on the same bytes:
- `broadcast_floor_s`: one gloo broadcast of a single buffer of all the bytes, preallocated on
  both sides (no flatten, no copy-in): the cost of moving the bytes between the two processes;
- `memcpy_s`: one in-process copy of all the bytes (the cost of touching them once).

`checksum_s`: one eopd_ray.core.weight_checksum pass over the same parameters, which learner rank 0
(on what it sends) and every rollout engine (read back after the reload) each make once per sync.

`ratio_to_floor` = sync time / broadcast floor (goal: <= 2 for 10M+ parameters);
`ratio_to_memcpy` is printed too. The vLLM reload itself is not in this benchmark (its cost is
in the pipeline's `time/sync_s`, see jobs/bench/throughput.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from eopd_ray.env import set_job_environment  # noqa: E402
from eopd_ray.ports import free_port  # noqa: E402

set_job_environment()

# (label, hidden, layers, vocab): Llama-shaped, untied embeddings, fp32.
SIZES = (
    ("1M", 128, 4, 2048),
    ("10M", 256, 8, 8192),
    ("30M", 384, 8, 32000),
    ("100M", 768, 8, 32000),
    ("300M", 1024, 20, 32000),
)


def llama_metas(hidden: int, layers: int, vocab: int):
    from eopd_ray.roles.weight_sync import TensorMeta

    inter = 4 * hidden
    metas = [TensorMeta("model.embed_tokens.weight", (vocab, hidden), "float32")]
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (
            ("self_attn.q_proj.weight", (hidden, hidden)),
            ("self_attn.k_proj.weight", (hidden, hidden)),
            ("self_attn.v_proj.weight", (hidden, hidden)),
            ("self_attn.o_proj.weight", (hidden, hidden)),
            ("mlp.gate_proj.weight", (inter, hidden)),
            ("mlp.up_proj.weight", (inter, hidden)),
            ("mlp.down_proj.weight", (hidden, inter)),
            ("input_layernorm.weight", (hidden,)),
            ("post_attention_layernorm.weight", (hidden,)),
        ):
            metas.append(TensorMeta(p + name, shape, "float32"))
    metas.append(TensorMeta("model.norm.weight", (hidden,), "float32"))
    metas.append(TensorMeta("lm_head.weight", (vocab, hidden), "float32"))
    return metas


def make_receiver_class():
    import ray
    import torch

    from eopd_ray.roles.weight_sync import WeightReceiver, _gloo_group

    @ray.remote(num_cpus=1)
    class Receiver:
        """The rollout side: parameters of the same shapes, filled by copy_ on every receive."""

        def __init__(self, metas, buckets, port: int) -> None:
            torch.set_num_threads(1)
            self.params = {m.name: torch.empty(m.shape) for m in metas}
            self.buckets = buckets
            self.port = port

        def join(self) -> None:
            group = _gloo_group("127.0.0.1", self.port, 1, 2, 300.0)
            self.receiver = WeightReceiver(group, self.buckets)

        def receive_collective(self) -> int:
            received = 0
            for bucket in self.receiver.receive():
                for name, tensor in bucket:
                    self.params[name].copy_(tensor)
                    received += tensor.numel()
            return received

        def receive_floor(self, numel: int) -> int:
            if getattr(self, "floor_buffer", None) is None:  # allocated (and faulted in) once
                self.floor_buffer = torch.empty(numel)
            self.receiver.group.broadcast(self.floor_buffer, 0).wait()
            return numel

        def receive_objects(self, buckets) -> int:
            received = 0
            for bucket in buckets:  # Ray resolved the top-level ref: tensors in shared memory
                for name, tensor in bucket:
                    self.params[name].copy_(tensor)
                    received += tensor.numel()
            return received

    return Receiver


def measure_size(label, hidden, layers, vocab, repeats, bucket_bytes):
    import ray
    import torch

    from eopd_ray.roles.weight_sync import WeightSender, _gloo_group, plan_buckets

    metas = llama_metas(hidden, layers, vocab)
    buckets = plan_buckets(metas, bucket_bytes)
    gen = torch.Generator().manual_seed(0)
    params = {m.name: torch.randn(m.shape, generator=gen) for m in metas}
    numel = sum(m.numel for m in metas)
    nbytes = sum(m.nbytes for m in metas)
    port = free_port()
    receiver = make_receiver_class().remote(metas, buckets, port)
    joined = receiver.join.remote()
    sender = WeightSender(_gloo_group("127.0.0.1", port, 0, 2, 300.0), buckets)
    ray.get(joined)

    def collective() -> None:
        done = receiver.receive_collective.remote()
        for index, bucket in enumerate(buckets):
            sender.send(index, [params[m.name] for m in bucket])
        assert ray.get(done) == numel

    def object_store() -> None:
        ref = ray.put([[(m.name, params[m.name]) for m in bucket] for bucket in buckets])
        assert ray.get(receiver.receive_objects.remote(ref)) == numel
        del ref

    flat = torch.randn(numel, generator=gen)

    def broadcast_floor() -> None:
        done = receiver.receive_floor.remote(numel)
        sender.group.broadcast(flat, 0).wait()
        assert ray.get(done) == numel

    target = torch.empty_like(flat)

    def memcpy() -> None:
        target.copy_(flat)

    def best(fn) -> float:
        fn()  # warm-up: first-touch page faults, gloo buffers
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)  # the machine is shared: the least-disturbed run

    from eopd_ray.core.weight_checksum import weights_checksum

    def checksum() -> None:  # what learner rank 0 and every engine each do once per sync
        weights_checksum(params.values())

    row = {
        "size": label,
        "parameters": numel,
        "bytes": nbytes,
        "buckets": len(buckets),
        "memcpy_s": best(memcpy),
        "checksum_s": best(checksum),
        "broadcast_floor_s": best(broadcast_floor),
        "transports": {},
    }
    for name, fn in (("collective", collective), ("object_store", object_store)):
        sync_s = best(fn)
        row["transports"][name] = {
            "sync_s": sync_s,
            "gbytes_per_s": nbytes / sync_s / 1e9,
            "ratio_to_floor": sync_s / row["broadcast_floor_s"],
            "ratio_to_memcpy": sync_s / row["memcpy_s"],
        }
    ray.kill(receiver)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Weight-sync time vs the byte-moving floor.")
    parser.add_argument("--quick", action="store_true", help="1M and 10M only, 2 repeats")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-bytes", type=int, default=256 * 2**20, help="sync.bucket_bytes")
    parser.add_argument("--out", help="write the results as JSON (a path or a URI)")
    args = parser.parse_args(argv)
    import ray

    sizes = SIZES[:2] if args.quick else SIZES
    repeats = 2 if args.quick else args.repeats
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = [measure_size(*size, repeats, args.bucket_bytes) for size in sizes]
    finally:
        ray.shutdown()
    print(
        f"\n{'size':>5s} {'MB':>8s} {'memcpy s':>9s} {'checksum s':>10s} {'bcast s':>9s}  "
        f"{'collective s':>12s} {'ratio':>6s}  {'obj store s':>11s} {'ratio':>6s}"
    )
    for r in rows:
        c, o = r["transports"]["collective"], r["transports"]["object_store"]
        print(
            f"{r['size']:>5s} {r['bytes'] / 1e6:8.1f} {r['memcpy_s']:9.4f} {r['checksum_s']:10.4f} "
            f"{r['broadcast_floor_s']:9.4f}  {c['sync_s']:12.4f} {c['ratio_to_floor']:6.2f}  "
            f"{o['sync_s']:11.4f} {o['ratio_to_floor']:6.2f}"
        )
    if args.out:
        summary = {"repeats": repeats, "bucket_bytes": args.bucket_bytes, "cores": os.cpu_count()}
        from eopd_ray.storage.outputs import write_json_output

        where = write_json_output(args.out, {**summary, "sizes": rows})
        print(f"results: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Operator hints from the environment: bf16 on a CPU that only emulates it."""

from __future__ import annotations

from eopd_ray.env import cpu_has_native_bf16, slow_bf16_warning

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx512f amx_bf16 amx_tile\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_has_native_bf16(ZEN4) is True
    assert cpu_has_native_bf16(SAPPHIRE_RAPIDS) is True
    assert cpu_has_native_bf16(SKYLAKE) is False
    assert cpu_has_native_bf16("processor\t: 0\nFeatures\t: fp asimd bf16\n") is None  # Arm
    assert cpu_has_native_bf16() in (True, False, None)  # this machine, whatever it is


def test_the_warning_names_the_roles_and_the_fix_only_where_bf16_is_emulated():
    message = slow_bf16_warning("bfloat16", ["teacher", "learner"], native=False)
    assert "teacher, learner run on CPU" in message and "model.dtype=float32" in message
    assert slow_bf16_warning("bfloat16", ["teacher"], native=True) is None
    assert slow_bf16_warning("bfloat16", ["teacher"], native=None) is None  # cannot tell
    assert slow_bf16_warning("bfloat16", [], native=False) is None  # every role on GPUs
    assert slow_bf16_warning("float32", ["teacher"], native=False) is None

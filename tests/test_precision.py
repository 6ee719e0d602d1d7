"""`train.mixed_precision: auto` picks bf16 only where the hardware has bf16 units."""
import pytest
import torch

from seechat import precision


@pytest.mark.parametrize("fast, expected", [(True, "bf16"), (False, "no")])
def test_auto_follows_cpu_bf16_support(monkeypatch, fast, expected):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)
    assert precision.resolve_mixed_precision("auto", device="cpu") == expected
    assert precision.autocast_dtype("auto") == (torch.bfloat16 if fast else None)


def test_explicit_values_pass_through_and_bad_ones_are_named():
    assert precision.resolve_mixed_precision("bf16") == "bf16"
    assert precision.resolve_mixed_precision(None) == "no"
    with pytest.raises(ValueError, match=r"'bf61'.*auto, no, bf16, fp16"):
        precision.resolve_mixed_precision("bf61")


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    fake = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "Path", lambda _: fake)
    precision.cpu_has_fast_bf16.cache_clear()
    try:
        fake.write_text("flags\t: fpu avx avx2 fma\n")
        assert precision.cpu_has_fast_bf16() is False
        precision.cpu_has_fast_bf16.cache_clear()
        fake.write_text("flags\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
        assert precision.cpu_has_fast_bf16() is True
    finally:
        precision.cpu_has_fast_bf16.cache_clear()


def _casts(module, x, context) -> int:
    """aten::_to_copy calls (dtype casts) of 3 forward calls in one bf16 autocast region."""
    with torch.no_grad(), torch.profiler.profile() as prof, torch.autocast("cpu", dtype=torch.bfloat16), context:
        for _ in range(3):
            module(x)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")


def test_frozen_weights_are_cast_once_per_autocast_region():
    import contextlib

    lin = torch.nn.Linear(8, 8).requires_grad_(False)
    x = torch.randn(2, 8)
    assert _casts(lin, x, contextlib.nullcontext()) == 9  # input, weight, bias: 3 times each
    assert _casts(lin, x, precision.reuse_autocast_casts(lin)) == 5  # weight and bias once
    assert not any(p.requires_grad for p in lin.parameters())  # flags restored
    with pytest.raises(RuntimeError, match="no_grad"):
        with precision.reuse_autocast_casts(lin):
            pass

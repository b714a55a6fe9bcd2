"""A bf16 run on a CPU without a bf16 matrix unit says so once, with the setting that helps."""

import math

from mm_ptft.train import trainer


def test_bf16_slowdown_is_measured_against_fp32():
    ratio = trainer.bf16_slowdown(size=64, repeats=2)
    assert math.isfinite(ratio) and ratio > 0


def test_the_warning_names_the_ratio_and_the_fix(monkeypatch, capsys):
    monkeypatch.setattr(trainer, "bf16_slowdown", lambda: 37.2)
    trainer._warn_if_slow_bf16()
    out = capsys.readouterr().out.strip()
    assert out.startswith("warning: on this CPU a bf16 matrix product is 37x slower than fp32")
    assert out.endswith("deepspeed.precision=fp32 will train much faster here")
    monkeypatch.setattr(trainer, "bf16_slowdown", lambda: 0.4)
    trainer._warn_if_slow_bf16()
    assert capsys.readouterr().out == ""

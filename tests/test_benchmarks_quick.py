"""The benchmark scripts run and print sane figures (no timing is asserted), and the hot paths they pushed to
be fast (the linear layers' in-place gradients, the dropout draws) still equal their plain references
(the optimiser's: tests/test_optim.py).

The scripts' quick run (`python -m tests.benchmarks.run_all --quick`, about 30 s) carries the `benchmark` marker:
the plain `pytest` leaves it out, run it before a release with `pytest -m benchmark`. The hot-path checks below
are quick and run every time."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from heads.model.layers import (
    StackedDropout,
    StackedLinear,
    grad_sq_norms,
    make_generators,
)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\[([a-e])\] (.+?): (-?[0-9.]+(?:e[+-]?[0-9]+)?) ?(\S*)", re.MULTILINE)


@pytest.fixture(scope="module")
def quick_output() -> str:
    proc = subprocess.run([sys.executable, "-m", "tests.benchmarks.run_all", "--quick", "--threads", "1"],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def _figures(text: str) -> dict[str, tuple[str, float, str]]:
    """name -> (item, value, unit) from the per-benchmark lines (the first occurrence of each name)."""
    out: dict[str, tuple[str, float, str]] = {}
    for item, name, value, unit in LINE.findall(text):
        out.setdefault(name.strip(), (item, float(value), unit))
    return out


@pytest.mark.benchmark
@pytest.mark.slow
def test_run_all_quick_prints_every_figure_as_a_sane_number(quick_output):
    figs = _figures(quick_output)
    expected = {
        "a": ["bare forward clips/s", "dump clips/s", "dump time / bare forward time"],
        "b": [f"{arch} ms per step (12 runs jointly, batch 8)" for arch in ("vanilla", "chain", "branch")]
             + [f"{arch} s per epoch" for arch in ("vanilla", "chain", "branch")]
             + ["full grid wall time", "branch-frames ms per step (12 runs jointly, batch 8)",
                "branch-frames s per epoch"],
        "c": ["end-to-end train step (batch 8, 2.5 s clips)", "train s per clip", "grid end to end (36 runs)",
              "speedup of (b) over (c)", "speedup of (b) + stage 1 over (c)"],
        "d": ["pooled cache bytes per clip", "frame cache bytes per clip", "in-memory cache", "peak RSS of (b)",
              "peak RSS / in-memory cache"],
    }
    for item, names in expected.items():
        for name in names:
            assert name in figs, f"missing figure [{item}] {name}"
            got_item, value, _ = figs[name]
            assert got_item == item, name
            assert math.isfinite(value) and value > 0, (name, value)
    # figures that follow from others: clips/s over the same clips give the ratio, the grid is the sum of parts
    a = figs["dump time / bare forward time"][1]
    assert a == pytest.approx(figs["bare forward clips/s"][1] / figs["dump clips/s"][1], rel=2e-3)
    assert figs["full grid wall time"][1] == pytest.approx(
        sum(figs[f"{arch} 12 runs x 30 epochs"][1] for arch in ("vanilla", "chain", "branch")), rel=2e-3)
    # (d) by hand: the quick cache stores cnn (16) + hidden_0..4 (5 x 24) in float16 = 272 bytes per clip, and
    # 3 frame layers (cnn, hidden_2, hidden_4: 64 values) x ceil(124 / 4) = 31 frames x 2 bytes (+ offsets)
    assert figs["pooled cache bytes per clip"][1] == pytest.approx((16 + 5 * 24) * 2, rel=1e-3)
    assert 64 * 31 * 2 <= figs["frame cache bytes per clip"][1] <= 64 * 31 * 2 + 64
    assert figs["peak RSS / in-memory cache"][1] > 1.0      # the process holds more than the cache
    # the summary repeats the goals
    assert "==== goals" in quick_output and "(d) goal <= 2" in quick_output


# ------------------------------------------------------------------ optimised hot paths == plain references

def test_stacked_linear_writes_its_weight_gradient_in_place_and_equals_autograd():
    """The in-place weight gradient, its recorded per-run norm, a second use in one step (accumulation), the
    reuse of the buffer in the next step, and the input and bias gradients all equal plain autograd."""
    g = torch.Generator().manual_seed(2)
    lin = StackedLinear(3, 160, 128, make_generators([1, 2, 3]), copies=2)   # big enough for the Gram form
    lin.use_grad_buffer()
    x = torch.randn(3, 2, 6, 160, generator=g, requires_grad=True)
    w = torch.randn(3, 2, 6, 128, generator=g)

    def reference(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weight = lin.weight.detach().clone().requires_grad_()
        bias = lin.bias.detach().clone().requires_grad_()
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        sum(((leaf @ weight + bias.unsqueeze(2)) * w).sum() for leaf in leaves).backward()
        return weight.grad, bias.grad, *(leaf.grad for leaf in leaves)

    (lin(x) * w).sum().backward()
    ref_w, ref_b, ref_x = reference(x)
    torch.testing.assert_close(lin.weight.grad, ref_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.bias.grad, ref_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_x, rtol=1e-5, atol=1e-5)
    direct = torch.linalg.vector_norm(ref_w.reshape(3, -1), dim=1).square()
    assert lin.weight._stacked_sq_norm[0] is lin.weight.grad           # the norm came from the Gram matrices
    torch.testing.assert_close(grad_sq_norms(lin.weight, 3), direct, rtol=1e-5, atol=1e-6)
    buffer = lin.weight.grad.data_ptr()

    lin.weight.grad = lin.bias.grad = None                             # the next step reuses the buffer
    x2 = torch.randn(3, 2, 6, 160, generator=g)
    (lin(x2) * w).sum().backward()
    assert lin.weight.grad.data_ptr() == buffer
    torch.testing.assert_close(lin.weight.grad, reference(x2)[0], rtol=1e-5, atol=1e-5)

    lin.weight.grad = lin.bias.grad = None                             # two uses in one step accumulate
    ((lin(x) + lin(x2)) * w).sum().backward()
    both = reference(x, x2)[0]
    torch.testing.assert_close(lin.weight.grad, both, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_sq_norms(lin.weight, 3),
                               torch.linalg.vector_norm(both.reshape(3, -1), dim=1).square(), rtol=1e-5, atol=1e-6)
    lin.weight.grad.mul_(2.0)                                          # an in-place change: the norm is re-read
    torch.testing.assert_close(grad_sq_norms(lin.weight, 3),
                               4 * torch.linalg.vector_norm(both.reshape(3, -1), dim=1).square(), rtol=1e-5, atol=1e-6)


def test_dropout_masks_are_each_runs_own_torch_rand_draws():
    x = torch.ones(3, 4, 10)
    drop = StackedDropout(0.3, make_generators([4, 5, 6], offset=9))
    out = drop(x)
    for r, gen in enumerate(make_generators([4, 5, 6], offset=9)):
        keep = torch.rand(4, 10, generator=gen) >= 0.3
        torch.testing.assert_close(out[r], keep.float() / 0.7, rtol=0, atol=0)
    assert F.dropout(x, 0.3, training=False).equal(x)  # sanity of the reference semantics


def test_dropout_drawn_ahead_gives_the_masks_of_one_draw_per_step(monkeypatch):
    """Several steps' masks per generator call (refilled every 3 steps here) are the very masks one draw per step
    gives, run by run; a change of shape (an epoch's last, shorter batch) starts a fresh draw for every run alike."""
    monkeypatch.setattr(StackedDropout, "DRAW_AHEAD_FLOATS", 3 * 4 * 10)
    ahead, plain, solo = StackedDropout(0.3), StackedDropout(0.3), StackedDropout(0.3)
    ahead.set_generators(make_generators([4, 5], offset=9), draw_ahead=True)
    plain.set_generators(make_generators([4, 5], offset=9))
    solo.set_generators(make_generators([5], offset=9), draw_ahead=True)
    x = torch.ones(2, 4, 10)
    for _ in range(7):
        torch.testing.assert_close(ahead(x), plain(x), rtol=0, atol=0)
    for _ in range(3):
        short = ahead(x[:, :3])
        assert short.shape == (2, 3, 10)
    solo_out = [solo(x[1:]) for _ in range(7)] + [solo(x[1:, :3]) for _ in range(3)]
    again = StackedDropout(0.3)
    again.set_generators(make_generators([4, 5], offset=9), draw_ahead=True)
    joint_out = [again(x) for _ in range(7)] + [again(x[:, :3]) for _ in range(3)]
    for j, s_ in zip(joint_out, solo_out):       # run 1 of the pair equals run 1 alone
        torch.testing.assert_close(j[1:], s_, rtol=0, atol=0)


@pytest.mark.benchmark
@pytest.mark.slow
def test_bench_search_quick_prints_both_sides_and_their_ratio():
    proc = subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_search", "--quick", "--rounds", "1",
                           "--trials", "4", "--batch", "4", "--epochs", "2", "--threads", "1"],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    figures = {name: float(value) for name, value in
               re.findall(r"\] (batches of \d+ \(.+?\)|ratio): (-?[0-9.]+)", proc.stdout)}
    stacked, one_by_one = figures["batches of 4 (stacked)"], figures["batches of 1 (one by one)"]
    assert stacked > 0 and one_by_one > 0
    assert figures["ratio"] == pytest.approx(one_by_one / stacked, rel=2e-3)


@pytest.mark.benchmark
@pytest.mark.slow
def test_bench_long_audio_quick_reads_the_windows_in_less_memory_than_the_whole_decode():
    proc = subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_long_audio", "--quick"],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    figures = {name: float(value) for name, value in
               re.findall(r"^\[1 min 48 kHz stereo WAV\] (.+?): (-?[0-9.]+(?:e[+-]?[0-9]+)?)", proc.stdout,
                          re.MULTILINE)}
    assert figures["windows read"] == 47                          # 1 + (60 - 2.5) / 1.25
    assert figures["window checksum relative difference"] <= 1e-9  # the same samples as the whole decode's
    assert figures["windowed read seconds"] > 0 and figures["whole-file decode seconds"] > 0
    # the whole decode holds the minute as float64 stereo (44 MiB) at least; 5 s blocks hold a twelfth of that
    assert figures["whole-file peak RSS"] > figures["windowed peak RSS"] > 0
    assert figures["peak RSS whole / windowed"] == pytest.approx(
        figures["whole-file peak RSS"] / figures["windowed peak RSS"], rel=5e-3)


@pytest.mark.benchmark
@pytest.mark.slow
def test_bench_input_quick_prints_every_input_path_and_the_ratios_of_its_sides():
    proc = subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_input", "--quick", "--rounds", "1"],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    figures = {(item, name): float(value) for item, name, value in
               re.findall(r"^\[(.+?)\] (.+?): (-?[0-9.]+(?:e[+-]?[0-9]+)?)", proc.stdout, re.MULTILINE)}
    one = {name[:-len(" clips/s")]: v for (item, name), v in figures.items()
           if item == "one process" and name.endswith(" clips/s")}
    assert sorted(one) == sorted(["16 kHz WAV", "48 kHz WAV", "16 kHz store (int16)", "48 kHz store (float32)"])
    assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures
    assert figures[("one process", "48 kHz store / 48 kHz WAV")] == pytest.approx(
        one["48 kHz store (float32)"] / one["48 kHz WAV"], rel=2e-3)
    assert figures[("one process", "16 kHz store / 16 kHz WAV")] == pytest.approx(
        one["16 kHz store (int16)"] / one["16 kHz WAV"], rel=2e-3)
    for workers in (0, 2):
        loader = {path: figures[("DataLoader", f"{path}, {workers} workers clips/s")] for path in one if path != "16 kHz WAV"}
        assert figures[("DataLoader", f"48 kHz store / 48 kHz WAV, {workers} workers")] == pytest.approx(
            loader["48 kHz store (float32)"] / loader["48 kHz WAV"], rel=2e-3)
    # the GPU's demand is arithmetic: 3 x 2 x 94,371,712 parameters x 124 frames, and 200 TFLOP/s over the
    # layer-by-layer count; every path's share of it is its clips/s over that demand
    gpu = {name: v for (item, name), v in figures.items() if item == "GPU estimate"}
    assert gpu["training FLOP per clip, rule of thumb"] == pytest.approx(3 * 2 * 94_371_712 * 124, rel=1e-6)
    flop = gpu["training FLOP per clip, layer by layer"]
    assert gpu["training FLOP per clip, rule of thumb"] < flop < 2 * gpu["training FLOP per clip, rule of thumb"]
    assert gpu["training TFLOP per batch of 8"] == pytest.approx(8 * flop / 1e12, rel=2e-3)
    assert gpu["GPU demand"] == pytest.approx(gpu["assumed effective GPU throughput"] * 1e12 / flop, rel=2e-3)
    for path, clips_s in one.items():
        assert gpu[f"{path} / GPU demand"] == pytest.approx(clips_s / gpu["GPU demand"], rel=2e-3)
    dump = {name: v for (item, name), v in figures.items() if item == "avb dump"}
    assert dump["WAVs / store"] == pytest.approx(dump["whole process from the 48 kHz WAVs (--no-decoded-audio)"]
                                                 / dump["whole process from the store (audio-16k.h5)"], rel=2e-3)
    assert "bit-for-bit equal" in proc.stdout and "==== goals" in proc.stdout


@pytest.mark.benchmark
@pytest.mark.slow
def test_bench_weightings_quick_prints_every_weighting_and_its_ratio_to_uniform():
    from heads.names import WEIGHTINGS

    proc = subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_weightings", "--quick", "--rounds", "1",
                           "--stack", "2", "--threads", "1"],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = re.findall(r"^\[a\] (\w+): ms per step, (1 run|2 runs stacked): ([0-9.e+-]+) ms  \(([0-9.]+)x uniform\)",
                      proc.stdout, re.MULTILINE)
    ms = {(w, label): float(v) for w, label, v, _ in rows}
    assert sorted({w for w, _ in ms}) == sorted(WEIGHTINGS) and len(ms) == 2 * len(WEIGHTINGS)
    for w, label, value, ratio in rows:
        assert float(value) > 0 and float(ratio) == pytest.approx(float(value) / ms[("uniform", label)], abs=6e-3)

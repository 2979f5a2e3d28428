import math

import pytest

from minicpm.errors import MiniCPMError
from minicpm.optim.schedule import cosine_schedule, resolve_schedule, wsd_schedule


def wsd(**overrides):
    args = dict(kind="wsd", total_steps=1000, warmup_steps=10, decay_steps=None, decay_start=None, decay="exp",
                half_life=None, floor=None, cosine_period=None)
    args.update(overrides)
    return resolve_schedule(**args)


def test_warmup_is_positive_at_step_zero_and_reaches_the_peak_at_its_last_step():
    s = wsd(warmup_steps=10)
    assert s(0) == pytest.approx(0.1)
    assert s(9) == 1.0
    assert all(s(i) < s(i + 1) for i in range(9))
    assert wsd(warmup_steps=0)(0) == 1.0
    assert cosine_schedule(0, warmup_steps=5, period=100) == pytest.approx(0.2)


def test_wsd_holds_the_peak_through_the_stable_phase():
    s = wsd(decay_steps=100)
    assert s.decay_start == 900
    assert {s(i) for i in range(10, 900)} == {1.0}
    assert s(900) < 1.0


def test_default_decay_is_ten_percent_of_the_run_with_five_half_lives():
    s = wsd()
    assert (s.decay_start, s.decay_steps, s.half_life) == (900, 100, 20.0)


def test_exponential_decay_halves_every_half_life():
    s = wsd(decay_steps=500, half_life=50)
    start = s.decay_start
    # k = s - T + 1 steps into the decay
    assert s(start + 49) == pytest.approx(0.5)
    assert s(start + 99) == pytest.approx(0.25)
    assert wsd_schedule(5049, warmup_steps=0, decay_start=5000, decay_steps=25000, half_life=5000) == \
        pytest.approx(0.5 ** (50 / 5000))


@pytest.mark.parametrize("decay", ["exp", "linear", "cosine", "1-sqrt"])
def test_every_decay_is_monotone_and_stays_above_its_floor(decay):
    s = wsd(decay=decay, decay_steps=200, floor=0.05)
    values = [s(i) for i in range(s.decay_start - 1, s.total_steps)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert min(values) >= 0.05


@pytest.mark.parametrize("decay", ["linear", "cosine", "1-sqrt"])
def test_finite_decays_end_exactly_on_the_floor(decay):
    assert wsd(decay=decay, floor=0.1)(999) == pytest.approx(0.1)
    assert wsd(decay=decay)(999) == pytest.approx(0.0, abs=1e-12)


def test_decay_start_and_decay_steps_are_two_spellings_of_one_schedule():
    assert wsd(decay_start=800) == wsd(decay_steps=200)
    with pytest.raises(MiniCPMError, match="schedule.decay_start"):
        wsd(decay_start=800, decay_steps=100)


def test_cosine_keeps_the_papers_ten_percent_floor_and_its_period_may_differ_from_the_run():
    s = resolve_schedule(kind="cosine", total_steps=1000, warmup_steps=10, decay_steps=None, decay_start=None,
                         decay="exp", half_life=None, floor=None, cosine_period=500)
    assert s.floor == 0.1
    assert s(10) < 1.0 and s(10) > 0.99
    assert s(254) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-3)  # halfway through the period
    assert s(499) == pytest.approx(0.1)
    assert s(999) == pytest.approx(0.1)  # flat at the floor after a period shorter than the run
    longer = resolve_schedule(kind="cosine", total_steps=1000, warmup_steps=10, decay_steps=None, decay_start=None,
                              decay="exp", half_life=None, floor=None, cosine_period=2000)
    assert longer(999) > 0.5  # a period longer than the run never reaches the floor


def test_constant_is_warmup_then_flat():
    s = resolve_schedule(kind="constant", total_steps=100, warmup_steps=4, decay_steps=None, decay_start=None,
                         decay="exp", half_life=None, floor=None, cosine_period=None)
    assert [s(i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert not s.in_decay(99)


def test_schedule_is_a_pure_function_of_the_step():
    s = wsd(decay="cosine")
    forwards = [s(i) for i in range(1000)]
    backwards = [s(i) for i in reversed(range(1000))][::-1]
    assert forwards == backwards
    assert all(math.isfinite(v) and v > 0 for v in forwards[:-1])


@pytest.mark.parametrize("bad, key", [(dict(kind="step"), "schedule.kind"), (dict(decay="poly"), "schedule.decay"),
                                      (dict(half_life=0), "schedule.half_life"), (dict(floor=1.5), "schedule.floor"),
                                      (dict(decay_steps=999, warmup_steps=10), "warmup"),
                                      (dict(total_steps=0), "schedule.total_steps")])
def test_bad_schedules_name_the_key(bad, key):
    with pytest.raises(MiniCPMError, match=key):
        wsd(**bad)

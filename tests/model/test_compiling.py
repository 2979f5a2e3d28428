"""parallel.compile: auto compiles the blocks only when the run's steps earn the compile time back (a fake cost
model here, so that the rule and not a device's speed is what is checked); true and false are kept as set."""

import pytest

from minicpm.errors import MiniCPMError
from minicpm.model.compiling import CompileCosts, choose_compile

FAKE = CompileCosts(compile_seconds=60.0, cached_compile_seconds=10.0, speedup=1.5, eager_mfu=0.5)


def test_auto_is_eager_for_a_short_run_and_compiled_for_a_long_one():
    # one eager step of 1 s saves 1/3 s compiled: the 60 s of compiling pay from 180 steps on
    short = choose_compile("auto", steps=100, step_seconds=1.0, costs=FAKE)
    long = choose_compile("auto", steps=1000, step_seconds=1.0, costs=FAKE)
    assert not short.compile and short.reason.startswith("eager (auto: 100 steps")
    assert long.compile and long.reason.startswith("compiled (auto: 1000 steps")
    assert "save ~33 s < ~60 s to compile" in short.reason


def test_a_warm_compile_cache_moves_the_break_even_down():
    # from the run's own cache (a resume) compiling costs 10 s: 100 steps now pay
    assert choose_compile("auto", steps=100, step_seconds=1.0, costs=FAKE, cached=True).compile


def test_explicit_settings_are_kept_and_an_unmeasured_device_stays_eager():
    assert choose_compile(True, steps=1, step_seconds=0.0, costs=FAKE).compile
    assert not choose_compile(False, steps=10**9, step_seconds=10.0, costs=FAKE).compile
    unmeasured = choose_compile("auto", steps=10**9, step_seconds=10.0, costs=None)
    assert not unmeasured.compile and "not measured" in unmeasured.reason


@pytest.mark.parametrize("setting", ["yes", 1, None])
def test_a_bad_setting_is_a_one_line_error(setting):
    with pytest.raises(MiniCPMError, match="parallel.compile") as error:
        choose_compile(setting, steps=1, step_seconds=1.0, costs=FAKE)
    assert "\n" not in str(error.value)

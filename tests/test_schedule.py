"""Timesteps, injection schedules and the inversion-save rule."""
import pytest

from tokenflow.errors import ConfigError
from tokenflow.method import schedule

SD_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon"}


def test_leading_spacing_with_offset():
    assert schedule.timesteps_of(SD_SCHEDULER, 10) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    ts = schedule.timesteps_of(SD_SCHEDULER, 50)
    assert ts[0] == 981 and ts[-1] == 1 and len(ts) == 50


def test_injection_schedules_are_the_first_int_n_times_fraction_steps():
    ts = schedule.timesteps_of(SD_SCHEDULER, 10)
    assert schedule.injection_timesteps(ts, 10, 0.5) == {901, 801, 701, 601, 501}
    assert schedule.injection_timesteps(ts, 10, 0.8) == {901, 801, 701, 601, 501, 401, 301, 201}
    assert schedule.injection_timesteps(ts, 10, 0.0) == set()
    assert schedule.injection_timesteps(ts, 10, 1.0) == set(ts)
    # float product then truncation, as int(n * f) in the original
    assert len(schedule.injection_timesteps(schedule.timesteps_of(SD_SCHEDULER, 50), 50, 0.29)) == int(50 * 0.29)


@pytest.mark.parametrize("inv,edit", [(500, 50), (50, 10), (100, 50), (50, 50)])
def test_compatible_step_counts(inv, edit):
    inv_ts = schedule.timesteps_of(SD_SCHEDULER, inv)
    saved = schedule.inversion_save_timesteps(inv_ts, schedule.timesteps_of(SD_SCHEDULER, edit))
    assert max(inv_ts) in saved
    assert set(schedule.timesteps_of(SD_SCHEDULER, edit)) <= saved


@pytest.mark.parametrize("inv,edit", [(50, 30), (40, 50), (7, 3)])
def test_incompatible_step_counts_name_the_fix(inv, edit):
    with pytest.raises(ConfigError, match="inversion timesteps"):
        schedule.inversion_save_timesteps(schedule.timesteps_of(SD_SCHEDULER, inv), schedule.timesteps_of(SD_SCHEDULER, edit))


def test_sdedit_truncation_is_the_originals_formula():
    ts = schedule.timesteps_of(SD_SCHEDULER, 50)
    kept = schedule.sdedit_timesteps(ts, 0.9)
    assert kept == ts[int(1 - 0.9 * 50):] and len(kept) == 44 and kept[0] == 861

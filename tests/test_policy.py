"""The policy: when a step perturbs and with which radius, as a pure function of the counters."""

import math

import pytest

from lightning_nusam.policy import Counters, Schedule, has_started, plan_step, radius, start_step


def plans(schedule: Schedule, steps: int = 10, planned: float = 10, **counters) -> list[float | None]:
    """ρ of each step's plan, None for a plain step."""
    result = []
    for t in range(steps):
        plan = plan_step(schedule, Counters(global_step=t, epoch=t // 5, planned_steps=planned, **counters))
        result.append(plan.rho if plan.perturb else None)
    return result


def test_start_fraction_counts_planned_steps_and_start_epoch_counts_epochs():
    assert plans(Schedule(rho=0.1, start_fraction=0.3)) == [None] * 3 + [0.1] * 7
    assert start_step(Schedule(rho=0.1, start_fraction=0.25), 10) == 3  # ceil(2.5)
    assert plans(Schedule(rho=0.1, start_epoch=1)) == [None] * 5 + [0.1] * 5
    assert start_step(Schedule(rho=0.1, start_epoch=1), 10) is None
    assert plans(Schedule(rho=0.1)) == [0.1] * 10


def test_every_n_steps_after_the_start():
    assert plans(Schedule(rho=0.2, start_fraction=0.3, every_n_steps=3)) == [
        None, None, None, 0.2, None, None, 0.2, None, None, 0.2]


def test_one_pass_primes_the_direction_with_a_plain_step():
    schedule = Schedule(rho=0.1, one_pass=True)
    priming = plan_step(schedule, Counters(0, 0), has_direction=False)
    assert not priming.perturb and priming.estimate and priming.one_pass
    step = plan_step(schedule, Counters(1, 0), has_direction=True)
    assert step.perturb and step.one_pass and not step.two_pass and step.rho == 0.1


@pytest.mark.parametrize(("name", "expected"), [
    ("linear", lambda p: 0.4 + (0.1 - 0.4) * p),
    ("cosine", lambda p: 0.1 + 0.3 * (1 + math.cos(math.pi * p)) / 2),
])
def test_linear_and_cosine_run_from_the_first_step_to_the_last_planned_one(name, expected):
    schedule = Schedule(rho=0.4, rho_schedule=name, rho_final=0.1, start_fraction=0.2)
    radii = plans(schedule, planned=10, first_step=2)
    assert radii[:2] == [None, None]
    assert radii[2:] == pytest.approx([expected((t - 2) / 7) for t in range(2, 10)])


def test_lr_radius_is_relative_to_the_base_rate_and_capped_at_rho():
    schedule = Schedule(rho=0.2, rho_schedule="lr")
    assert radius(schedule, Counters(0, 0, lr=0.01, base_lr=0.1)) == pytest.approx(0.02)  # warm-up
    assert radius(schedule, Counters(0, 0, lr=0.3, base_lr=0.1)) == 0.2  # above the base: capped
    assert radius(schedule, Counters(0, 0, lr=0.0, base_lr=0.1)) == 0.0  # a warm-up from 0
    assert radius(schedule, Counters(0, 0, lr=0.0, base_lr=0.0)) == 0.0
    assert radius(schedule, Counters(0, 0, lr=0.1, base_lr=0.0)) == 0.2  # no base known


def test_has_started():
    assert not has_started(Schedule(rho=0.1, start_epoch=2), Counters(global_step=100, epoch=1))
    half = Schedule(rho=0.1, start_fraction=0.5)
    assert has_started(half, Counters(global_step=5, epoch=0, planned_steps=10))


@pytest.mark.parametrize(("options", "argument"), [
    ({"rho": -1.0}, "rho"), ({"rho": 0.1, "start_epoch": -1}, "start_epoch"),
    ({"rho": 0.1, "start_fraction": 1.5}, "start_fraction"),
    ({"rho": 0.1, "every_n_steps": 0}, "every_n_steps"),
    ({"rho": 0.1, "rho_schedule": "exp"}, "rho_schedule"), ({"rho": 0.1, "rho_final": 0.0}, "rho_final"),
    ({"rho": 0.1, "one_pass": 1}, "one_pass"),
])
def test_bad_schedules_name_the_argument(options, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        Schedule(**options)


def test_a_start_is_given_one_way():
    with pytest.raises(ValueError, match="either"):
        Schedule(rho=0.1, start_epoch=1, start_fraction=0.5)

"""`DODEScheduler.step()` drives the solver's generator by hand (issue 19 item 1): no thread, abandoned runs are
freed, and deepcopy/pickle work at every point of a run and continue it bit for bit."""
import copy
import gc
import pickle
import threading
import weakref

import pytest
import torch

pytest.importorskip("diffusers")
from dode_lightning.diffusers_scheduler import DODEScheduler  # noqa: E402


def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for a UNet (depends on the latents and the timestep)."""
    return 0.5 * torch.tanh(x) + 1e-4 * float(t)


def _scheduler(solver: str = "unipc_3", prediction: str = "v_prediction", steps: int = 6) -> DODEScheduler:
    probe = DODEScheduler(solver=solver)
    probe.set_timesteps(steps)
    lambdas = torch.linspace(0.05, 0.3, probe.solver.num_stages, dtype=torch.float64)
    return DODEScheduler(solver=solver, prediction_type=prediction, sigmas=probe.solver.sigmas.tolist(), lambdas=lambdas.tolist(), nfe=probe.solver.nfe)


def _steps(scheduler: DODEScheduler, x: torch.Tensor, count: int | None = None) -> torch.Tensor:
    timesteps = scheduler.timesteps[scheduler.step_index :]
    for t in timesteps if count is None else timesteps[:count]:
        x = scheduler.step(network(x, t), t, x).prev_sample
    return x


def _start() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def test_abandoned_runs_leave_no_thread_and_are_freed():
    threads = threading.active_count()
    refs = []
    for _ in range(5):
        scheduler = _scheduler()
        scheduler.set_timesteps(6)
        output = network(_start(), scheduler.timesteps[0])
        scheduler.step(output, scheduler.timesteps[0], _start())
        assert threading.active_count() == threads
        refs += [weakref.ref(scheduler), weakref.ref(output)]
        del scheduler, output
    gc.collect()
    assert threading.active_count() == threads
    assert all(ref() is None for ref in refs)  # the dropped schedulers and the outputs they held are gone


@pytest.mark.parametrize("solver,prediction", [("unipc_3", "v_prediction"), ("heun", "epsilon"), ("dpm_solver_3", "sample")])
def test_deepcopy_and_pickle_at_three_points_continue_bit_for_bit(solver, prediction):
    steps = 3 if solver == "heun" else 6
    reference = _scheduler(solver, prediction, steps)
    reference.set_timesteps(steps)
    expected = _steps(reference, _start())

    fresh = _scheduler(solver, prediction, steps)
    for clone in (copy.deepcopy(fresh), pickle.loads(pickle.dumps(fresh))):  # before set_timesteps
        clone.set_timesteps(steps)
        assert torch.equal(_steps(clone, _start()), expected)

    fresh.set_timesteps(steps)
    x = _steps(fresh, _start(), 2)  # mid-run
    for clone in (copy.deepcopy(fresh), pickle.loads(pickle.dumps(fresh))):
        assert clone.step_index == 2
        assert torch.equal(_steps(clone, x), expected)
    assert torch.equal(_steps(fresh, x), expected)  # the original is untouched by its copies

    for clone in (copy.deepcopy(fresh), pickle.loads(pickle.dumps(fresh))):  # after the last step
        assert clone.step_index == fresh.step_index and torch.equal(clone.timesteps, fresh.timesteps)
        clone.set_timesteps(steps)
        assert torch.equal(_steps(clone, _start()), expected)


def test_a_failed_step_can_be_retried():
    reference = _scheduler()
    reference.set_timesteps(6)
    expected = _steps(reference, _start())
    scheduler = _scheduler()
    scheduler.set_timesteps(6)
    x = _steps(scheduler, _start(), 3)
    t = scheduler.timesteps[3]

    def failing(*args):
        raise RuntimeError("failing network")

    scheduler._eps_and_denoised = failing  # fails inside the run, where the output is turned into (ε̂, x̂₀)
    with pytest.raises(RuntimeError, match="failing network"):
        scheduler.step(network(x, t), t, x)
    del scheduler._eps_and_denoised
    assert scheduler.step_index == 3 and scheduler._generator is None  # the next step replays the accepted outputs
    assert torch.equal(_steps(scheduler, x), expected)

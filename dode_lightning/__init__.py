"""dode-lightning: distilled ODE solvers (D-ODE, Kim, Tang & Yu, CVPR 2024) for pretrained diffusion models."""
from .api import Student, calibrate, load_student
from .checkpoints import LoadedDenoiser, load_denoiser
from .denoisers import CountingDenoiser, DiscreteEpsDenoiser, eps_from_x0, x0_from_eps
from .gmm import GaussianMixture, digits_mixture
from .schedules import EDM, VE, VPContinuous, VPDiscrete, make_schedule
from .solvers import SOLVERS, Solver, make_solver, run_stages

__version__ = "0.1.0"

__all__ = [
    "calibrate",
    "load_student",
    "Student",
    "LoadedDenoiser",
    "load_denoiser",
    "CountingDenoiser",
    "DiscreteEpsDenoiser",
    "eps_from_x0",
    "x0_from_eps",
    "GaussianMixture",
    "digits_mixture",
    "EDM",
    "VE",
    "VPContinuous",
    "VPDiscrete",
    "make_schedule",
    "SOLVERS",
    "Solver",
    "make_solver",
    "run_stages",
    "DODEScheduler",
    "export_scheduler",
]


def __getattr__(name: str):
    # diffusers is optional: the scheduler module is imported on first use only.
    if name in ("DODEScheduler", "export_scheduler"):
        try:
            from . import diffusers_scheduler
        except ImportError:
            from .checkpoints.diffusers_folder import DIFFUSERS_INSTALL_HINT

            raise ImportError(DIFFUSERS_INSTALL_HINT.replace("loading a diffusers folder", f"dode_lightning.{name}")) from None
        return getattr(diffusers_scheduler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Solvers as stage generators (plain tensor code, no Lightning)."""
from .base import SOLVERS, NFEError, Solver, make_solver, register_solver
from .first_order import DDIM, Euler, Heun, ddim_stages, heun_stages
from .stages import LambdaRule, Stage, StageGenerator, run_stages

__all__ = [
    "SOLVERS",
    "NFEError",
    "Solver",
    "make_solver",
    "register_solver",
    "DDIM",
    "Euler",
    "Heun",
    "ddim_stages",
    "heun_stages",
    "LambdaRule",
    "Stage",
    "StageGenerator",
    "run_stages",
]

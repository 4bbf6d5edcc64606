"""Solvers as stage generators (plain tensor code, no Lightning)."""
from .base import SOLVERS, NFEError, OneStagePerStep, Solver, make_solver, register_solver, solver_on
from .deis import DEIS, DEIS1, DEIS2, DEIS3, deis_coefficients, deis_stages
from .dpm_solver import DPMSolver, DPMSolver2, DPMSolver3, dpm_solver_stages, singlestep_orders
from .dpm_solver_pp import DPMSolverPP, DPMSolverPP2M, DPMSolverPP3M, dpm_solver_pp_stages, multistep_orders
from .first_order import DDIM, Euler, Heun, ddim_stages, heun_stages
from .ipndm import IPNDM, ipndm_stages
from .unipc import UniPC, UniPC2, UniPC3, unipc_coefficients, unipc_orders, unipc_stages
from .stages import Evaluate, LambdaLayout, LambdaRule, Stage, StageCorrector, StageGenerator, answer, run_stages

__all__ = [
    "SOLVERS",
    "NFEError",
    "Solver",
    "OneStagePerStep",
    "make_solver",
    "solver_on",
    "register_solver",
    "DDIM",
    "Euler",
    "Heun",
    "ddim_stages",
    "heun_stages",
    "IPNDM",
    "ipndm_stages",
    "DEIS",
    "DEIS1",
    "DEIS2",
    "DEIS3",
    "deis_coefficients",
    "deis_stages",
    "DPMSolver",
    "DPMSolver2",
    "DPMSolver3",
    "dpm_solver_stages",
    "singlestep_orders",
    "DPMSolverPP",
    "DPMSolverPP2M",
    "DPMSolverPP3M",
    "dpm_solver_pp_stages",
    "multistep_orders",
    "UniPC",
    "UniPC2",
    "UniPC3",
    "unipc_coefficients",
    "unipc_orders",
    "unipc_stages",
    "Evaluate",
    "answer",
    "LambdaRule",
    "Stage",
    "StageCorrector",
    "LambdaLayout",
    "StageGenerator",
    "run_stages",
]

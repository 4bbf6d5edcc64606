"""The paper's Fig. 2 and Fig. 5 on the exact digits mixture.

Fig. 2: cosine similarity between the denoiser outputs at every pair of steps of a 1000-step DDIM trajectory (VP
linear, every DDPM timestep), for noise prediction ε and data prediction x₀. Fig. 5: norm of x along the trajectory
and the path of two pixels, for 10-step Euler (= EDM DDIM, Karras), its D-variant (`aligned`, C = 10, seeds 0–99)
and the 1000-step Euler reference (whose Karras grid contains the 10-step one).
Usage: PYTHONPATH=. python benchmarks/trajectories.py [--quick] [--out-dir docs]
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from benchmarks.common import CALIBRATION_SEEDS, HELD_OUT_START, SCALE, figure_path, machine, markdown_table, output_dir, parser, write_section
from dode_lightning.distill import SolverSetup, build_teacher, fit_closed_form, rmse, seeded_noise, teacher_targets
from dode_lightning.gmm import GaussianMixture, digits_mixture
from dode_lightning.schedules import EDM, make_schedule
from dode_lightning.solvers import Solver

PIXELS = ((3, 3), (4, 5))  # two central pixels of the 8×8 digits (high variance across classes)


def denoiser_outputs(mixture: GaussianMixture, steps: int, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(ε outputs, x₀ outputs, σ) at every evaluation of a `steps`-step noise-prediction DDIM run on VP linear."""
    solver = SolverSetup.resolve("ddim", steps, make_schedule("vp_linear")).build()
    eps, x0, sigmas = [], [], []

    def record(x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        denoised = mixture(x, sigma, class_labels)
        eps.append(((x - denoised) / float(sigma)).reshape(len(x), -1))
        x0.append(denoised.reshape(len(x), -1))
        sigmas.append(float(sigma))
        return denoised

    solver.sample(record, noise)
    return torch.stack(eps), torch.stack(x0), torch.tensor(sigmas, dtype=torch.float64)


def cosine_matrix(outputs: Tensor) -> Tensor:
    """(steps, steps) cosine similarity between the outputs at two steps, per sample, averaged over the batch."""
    unit = outputs / outputs.norm(dim=-1, keepdim=True)
    return torch.einsum("ibd,jbd->ij", unit, unit) / outputs.shape[1]


def trajectory(solver: Solver, mixture: GaussianMixture, noise: Tensor, lambdas: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """States (stages + 1, B, …) including the initial one, and their σ."""
    states, sigmas = [solver.init_state(noise)], [float(solver.sigmas[0])]

    def keep(k: int, stage, state: Tensor) -> None:
        states.append(state.clone())
        sigmas.append(float(stage.sigma_next))

    solver.sample(mixture, noise, lambdas, observe=keep)
    return torch.stack(states), torch.tensor(sigmas, dtype=torch.float64)


def plot_cosine(eps_cos: Tensor, x0_cos: Tensor, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low = float(min(eps_cos.min(), x0_cos.min()))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, matrix, title in zip(axes, (eps_cos, x0_cos), ("noise prediction ε", "data prediction x₀")):
        image = ax.imshow(matrix.numpy(), vmin=low, vmax=1, cmap="viridis", origin="upper")
        ax.set_title(f"cosine similarity of {title}")
        ax.set_xlabel("step (0 = t 999, most noise)")
        ax.set_ylabel("step")
        fig.colorbar(image, ax=ax, shrink=0.85)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_paths(runs: dict[str, tuple[Tensor, Tensor]], exact: Tensor, sample: int, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = [("-", "k", None), ("--", "tab:orange", "o"), ("-", "tab:blue", "^")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for (label, (states, sigmas)), (line, color, marker) in zip(runs.items(), styles):
        norm = states[:, sample].reshape(len(states), -1).norm(dim=-1)
        plotted = sigmas.clamp(min=1e-3)  # σ = 0 drawn at 10⁻³ on the log axis
        axes[0].plot(plotted.numpy(), norm.numpy(), line, color=color, marker=marker, label=label)
        (ra, ca), (rb, cb) = PIXELS
        scaled = states[:, sample, 0] / torch.sqrt(1 + sigmas**2)[:, None, None]  # VP form: bounded, as DDIM sees it
        axes[1].plot(scaled[:, ra, ca].numpy(), scaled[:, rb, cb].numpy(), line, color=color, marker=marker, label=label)
    (ra, ca), (rb, cb) = PIXELS
    axes[1].plot([float(exact[sample, 0, ra, ca])], [float(exact[sample, 0, rb, cb])], "*", color="tab:red", markersize=14, label="exact ODE endpoint")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].invert_xaxis()
    axes[0].set_xlabel("σ of the state (σ = 0 drawn at 10⁻³)")
    axes[0].set_ylabel("‖x‖ (one sample)")
    axes[0].set_title("norm of x along the trajectory")
    axes[1].set_xlabel(f"pixel {PIXELS[0]} of x/√(1+σ²)")
    axes[1].set_ylabel(f"pixel {PIXELS[1]} of x/√(1+σ²)")
    axes[1].set_title("path of two pixels (same sample, VP scaling)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--batch", type=int, default=16)
    args = args_parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    steps = 190 if args.quick else 1000  # Karras grids with 9m + 1 points contain the 10-point grid
    mixture = digits_mixture()
    noise, _ = seeded_noise(range(HELD_OUT_START, HELD_OUT_START + args.batch), (1, 8, 8))

    eps, x0, eval_sigmas = denoiser_outputs(mixture, steps, noise)
    eps_cos, x0_cos = cosine_matrix(eps), cosine_matrix(x0)
    lags = [1, 10, 100] if steps >= 1000 else [1, 10]
    fig2_rows = []
    for name, matrix in (("ε", eps_cos), ("x₀", x0_cos)):
        cells = [name] + [f"{float(torch.diagonal(matrix, lag).mean()):.4f}" for lag in lags]
        cells += [f"{float(torch.diagonal(matrix, lag).min()):.4f}" for lag in lags[:1]]
        cells.append(f"{float(matrix.min()):.3f}")
        fig2_rows.append(cells)
    fig2 = markdown_table(["prediction"] + [f"mean cos, lag {lag}" for lag in lags] + ["min cos, lag 1", "min cos, any pair"], fig2_rows)

    setup = SolverSetup.resolve("euler", 10, EDM())
    student = setup.build()
    calib, _ = seeded_noise(CALIBRATION_SEEDS, (1, 8, 8))
    teacher, indices = build_teacher(student, setup, SCALE, "aligned")
    lambdas = fit_closed_form(student, mixture, calib, teacher_targets(teacher, indices, mixture, calib)).lambdas
    reference = SolverSetup.resolve("euler", steps, EDM()).build()
    reference_label = f"reference ({steps} steps)"
    runs = {
        reference_label: trajectory(reference, mixture, noise),
        "base (10 steps)": trajectory(student, mixture, noise),
        "D, aligned (10 steps)": trajectory(student, mixture, noise, lambdas),
    }
    exact = mixture.exact_endpoint(noise * 80.0, 80.0)
    ref_states, ref_sigmas = runs[reference_label]
    at_knots = [int(torch.argmin((ref_sigmas - s).abs())) for s in student.sigmas.tolist()]
    fig5_rows = []
    for k, sigma in enumerate(student.sigmas.tolist()):
        ref = ref_states[at_knots[k]]
        cells = [str(k), f"{sigma:.3g}", f"{float(ref.reshape(len(ref), -1).norm(dim=-1).mean()):.3f}"]
        for label in ("base (10 steps)", "D, aligned (10 steps)"):
            state = runs[label][0][k]
            cells += [f"{float(state.reshape(len(state), -1).norm(dim=-1).mean()):.3f}", f"{rmse(state, ref):.4f}"]
        fig5_rows.append(cells)
    fig5 = markdown_table(["state k", "σ", "mean ‖x‖ ref.", "mean ‖x‖ base", "RMSE base vs ref.", "mean ‖x‖ D", "RMSE D vs ref."], fig5_rows)
    endpoint = markdown_table(
        ["run", "RMSE to the exact ODE endpoint"],
        [[label, f"{rmse(states[-1], exact):.4f}"] for label, (states, _) in runs.items()],
    )
    seconds = time.perf_counter() - start
    print(fig2, fig5, endpoint, sep="\n\n")
    print(f"\n{seconds:.0f} s in all")
    out = output_dir(args)
    if out is None:
        return
    plot_cosine(eps_cos, x0_cos, figure_path(out, "fig2_cosine"))
    plot_paths(runs, exact, 0, figure_path(out, "fig5_trajectory"))
    command = "PYTHONPATH=. python benchmarks/trajectories.py" + (" --quick" if args.quick else "")
    text = f"""## Fig. 2 and Fig. 5 analogues

`{command}` — {machine()}; {seconds:.0f} s wall. {args.batch} held-out seeds from {HELD_OUT_START:,}.

### Fig. 2: similarity of denoiser outputs along a {steps}-step trajectory

{steps}-step noise-prediction DDIM on VP linear (σ from {float(eval_sigmas[0]):.1f} to {float(eval_sigmas[-1]):.3g}); at each
evaluation the exact denoiser's x₀ = D(x; σ) and ε = (x − D)/σ (VE form), cosine similarity between the flattened
outputs at steps i and j of the same sample, averaged over the samples.

![cosine similarity heatmaps](benchmarks/fig2_cosine.png)

{fig2}

### Fig. 5: norm of x and two pixels along the trajectory

10-step Euler (= EDM DDIM, Karras ρ = 7), its D-variant (`aligned`, C = {SCALE}, λ fitted on seeds 0–99) and the
{steps}-step Euler reference; the reference's Karras grid contains the 10-step grid, so the states compare at
the same σ. The plot shows sample 0 (pixel paths in VP scaling x/√(1+σ²), which keeps them bounded); the table
averages ‖x‖ (8×8 pixels, VE form) over the {args.batch} samples.

![norm and pixel paths](benchmarks/fig5_trajectory.png)

{fig5}

{endpoint}
"""
    write_section(out, "trajectories", text)


if __name__ == "__main__":
    main()

"""EDM's preconditioners: D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise) around a `SongUNet` or `DhariwalUNet`.

Formulas from `shared/reference/checkpoints.md` §7 and `method.md` §6.1. Each class's `forward(x, sigma,
class_labels=None)` is the package's denoiser interface (x in VE form, returns x̂₀). Deliberate difference from
EDM: the network always computes in float32 (EDM switches to fp16 for `use_fp16` nets on CUDA); `use_fp16` is kept
as an attribute only. D is returned in float32, as EDM does; solvers cast it to their state dtype.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .edm import DhariwalUNet, SongUNet

__all__ = ["EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond", "PRECONDITIONERS", "MODEL_TYPES"]

MODEL_TYPES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


def _cpu_f32(value: float | int | Tensor) -> Tensor:
    # Constructor-time constants are computed on the CPU in float32 as EDM does, even under a meta-device context.
    return torch.as_tensor(value, dtype=torch.float32, device="cpu")


class _Precond(nn.Module):
    """Shared plumbing: builds `self.model`, normalises inputs and labels, applies the coefficients."""

    default_model_type: ClassVar[str]
    output_channel_factor: ClassVar[int] = 1

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        model_type: str | None = None,
        own_kwargs: dict[str, Any] | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        model_type = model_type or self.default_model_type
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model_type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.init_kwargs = dict(
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, use_fp16=use_fp16,
            **(own_kwargs or {}), model_type=model_type, **model_kwargs,
        )
        self.model = MODEL_TYPES[model_type](
            img_resolution=img_resolution,
            in_channels=img_channels,
            out_channels=img_channels * self.output_channel_factor,
            label_dim=label_dim,
            **model_kwargs,
        )

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) for float32 σ shaped (N, 1, 1, 1)."""
        raise NotImplementedError

    def round_sigma(self, sigma: Tensor | float) -> Tensor:
        """Noise level the network is trained on nearest to σ (identity except for iDDPM)."""
        return torch.as_tensor(sigma)

    def _labels(self, class_labels: Tensor | None, x: Tensor) -> Tensor | None:
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros(1, self.label_dim, device=x.device)
        if not class_labels.is_floating_point() and class_labels.ndim == 1:
            # Integer class indices are accepted as a convenience; EDM itself takes one-hot rows.
            return nn.functional.one_hot(class_labels.long(), self.label_dim).to(device=x.device, dtype=torch.float32)
        return class_labels.to(device=x.device, dtype=torch.float32).reshape(-1, self.label_dim)

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | float,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        out = self.model(c_in * x, c_noise.flatten(), self._labels(class_labels, x), augment_labels=augment_labels)
        return c_skip * x + c_out * out[:, : self.img_channels].to(torch.float32)


class EDMPrecond(_Precond):
    """Karras et al.'s preconditioning: σ_d²/(σ²+σ_d²), σσ_d/√(σ²+σ_d²), 1/√(σ²+σ_d²), ¼ ln σ."""

    default_model_type = "DhariwalUNet"

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0,
        sigma_max: float = float("inf"),
        sigma_data: float = 0.5,
        model_type: str = "DhariwalUNet",
        **model_kwargs: Any,
    ) -> None:
        own = dict(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data)
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, own, **model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class VPPrecond(_Precond):
    """Song et al.'s continuous VP (DDPM++ baseline): c_skip 1, c_out −σ, c_in 1/√(σ²+1), c_noise (M−1)·σ⁻¹_VP(σ)."""

    default_model_type = "SongUNet"

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        M: int = 1000,
        epsilon_t: float = 1e-5,
        model_type: str = "SongUNet",
        **model_kwargs: Any,
    ) -> None:
        own = dict(beta_d=beta_d, beta_min=beta_min, M=M, epsilon_t=epsilon_t)
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, own, **model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(_cpu_f32(epsilon_t)))
        self.sigma_max = float(self.sigma(_cpu_f32(1)))

    def sigma(self, t: Tensor) -> Tensor:
        """σ_VP(t) = √(exp(½β_d t² + β_min t) − 1)."""
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: Tensor) -> Tensor:
        """t with σ_VP(t) = σ."""
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c_in = 1 / (sigma**2 + 1).sqrt()
        return torch.ones_like(sigma), -sigma, c_in, (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(_Precond):
    """Song et al.'s VE (NCSN++ baseline): c_skip 1, c_out σ, c_in 1, c_noise ln(σ/2)."""

    default_model_type = "SongUNet"

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0.02,
        sigma_max: float = 100,
        model_type: str = "SongUNet",
        **model_kwargs: Any,
    ) -> None:
        own = dict(sigma_min=sigma_min, sigma_max=sigma_max)
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, own, **model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


class iDDPMPrecond(_Precond):
    """Nichol & Dhariwal's improved DDPM (ADM baseline) on its discrete σ table u_0 > … > u_M = 0.

    c_skip 1, c_out −σ, c_in 1/√(σ²+1), c_noise M−1−j with j the index of the u_j nearest σ; the network
    outputs 2·img_channels channels (mean and variance) and D uses the first img_channels.
    """

    default_model_type = "DhariwalUNet"
    output_channel_factor = 2

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        C_1: float = 0.001,
        C_2: float = 0.008,
        M: int = 1000,
        model_type: str = "DhariwalUNet",
        **model_kwargs: Any,
    ) -> None:
        own = dict(C_1=C_1, C_2=C_2, M=M)
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, own, **model_kwargs)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        u = torch.zeros(M + 1, device="cpu")
        for j in range(M, 0, -1):
            ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer("u", u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def alpha_bar(self, j: int) -> Tensor:
        """ᾱ(j) = sin²(π j / (2M(C_2+1))), float32."""
        return (0.5 * math.pi * _cpu_f32(j) / self.M / (self.C_2 + 1)).sin() ** 2

    def sigma_index(self, sigma: Tensor) -> Tensor:
        """Index j of the u_j nearest each σ (same shape as σ)."""
        flat = torch.as_tensor(sigma).to(device=self.u.device, dtype=torch.float32).reshape(-1, 1)
        return (flat - self.u.reshape(1, -1)).abs().argmin(dim=1).reshape(torch.as_tensor(sigma).shape)

    def round_sigma(self, sigma: Tensor | float) -> Tensor:
        sigma = torch.as_tensor(sigma)
        return self.u[self.sigma_index(sigma).flatten()].to(sigma.dtype).reshape(sigma.shape).to(sigma.device)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = self.M - 1 - self.sigma_index(sigma).to(device=sigma.device, dtype=torch.float32)
        return torch.ones_like(sigma), -sigma, c_in, c_noise


PRECONDITIONERS: dict[str, type[_Precond]] = {
    "EDMPrecond": EDMPrecond,
    "VPPrecond": VPPrecond,
    "VEPrecond": VEPrecond,
    "iDDPMPrecond": iDDPMPrecond,
}

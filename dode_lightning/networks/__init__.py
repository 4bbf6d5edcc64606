"""Network architectures for pretrained checkpoints (EDM's U-Nets and preconditioners), plain PyTorch."""
from .edm import DhariwalUNet, SongUNet
from .precond import MODEL_TYPES, PRECONDITIONERS, EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond

__all__ = [
    "DhariwalUNet",
    "SongUNet",
    "MODEL_TYPES",
    "PRECONDITIONERS",
    "EDMPrecond",
    "VEPrecond",
    "VPPrecond",
    "iDDPMPrecond",
]

"""Calibrate a D-ODE solver: `python train.py --config configs/gmm_digits.yaml` (see README)."""
import sys

from dode_lightning.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())

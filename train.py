"""Calibrate a D-ODE solver: `python train.py --config configs/gmm_digits.yaml` (see README)."""
import sys

if __name__ == "__main__":
    from start_signals import stop_cleanly_while_starting

    stop_cleanly_while_starting()

from dode_lightning.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())

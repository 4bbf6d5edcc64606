"""Sample a (D-)solver for a range of seeds: `python sample.py --config configs/gmm_digits.yaml --lambdas none
--seeds 0-999 --outdir out/` (see docs/sampling.md)."""
import sys

if __name__ == "__main__":
    from start_signals import stop_cleanly_while_starting

    stop_cleanly_while_starting()

from dode_lightning.sample_cli import sample_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(sample_main())

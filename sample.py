"""Sample a (D-)solver for a range of seeds: `python sample.py --config configs/gmm_digits.yaml --lambdas none
--seeds 0-999 --outdir out/` (see docs/sampling.md)."""
import sys

from dode_lightning.sample_cli import sample_main

if __name__ == "__main__":
    sys.exit(sample_main())

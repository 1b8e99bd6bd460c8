"""`python -m convert HF_DIR OUT_DIR [--dtype D]` (same as `polar-jax convert`)."""

import sys

from polar_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))

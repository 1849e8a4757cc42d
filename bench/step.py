"""The step benchmark under its earlier name, kept for the commands recorded in
bench/results/: ``python bench/step.py ARGS`` is ``python -m fastsam.bench ARGS``, with SAM
only unless ``--optimizer``/``--optimizers`` says otherwise (as this script did)."""
import sys

from fastsam.bench.__main__ import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a in ("--optimizer", "--optimizers") for a in argv):
        argv = ["--optimizers", "sam", *argv]
    main(argv)

"""Evaluate a saved run (caption its eval split, score, write RUN_DIR/eval). Launch with deepspeed, torchrun
or python:

    python launchers/eval.py RUN_DIR [--num-beams 5] [--out DIR]
    deepspeed --num_gpus 2 launchers/eval.py RUN_DIR      # ZeRO-3, generation sharded over ranks
"""

import sys

from ptscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))

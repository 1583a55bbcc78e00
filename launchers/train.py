"""Train a PT-PEFT recipe. Launch with deepspeed, torchrun or python:

    deepspeed launchers/train.py --ds ds_configs/zero3.json
    deepspeed --num_gpus 2 launchers/train.py --ds ds_configs/zero3.json [--recipe R.yaml] [key=value ...]
    torchrun --nproc_per_node 2 launchers/train.py --ds ds_configs/zero3.json
"""

import sys

from ptscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

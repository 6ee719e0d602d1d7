"""finetune stage. On the CPU (one process):

    OMP_NUM_THREADS=8 accelerate launch -q --config_file recipes/accelerate/cpu.yaml \\
        recipes/finetune.py --config recipes/X.yaml [key=value ...]

Several processes or GPUs: another config of recipes/accelerate/ (e.g. ddp.yaml). The config gives
accelerate every value it would otherwise default and announce; `-q` keeps accelerate's own
traceback out when the run stops on a mistake in the recipe or data, which ends in one line
naming it (this script exits with status 2, the launcher with 1; `--debug` shows the traceback).
With no --config it runs the easy-VQA default recipe (recipes/easyvqa_finetune.yaml)."""
import sys

from seechat.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("finetune"))

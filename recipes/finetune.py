"""finetune stage: `accelerate launch recipes/finetune.py --config recipes/X.yaml [key=value ...]`.
With no --config it runs the easy-VQA default recipe (recipes/easyvqa_finetune.yaml)."""
import sys

from seechat.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("finetune"))

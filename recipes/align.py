"""align stage: `accelerate launch recipes/align.py --config recipes/X.yaml [key=value ...]`.
With no --config it runs the easy-VQA default recipe (recipes/easyvqa_align.yaml)."""
import sys

from seechat.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("align"))

"""Prepare easy-VQA for seechat's embedded default. The library code (and what is written) is
seechat/experiments/easyvqa/prepare.py; this script is the checkout's entry point to it.

    python data/prepare_easyvqa.py [--out data/generated/easyvqa] [--seed 0]
"""
import sys

from seechat.experiments.easyvqa.prepare import *  # noqa: F401,F403  (the names, for scripts importing this file)
from seechat.experiments.easyvqa.prepare import main

if __name__ == "__main__":
    sys.exit(main())

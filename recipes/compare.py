"""Every path (MLP projector, Q-Former, resampler, native early fusion) on easy-VQA under one
training-time budget: `python recipes/compare.py [--config recipes/compare.yaml] [key=value ...]`,
the same as `seechat compare`. Writes benchmarks/results/compare.{json,md,png}."""
import sys

from seechat.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))

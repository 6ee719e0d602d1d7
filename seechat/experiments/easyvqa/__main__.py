"""`python -m seechat.experiments.easyvqa` (what `make demo` runs)."""
import sys

from seechat.experiments.easyvqa.pipeline import main

sys.exit(main())

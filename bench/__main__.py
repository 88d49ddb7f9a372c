"""`python3 -m bench [--quick]` from the repository root: the benchmark suite (bench/run.py)."""

import sys

from bench.run import main

sys.exit(main())

"""``python -m benchmarks run ...``: the one entry point of the harness."""

import sys

from benchmarks.run import main

sys.exit(main())

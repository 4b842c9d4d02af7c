"""`python -m benchmarks`: see benchmarks.harness."""

import sys

from benchmarks.harness import main

sys.exit(main())

"""python -m mongoproxy"""

import sys

from mongoproxy.cli import main

sys.exit(main())

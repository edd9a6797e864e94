"""python -m hyperkern ...: the same command line as `hyperkern` (see hyperkern.cli)."""
import sys

from hyperkern.cli import main

sys.exit(main())

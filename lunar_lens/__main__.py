import sys

from lunar_lens.cli import main

sys.exit(main())

import sys

from mm_ptft.cli import main

sys.exit(main())

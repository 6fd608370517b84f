import sys

from npinv.cli import main

sys.exit(main())

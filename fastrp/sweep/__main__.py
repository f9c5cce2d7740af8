import sys

from fastrp.sweep.cli import main

sys.exit(main())

import sys

from qatkd.cli import main

sys.exit(main())

"""``python -m randprop`` (and ``torchrun -m randprop``): the command-line tool."""

import sys

from randprop.cli import main

sys.exit(main())

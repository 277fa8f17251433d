"""``python -m experiments.continual_lm``: see :mod:`.main`."""

import sys

from experiments.continual_lm.main import main

sys.exit(main())

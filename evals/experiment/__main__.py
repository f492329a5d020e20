"""`python -m evals.experiment arms|report ...`: the command line is evals.experiment.main."""

import sys

from evals.experiment import main

sys.exit(main())

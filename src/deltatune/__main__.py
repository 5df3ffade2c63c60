"""``python -m deltatune ...`` (and ``torchrun ... -m deltatune train RECIPE``) run the CLI."""

import sys

from deltatune.cli import main

sys.exit(main())

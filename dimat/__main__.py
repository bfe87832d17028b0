"""``python -m dimat ...`` (used by torchrun: ``torchrun ... -m dimat agent CONFIG``)."""

import sys

from dimat.cli import main

sys.exit(main())

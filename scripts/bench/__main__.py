"""``PYTHONPATH=scripts python -m bench``: what ``make bench`` runs."""

import sys

from .run import main

# The guard matters: the load generator's processes are spawned, and they
# import this module again as __mp_main__.
if __name__ == "__main__":
    sys.exit(main())

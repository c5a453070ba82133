import sys

from .echo import main

sys.exit(main())

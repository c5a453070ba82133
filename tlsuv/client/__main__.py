"""``python -m tlsuv.client``: the same program as the ``tlsuv-client`` console script.

Why ``tlsuv.client`` is a package: ``python -m`` on a plain module runs that
file as ``__main__``, and when the command-line code then imports the library
(as it must) the same file runs a second time as ``tlsuv.client`` -- two
copies of every class and of the per-loop pending-list registry.  For a
package, ``-m`` imports the package once and runs only this small file.
"""

import sys

from ..client_cli import main

sys.exit(main())

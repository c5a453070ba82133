"""Build glue for tlsuv's one optional C extension; everything else is in pyproject.toml.

``tlsuv._speedups`` (tlsuv/_speedups.c) is the compiled data path.  It is
optional in both senses: ``optional=True`` turns a failed compilation (no C
compiler, no Python headers) into a warning, and tlsuv then runs its
pure-Python path; ``TLSUV_NO_EXTENSIONS=1`` at build time skips it, as it
skips it at run time.  It needs nothing but a C compiler and Python's
headers: OpenSSL is reached through pyOpenSSL's binding at run time, not
linked (see the module's opening comment).
"""

import os

from setuptools import Extension, setup

ext_modules = []
if not os.environ.get("TLSUV_NO_EXTENSIONS"):
    ext_modules.append(Extension("tlsuv._speedups", ["tlsuv/_speedups.c"], optional=True))

setup(ext_modules=ext_modules)

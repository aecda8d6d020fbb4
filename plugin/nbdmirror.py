"""nbdkit plugin, from a checkout: the package's nbdmirror/nbdkit_plugin.py.

    nbdkit python plugin/nbdmirror.py source=SRC control=SOCK [target=URI ...]

The same plugin and keys that `nbdmirror serve` uses.  This file only runs
that one (which loads its package by location) and serves its callbacks.
"""

import importlib.util
import os

_PLUGIN = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "nbdmirror", "nbdkit_plugin.py")
_spec = importlib.util.spec_from_file_location("nbdmirror_plugin", _PLUGIN)
_plugin = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_plugin)
globals().update((name, value) for name, value in vars(_plugin).items()
                 if not name.startswith("_"))

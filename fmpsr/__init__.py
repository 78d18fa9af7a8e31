"""fmpsr: prune image super-resolution networks inside BasicSR.

Importing the package patches basicsr 1.4.2 for current torch (:mod:`fmpsr.compat`) and registers
fmpsr's archs, models and losses in BasicSR's registries, the way Real-ESRGAN's plug-in does.
"""
from .compat import patch_basicsr

patch_basicsr()

from . import archs, data, losses, models  # noqa: F401,E402  (registers them)

__version__ = '0.1.0'

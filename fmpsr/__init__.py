"""fmpsr: prune image super-resolution networks inside BasicSR.

Importing the package patches basicsr 1.4.2 for current torch (:mod:`fmpsr.compat`), registers
fmpsr's archs, models and losses in BasicSR's registries, the way Real-ESRGAN's plug-in does, and
adds option / data checks and exact resume to BasicSR's pipelines (:mod:`fmpsr.pipeline`).
"""
from .compat import patch_basicsr

patch_basicsr()

from . import archs, data, losses, models  # noqa: F401,E402  (registers them)
from .pipeline import install as _install_pipeline  # noqa: E402

_install_pipeline()

__version__ = '0.1.0'

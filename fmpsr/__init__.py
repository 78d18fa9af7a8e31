"""fmpsr: prune image super-resolution networks inside BasicSR.

Importing the package patches basicsr 1.4.2 for current torch (:mod:`fmpsr.compat`), registers
fmpsr's archs, models and losses in BasicSR's registries, the way Real-ESRGAN's plug-in does, and
adds option / data checks and exact resume to BasicSR's pipelines (:mod:`fmpsr.pipeline`). Option
files are read with a safe YAML loader (:mod:`fmpsr.options_io`), and a torch whose
``weights_only=True`` loading is unsafe stops the import (:mod:`fmpsr.requirements`).
"""
from .requirements import check_torch

check_torch()  # before anything loads a checkpoint: older torch's weights_only=True is not safe

from .compat import patch_basicsr  # noqa: E402

patch_basicsr()

from . import archs, data, losses, models  # noqa: F401,E402  (registers them)
from .options_io import install as _install_safe_options  # noqa: E402
from .pipeline import install as _install_pipeline  # noqa: E402

_install_safe_options()  # safe YAML for option files; before the pipeline wraps parse_options
_install_pipeline()

__version__ = '0.1.0'

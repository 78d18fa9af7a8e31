"""Import every ``*_model.py`` file here so its classes land in BasicSR's registries."""
import importlib
from os import path as osp

from basicsr.utils import scandir

_folder = osp.dirname(osp.abspath(__file__))
_suffix = '_model.py'
_modules = [importlib.import_module(f'fmpsr.models.{osp.splitext(name)[0]}')
            for name in sorted(scandir(_folder)) if name.endswith(_suffix)]

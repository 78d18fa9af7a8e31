"""Versions of fmpsr's dependencies that are checked at import, because an older one is unsafe.

fmpsr loads every checkpoint with ``torch.load(weights_only=True)`` and relies on it to refuse
pickled code. That guarantee does not hold on older torch: CVE-2025-32434 (remote code execution
through ``weights_only=True``) was fixed in torch 2.6, and CVE-2026-24747 in torch 2.10. ``import
fmpsr`` therefore stops on a torch older than :data:`MIN_TORCH` with one line and exit status 2.
"""
import sys

MIN_TORCH = '2.10'


def torch_is_safe(version):
    """True when ``version`` (a torch version string such as ``'2.15.0+cu132'``) is at least
    :data:`MIN_TORCH`; local labels (``+cpu``) and pre-release tags of that release count as it."""
    from packaging.version import Version
    return Version(Version(str(version)).base_version) >= Version(MIN_TORCH)


def check_torch():
    """Stop with one line on stderr and exit status 2 when the installed torch is older than
    :data:`MIN_TORCH` (its ``weights_only=True`` loading is not safe there).

    Raises:
        SystemExit: status 2, after printing ``fmpsr: error: torch X is older than ...``.
    """
    import torch
    if not torch_is_safe(torch.__version__):
        print(f'fmpsr: error: torch {torch.__version__} is older than {MIN_TORCH}: its torch.load(weights_only=True) '
              'can run code from a checkpoint (CVE-2025-32434, CVE-2026-24747); install torch>='
              f'{MIN_TORCH}', file=sys.stderr, flush=True)
        raise SystemExit(2)

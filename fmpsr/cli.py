"""Errors a user can read, for every fmpsr command (``fmpsr/train.py``, ``fmpsr/test.py``, ``scripts/``).

:func:`run_cli` runs a command's ``main`` and turns the errors that come from bad input (an option
file, a data set, a checkpoint, a command-line value) into one line on stderr::

    fmpsr: error: pruning: unknown key(s) ['lamda_c']; known keys are [...]

with exit status 2 (argparse's status for bad usage), instead of a Python traceback. fmpsr's checks
raise ``ValueError`` (``DataCheckError``), ``KeyError``, ``FileNotFoundError`` / ``OSError``,
``FloatingPointError`` (a NaN loss), ``pickle.UnpicklingError`` (``UnsafeCheckpointError``, a refused
checkpoint) or ``DataLoadError`` with a message that names the key, file or value at fault; that
message is the whole line. A ``KeyError`` raised outside fmpsr (BasicSR, torch) is a bare lookup with
no sentence of its own, so it gets its type and place added, e.g.
``fmpsr: error: missing option or entry 'datasets' (KeyError at basicsr/utils/options.py:97;
FMPSR_TRACEBACK=1 shows the traceback)``.

Every other exception (a bug) keeps its full traceback. The environment variable
``FMPSR_TRACEBACK=1`` shows the traceback of every error, for every command (``fmpsr/train.py``,
``fmpsr/test.py``, ``fmpsr-infer``, the data and deploy scripts); ``fmpsr/train.py`` and
``fmpsr/test.py`` also show it with ``--debug``, which there turns on BasicSR's debug mode as well.
"""
import os
import os.path as osp
import pickle
import sys
import traceback

FMPSR_DIR = osp.dirname(osp.abspath(__file__))
# errors raised in these folders carry messages written for users (fmpsr's checks, the scripts)
OWN_DIRS = (FMPSR_DIR + os.sep, osp.join(osp.dirname(FMPSR_DIR), 'scripts') + os.sep)
TRACEBACK_ENV = 'FMPSR_TRACEBACK'
EXIT_BAD_INPUT = 2


def readable_errors():
    """The exception types :func:`run_cli` reports in one line (bad input, not bugs)."""
    types = [ValueError, KeyError, OSError, FloatingPointError, pickle.UnpicklingError]
    try:
        import yaml
        types.append(yaml.YAMLError)
    except ImportError:  # pragma: no cover - yaml comes with basicsr
        pass
    from fmpsr.data.sampling import DataLoadError
    types.append(DataLoadError)
    return tuple(types)


def wants_traceback(argv=None):
    """True when ``FMPSR_TRACEBACK`` is set to something other than '', '0', 'false' or 'no', or when
    ``--debug`` is among the arguments (fmpsr/train.py and fmpsr/test.py accept it)."""
    argv = sys.argv[1:] if argv is None else argv
    return '--debug' in argv or os.environ.get(TRACEBACK_ENV, '').strip().lower() not in ('', '0', 'false', 'no')


def error_message(error):
    """One line for ``error``: its message; a ``KeyError`` raised outside fmpsr (the package or
    ``scripts/``), a bare lookup, also gets its origin and the ``FMPSR_TRACEBACK=1`` hint.

    That ``KeyError`` is a missing option or dict entry: ``missing option or entry 'x'``.
    Multi-line messages are joined; a DataLoader worker's re-raised error keeps only its last line
    (the original message).
    """
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        message = error.args[0]
    else:
        message = str(error) or type(error).__name__
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if 'Original Traceback (most recent call last):' in lines:
        lines = lines[-1:]  # "fmpsr.data.sampling.DataLoadError: cannot load training pair ..."
    message = ' '.join(lines)
    frame = _origin(error)
    if not isinstance(error, KeyError) or frame is None or osp.abspath(frame.filename).startswith(OWN_DIRS):
        return message
    where = f'{_short_path(frame.filename)}:{frame.lineno}'
    message = f'missing option or entry {message!r}' if ' ' not in message else message
    return f'{message} ({type(error).__name__} at {where}; {TRACEBACK_ENV}=1 shows the traceback)'


def _origin(error):
    """The innermost frame of ``error``'s traceback (where it was raised), or None."""
    frames = traceback.extract_tb(error.__traceback__)
    return frames[-1] if frames else None


def _short_path(path):
    for marker in ('site-packages' + os.sep, 'dist-packages' + os.sep):
        if marker in path:
            return path.split(marker, 1)[1]
    return osp.relpath(path) if not osp.relpath(path).startswith('..') else path


def run_cli(main, prog='fmpsr', use_return_code=False, argv=None):
    """Run ``main()`` and exit; bad-input errors end with one line on stderr and exit status 2.

    Args:
        main (callable): the command (no arguments; it reads ``sys.argv`` itself).
        prog (str): the name printed before ``error:`` (argparse style).
        use_return_code (bool): exit with ``main()``'s return value (an int status); otherwise 0.
        argv (list[str] | None): the arguments looked at for ``--debug`` (default ``sys.argv[1:]``).

    Raises:
        SystemExit: always (status 0, ``main()``'s status, or 2 for a bad-input error).
        Any exception that is not one of :func:`readable_errors`, or any exception when
        :func:`wants_traceback` is true (unchanged, with its traceback).
    """
    try:
        result = main()
    except readable_errors() as error:
        if wants_traceback(argv):
            raise
        print(f'{prog}: error: {error_message(error)}', file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    sys.exit(result if use_return_code and isinstance(result, int) and not isinstance(result, bool) else 0)

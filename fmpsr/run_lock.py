"""One run per experiment name at a time: a lock held for the whole run (``fcntl.flock``).

BasicSR renames ``experiments/<name>`` to ``<name>_archived_<time>`` when a new run starts and
``--auto_resume`` removes the temporary files of unfinished writes in it, so two runs with one name
would archive or corrupt each other's checkpoints. :func:`acquire` takes an exclusive ``flock`` on
``<parent>/.<name>.lock`` (beside the folder, not inside it, since the folder itself may be renamed)
and keeps it until the process ends; the kernel releases it whatever way the process ends (SIGKILL
included), so a stale lock file never blocks a later run. The file holds the owner's pid, host and
start time, for messages.

``flock`` works on local disks and NFSv4 (Linux emulates it with byte-range locks); on a shared file
system without lock support (e.g. Lustre mounted without ``-o flock``) taking it fails with an
``OSError`` that names the file.
"""
import atexit
import fcntl
import os
import os.path as osp
import socket
import time

_HELD = {}


class RunLockedError(OSError):
    """Another live process holds the lock of this experiment (the message names it, its pid and host)."""


def lock_path(folder):
    """The lock file of the run folder ``folder``: ``<parent>/.<basename>.lock``."""
    folder = osp.abspath(folder)
    return osp.join(osp.dirname(folder), f'.{osp.basename(folder)}.lock')


def owner(path):
    """What the lock file ``path`` says about its holder ('pid 123 on host h since <time>'), or ''."""
    try:
        with open(path) as f:
            return f.read(512).strip()
    except OSError:
        return ''


def is_locked(folder):
    """True while a live process holds the lock of ``folder`` (tried without blocking, released at once)."""
    path = lock_path(folder)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def acquire(folder, what='experiment'):
    """Take the lock of the run folder ``folder`` for the rest of this process (idempotent).

    The lock file is removed when the process exits normally; a file left by a killed process is
    reused. Acquiring checks that the file it locked is still the one at the path (another process
    may have removed it in between), so two processes can never both hold it.

    Args:
        folder (str): ``experiments/<name>`` (or ``results/<name>`` for a test run); it need not
            exist, its parent is made if missing.
        what (str): for messages.

    Returns:
        str: the lock file's path.

    Raises:
        RunLockedError: another live process holds it (its pid and host are named).
        OSError: the lock file cannot be made or locked (e.g. a read-only or lock-less file system).
    """
    path = lock_path(folder)
    if path in _HELD:
        return path
    os.makedirs(osp.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = owner(path) or 'another process'
            raise RunLockedError(
                f'{what} {osp.basename(osp.abspath(folder))!r} is in use by another run ({holder}; lock file '
                f'{path!r}): two runs with one name would archive or overwrite each other\'s files. Wait for it to '
                'end or stop it, or give this run another name') from None
        except OSError as error:
            os.close(fd)
            raise OSError(f'cannot lock {path!r} ({error.strerror or error}): the file system may not support '
                          'flock; fmpsr locks each run so that two runs with one name cannot overwrite each '
                          'other') from error
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # removed or replaced by its previous holder after we opened it: try again
    os.ftruncate(fd, 0)
    os.write(fd, f'pid {os.getpid()} on host {socket.gethostname()} since {time.strftime("%Y-%m-%d %H:%M:%S")}\n'
             .encode())
    _HELD[path] = (fd, os.getpid())
    return path


def release(path):
    """Remove the lock file ``path`` and release it (done at exit for every held lock)."""
    fd, pid = _HELD.pop(path, (None, None))
    if fd is None:
        return
    if pid == os.getpid():  # not in a forked child (DataLoader workers share the descriptor)
        try:
            os.remove(path)  # still locked here: nobody can take the file and lose it
        except OSError:
            pass
    os.close(fd)


def _close_in_child():
    """In a forked child (a DataLoader worker, a helper process): close the inherited descriptors of the
    held locks. ``flock`` belongs to the open file, so a child that outlived a killed parent would
    otherwise keep the run locked; closing the child's copy leaves the parent's lock in place."""
    for path, (fd, pid) in list(_HELD.items()):
        _HELD.pop(path)
        try:
            os.close(fd)
        except OSError:
            pass


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_close_in_child)


@atexit.register
def _release_all():
    for path in list(_HELD):
        release(path)

"""Read and write 8- / 16-bit images (grayscale, BGR, BGRA) with OpenCV, without half-written files."""
import os

import cv2
import numpy as np

from fmpsr.pruning.export import atomic_write

MAX_VALUES = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}
EXTENSIONS = ('png', 'jpg')


class ImageReadError(OSError):
    """A file that is not an image OpenCV can read, or one of an unsupported kind."""


def read_image(path):
    """Read an image as stored (``cv2.IMREAD_UNCHANGED``).

    Args:
        path (str): image file.

    Returns:
        ndarray: (H, W) grayscale, (H, W, 3) BGR or (H, W, 4) BGRA; dtype uint8 or uint16.

    Raises:
        ImageReadError: unreadable file, or a dtype / channel count other than the above (the path
            and what was found are named).
    """
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageReadError(f'cannot read {path!r} as an image')
    if img.dtype not in MAX_VALUES:
        raise ImageReadError(f'{path!r} has pixel type {img.dtype}; only 8- and 16-bit images are supported')
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4))):
        raise ImageReadError(f'{path!r} has shape {img.shape}; expected gray, BGR or BGRA')
    return img


def to_float(img):
    """uint8 / uint16 image -> float32 in [0, 1] (same shape)."""
    return img.astype(np.float32) / MAX_VALUES[img.dtype]


def from_float(img, dtype):
    """float image in [0, 1] -> ``dtype`` (uint8 / uint16), clipped and rounded."""
    peak = MAX_VALUES[np.dtype(dtype)]
    return (np.clip(img, 0, 1) * peak).round().astype(dtype)


def write_image(path, img):
    """Write ``img`` to ``path`` atomically; the format follows the extension of ``path``.

    16-bit images written as JPEG are converted to 8 bits (JPEG has no 16-bit form).

    Raises:
        ValueError: OpenCV cannot encode ``img`` in that format (the path is named).
    """
    ext = os.path.splitext(path)[1].lower()
    if ext in ('.jpg', '.jpeg') and img.dtype == np.uint16:
        img = from_float(to_float(img), np.uint8)
    ok, data = cv2.imencode(ext, img)
    if not ok:
        raise ValueError(f'OpenCV cannot write {path!r} (shape {img.shape}, {img.dtype})')

    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(data.tobytes())
        chmod_default(tmp)
    atomic_write(path, write)


def chmod_default(path):
    """Give ``path`` the permissions a plain ``open()`` would (0666 less the umask): the temporary
    files of :func:`~fmpsr.pruning.export.atomic_write` are created 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)

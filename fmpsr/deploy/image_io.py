"""Read and write 8- / 16-bit images (grayscale, BGR, BGRA) with OpenCV, without half-written files.

Images may come from anyone, so :func:`read_image` looks at the file's header (Pillow reads only
the header when it opens a file) before anything is decoded: an image of more than ``max_pixels``
pixels (default :data:`DEFAULT_MAX_PIXELS`, 64 megapixels) is refused without being decoded, however
small the file (a few-kB PNG can declare 30000 x 30000 pixels). The EXIF orientation tag is honoured:
the pixels are turned as Pillow's ``ImageOps.exif_transpose`` would, so the output stands the way
photo viewers show the input.
"""
import os
import warnings

import cv2
import numpy as np

from fmpsr.pruning.export import atomic_write

MAX_VALUES = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}
EXTENSIONS = ('png', 'jpg')
DEFAULT_MAX_PIXELS = 64_000_000  # 64 megapixels: e.g. 8000 x 8000
EXIF_ORIENTATION = 0x0112


class ImageReadError(OSError):
    """A file that is not an image OpenCV can read, or one of an unsupported kind."""


class ImageTooLargeError(ImageReadError):
    """An image whose header declares more pixels than allowed; it was not decoded."""


def read_header(path):
    """Size and EXIF orientation of an image from its header, without decoding the pixels (Pillow).

    Returns:
        tuple: (width, height, orientation), orientation the EXIF tag 1..8 (1 when absent or invalid).

    Raises:
        ImageReadError: Pillow cannot identify the file as an image (the path is named).
    """
    from PIL import Image, UnidentifiedImageError

    saved = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # the caller compares the size with its own limit
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with Image.open(path) as image:
                width, height = image.size
                orientation = _orientation(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ImageReadError(f'cannot read {path!r} as an image ({reason})') from error
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    return width, height, orientation


def _orientation(image):
    """EXIF orientation of an opened (not loaded) Pillow image: 1..8, 1 when there is none."""
    from PIL import Image

    try:
        if image.format == 'TIFF':
            exif = image.getexif()  # TIFF tags are read with the header
        elif image.info.get('exif'):
            exif = Image.Exif()
            exif.load(image.info['exif'])
        else:
            return 1
        value = exif.get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 (a damaged EXIF block only loses the orientation)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def apply_orientation(img, orientation):
    """Turn ``img`` (H, W[, C]) upright for EXIF ``orientation`` 1..8 (as ``ImageOps.exif_transpose``)."""
    if orientation in (5, 6, 7, 8):
        img = {5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1),
               7: lambda a: np.rot90(a, 2).swapaxes(0, 1), 8: lambda a: np.rot90(a, 1)}[orientation](img)
    else:
        img = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1]}.get(orientation,
                                                                                             lambda a: a)(img)
    return np.ascontiguousarray(img)


def read_image(path, max_pixels=DEFAULT_MAX_PIXELS):
    """Read an image as stored (``cv2.IMREAD_UNCHANGED``), turned upright by its EXIF orientation.

    Args:
        path (str): image file.
        max_pixels (int | None): refuse images of more pixels (width x height, from the header, before
            decoding); None or 0: no limit.

    Returns:
        ndarray: (H, W) grayscale, (H, W, 3) BGR or (H, W, 4) BGRA; dtype uint8 or uint16.

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels (not decoded).
        ImageReadError: unreadable file, or a dtype / channel count other than the above (the path
            and what was found are named).
    """
    width, height, orientation = read_header(path)
    if max_pixels and width * height > max_pixels:
        raise ImageTooLargeError(f'{path!r} is {width} x {height} = {width * height / 1e6:.1f} megapixels, above the '
                                 f'limit of {max_pixels / 1e6:g} megapixels (not decoded; --max-pixels raises it)')
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)  # UNCHANGED: no EXIF turn by OpenCV, done below
    if img is None:
        raise ImageReadError(f'cannot read {path!r} as an image')
    if img.shape[:2] != (height, width):
        raise ImageReadError(f'{path!r}: OpenCV decoded {img.shape[1]} x {img.shape[0]} pixels, its header says '
                             f'{width} x {height}')
    if img.dtype not in MAX_VALUES:
        raise ImageReadError(f'{path!r} has pixel type {img.dtype}; only 8- and 16-bit images are supported')
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4))):
        raise ImageReadError(f'{path!r} has shape {img.shape}; expected gray, BGR or BGRA')
    return apply_orientation(img, orientation)


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
    atomic_write(path, write)

"""Reading an image file: the one rule every file-backed path follows (folder tasks, their stores, prediction).

- **Fully decoded on open.** ``Image.open`` reads only the header; a truncated JPEG fails only when its
  pixels are needed. :func:`open_image` decodes everything, so a bad file fails here, naming itself.
- **Upright.** A camera stores a photo as the sensor saw it and records how to turn it in the EXIF
  ``Orientation`` tag; viewers apply it, and so do Hugging Face ``datasets`` (its ``Image`` feature calls
  ``ImageOps.exif_transpose``). torchvision's and timm's file loaders do not. inca applies the tag, so a
  portrait photo is seen as a portrait, the same way in training, in activation stores and in prediction.
- **Regular files only.** A FIFO or device named ``x.png`` would block or stream forever; it is refused
  without being read.
"""

from __future__ import annotations

import os
import stat

from PIL import ExifTags, Image, ImageOps

__all__ = ["IMAGE_EXTENSIONS", "open_image", "open_image_turned"]

# The file extensions read as images: torchvision's ``IMG_EXTENSIONS`` (what its ImageFolder reads), written out so
# that finding a folder's images imports no torch.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def open_image(path: str | os.PathLike) -> Image.Image:
    """The RGB pixels of an image file, fully decoded and turned upright by its EXIF orientation (if any)."""
    return open_image_turned(path)[0]


def open_image_turned(path: str | os.PathLike) -> tuple[Image.Image, bool]:
    """:func:`open_image`, and whether the EXIF orientation turned the image (it is set and not "as stored"):
    such files read differently here than through loaders that ignore the tag.

    Raises ``OSError`` (``PermissionError``, ``IsADirectoryError``, or PIL's errors for files it cannot
    decode) or ``ValueError`` for a file that is not a regular file; callers name the file in their message.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO for reading must not wait for a writer
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        os.set_blocking(fd, True)
        file = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with file, Image.open(file) as image:
        image.load()
        turned = image.getexif().get(ExifTags.Base.Orientation, 1) not in (0, 1)
        ImageOps.exif_transpose(image, in_place=True)
        return image.convert("RGB"), turned  # a copy, which outlives the closed file


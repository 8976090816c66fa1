"""One small reader per teacher file format; ``models.loading`` picks one by content and finishes the job.

Every reader returns a :class:`~dfcompress.models.formats.common.Loaded` (a hookable eval-mode module plus
whatever metadata the file carried); shape/preprocessing defaults and sanity checks live in ``loading``
so that they are applied identically to every format.
"""
from __future__ import annotations

from .common import Loaded
from .detect import detect_format

__all__ = ["Loaded", "detect_format"]

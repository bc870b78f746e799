"""Exception types shared by every reflora module."""


class FormatError(ValueError):
    """A file (safetensors, adapter directory, golden vectors) is malformed.

    A subclass of ValueError, so ``except ValueError`` still catches it. The
    message names the file and the offending key or byte range.
    """

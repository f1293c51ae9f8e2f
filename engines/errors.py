"""Typed errors of the runtime, raised where the fact is known.

They know nothing of HTTP: the server maps each type to a status in one table
(server/errors.py) and the CLIs to a one-line message; ``code`` is the stable machine-readable
name that both show.
"""

from __future__ import annotations


class Sam3Error(Exception):
    """Base class: every error the runtime raises on purpose."""

    code = "sam3_error"


class BundleError(Sam3Error):
    """The bundle directory or its manifest is missing, malformed or corrupt."""

    code = "bundle_error"


class BackendUnavailable(Sam3Error):
    """The requested backend (TensorRT, a GPU) is not present on this machine."""

    code = "backend_unavailable"


class EngineError(Sam3Error):
    """An engine failed to build, load or run."""

    code = "engine_error"


class InvalidInput(Sam3Error):
    """Base for errors caused by what the caller sent."""

    code = "invalid_input"


class InvalidImage(InvalidInput):
    """Bytes that do not decode to an image, or an image with no pixels."""

    code = "invalid_image"


class ImageTooLarge(InvalidInput):
    """Over the megapixel limit (checked from the header, before decoding)."""

    code = "image_too_large"


class UnsupportedImageType(InvalidInput):
    """An image source of a kind the decoder cannot read."""

    code = "unsupported_media_type"


class InvalidPrompt(InvalidInput):
    """Empty prompt list, empty string, or otherwise unusable text."""

    code = "invalid_prompt"


class PromptTooLong(InvalidPrompt):
    code = "prompt_too_long"


class TooManyPrompts(InvalidPrompt):
    code = "too_many_prompts"


class InvalidOption(InvalidInput):
    """A threshold or format option out of range."""

    code = "invalid_option"


class InvalidBox(InvalidInput):
    """An exemplar box that is degenerate, outside the image, one too many, or a prompt the
    model cannot use (negative boxes with neither text nor a positive box)."""

    code = "invalid_box"


class ExemplarsUnsupported(InvalidInput):
    """Exemplar (box) prompts sent to a bundle or backend without the exemplar graphs."""

    code = "exemplars_unsupported"

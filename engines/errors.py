"""Typed errors of the runtime, raised where the fact is known.

The server maps each to an HTTP status in one exception handler and the CLIs to a one-line
message; ``code`` is the stable machine-readable name that both show.
"""

from __future__ import annotations


class Sam3Error(Exception):
    """Base class: every error the runtime raises on purpose."""

    code = "sam3_error"
    http_status = 500


class BundleError(Sam3Error):
    """The bundle directory or its manifest is missing, malformed or corrupt."""

    code = "bundle_error"
    http_status = 500


class BackendUnavailable(Sam3Error):
    """The requested backend (TensorRT, a GPU) is not present on this machine."""

    code = "backend_unavailable"
    http_status = 503


class EngineError(Sam3Error):
    """An engine failed to build, load or run."""

    code = "engine_error"
    http_status = 500


class InvalidInput(Sam3Error):
    """Base for errors caused by what the caller sent (4xx)."""

    code = "invalid_input"
    http_status = 422


class InvalidImage(InvalidInput):
    """Bytes that do not decode to an image, or an image with no pixels."""

    code = "invalid_image"
    http_status = 422


class ImageTooLarge(InvalidInput):
    """Over the megapixel limit (checked from the header, before decoding)."""

    code = "image_too_large"
    http_status = 413


class UnsupportedImageType(InvalidInput):
    code = "unsupported_media_type"
    http_status = 415


class InvalidPrompt(InvalidInput):
    """Empty prompt list, empty string, or otherwise unusable text."""

    code = "invalid_prompt"
    http_status = 422


class PromptTooLong(InvalidPrompt):
    code = "prompt_too_long"
    http_status = 422


class TooManyPrompts(InvalidPrompt):
    code = "too_many_prompts"
    http_status = 422


class InvalidOption(InvalidInput):
    """A threshold or format option out of range."""

    code = "invalid_option"
    http_status = 422

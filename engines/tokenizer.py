"""Prompt tokenisation for the text encoder, with ``tokenizers`` alone (no torch, no ftfy).

The bundle's ``tokenizer.json`` (written by ``export/tokenizer.py``) holds the CLIP BPE model,
the pre-token regex, SOT/EOT, truncation and padding. What a ``tokenizers`` normalizer cannot
express of Meta's cleaning (``ftfy.fix_text`` then ``html.unescape`` twice) is done here by
:func:`clean_prompt` with the standard library, so the Jetson needs neither ftfy nor torch.

Reference: Meta's ``SimpleTokenizer`` (``sam3/model/tokenizer_ve.py``) and its text encoder,
which pads with 0 and builds the attention mask as ``tokens != 0``. We do the same, so a real
token with id 0 (``"!"`` not at a word end, e.g. in ``'!"'``) is masked out exactly as Meta
masks it; for every ordinary prompt the mask is 1 on SOT..EOT and 0 on padding.
"""

from __future__ import annotations

import html
import os
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from tokenizers import Tokenizer

from engines.bundle import TokenizerInfo, sha256_file
from engines.errors import BundleError, InvalidPrompt, PromptTooLong, TooManyPrompts
from engines.options import DEFAULT_MAX_PROMPT_CHARS
from engines.types import Prompts

if TYPE_CHECKING:
    from engines.bundle import Bundle


# --- ftfy.fix_text, the subset that needs no mojibake detection (ftfy 6.3 tables) -------------
# Not reproduced: mojibake repair (fix_encoding & co.) and C1-control reinterpretation; these only
# change text that was decoded with the wrong codec, which an API client should not send.
_HTML_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")  # ftfy: only entities ending with ';'
_ANSI_RE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_SINGLE_QUOTE_RE = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTE_RE = re.compile("[\u201c-\u201f]")
_LINE_BREAK_RE = re.compile("\r\n|\r|\u2028|\u2029|\u0085")
_LIGATURES = {
    ord("Ĳ"): "IJ", ord("ĳ"): "ij", ord("ŉ"): "ʼn", ord("Ǳ"): "DZ", ord("ǲ"): "Dz",
    ord("ǳ"): "dz", ord("Ǆ"): "DŽ", ord("ǅ"): "Dž", ord("ǆ"): "dž", ord("Ǉ"): "LJ",
    ord("ǈ"): "Lj", ord("ǉ"): "lj", ord("Ǌ"): "NJ", ord("ǋ"): "Nj", ord("ǌ"): "nj",
    ord("ﬀ"): "ff", ord("ﬁ"): "fi", ord("ﬂ"): "fl", ord("ﬃ"): "ffi", ord("ﬄ"): "ffl",
    ord("ﬅ"): "ſt", ord("ﬆ"): "st",
}  # fmt: skip
_WIDTH_MAP = {0x3000: " "}
_WIDTH_MAP.update(
    (i, unicodedata.normalize("NFKC", chr(i)))
    for i in range(0xFF01, 0xFFF0)
    if unicodedata.normalize("NFKC", chr(i)) != chr(i)
)
_CONTROL_CHARS = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
     *range(0xFFF9, 0xFFFD)]
)  # fmt: skip
_WHITESPACE_RE = re.compile(r"\s+")
# C0 controls other than tab, line feed, form feed and carriage return, and DEL: a prompt holding
# one is refused (they are not text; ESC would start an ANSI sequence the cleaning deletes).
REJECTED_CHARS = "\x00-\x08\x0b\x0e-\x1f\x7f"
_REJECTED_RE = re.compile(f"[{REJECTED_CHARS}]")
# What the cleaning deletes without a trace besides whitespace: a prompt needs one other character.
INVISIBLE_CHARS = REJECTED_CHARS + "\u206a-\u206f\ufeff\ufff9-\ufffc"


def _fix_text(text: str) -> str:
    """ftfy.fix_text's character-level fixes, iterated to a fixed point as ftfy does."""
    unescape = "<" not in text  # ftfy's unescape_html="auto"
    while True:
        before = text
        if unescape:
            text = _HTML_ENTITY_RE.sub(lambda m: html.unescape(m.group(0)), text)
        text = text.translate(_LIGATURES).translate(_WIDTH_MAP)
        text = _SINGLE_QUOTE_RE.sub("'", _DOUBLE_QUOTE_RE.sub('"', text))
        text = _LINE_BREAK_RE.sub("\n", text)
        text = _ANSI_RE.sub("", text).translate(_CONTROL_CHARS)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def clean_prompt(text: str) -> str:
    """Meta's ``_clean_lower``: fix_text, unescape twice, strip, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return _WHITESPACE_RE.sub(" ", text).strip().lower()


def prompt_list(prompts: object) -> list[Any]:
    """``prompts`` as a list, or InvalidPrompt when it is not one (a bare string is not): the
    one shape check of a prompt list, for the tokenizer and the pipeline's typed prompts."""
    if isinstance(prompts, (str, bytes)):
        raise InvalidPrompt("prompts must be a list of strings, not a single string")
    try:
        return list(prompts)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidPrompt(f"prompts must be a list of strings, got {type(prompts).__name__}") from None


class PromptTokenizer:
    """Fixed-length CLIP token ids and masks for a batch of prompts.

    Validates prompts (typed errors the server maps to 4xx) before they cost any compute; a
    prompt longer than the context is truncated as Meta does (first tokens kept, EOT last).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        info: TokenizerInfo,
        *,
        max_chars: int | None = DEFAULT_MAX_PROMPT_CHARS,
        max_prompts: int | None = None,
    ) -> None:
        # The pipeline passes its engines.options.Limits; None: unbounded (the context length
        # truncates anyway).
        self.path = Path(path)
        self.info = info
        self.max_chars = max_chars
        self.max_prompts = max_prompts
        try:
            self._hash = sha256_file(self.path)
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise BundleError(f"cannot load tokenizer {self.path}: {exc}") from exc
        if info.sha256 and info.sha256 != self._hash:
            raise BundleError(f"tokenizer {self.path.name} does not match the manifest sha256")
        # The manifest is the contract: enforce its lengths whatever the file says.
        self._tok.enable_truncation(max_length=info.context_length)
        pad_token = self._tok.id_to_token(info.pad_id)
        if pad_token is None:
            raise BundleError(f"tokenizer has no token with pad id {info.pad_id}")
        self._tok.enable_padding(pad_id=info.pad_id, pad_token=pad_token, length=info.context_length)
        probe = self._tok.encode("a").ids
        if probe[0] != info.bos_id or info.eos_id not in probe:
            raise BundleError(
                f"tokenizer does not add SOT/EOT ids {info.bos_id}/{info.eos_id} (got {probe[:3]})"
            )

    @classmethod
    def from_bundle(cls, bundle: "Bundle", **kwargs: int | None) -> "PromptTokenizer":
        return cls(bundle.tokenizer_path, bundle.manifest.tokenizer, **kwargs)  # type: ignore[arg-type]

    @property
    def context_length(self) -> int:
        return self.info.context_length

    @property
    def tokenizer_hash(self) -> str:
        """sha256 of tokenizer.json: part of the text-embedding cache key."""
        return self._hash

    def validate(self, prompts: Sequence[str]) -> Prompts:
        """Typed errors for unusable prompt lists; the prompts, marked as checked."""
        if isinstance(prompts, Prompts):
            return prompts
        items = prompt_list(prompts)
        if not items:
            raise InvalidPrompt("the prompt list is empty")
        if self.max_prompts is not None and len(items) > self.max_prompts:
            raise TooManyPrompts(f"{len(items)} prompts given, at most {self.max_prompts} per call")
        for i, prompt in enumerate(items):
            if not isinstance(prompt, str):
                raise InvalidPrompt(f"prompt {i} is {type(prompt).__name__}, not a string")
            if self.max_chars is not None and len(prompt) > self.max_chars:
                raise PromptTooLong(f"prompt {i} has {len(prompt)} characters (limit {self.max_chars})")
            control = _REJECTED_RE.search(prompt)
            if control:
                raise InvalidPrompt(f"prompt {i} contains the control character U+{ord(control.group()):04X}")
            # Judged as the text encoder will read it: "&nbsp;", a no-break space or a BOM alone
            # are empty prompts too.
            if not clean_prompt(prompt):
                raise InvalidPrompt(
                    f"prompt {i} ({prompt[:24]!r}) is empty or whitespace only (once cleaned as the tokenizer does)"
                )
        return Prompts(items)

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``input_ids`` and ``attention_mask``, both int32 [N, context_length] (validates
        unless given :class:`~engines.types.Prompts`)."""
        items = self.validate(prompts)
        encodings = self._tok.encode_batch([clean_prompt(p) for p in items])
        ids = np.asarray([e.ids for e in encodings], dtype=np.int32)
        mask = (ids != self.info.pad_id).astype(np.int32)  # Meta: tokens != 0
        return ids, mask

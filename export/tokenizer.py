"""Build the CLIP BPE tokenizer of SAM3 as a ``tokenizers``-library ``tokenizer.json``.

Why build it ourselves: there is no hub access at export time, Meta's ``sam3`` wheel does not
ship the BPE vocabulary, and transformers 5 ``CLIPTokenizer(vocab_file=..., merges_file=...)``
silently ignores those kwargs. open_clip_torch ships the very file Meta's model was trained
with (``bpe_simple_vocab_16e6.txt.gz``), so we turn that into a ``tokenizers`` BPE model.

Reference semantics are Meta's ``SimpleTokenizer`` (``sam3/model/tokenizer_ve.py``):
ftfy + double ``html.unescape`` + whitespace collapse + lower-case, the pre-token regex
``'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``, byte-level BPE with a
``</w>`` end-of-word suffix, ``<start_of_text>``/``<end_of_text>`` (49406/49407), truncation to
the context length keeping EOT last, padding with id 0. The ftfy/HTML part cannot be expressed
as a ``tokenizers`` normalizer; it lives in :func:`engines.tokenizer.clean_prompt` (stdlib only,
so the Jetson runtime can run it). The normalizer written here (NFC, whitespace, lower-case) is
idempotent on cleaned text and makes the file usable on its own for ordinary prompts.

This module is torch-free (it only needs ``tokenizers``); export writes the file into the
bundle and records :class:`engines.bundle.TokenizerInfo` from the dict it returns.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from engines.bundle import sha256_file, write_atomic

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
TOKENIZER_FILE = "tokenizer.json"
CONTEXT_LENGTH = 32  # SAM3's text encoder context (Meta: VETextEncoder(context_length=32))
SOT_TOKEN = "<start_of_text>"  # Meta/open_clip names (not OpenAI's "<|startoftext|>")
EOT_TOKEN = "<end_of_text>"
BOS_ID = 49406
EOS_ID = 49407
PAD_ID = 0  # Meta pads with zeros (torch.zeros) and masks with ``tokens != 0``
VOCAB_SIZE = 49408
# Meta: merges = lines[1 : 49152 - 256 - 2 + 1] (first line is a version header)
NUM_MERGES = 49152 - 256 - 2
# Meta's pre-token regex without the special-token alternatives (those are added tokens here).
PRETOKEN_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class TokenizerBuildError(RuntimeError):
    """The BPE vocabulary is missing or malformed."""


def find_bpe_vocab() -> Path:
    """Locate open_clip's ``bpe_simple_vocab_16e6.txt.gz`` through importlib.resources."""
    try:
        resource = importlib.resources.files("open_clip").joinpath(BPE_FILE)
    except ModuleNotFoundError:
        raise TokenizerBuildError(
            f"cannot build the tokenizer: the package open_clip_torch (which ships {BPE_FILE}) "
            "is not installed; pip install open_clip_torch==3.3.0 (see requirements/export.txt)"
        ) from None
    path = Path(str(resource))
    if not path.is_file():
        raise TokenizerBuildError(f"open_clip is installed but {BPE_FILE} is missing at {path}")
    return path


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map (same table as Meta's and ByteLevel's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def read_merges(bpe_path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """The merges Meta's SimpleTokenizer uses, in rank order."""
    try:
        with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TokenizerBuildError(f"cannot read BPE vocabulary {bpe_path}: {exc}") from exc
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise TokenizerBuildError(f"{bpe_path} does not look like CLIP's BPE merges file")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Vocabulary in Meta's order: 256 bytes, 256 bytes + ``</w>``, one token per merge, specials."""
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += [SOT_TOKEN, EOT_TOKEN]
    table = {tok: i for i, tok in enumerate(vocab)}
    if len(table) != VOCAB_SIZE or table[SOT_TOKEN] != BOS_ID or table[EOT_TOKEN] != EOS_ID:
        raise TokenizerBuildError(f"unexpected CLIP vocabulary (size {len(table)})")
    return table


def build_tokenizer(bpe_path: str | os.PathLike[str] | None = None) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equal to Meta's SimpleTokenizer on cleaned text.

    Truncation keeps the last slot for EOT because the post-processor adds SOT/EOT after the
    sequence was truncated to ``CONTEXT_LENGTH - 2`` tokens, i.e. Meta's
    ``tokens[:32]; tokens[-1] = eot``.
    """
    path = Path(bpe_path) if bpe_path is not None else find_bpe_vocab()
    merges = read_merges(path)
    vocab = build_vocab(merges)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=None,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.NFC(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
            normalizers.Lowercase(),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # keep the regex matches, drop what lies between them (whitespace), like re.findall
            pre_tokenizers.Split(Regex(PRETOKEN_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " ")])
    # Meta's regex matches the special-token strings in (cleaned, lower-cased) text and maps them
    # to their ids; normalized=True reproduces that (the text is lower-cased first).
    tok.add_special_tokens(
        [
            AddedToken(SOT_TOKEN, normalized=True, special=True),
            AddedToken(EOT_TOKEN, normalized=True, special=True),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT_TOKEN} $A {EOT_TOKEN}",
        special_tokens=[(SOT_TOKEN, BOS_ID), (EOT_TOKEN, EOS_ID)],
    )
    configure_lengths(tok, CONTEXT_LENGTH, PAD_ID)
    return tok


def configure_lengths(tok: Tokenizer, context_length: int, pad_id: int) -> None:
    """Fixed-length output: truncate (keeping EOT) and right-pad with ``pad_id``."""
    tok.enable_truncation(max_length=context_length, strategy="longest_first", direction="right")
    pad_token = tok.id_to_token(pad_id) or "!"
    tok.enable_padding(direction="right", pad_id=pad_id, pad_token=pad_token, length=context_length)


def write_tokenizer_json(
    path: str | os.PathLike[str], bpe_path: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Write ``tokenizer.json`` atomically; return the :class:`TokenizerInfo` fields for the manifest."""
    path = Path(path)
    tok = build_tokenizer(bpe_path)
    # sort_keys-free, pretty=False: the file is data; its sha256 keys the text-embedding cache.
    data = json.loads(tok.to_str())
    write_atomic(path, json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "context_length": CONTEXT_LENGTH,
        "pad_id": PAD_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
    }

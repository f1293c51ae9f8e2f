"""PromptTokenizer (engines/) + tokenizer.json builder (export/) against Meta's SimpleTokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engines.bundle import TokenizerInfo
from engines.errors import InvalidPrompt, PromptTooLong, TooManyPrompts
from engines.tokenizer import PromptTokenizer, clean_prompt
from export.tokenizer import BOS_ID, CONTEXT_LENGTH, EOS_ID, find_bpe_vocab, write_tokenizer_json

REPO = Path(__file__).resolve().parents[2]

STRINGS = [
    "a photo of a cat",
    "cat",
    "Person",
    "RED CAR on the left",
    "a dog, a cat & a bird!",
    "don't stop; we're here, they've gone, I'm ok, you'll see, he'd go",
    "it's  \t multiple   spaces\nand newlines\r\n",
    "naïve café résumé",
    "Ünïcödé straße ÅNGSTRÖM",
    "日本語のテキスト",
    "中文 提示 词",
    "кошка на диване",
    "emoji 🐱🐶🚗 test",
    "numbers 12345 and 3.14159, 1e-3",
    "!!! ?! ... @#$ %^&*()_+-=[]{}|;:,.<>/?",
    '!"!x !" "! a!b !a a!',
    "hello!world",
    "x" * 200,
    "the quick brown fox jumps over the lazy dog " * 5,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "“curly quotes” and ‘single’ don’t",
    "ﬁne ﬂowers ﬀ",
    "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ",
    "Tom &amp; Jerry &lt;3 &amp;amp; &quot;hi&quot;",
    "a <b>bold</b> &amp; move",
    "e\u0301 composed vs é",
    "zero\u200bwidth space",
    "tab\tseparated\tvalues",
    "<start_of_text> injected <end_of_text>",
    "a" + "\u00a0" * 3 + "b",
    "UPPER-case_with_underscores and-dashes",
    "traffic light; stop sign; fire hydrant",
]


@pytest.fixture(scope="session")
def tokenizer_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TokenizerInfo]:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    info = TokenizerInfo(**write_tokenizer_json(path))
    return path, info


@pytest.fixture(scope="session")
def meta_tokenizer():
    tokenizer_ve = pytest.importorskip("sam3.model.tokenizer_ve")
    return tokenizer_ve.SimpleTokenizer(bpe_path=str(find_bpe_vocab()), context_length=CONTEXT_LENGTH)


@pytest.fixture(scope="session")
def prompt_tokenizer(tokenizer_bundle) -> PromptTokenizer:
    path, info = tokenizer_bundle
    # Token ids are compared with Meta's on long prompts too (truncation): no length limit here,
    # the limit has its own tests below.
    return PromptTokenizer(path, info, max_chars=None)


def test_manifest_fields(tokenizer_bundle) -> None:
    path, info = tokenizer_bundle
    assert (info.file, info.context_length, info.pad_id, info.bos_id, info.eos_id) == (
        "tokenizer.json", 32, 0, 49406, 49407,
    )
    assert json.loads(path.read_text(encoding="utf-8"))["model"]["type"] == "BPE"


def test_known_ids(prompt_tokenizer: PromptTokenizer) -> None:
    ids, mask = prompt_tokenizer.encode(["a photo of a cat"])
    expected = [49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 25
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.shape == (1, 32)
    assert ids[0].tolist() == expected
    assert mask[0].tolist() == [1] * 7 + [0] * 25


def test_ids_equal_meta(prompt_tokenizer: PromptTokenizer, meta_tokenizer) -> None:
    ids, mask = prompt_tokenizer.encode(STRINGS)
    ref = meta_tokenizer(STRINGS).numpy()
    for i, text in enumerate(STRINGS):
        assert ids[i].tolist() == ref[i].tolist(), text
    # Meta's text encoder masks with tokens != 0
    np.testing.assert_array_equal(mask, (ref != 0).astype(np.int32))


def test_ids_equal_meta_random_strings(prompt_tokenizer: PromptTokenizer, meta_tokenizer) -> None:
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789 .,!?'-&;:\"()éüßøλжあ中🙂\t")
    texts = []
    for _ in range(300):
        n = int(rng.integers(1, 120))
        text = "".join(rng.choice(alphabet, n))
        if text.strip():
            texts.append(text)
    ids, _ = prompt_tokenizer.encode(texts)
    ref = meta_tokenizer(texts).numpy()
    bad = [t for t, a, b in zip(texts, ids, ref) if a.tolist() != b.tolist()]
    assert not bad, bad[:5]


def test_truncation_keeps_eot(prompt_tokenizer: PromptTokenizer, meta_tokenizer) -> None:
    text = " ".join(f"word{i}" for i in range(60))
    ids, mask = prompt_tokenizer.encode([text])
    assert ids[0, 0] == BOS_ID and ids[0, -1] == EOS_ID
    assert mask[0].sum() == 32
    assert ids[0].tolist() == meta_tokenizer([text])[0].tolist()


def test_tokenizer_json_alone_matches_meta(tokenizer_bundle, meta_tokenizer) -> None:
    """The file is usable without our Python cleaning for ordinary prompts."""
    from tokenizers import Tokenizer

    path, _ = tokenizer_bundle
    tok = Tokenizer.from_file(str(path))
    plain = [s for s in STRINGS if clean_prompt(s) == " ".join(s.split()).lower()]
    assert len(plain) > 15
    for text in plain:
        assert tok.encode(text).ids == meta_tokenizer([text])[0].tolist(), text


def test_loads_with_tokenizers_alone(tokenizer_bundle) -> None:
    path, info = tokenizer_bundle
    code = (
        "import sys; from engines.bundle import TokenizerInfo; from engines.tokenizer import PromptTokenizer\n"
        f"t = PromptTokenizer({str(path)!r}, TokenizerInfo(**{info.__dict__!r}))\n"
        "ids, mask = t.encode(['a photo of a cat'])\n"
        "assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407], ids\n"
        "bad = [m for m in ('torch', 'transformers', 'export', 'ftfy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_hash_and_batch(prompt_tokenizer: PromptTokenizer, tokenizer_bundle) -> None:
    path, info = tokenizer_bundle
    assert prompt_tokenizer.tokenizer_hash == info.sha256
    ids, mask = prompt_tokenizer.encode(["cat", "a photo of a dog", "car"])
    assert ids.shape == mask.shape == (3, 32)
    single = np.concatenate([prompt_tokenizer.encode([p])[0] for p in ["cat", "a photo of a dog", "car"]])
    np.testing.assert_array_equal(ids, single)


@pytest.mark.parametrize(
    "prompts, error",
    [
        ([], InvalidPrompt),
        ([""], InvalidPrompt),
        (["   \t\n"], InvalidPrompt),
        # Empty once cleaned as the tokenizer cleans (no-break spaces, entities, BOM), controls.
        (["\u00a0\u2003 "], InvalidPrompt),
        (["&nbsp;&#32;"], InvalidPrompt),
        (["\ufeff"], InvalidPrompt),
        (["cat\x00"], InvalidPrompt),
        (["a\x1b[1mcat"], InvalidPrompt),
        (["cat", None], InvalidPrompt),
        ([b"cat"], InvalidPrompt),
        ("cat", InvalidPrompt),
        (["x" * 10_000], PromptTooLong),
        (["cat"] * 5, TooManyPrompts),
    ],
)
def test_bad_prompts(tokenizer_bundle, prompts, error) -> None:
    path, info = tokenizer_bundle
    tok = PromptTokenizer(path, info, max_prompts=4)
    with pytest.raises(error):
        tok.encode(prompts)


def test_char_limit_is_configurable(tokenizer_bundle) -> None:
    path, info = tokenizer_bundle
    tok = PromptTokenizer(path, info, max_chars=10)
    tok.encode(["x" * 10])
    with pytest.raises(PromptTooLong):
        tok.encode(["x" * 11])
    assert issubclass(PromptTooLong, InvalidPrompt)

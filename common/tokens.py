"""Token ids as text a reviewer can tell apart.

A byte-level BPE (Llama-3: 647 ids) has tokens that are fragments of a UTF-8 character:
decoded alone they all print as U+FFFD. :func:`token_text` shows those as their bytes
(``<0xE2 0x80>``) instead, so two different fragments never look the same. Labels,
verdicts and few-shot examples are keyed by token id; this text is only for reading.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

REPLACEMENT = "\ufffd"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The byte-level alphabet of GPT-2-style BPEs: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_bytes(tokenizer: Any, token_id: int) -> bytes | None:
    """The raw bytes of one token of a byte-level BPE; None for other tokenizers."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(piece, str):
        return None
    table = _byte_decoder()
    try:
        return bytes(table[c] for c in piece)
    except KeyError:
        return None


def bytes_label(raw: bytes) -> str:
    """``<0xE2 0x80>``: how a byte fragment is shown."""
    return "<" + " ".join(f"0x{b:02X}" for b in raw) + ">"


def token_text(tokenizer: Any, token_id: int) -> str:
    """What one token reads as: its decoded text, or its bytes when it is a fragment of a
    character (a literal U+FFFD token keeps its text)."""
    text = str(tokenizer.decode([int(token_id)]))
    if REPLACEMENT not in text:
        return text
    raw = token_bytes(tokenizer, token_id)
    if raw is None:
        return text
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return bytes_label(raw)
    return text


def is_byte_fragment(text: str) -> bool:
    """Whether a stored token text is a byte fragment shown by :func:`bytes_label`."""
    return text.startswith("<0x") and text.endswith(">")

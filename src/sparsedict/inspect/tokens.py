"""Token ids -> readable strings, for the browser and the exports.

Byte-level BPE vocabularies (GPT-2, SmolLM2, Llama 3, Qwen) store tokens as printable stand-ins for
bytes (``Ġ`` for a space, ``Ċ`` for a newline). ``token_texts`` maps every id back to its bytes and
decodes them as UTF-8; a token holding part of a multi-byte character keeps the undecodable bytes as
``\\xNN`` escapes, since a single token cannot show half a character. SentencePiece vocabularies
(``▁`` for a space, ``<0x0A>`` byte tokens) are mapped the same way. ``display`` then makes the
invisible visible for the browser: a newline becomes ``↵``, a tab ``⇥``, other control characters
``\\xNN``; spaces stay spaces (the browser renders token text with ``white-space: pre``), except in a
token of spaces only, shown as ``␣``.
"""

from __future__ import annotations

import re

_CONTROL = {"\n": "↵", "\t": "⇥", "\r": "␍"}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_unicode() -> dict[str, int]:
    """The byte-level BPE alphabet: printable character -> the byte it stands for."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is not None and "ByteLevel" in type(decoder).__name__ + repr(decoder)[:40]:
        return True
    vocab = tokenizer.get_vocab()
    return sum(1 for t in vocab if t.startswith("Ġ")) > 0.01 * max(1, len(vocab))


def token_texts(tokenizer) -> list[str]:
    """Decoded text of every token id ``0 .. len(tokenizer) - 1`` (special tokens as written)."""
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_tokens)
    out: list[str] = []
    if _is_byte_level(tokenizer):
        table = _byte_unicode()
        for piece in pieces:
            if piece is None:
                out.append("")
            elif piece in special or any(c not in table for c in piece):
                out.append(piece)
            else:
                out.append(bytes(table[c] for c in piece).decode("utf-8", errors="backslashreplace"))
        return out
    for piece in pieces:
        if piece is None:
            out.append("")
        elif piece in special:
            out.append(piece)
        elif _BYTE_TOKEN.fullmatch(piece):
            out.append(bytes([int(piece[3:5], 16)]).decode("utf-8", errors="backslashreplace"))
        else:
            out.append(piece.replace("▁", " "))
    return out


def display(text: str) -> str:
    """``text`` with newlines, tabs and other control characters made visible (one line); a token of
    spaces only shows each space as ``␣``."""
    if text and text.strip(" ") == "":
        return "␣" * len(text)
    return "".join(
        _CONTROL.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in text
    )

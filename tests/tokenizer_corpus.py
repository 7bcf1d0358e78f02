"""Texts that exercise SentencePiece's corners; shared by the tokenizer and token-count tests.

`CORPUS` is hand-written (whitespace runs, code, emoji, CJK, numbers, accents, text that looks
like control tokens, ...). `random_texts` adds seeded fuzz from the same ingredients.
"""

from __future__ import annotations

import random

CORPUS: list[str] = [
    "",
    " ",
    "  ",
    "   ",
    " " * 17,
    " " * 40,
    "Hello world",
    " leading space",
    "   three leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "a  b   c    d     e",
    "\t",
    "tab\tseparated\tvalues\t",
    "\t\tindented with tabs",
    "line one\nline two\r\nline three\n\n\nend\n",
    " \n \t \n",
    "def f(x):\n    if x > 0:\n        return x ** 2\n    return None\n",
    'const o = {"a": [1, 2, 3], "b": null}; // JSON-ish\nconsole.log(o?.a ?? []);',
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name;",
    "😀🎉👍🏽 👨‍👩‍👧‍👦 family 🤖🦾",
    "emoji at the end 🫠",
    "日本語のテキストです。中文文本，包括标点。한국어 텍스트입니다.",
    "混合 mixed 文字 text 123",
    "3.14159 1,234,567 0x1F 1e-9 -42 +7 2024-04-16 12:30:45",
    "1234567890" * 3,
    "naïve café résumé Ærøskøbing façade Straße Ångström",
    "Привет, мир! Ελληνικά ∑∫√ ½ ⅓ ™ © ° ±",
    "ﬁ ligature and full-width ＡＢＣ１２３",
    "[INST] not a control token [/INST] </s> <s> [TOOL_CALLS] [AVAILABLE_TOOLS]",
    "<unk> <0x0A> ▁ literal lower one-eighth block ▁▁",
    "[REFERENCE_DOC_1] user-defined piece [REFERENCE_DOC_10]x",
    "x[REFERENCE_DOC_2][REFERENCE_DOC_3] y",
    " [REFERENCE_DOC_0]",
    "zero\u200bwidth\u200djoiner and NUL \x00 and bell \x07",
    "\U0001d54f\U0001d56a\U0001d57b math letters and rare 𠀀 CJK ext-B",
    "USER: hi ASSISTANT: hello</s>USER: again",
    "A" * 300,
]

_ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789.,;:!?()[]{}<>/\\'\"-_=+*&^%$#@~`|")
_ALPHABET += [" ", " ", " ", "  ", "    ", "\n", "\n\n", "\t", "\r\n"]
_ALPHABET += [*"éàüñçøßœДЖЩ日本語中文한국어∑√😀🎉🤖👍🏽", "\u200b", "▁", "ﬁ"]
_WORDS = ["the", "function", "return", "Hello", "world", "import", "naïve", "東京", "1234567"]
_WORDS += ["[INST]", "</s>", "<s>", "[REFERENCE_DOC_1]", "<0x0A>", "USER:", "ASSISTANT:"]


def random_texts(count: int, seed: int = 0, max_items: int = 40) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        items = [
            rng.choice(_WORDS) if rng.random() < 0.3 else rng.choice(_ALPHABET)
            for _ in range(rng.randint(0, max_items))
        ]
        texts.append("".join(items))
    return texts

"""Exact automatic checkers for the real-model skills and composite tasks. Pure functions on
strings: each decides whether a model's reply answers one example correctly.

A checker is lenient only about wrapping that does not change the answer (case where case is
not the skill, surrounding words in free-text answers, "and" in number words) and strict about
the answer itself: the value, the format the task asks for (digits vs words, JSON with exactly
the asked keys, capital letters).
"""

from __future__ import annotations

import json
import re
import unicodedata

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (10**3, "thousand"))
NUMBER_WORDS = frozenset(_ONES) | frozenset(_TENS[2:]) | {"hundred"} | {s for _, s in _SCALES}
_INTEGER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?!\d)|-?\d+")


def _below_thousand(n: int) -> str:
    """Words of 0 < n < 1000, British style: "three hundred and four"."""
    hundreds, rest = divmod(n, 100)
    if rest < 20:
        tail = _ONES[rest] if rest else ""
    else:
        tens, ones = divmod(rest, 10)
        tail = _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if not hundreds:
        return tail
    return f"{_ONES[hundreds]} hundred" + (f" and {tail}" if tail else "")


def int_to_words(n: int) -> str:
    """English words of 0 <= n < 10**12, as num2words writes them ("one thousand and five",
    "twelve thousand, three hundred and four"): groups joined by commas, and by "and" before a
    last group under one hundred."""
    if not 0 <= n < 10**12:
        raise ValueError(f"int_to_words takes 0 <= n < 10**12, not {n}")
    if n < 1000:
        return _below_thousand(n) if n else "zero"
    parts = []
    for scale, name in _SCALES:
        count, n = divmod(n, scale)
        if count:
            parts.append(f"{_below_thousand(count)} {name}")
    if not n:
        return ", ".join(parts)
    joiner = " and " if n < 100 else ", "
    return ", ".join(parts) + joiner + _below_thousand(n)


def fold(text: str) -> str:
    """Casefolded, accents removed ("Brasília" -> "brasilia")."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def words_of(text: str) -> list[str]:
    """Alphanumeric words of folded text; punctuation and hyphens separate words."""
    return re.findall(r"[a-z0-9]+", fold(text))


def contains_phrase(text: str, phrase: str) -> bool:
    """True when the words of `phrase` occur in `text` contiguously (whole words, folded)."""
    needle, hay = words_of(phrase), words_of(text)
    return bool(needle) and any(hay[i:i + len(needle)] == needle for i in range(len(hay) - len(needle) + 1))


def last_integer(text: str) -> int | None:
    """The last integer written in digits in `text` ("1,234" is 1234), or None."""
    found = _INTEGER.findall(text)
    return int(found[-1].replace(",", "")) if found else None


def number_word_runs(text: str) -> list[list[str]]:
    """Maximal runs of number words in `text`, "and" dropped ("five hundred and sixty-five"
    -> ["five", "hundred", "sixty", "five"])."""
    runs, current = [], []
    for word in words_of(text):
        if word in NUMBER_WORDS:
            current.append(word)
        elif word == "and" and current:
            continue
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def says_in_words(text: str, n: int) -> bool:
    """True when `text` has no digits and its last run of number words is exactly the words
    of n (with or without "and", commas or hyphens)."""
    if any(c.isdigit() for c in text):
        return False
    runs = number_word_runs(text)
    return bool(runs) and runs[-1] == [w for w in words_of(int_to_words(n)) if w != "and"]


def parse_json_object(text: str) -> dict | None:
    """The reply parsed as one JSON object, or None. Strict: the whole reply (surrounding
    whitespace aside) must be the object; no code fences, no prose."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _same_value(got, expected) -> bool:
    if isinstance(expected, str):
        return isinstance(got, str) and fold(got.strip()) == fold(expected)
    # bool is an int in Python; an answer of true is not the number 1.
    return type(got) is type(expected) and got == expected


def json_matches(text: str, expected: dict) -> bool:
    """True when the reply is exactly a JSON object with the expected keys and values (strings
    compared folded, numbers must be JSON numbers)."""
    got = parse_json_object(text)
    return got is not None and got.keys() == expected.keys() and all(
        _same_value(got[k], v) for k, v in expected.items())


def has_no_lowercase(text: str) -> bool:
    return not any(c.islower() for c in text)


def _strip_wrapping(text: str) -> str:
    """Surrounding whitespace, quotes and a final period removed; inner whitespace collapsed."""
    text = " ".join(text.split()).strip("\"'“”")
    return text.removesuffix(".")


# --- one checker per task: (reply, expected) -> bool -----------------------------------------

def check_arithmetic(reply: str, expected: int) -> bool:
    """The last integer in the reply is the result."""
    return last_integer(reply) == expected


def check_words(reply: str, expected: int) -> bool:
    """The number in words, no digits anywhere."""
    return says_in_words(reply, expected)


def check_capital(reply: str, expected: str) -> bool:
    """The capital's name appears in the reply (whole words, accents and case ignored)."""
    return contains_phrase(reply, expected)


def check_json(reply: str, expected: dict) -> bool:
    return json_matches(reply, expected)


def check_upper(reply: str, expected: str) -> bool:
    """Exactly the text in capital letters (surrounding quotes and a final period aside)."""
    return _strip_wrapping(reply) == expected


def check_capital_upper(reply: str, expected: str) -> bool:
    """The capital's name, and no lower-case letter anywhere in the reply."""
    return has_no_lowercase(reply) and contains_phrase(reply, expected)


CHECKERS = {
    "arithmetic": check_arithmetic,
    "words": check_words,
    "capital": check_capital,
    "json": check_json,
    "upper": check_upper,
    "arithmetic_words": check_words,
    "arithmetic_json": check_json,
    "capital_json": check_json,
    "capital_upper": check_capital_upper,
}


def is_correct(task: str, reply: str, expected) -> bool:
    """Whether `reply` answers an example of `task` whose right answer is `expected`."""
    return CHECKERS[task](reply, expected)

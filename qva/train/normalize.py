"""English text normalisation for scoring speech: WER and CER compare words, not spelling conventions.

`english(text)` applies, in order (Whisper's `EnglishTextNormalizer` is the reference; `tests/train/test_train_formats.py`
compares the two on sentences and lists where they differ):
  1. Unicode NFKC, lower case; text in [brackets] or (parentheses) removed; fillers (um, uh, hmm, mm, mhm) removed
  2. contractions written out: won't → will not, can't → can not, let's → let us, n't → not, 're → are, 'll → will,
     've → have, 'm → am, 'd been/gone → had been/gone, other 'd → would; 's → is after it/that/there/here/what/
     where/who/how/he/she only (Whisper writes every 's as "is", "john's" → "john is"; here a possessive keeps
     its s: "johns")
  3. titles: mr → mister, mrs → missus, ms → miss, dr → doctor, st → saint, prof → professor, jr → junior
  4. numbers in words become digits: cardinals ("one thousand two hundred and thirty four" → 1234), digit by
     digit ("oh eight" → 08), adjacent numbers joined as Whisper joins them ("nineteen ninety nine" → 1999),
     "point" decimals (3.5), ordinals (twenty second → 22nd), "percent" → %, "dollars" → $ before the number;
     "a" before hundred/thousand is not a number word ("a hundred" → "a 100", as Whisper)
  5. digits: thousands separators dropped (1,000 → 1000); a "." between digits kept (3.5)
  6. a comma, full stop (not between digits), ; : ! or ? ends a run of number words ("nineteen, ninety" → 19 90;
     Whisper removes punctuation first and joins them: 1990); a decimal ends its number (Whisper joins "three point
     five twenty dollars" into $3.520);
     every punctuation mark becomes a space (apostrophes are removed), whitespace collapsed
Not done (Whisper does): British → American spelling (Whisper reads a 1 700-word list shipped with its
tokenizer), fractions and currencies other than dollars, "twice", "double seven".
"""

from __future__ import annotations

import re
import unicodedata

UNITS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine".split())} | {"oh": 0}
TEENS = {w: i + 10 for i, w in enumerate("ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split())}
TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000, "trillion": 1_000_000_000_000}
ORDINALS = {"first": "one", "second": "two", "third": "three", "fifth": "five", "eighth": "eight", "ninth": "nine", "twelfth": "twelve"}
FILLERS = {"um", "uh", "hmm", "mm", "mhm", "mmm", "uhm", "umm"}
TITLES = {"mr": "mister", "mrs": "missus", "ms": "miss", "dr": "doctor", "st": "saint", "prof": "professor", "jr": "junior"}
CONTRACTIONS = [
    (r"\bwon't\b", "will not"), (r"\bcan't\b", "can not"), (r"\blet's\b", "let us"), (r"\bain't\b", "aint"),
    (r"'d (been|gone)\b", r" had \1"), (r"\b(it|that|there|here|what|where|who|how|he|she)'s\b", r"\1 is"),
    (r"n't\b", " not"), (r"'re\b", " are"), (r"'ll\b", " will"), (r"'ve\b", " have"), (r"'m\b", " am"), (r"'d\b", " would"),
]


def _number_word(w: str) -> bool:
    return w in UNITS or w in TEENS or w in TENS or w in SCALES


def _ordinal(w: str) -> tuple[str, str] | None:
    """("twenty", "th") for "twentieth", ("one", "st") for "first"; None if `w` is no ordinal."""
    if w in ORDINALS:
        base = ORDINALS[w]
    elif w.endswith("ieth") and w[:-4] + "y" in TENS:
        base = w[:-4] + "y"
    elif w.endswith("th") and _number_word(w[:-2]) and w[:-2] not in UNITS:
        base = w[:-2]
    elif w.endswith("th") and w[:-2] in UNITS:  # fourth, sixth, seventh
        base = w[:-2]
    else:
        return None
    value = UNITS.get(base, TEENS.get(base, TENS.get(base, SCALES.get(base))))
    suffix = "th" if value % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(value % 10, "th")
    return base, suffix


def _parse_run(words: list[str]) -> str:
    """Number words (a run with no other words) → digits; adjacent numbers are joined without a space."""
    out, total, cur, last = [], 0, 0, None

    def flush():
        nonlocal total, cur, last
        if last is not None:
            out.append(str(total + cur))
        total, cur, last = 0, 0, None

    for w in words:
        if w in UNITS or w in TEENS:
            v = UNITS.get(w, TEENS.get(w))
            if last in ("unit", "teen") or (last == "tens" and (cur % 10 or v >= 10)):
                flush()  # "eight seven": two numbers; "twenty one": one
            cur, last = cur + v, "unit" if w in UNITS else "teen"
        elif w in TENS:
            if last in ("unit", "teen", "tens") and not (last == "hundred"):
                flush()  # "nineteen ninety": two numbers, joined later
            cur, last = cur + TENS[w], "tens"
        else:  # a scale
            scale = SCALES[w]
            if scale == 100:
                cur, last = max(cur, 1) * 100, "hundred"
            else:
                total, cur, last = total + max(cur, 1) * scale, 0, "scale"
    flush()
    return "".join(out)


def _numbers(words: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(words):
        w = words[i]
        start_ok = _number_word(w)
        if not start_ok:
            ordinal = _ordinal(w)
            out.append(_parse_run([ordinal[0]]) + ordinal[1] if ordinal and ordinal[0] in UNITS | TEENS | TENS else w)
            i += 1
            continue
        j, run, suffix = i, [], ""
        while j < len(words):
            x = words[j]
            if _number_word(x) and not (x == "oh" and not run and j + 1 < len(words) and not _number_word(words[j + 1])):
                run.append(x)
            elif x == "and" and run and run[-1] in SCALES and j + 1 < len(words) and _number_word(words[j + 1]):
                pass
            elif run and (o := _ordinal(x)) is not None:
                run.append(o[0])
                suffix = o[1]
                j += 1
                break
            else:
                break
            j += 1
        if not run:  # "oh" on its own is a word
            out.append(w)
            i += 1
            continue
        number = _parse_run(run)
        if not suffix and j + 2 < len(words) + 1 and j < len(words) and words[j] == "point" and j + 1 < len(words) and words[j + 1] in UNITS:
            k = j + 1
            decimals = ""
            while k < len(words) and words[k] in UNITS:
                decimals += str(UNITS[words[k]])
                k += 1
            number, j = f"{number}.{decimals}", k
        if j < len(words) and words[j] == "percent" and not suffix:
            number, j = number + "%", j + 1
        elif j < len(words) and words[j] in ("dollars", "dollar") and not suffix:
            number, j = "$" + number, j + 1
        out.append(number + suffix)
        i = j
    return out


def english(text: str) -> str:
    """`text` normalised for scoring by the rules in this module's docstring."""
    s = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    s = re.sub(r"\[[^\]]*\]|\([^)]*\)", " ", s)
    for pattern, repl in CONTRACTIONS:
        s = re.sub(pattern, repl, s)
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # rule: 1,000 → 1000
    s = re.sub(r"(?<!\d)\.|\.(?!\d)|[,;:!?]", " \0 ", s)  # rule: a "." is kept only between digits; marks end a number

    s = re.sub(r"'", "", s)
    s = re.sub(r"[^\w\s.$%\0]", " ", s)
    words = [TITLES.get(w, w) for w in s.split() if w not in FILLERS]
    return " ".join(w for w in _numbers(words) if w != "\0")


def chars(text: str) -> list[str]:
    """The characters CER counts: those of the normalised text, single spaces between words included."""
    return list(english(text))

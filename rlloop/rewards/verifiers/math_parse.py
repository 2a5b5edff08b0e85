"""Whole-answer parsing for the `math` verifier: a string counts only if a parser consumed all of it.

math-verify's own `parse` *searches* a text for something mathematical, which is right for a model's
free-form output but wrong for a gold answer: on "2, or equivalently $1+1$" or "C(10, 5)" it returns a
fragment (1, 2, ...) and an answer equal to the fragment scored 1. Here every candidate parse covers the
whole string:

- LaTeX: math-verify's normaliser (its unit stripping off: that deletes trailing words such as "more" or
  "ab", turning "2ab" into 2) then latex2sympy on the entire result, which fails on anything it cannot
  consume. A parse is refused when the string holds English words (latex2sympy would read "the answer
  is 5" as t*h*e*...*5) or ASCII function names (it reads "sqrt" as s*q*r*t).
- ASCII maths (`sqrt(2)`, `C(10, 5)`, `binom(10,5)`, `x^2`, `sum_(k=1)^n 1/k`): sympy's `parse_expr` on
  the entire string, after a tokeniser has checked that every token is a number, an operator, a
  one-letter variable or a known function (parse_expr evaluates its input; the tokeniser keeps model
  output from reaching it with anything else).
- Text answers of at most four words ("Yes", "no solution", "\\text{(C)}"), compared as lowercased words.
- A trailing unit word or `\\text{unit}` after a number ("5 apples", "12 \\text{ cm}^2") and a trailing
  percent sign ("50\\%": 50 and 1/2 both count) are dropped first.

"X or Y": when X and Y have the same value they are alternative spellings and either counts; otherwise
the answer is all of them (a set, a union of intervals, an `Or` of inequalities), so "1" does not match
the gold "1 or 2" and the answer "1 or 2" does not match the gold "2". An explicit "X, or equivalently
Y" ("i.e.", "alternatively") in a *gold* answer lists alternatives: any of them that parses counts. In a
model's answer such markers are not trusted (a policy could list two different values that way).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, List, Optional

# English words that never name a variable product in an answer (letter runs of any length), and
# ASCII function names that latex2sympy would split into letters.
STOPWORDS = frozenset(
    """a an and are as at be both but by can does each either else equivalently even every exist exists
    for from has have if in is it its least less let may more most must neither no none nor not odd of on
    one only or other otherwise per set so some such than that the then there these this those three to
    two we when where which with yes answer answers solution solutions number numbers ten six""".split()
)
ASCII_NAMES = frozenset(
    """sqrt cbrt pi oo inf infinity binom choose sum prod exp log ln sin cos tan cot sec csc asin acos
    atan arcsin arccos arctan sinh cosh tanh abs floor ceil factorial gcd lcm max min mod lim""".split()
)
_CONNECTOR = r"(?:or\s+equivalently|equivalently|alternatively|i\.e\.?|or|and)"
_TEXT_CMD = r"\\(?:text|textrm|textnormal|textbf|textit|mbox|mathrm|mathbf|mathit|operatorname)\s*"
_TEXT_CONNECTOR = re.compile(_TEXT_CMD + r"\{([\s,;.:]*" + _CONNECTOR + r"[\s,;.:]*)\}")
EXPLICIT_ALTERNATIVES = re.compile(
    r"[,;]?\s*(?<![A-Za-z\\])(?:or\s+)?(?:equivalently|alternatively|i\.e\.?)(?![A-Za-z])[,:]?"
)
_BARE_OR = re.compile(r"[,;]?\s*(?<![A-Za-z\\])or(?![A-Za-z])\s*")
_SPACING = re.compile(r"\\(?:quad|qquad|,|;|:|!)|~")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3})((?:(?:\\,|\\ |\{,\}|,\\!|\\!|\\;)\d{3})+)(?![\d])")
_UNICODE = {"−": "-", "–": "-", "×": "\\times ", "÷": "\\div ", "·": "\\cdot ", "π": "\\pi ", "∞": "\\infty ",
            "≤": "\\le ", "≥": "\\ge ", "≠": "\\ne ", "°": "^\\circ"}  # fmt: skip
_PERCENT = re.compile(r"^(.*?)\s*(?:\\?%|\\text\{\s*%\s*\}|\s+percent)$", re.DOTALL)
_UNIT = re.compile(
    r"^(?P<value>.*?[\d}.)])\s*(?:" + _TEXT_CMD + r"\{\s*(?P<tunit>[A-Za-z]+(?:\s+[A-Za-z]+)?)\s*\}"
    r"|\s(?P<unit>[A-Za-z]{2,}(?:\s+[A-Za-z]{2,})?))\s*(?:\^\s*\{?\d\}?)?$",
    re.DOTALL,
)
_CHOICE_VALUE = re.compile(_TEXT_CMD + r"\{\s*\(([A-Ea-e])\)\s*\}\s*(.+)$", re.DOTALL)
_PLAIN_INT = re.compile(r"^[-+]?\d{1,50}$")
_TEXT_WORDS = re.compile(r"^[a-z][a-z'\-]*(?: [a-z][a-z'\-]*){0,3}$")


@dataclass(frozen=True)
class Text:
    """A text answer ("yes", "no solution", "c"): lowercased words, compared as strings."""

    value: str


def _unwrap_braced(text: str, command: str) -> Optional[str]:
    """The content of `\\command{...}` when that group spans all of `text`, else None."""
    m = re.match(r"\\" + command + r"\s*\{", text)
    if not m:
        return None
    depth = 0
    for j in range(m.end() - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[m.end() : j] if j == len(text) - 1 else None
    return None


def clean(text: str) -> str:
    """The answer itself: outer `$...$`, `\\(...\\)`, `\\[...\\]` and `\\boxed{}` unwrapped, a trailing
    period dropped, thousands separators (`10\\,000`, `10{,}000`) joined, unicode signs as LaTeX."""
    s = text.strip()
    for old, new in _UNICODE.items():
        s = s.replace(old, new)
    while True:
        before = s
        s = s.strip().rstrip(".").rstrip()
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            inner = s[len(left) : -len(right)]
            if s.startswith(left) and s.endswith(right) and len(s) > len(left) + len(right):
                if "$" not in inner.replace("\\$", ""):
                    s = inner
        # a gold wholly in \text{} ("\text{B, C, D}") is read as what it holds, not one symbol "b,c,d"
        for command in ("boxed", "fbox", "displaystyle", "text", "textbf", "textrm", "mathrm", "mbox"):
            inner = _unwrap_braced(s, command)
            if inner is not None:
                s = inner
        s = re.sub(r"^\\displaystyle\s*", "", s)
        if s == before:
            break
    s = re.sub(r"(?<!\\)\$", " ", s)  # "$1$ or $2$": the delimiters of a mixed text go, its words stay
    s = _THOUSANDS.sub(lambda m: m.group(1) + re.sub(r"\D", "", m.group(2)), s)
    s = _TEXT_CONNECTOR.sub(lambda m: f" {m.group(1).strip()} ", s)
    return re.sub(r"\s+", " ", s).strip()


def _words(latex: str) -> List[str]:
    """Letter runs of a normalised LaTeX string outside command names (`\\frac`, `\\begin{pmatrix}`)."""
    s = re.sub(r"\\(?:begin|end|operatorname)\s*\{[^{}]*\}", " ", latex)
    s = re.sub(r"\\[A-Za-z]+", " ", s)
    return re.findall(r"[A-Za-z]+", s)


def _prose(latex: str) -> bool:
    """Words that make a LaTeX parse a product of letters: English, ASCII function names, 4+ letters,
    or any word in `\\text{}` (latex2sympy turns "5 \\text{ cm}" into 5*cm)."""
    for content in re.findall(_TEXT_CMD + r"\{([^{}]*)\}", latex):
        if re.search(r"[A-Za-z]{2}", content):
            return True
    for word in _words(latex):
        low = word.lower()
        if len(word) >= 2 and (low in STOPWORDS or low in ASCII_NAMES or len(word) >= 4):
            return True
    return False


@lru_cache(maxsize=4096)
def _latex(text: str) -> Any:
    from latex2sympy2_extended.math_normalization import NormalizationConfig, normalize_latex
    from math_verify.parser import parse_latex_cached

    if re.search(r"(?<![A-Za-z\\])C\s*\(|\dC\d", text):  # C(10, 5), 10C5: binomials, not products
        return None
    config = NormalizationConfig(
        basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="none", equations=False
    )
    norm = normalize_latex(text, config=config)
    # "1 2" would parse as 3 and "5, more" as {5, e*m*o*r}
    if not norm or _prose(norm) or re.search(r"\d\s+\d", norm) or "\\boxed" in norm:
        return None
    try:
        return parse_latex_cached(norm)
    except Exception:  # noqa: BLE001 - latex2sympy raises many types for input it cannot consume
        return None


_ASCII_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)|([A-Za-z]+(?:_\d+|_[A-Za-z]|\d+)?)|(\*\*|[-+*/^(),!]))")


def _ascii_tokens_ok(text: str) -> bool:
    """Every token is a number, an operator, a one-letter variable or a known name (parse_expr runs
    `eval`: nothing else may reach it), and no two numbers touch ("1 2")."""
    pos, last_kind = 0, None
    while pos < len(text):
        m = _ASCII_TOKEN.match(text, pos)
        if not m:
            return False if text[pos:].strip() else True
        kind = m.lastindex
        if kind == 1 and last_kind == 1:
            return False
        if kind == 2:
            base = re.match(r"[A-Za-z]+", m.group(2)).group(0)
            if len(base) > 1 and base.lower() not in ASCII_NAMES - {"sum", "prod", "lim", "mod", "choose"}:
                return False
        pos, last_kind = m.end(), kind
    return True


def _ascii_names() -> dict:
    import sympy

    # lowercased and real, as latex2sympy makes them: Symbol("x") != Symbol("x", real=True)
    names = {chr(c): sympy.Symbol(chr(c).lower(), real=True) for c in [*range(65, 91), *range(97, 123)]}
    names.update(
        e=sympy.E, E=sympy.E, pi=sympy.pi, oo=sympy.oo, inf=sympy.oo, infinity=sympy.oo, sqrt=sympy.sqrt,
        cbrt=sympy.cbrt, binom=sympy.binomial, binomial=sympy.binomial, exp=sympy.exp, log=sympy.log,
        ln=sympy.log, sin=sympy.sin, cos=sympy.cos, tan=sympy.tan, cot=sympy.cot, sec=sympy.sec,
        csc=sympy.csc, asin=sympy.asin, acos=sympy.acos, atan=sympy.atan, arcsin=sympy.asin,
        arccos=sympy.acos, arctan=sympy.atan, sinh=sympy.sinh, cosh=sympy.cosh, tanh=sympy.tanh,
        abs=sympy.Abs, floor=sympy.floor, ceil=sympy.ceiling, factorial=sympy.factorial, gcd=sympy.gcd,
        lcm=sympy.lcm, max=sympy.Max, min=sympy.Min,
    )  # fmt: skip
    return names


def _ascii_expr(text: str) -> Any:
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    text = re.sub(r"(?<![A-Za-z])C\s*\(", "binomial(", text)
    text = re.sub(r"(?<![\w.])(\d+)\s*C\s*(\d+)(?![\w.])", r"binomial(\1,\2)", text)  # 10C5
    if not text.strip() or not _ascii_tokens_ok(text.replace("binomial(", "binom(")):
        return None
    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    try:
        value = parse_expr(text, local_dict=_ascii_names(), transformations=transformations, evaluate=False)
    except Exception:  # noqa: BLE001 - SyntaxError, TypeError, TokenError ...
        return None
    if isinstance(value, tuple):
        if not all(isinstance(v, sympy.Basic) for v in value):
            return None
        inner = text.strip()
        paren = inner.startswith("(") and inner.endswith(")")
        return sympy.Tuple(*value) if paren else sympy.FiniteSet(*value)
    return value if isinstance(value, sympy.Basic) and not isinstance(value, type) else None


_SUM = re.compile(
    r"^(sum|prod)\s*_\s*[({]\s*([A-Za-z])\s*=\s*([^(){}]+)[)}]\s*\^\s*(\([^()]+\)|\{[^{}]+\}|\w+)\s*(.+)$"
)


@lru_cache(maxsize=4096)
def _ascii(text: str) -> Any:
    """sympy for ASCII maths covering all of `text`, or None."""
    import sympy

    if "\\" in text or ("{" in text and not text.startswith(("sum", "prod"))):
        return None
    m = _SUM.match(text.strip())
    if m:
        kind, var, low, high, body = m.groups()
        parts = [_ascii_expr(p) for p in (low, high.strip("(){}"), body)]
        if any(p is None for p in parts):
            return None
        symbol = sympy.Symbol(var.lower(), real=True)
        return (sympy.Sum if kind == "sum" else sympy.Product)(parts[2], (symbol, parts[0], parts[1]))
    return _ascii_expr(text)


def _text(text: str) -> Optional[Text]:
    s = re.sub(_TEXT_CMD + r"\{([^{}]*)\}", r"\1", text)
    s = re.sub(r"\\\s|\s+", " ", s).strip().rstrip(".").strip().lower()
    s = re.sub(r"^\(([a-z])\)$", r"\1", s)
    return Text(s) if _TEXT_WORDS.match(s) else None


def parse_single(text: str, *, gold: bool = True) -> List[Any]:
    """Candidates for one answer with no top-level "or": [] when nothing covers all of `text`.

    gold=False refuses the "\\textbf{(C) } 12" form (letter or value), which would give an answer two
    chances."""
    text = text.strip().strip(",;").strip()
    if not text:
        return []
    m = _PERCENT.match(text)
    if m and m.group(1).strip():
        import sympy

        found = parse_single(m.group(1), gold=gold)
        return [v for x in found if isinstance(x, sympy.Basic) for v in (x, x / 100)]
    m = _CHOICE_VALUE.match(text)
    if m:  # "\textbf{(C) } 12": the letter or its value
        return [Text(m.group(1).lower()), *parse_single(m.group(2))] if gold else []
    if _PLAIN_INT.match(text):  # most golds (GSM8K, AIME): no ANTLR parse (~10 ms) needed
        import sympy

        return [sympy.Integer(text)]
    value = _latex(text)
    if value is None:
        value = _ascii(text)
    if value is not None:
        return [value]
    m = _UNIT.match(text)
    if m:
        unit = (m.group("tunit") or m.group("unit")).lower()
        numeric = all(w == "e" for w in _words(m.group("value")))  # "3\sqrt{2} \text{ cm}", not "2 x cm"
        if numeric and not set(unit.split()) & (STOPWORDS | ASCII_NAMES):
            return parse_single(m.group("value"), gold=gold)
    text_value = _text(text)
    return [text_value] if text_value is not None else []


def split_top(text: str, pattern: re.Pattern) -> List[str]:
    """`text` split at matches of `pattern` outside braces/parentheses/brackets."""
    parts, start, depth = [], 0, 0
    depth_at = []
    for ch in text:
        depth += ch in "{([" and 1 or 0
        depth -= ch in "})]" and 1 or 0
        depth_at.append(depth)
    for m in pattern.finditer(text):
        if m.start() > 0 and depth_at[m.start() - 1] != 0:
            continue
        parts.append(text[start : m.start()])
        start = m.end()
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _as_text(value: Any) -> Any:
    import sympy

    return Text(value.name.lower()) if isinstance(value, sympy.Symbol) else value


def same_value(a: Any, b: Any) -> bool:
    """Whether two candidates are the same answer (text: same words; maths: math-verify's verify)."""
    if isinstance(a, Text) or isinstance(b, Text):
        # "C" parses as the symbol c; "\\textbf{(C) } 12" holds the text answer "c"
        return _as_text(a) == _as_text(b)
    from math_verify import verify

    # timeouts off: math-verify's use SIGALRM, which the verifier pool's per-sample limit already owns
    return bool(verify(a, b, timeout_seconds=None))


def _combine(values: List[Any]) -> Optional[Any]:
    """The answer "X or Y or ..." for different values: all of them."""
    import sympy

    if any(isinstance(v, Text) for v in values):
        return None
    try:
        if all(isinstance(v, sympy.Set) for v in values):
            return sympy.Union(*values)
        if all(
            isinstance(v, sympy.core.relational.Relational) and not isinstance(v, sympy.Eq) for v in values
        ):
            return sympy.Or(*values)
        return sympy.FiniteSet(*values)
    except Exception:  # noqa: BLE001 - sympy refuses some mixes
        return None


def _parse_or(text: str, gold: bool) -> List[Any]:
    parts = split_top(text, _BARE_OR)
    if len(parts) > 1:
        found = [parse_single(p, gold=gold) for p in parts]
        if all(found):
            firsts = [f[0] for f in found]
            if all(same_value(firsts[0], v) for v in firsts[1:]):
                return [c for f in found for c in f]
            combined = _combine(firsts)
            return [combined] if combined is not None else []
    return parse_single(text, gold=gold)


def parse_whole(text: str, *, gold: bool) -> List[Any]:
    """Every candidate value of an answer that covers all of `text`; [] when there is none.

    gold=True honours "X, or equivalently Y" as alternatives (any part that parses counts); for a
    model's answer the parts must all have the same value.
    """
    s = clean(text)
    if not s:
        return []
    parts = split_top(s, EXPLICIT_ALTERNATIVES)
    if len(parts) > 1:
        found = [_parse_or(p, gold) for p in parts if p]
        if gold:
            return [c for f in found for c in f]
        if all(found) and all(same_value(found[0][0], f[0]) for f in found[1:]):
            return [c for f in found for c in f]
        return []
    return _parse_or(s, gold)


def matches(gold: List[Any], answer: List[Any]) -> bool:
    """Whether any candidate of the answer equals any candidate of the gold."""
    return any(same_value(g, a) for g in gold for a in answer)

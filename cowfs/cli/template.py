"""Docker's `--format TEMPLATE`: a small interpreter of the part of Go's text/template that Docker users write.

No maintained pure-Python text/template exists on PyPI, and Docker adds its own rules on top (its functions,
the `table` prefix and header row, `\\t` and `\\n` in the argument), so both are here, with Go's printing.

`render(text, data)` runs a template once (`cowfs inspect --format`); `format_rows(fmt, rows, headers)`
prints a list as `docker images/ps/history --format` does. Data is Python: a `Record` is a Go struct (a
field it lacks is an error), a dict a Go map (a missing key is `<no value>`), lists, str, int, float,
bool and None. Understood: text, `{{.Field.Chain}}`, `.`, `$` and `$var` (declared with `:=`, set with
`=`), literals ("quoted", `raw`, 'c', numbers, true, false, nil), pipelines `a | f b`, `(parentheses)`,
`{{if}}`/`{{else if}}`/`{{else}}`/`{{end}}`, `{{with}}`, `{{range}}` (with `$i, $e :=`, `{{else}}`,
`{{break}}`, `{{continue}}`), `{{- trim -}}` markers, `{{/* comments */}}`, and the functions in FUNCTIONS.
Anything else, and every parse or execution error, is a TemplateError: one line saying what and where.
"""

import datetime
import decimal
import json
import math
import re

from cowfs.errors import CowfsError
from cowfs.formatting import table


class TemplateError(CowfsError):
    """A template that cannot be parsed or run: `template: WHAT at column N`."""


class Record(dict):
    """A Go struct: its fields in order; asking for one it lacks is an error (Go's "can't evaluate field").
    `kind` names its type in messages ("image", "images row")."""

    __slots__ = ("kind",)

    def __init__(self, kind, fields):
        super().__init__(fields)
        self.kind = kind


# -- how Go prints values ---------------------------------------------------------------------------------

def go_string(value, nested=False):
    """`value` as Go's fmt prints it (%v): lists `[a b]`, maps `map[k:v]` by key, structs `{a b}`, bools
    `true`, None `<no value>` where a template prints it (a missing map key) and `<nil>` inside a value."""
    if value is None:
        return "<nil>" if nested else "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, str):
        return value
    if isinstance(value, Record):
        return "{" + " ".join(go_string(v, True) for v in value.values()) + "}"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{go_string(value[k], True)}" for k in sorted(value)) + "]"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(go_string(v, True) for v in value) + "]"
    return str(value)


def _go_float(x):
    """%v of a float64, as Go's strconv 'g' with the shortest digits: %e form when the exponent is < -4
    or >= 6 ("1e+06", "1.5e-07"), else plain ("123456", "0.5")."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if x == 0:
        return "-0" if math.copysign(1, x) < 0 else "0"
    sign, digit_tuple, exponent = decimal.Decimal(repr(x)).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    exp = len(digits) + exponent - 1  # of the first digit
    if exp < -4 or exp >= 6:
        text = digits[0] + ("." + digits[1:] if len(digits) > 1 else "") + f"e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    elif exp < 0:
        text = "0." + "0" * (-exp - 1) + digits
    else:
        whole = digits[:exp + 1].ljust(exp + 1, "0")
        text = whole + ("." + digits[exp + 1:] if len(digits) > exp + 1 else "")
    return ("-" if sign else "") + text


def go_type(value):
    """The Go type a value stands for, in messages: string, int, float64, bool, []interface {}, ..."""
    if value is None:
        return "<nil>"
    if isinstance(value, Record):
        return value.kind
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float64"), (str, "string"),
                       (dict, "map[string]interface {}"), ((list, tuple), "[]interface {}")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def go_quote(text):
    """Go's strconv.Quote: double quotes, Go's escapes, printable characters kept."""
    escapes = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v",
               "\\": "\\\\", '"': '\\"'}
    out = []
    for c in text:
        if c in escapes:
            out.append(escapes[c])
        elif c.isprintable():
            out.append(c)
        elif ord(c) < 0x80:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'


def go_time(seconds, rfc3339=False):
    """A time (seconds since the epoch) in the local zone as Go prints time.Unix(s, 0): Time.String()
    ("2024-01-01 00:00:00 +0000 UTC", docker images/ps CreatedAt) or RFC 3339 ("2024-01-01T00:00:00Z",
    docker history CreatedAt). "N/A" for None (no created time)."""
    if seconds is None:
        return "N/A"
    t = datetime.datetime.fromtimestamp(int(seconds)).astimezone()
    if rfc3339:
        text = t.isoformat(timespec="seconds")
        return text[:-len("+00:00")] + "Z" if not t.utcoffset() else text
    return t.strftime("%Y-%m-%d %H:%M:%S %z %Z")


def go_json(value):
    """Docker's `json` function: Go's encoding/json, compact, without HTML escaping; map keys sorted,
    struct fields in order."""
    def plain(v):
        if isinstance(v, Record):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, dict):
            return {str(k): plain(v[k]) for k in sorted(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, float) and v.is_integer() and abs(v) < 1e21:
            return int(v)
        return v
    try:
        text = json.dumps(plain(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise _CallError(f"json: unsupported value: {e}") from None
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


# -- reading a template: tokens, then a tree ------------------------------------------------------------------
#
# Tokens are (kind, value, pos, spaced, end): kind "text", "open" ({{), "close" (}}), "field" (value: the
# names of .A.B), "var" (value: (name, names after it)), "dot", "ident", "string", "number", "pipe",
# "lparen", "rparen", "comma", "declare" (:=), "assign" (=); pos and end are offsets in the text; spaced
# says whether white space came before it (a field right after ")" continues the parenthesised value).

SPACE = " \t\r\n"
_IDENT = re.compile(r"[^\W\d]\w*")
_WORD = re.compile(r"\w*")
_NUMBER = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+|\d[\d_]*(?:\.[\d_]*)?(?:[eE][+-]?\d+)?"
                     r"|\.\d[\d_]*(?:[eE][+-]?\d+)?)")
_ESCAPE = re.compile(r"\\(?:([abfnrtv\\'\"])|x([0-9a-fA-F]{2})|([0-7]{3})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\",
                   "'": "'", '"': '"'}
KEYWORDS = ("if", "else", "end", "range", "with", "break", "continue", "define", "template", "block")


class _Source:
    """The template text, and where an offset in it is for messages (in the argument as given)."""

    def __init__(self, text, origin=None, given=None):
        self.text = text
        self.origin = origin  # offset in `text` -> offset in `given`, the argument (docker's \t is one tab)
        self.given = given if given is not None else text

    def where(self, pos):
        """ "column C" (or "line L, column C") of offset `pos` of the text, in the argument as given."""
        if self.origin is not None:
            pos = self.origin[min(pos, len(self.origin) - 1)]
        given = self.given
        line = given.count("\n", 0, pos) + 1
        column = pos - (given.rfind("\n", 0, pos) + 1) + 1
        return f"line {line}, column {column}" if "\n" in given else f"column {column}"

    def error(self, message, pos):
        return TemplateError(f"template: {message} at {self.where(pos)}")


def _lex(src):
    """The tokens of the template in `src` (a _Source); trim markers and comments are applied here."""
    text, n, toks, i = src.text, len(src.text), [], 0
    while i < n:
        j = text.find("{{", i)
        if j < 0:
            toks.append(("text", text[i:], i, True, n))
            break
        k = j + 2
        before = text[i:j]
        if text.startswith("-", k) and k + 1 < n and text[k + 1] in SPACE:  # {{- trims the text before
            before = before.rstrip(SPACE)
            k += 2
        if before:
            toks.append(("text", before, i, True, j))
        if text.startswith("/*", k):  # {{/* a comment */}}
            end = text.find("*/", k + 2)
            if end < 0:
                raise src.error("unclosed comment", j)
            end += 2
            if text.startswith("}}", end):
                i, trim = end + 2, False
            elif end < n and text[end] in SPACE and text.startswith("-}}", end + 1):
                i, trim = end + 4, True
            else:
                raise src.error("comment ends before closing delimiter", end)
        else:
            toks.append(("open", None, j, True, j + 2))
            i, trim = _lex_action(src, k, j, toks)
        if trim:  # -}} trims the text after
            while i < n and text[i] in SPACE:
                i += 1
    return toks


def _lex_action(src, k, opened, toks):
    """Tokens from offset k to the action's }} (appended to toks); returns (offset after it, trim after)."""
    text, n, spaced = src.text, len(src.text), True
    while True:
        if k >= n:
            raise src.error("unclosed action", opened)
        c = text[k]
        if c in SPACE:
            if text.startswith("-}}", k + 1):
                toks.append(("close", None, k + 1, True, k + 4))
                return k + 4, True
            k, spaced = k + 1, True
            continue
        if text.startswith("}}", k):
            toks.append(("close", None, k, spaced, k + 2))
            return k + 2, False
        start = k
        after = text[k + 1:k + 2]
        if c.isdigit() or (c in "+-" and (after.isdigit() or after == ".")) or (c == "." and after.isdigit()):
            number = _NUMBER.match(text, k)
            k = number.end() if number else k + 1
            if not number or (k < n and (text[k].isalnum() or text[k] in "_.")):
                raise src.error(f"bad number syntax: {go_quote(text[start:k + 1])}", start)
            tok = ("number", _number(src, number.group(), start), start, spaced)
        elif c == ".":
            names, k = _names(text, k)
            tok = ("field", names, start, spaced) if names else ("dot", None, start, spaced)
            k = max(k, start + 1)
        elif c == "$":
            m = _WORD.match(text, k + 1)
            names, k = _names(text, m.end())
            tok = ("var", ("$" + m.group(), names), start, spaced)
        elif _IDENT.match(text, k):
            k = _IDENT.match(text, k).end()
            tok = ("ident", text[start:k], start, spaced)
        elif c in "\"'`":
            k, value = _quoted(src, k)
            tok = ("number" if c == "'" else "string", value, start, spaced)
        elif text.startswith(":=", k):
            k, tok = k + 2, ("declare", None, start, spaced)
        else:
            kinds = {"|": "pipe", "(": "lparen", ")": "rparen", ",": "comma", "=": "assign"}
            if c not in kinds:
                raise src.error(f"unexpected {go_quote(c)}", k)
            k, tok = k + 1, (kinds[c], c, start, spaced)
        toks.append(tok + (k,))
        spaced = False


def _names(text, k):
    """The names of a chain .A.B.C starting at k (at a "."): ([names], offset after it)."""
    names = []
    while text.startswith(".", k):
        m = _IDENT.match(text, k + 1)
        if not m:
            break
        names.append(m.group())
        k = m.end()
    return names, k


def _number(src, literal, pos):
    """A number literal's value: int (decimal, 0x, 0o, 0b, or 0-prefixed octal, as Go reads them) or float."""
    digits = literal.replace("_", "")
    try:
        if re.fullmatch(r"[+-]?0[0-7]+", digits):
            return int(digits, 8)
        if re.fullmatch(r"[+-]?(0[xX][0-9a-fA-F]+|0[bBoO][0-7]+|\d+)", digits):
            return int(digits, 0)
        return float(digits)
    except ValueError:
        raise src.error(f"bad number syntax: {go_quote(literal)}", pos) from None


def _quoted(src, k):
    """A "string", `raw string` or 'c' (a character's code) at k: (offset after it, value)."""
    text, quote = src.text, src.text[k]
    if quote == "`":
        end = text.find("`", k + 1)
        if end < 0:
            raise src.error("unterminated raw quoted string", k)
        return end + 1, text[k + 1:end].replace("\r", "")
    end = k + 1
    while end < len(text) and text[end] != quote:
        if text[end] == "\n":
            break
        end += 2 if text[end] == "\\" else 1
    if end >= len(text) or text[end] != quote:
        raise src.error("unterminated quoted string" if quote == '"' else "unterminated character constant", k)
    body = text[k + 1:end]

    def unescape(m):
        simple, hex2, octal, u4, u8 = m.groups()
        if simple is not None:
            if simple == ("'" if quote == '"' else '"'):
                raise src.error(f"invalid syntax: {text[k:end + 1]}", k)
            return _SIMPLE_ESCAPES[simple]
        return chr(int(hex2 or u4 or u8, 16) if octal is None else int(octal, 8))
    rest = _ESCAPE.sub("", body)
    if "\\" in rest:
        raise src.error(f"invalid syntax: {text[k:end + 1]}", k)
    value = _ESCAPE.sub(unescape, body)
    if quote == "'":
        if len(value) != 1:
            raise src.error(f"malformed character constant: {text[k:end + 1]}", k)
        return end + 1, ord(value)
    return end + 1, value


# The tree. A list of nodes, each a tuple (kind, pos, ...):
#   ("text", pos, str)                          ("action", pos, pipe)
#   ("if" | "with" | "range", pos, pipe, [body], [else] or None)        ("break" | "continue", pos)
# a pipe is ("pipe", pos, [declared names], assigns, [commands]); a command a list of operands:
#   ("field", pos, [names])  ("var", pos, name, [names])  ("dot", pos)  ("literal", pos, value)
#   ("func", pos, name)  ("paren", pos, pipe, [names])

_MAX_DEPTH = 100  # nested control structures and parentheses


class _Parser:
    def __init__(self, src, functions):
        self.src, self.functions = src, functions
        self.toks, self.i = _lex(src), 0
        self.vars = ["$"]  # declared variables in scope
        self.ranges = 0  # how many {{range}} enclose this point: {{break}} needs one
        self.depth = 0

    def error(self, message, tok):
        return self.src.error(message, tok[2] if tok else len(self.src.text))

    def describe(self, tok):
        """A token as written, quoted, for messages: "}}", ".Name", "end of template"."""
        return "end of template" if tok is None else go_quote(self.src.text[tok[2]:tok[4]])

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def next(self):
        tok = self.peek()
        if tok is None:
            raise self.src.error("unexpected end of template (an action is not closed)", len(self.src.text))
        self.i += 1
        return tok

    def expect(self, kind, context):
        tok = self.next()
        if tok[0] != kind:
            raise self.error(f"unexpected {self.describe(tok)} in {context}", tok)
        return tok

    def parse(self):
        nodes, stop = self.nodes()
        if stop is not None:
            raise self.error(f"unexpected {{{{{stop[1]}}}}}", stop)
        return nodes

    def nodes(self):
        """Nodes up to an {{else}} or {{end}} (returned, its }} not yet read) or the end of the text (None)."""
        nodes = []
        while self.peek() is not None:
            tok = self.next()
            if tok[0] == "text":
                nodes.append(("text", tok[2], tok[1]))
                continue
            word = self.peek()
            if word is not None and word[0] == "ident" and word[1] in ("else", "end"):
                self.i += 1
                return nodes, word
            nodes.append(self.action())
        return nodes, None

    def action(self):
        tok = self.peek()
        if tok is not None and tok[0] == "ident" and tok[1] in KEYWORDS:
            word = tok[1]
            if word in ("if", "with", "range"):
                return self.control()
            if word in ("break", "continue"):
                self.i += 1
                if not self.ranges:
                    raise self.error(f"{{{{{word}}}}} outside {{{{range}}}}", tok)
                self.expect("close", f"{{{{{word}}}}}")
                return (word, tok[2])
            raise self.error(f"{{{{{word}}}}} is not supported (cowfs knows one template, no others)", tok)
        return ("action", tok[2] if tok else 0, self.pipeline("command", "close"))

    def control(self):
        tok = self.next()
        kind = tok[1]
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.error("template nested too deeply", tok)
        scope = len(self.vars)
        pipe = self.pipeline(kind, "close", declarations=2 if kind == "range" else 1)
        self.ranges += kind == "range"
        body, stop = self.nodes()
        self.ranges -= kind == "range"
        if stop is None:
            raise self.error(f"{{{{{kind}}}}} without {{{{end}}}}", tok)
        otherwise = None
        if stop[1] == "else":
            chained = self.peek()
            if chained is not None and chained[0] == "ident" and chained[1] in ("if", "with"):
                otherwise = [self.control()]  # {{else if ...}}: ends at the same {{end}}
            else:
                self.expect("close", "{{else}}")
                otherwise, stop = self.nodes()
                if stop is None or stop[1] != "end":
                    raise self.error(f"{{{{{kind}}}}} without {{{{end}}}}" if stop is None else
                                     "unexpected {{else}} after {{else}}", stop or tok)
                self.expect("close", "{{end}}")
        else:
            self.expect("close", "{{end}}")
        del self.vars[scope:]
        self.depth -= 1
        return (kind, tok[2], pipe, body, otherwise)

    def pipeline(self, context, end, declarations=1):
        """[$x :=] command | command ... up to the `end` token (close or rparen), which it reads."""
        first = self.peek()
        pos = first[2] if first else len(self.src.text)
        names, assigns = self.declarations(declarations, context)
        commands = []
        while True:
            commands.append(self.command(context, end))
            tok = self.next()
            if tok[0] == end:
                break
            if tok[0] != "pipe":
                raise self.error(f"unexpected {self.describe(tok)} in {context}", tok)
        for command in commands[1:]:
            if command[0][0] != "func":
                raise self.src.error(f"can't give argument to non-function {_show(command[0])}", command[0][1])
        if not assigns:
            self.vars.extend(names)
        return ("pipe", pos, names, assigns, commands)

    def declarations(self, allowed, context):
        toks, i = self.toks, self.i
        found = []
        while i + 1 < len(toks) and toks[i][0] == "var" and not toks[i][1][1]:
            found.append(toks[i])
            if toks[i + 1][0] == "comma" and len(found) < 2:
                i += 2
                continue
            if toks[i + 1][0] in ("declare", "assign"):
                break
            return [], False
        else:
            return [], False
        if len(found) > allowed:
            raise self.error(f"too many declarations in {context}", found[0])
        assigns = toks[i + 1][0] == "assign"
        if assigns:
            for tok in found:
                if tok[1][0] not in self.vars:
                    raise self.error(f"undefined variable {go_quote(tok[1][0])}", tok)
        self.i = i + 2
        return [tok[1][0] for tok in found], assigns

    def command(self, context, end):
        operands = []
        while True:
            tok = self.peek()
            if tok is None or tok[0] in ("pipe", end):
                break
            if tok[0] in ("close", "rparen"):
                raise self.error(f"unexpected {self.describe(tok)} in {context}", tok)
            operands.append(self.operand())
        if not operands:
            raise self.error(f"missing value for {context}", tok)
        head = operands[0]
        if head[0] == "literal" and head[2] is None:
            raise self.src.error("nil is not a command", head[1])
        if head[0] != "func" and len(operands) > 1:
            raise self.src.error(f"can't give argument to non-function {_show(head)}", head[1])
        return operands

    def operand(self):
        tok = self.next()
        kind, value, pos = tok[0], tok[1], tok[2]
        if kind == "field":
            return ("field", pos, value)
        if kind == "var":
            if value[0] not in self.vars:
                raise self.error(f"undefined variable {go_quote(value[0])}", tok)
            return ("var", pos, value[0], value[1])
        if kind == "dot":
            return ("dot", pos)
        if kind in ("string", "number"):
            return ("literal", pos, value)
        if kind == "ident":
            if value in ("true", "false", "nil"):
                return ("literal", pos, {"true": True, "false": False, "nil": None}[value])
            if value in KEYWORDS:
                raise self.error(f"unexpected {{{{{value}}}}} in operand", tok)
            if value not in self.functions:
                if value in _GO_ONLY:
                    raise self.error(f'function "{value}" is not supported', tok)
                raise self.error(f'function "{value}" not defined', tok)
            return ("func", pos, value)
        if kind == "lparen":
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise self.error("template nested too deeply", tok)
            pipe = self.pipeline("parenthesized pipeline", "rparen")
            self.depth -= 1
            names = []
            after = self.peek()
            if after is not None and after[0] == "field" and not after[3]:  # (...).Field
                names = self.next()[1]
            return ("paren", pos, pipe, names)
        raise self.error(f"unexpected {self.describe(tok)} in operand", tok)


def _show(operand):
    """An operand as written, for messages: .A.B, $x, "text", 3, (...)."""
    kind = operand[0]
    if kind == "field":
        return "." + ".".join(operand[2])
    if kind == "var":
        return operand[2] + "".join("." + n for n in operand[3])
    if kind == "dot":
        return "."
    if kind == "literal":
        return go_quote(operand[2]) if isinstance(operand[2], str) else go_string(operand[2], True)
    if kind == "func":
        return operand[2]
    return "(...)" + "".join("." + n for n in operand[3])


# -- the functions: Go's builtins and Docker's -----------------------------------------------------------------

class _CallError(Exception):
    """A function refused its arguments: `error calling NAME: MESSAGE`."""


def _want(value, kind):
    """`value` when it is of Go type `kind` (string, int, []string), else the error Go gives."""
    ok = {"string": lambda v: isinstance(v, str),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "[]string": lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)}[kind](value)
    if not ok:
        raise _CallError(f"wrong type for value; expected {kind}; got {go_type(value)}")
    return value


def _index(item, *keys):
    for key in keys:
        if item is None:  # a missing map entry: as Docker's typed data, a zero value, not an error
            return None
        if isinstance(item, dict) and not isinstance(item, Record):
            item = item.get(_want(key, "string"))
        elif isinstance(item, (list, tuple, str)):
            seq = item.encode() if isinstance(item, str) else item  # Go indexes a string's bytes
            if not 0 <= _want(key, "int") < len(seq):
                raise _CallError(f"index out of range: {key}")
            item = seq[key]
        else:
            raise _CallError(f"can't index item of type {go_type(item)}")
    return item


def _slice(item, *bounds):
    """slice x 1 2 is x[1:2] (of a string's characters, where Go slices its bytes)."""
    if not isinstance(item, (list, tuple, str)):
        raise _CallError(f"can't slice item of type {go_type(item)}")
    if len(bounds) > (2 if isinstance(item, str) else 3):
        raise _CallError("too many slice indexes")
    bounds = [_want(b, "int") for b in bounds]
    low = bounds[0] if bounds else 0
    high = bounds[1] if len(bounds) > 1 else len(item)
    if not 0 <= low <= high <= len(item):
        raise _CallError(f"index out of range: {high if high > len(item) else low}")
    return item[low:high]


def _len(value):
    if isinstance(value, str):
        return len(value.encode())  # Go: bytes
    if isinstance(value, (list, tuple, dict)) and not isinstance(value, Record):
        return len(value)
    raise _CallError(f"len of type {go_type(value)}")


def _sprint(*args):
    """fmt.Sprint: a space between two operands when neither is a string."""
    out = []
    for i, arg in enumerate(args):
        if i and not isinstance(arg, str) and not isinstance(args[i - 1], str):
            out.append(" ")
        out.append(go_string(arg, nested=True))
    return "".join(out)


_VERB = re.compile(r"%([-+# 0]*)(\d+)?(?:\.(\d*))?([a-zA-Z%])")


def _sprintf(fmt, *args):
    """fmt.Sprintf for the verbs %v %s %q %d %x %X %o %b %c %t %f %e %g %%, with flags - 0 + and width and
    precision; a wrong verb for its value prints as Go prints it (%!d(string=x))."""
    out, used, last = [], 0, 0
    for m in _VERB.finditer(_want(fmt, "string")):
        out.append(fmt[last:m.start()])
        last = m.end()
        flags, width, precision, verb = m.groups()
        if verb == "%":
            out.append("%")
            continue
        if used >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        arg, used = args[used], used + 1
        text = _verb(verb, arg, flags, None if precision is None else int(precision or 0))
        width = int(width or 0)
        number = isinstance(arg, (int, float)) and not isinstance(arg, bool) and verb in "dxXobfeEgG"
        if "-" in flags:
            text = text.ljust(width)
        elif "0" in flags and number:  # zeros after the sign
            sign = text[0] if text[0] in "+-" else ""
            text = sign + text[len(sign):].rjust(width - len(sign), "0")
        else:
            text = text.rjust(width)
        out.append(text)
    out.append(fmt[last:])
    if used < len(args):
        out.append("%!(EXTRA " + ", ".join(f"{go_type(a)}={go_string(a, True)}" for a in args[used:]) + ")")
    return "".join(out)


def _verb(verb, arg, flags, precision):
    """One argument through one verb (no width)."""
    if isinstance(arg, (list, tuple)) and verb != "v":
        return "[" + " ".join(_verb(verb, a, flags, precision) for a in arg) + "]"
    if verb == "v":
        return go_string(arg, nested=True)
    if verb == "s" and isinstance(arg, str):
        return arg if precision is None else arg[:precision]
    if verb == "q" and isinstance(arg, str):
        return go_quote(arg)
    if verb == "t" and isinstance(arg, bool):
        return "true" if arg else "false"
    if isinstance(arg, int) and not isinstance(arg, bool) and verb in "dxXobc":
        if verb == "c":
            return chr(arg)
        return ("+" if "+" in flags and arg >= 0 else "") + format(arg, verb.replace("d", ""))
    if isinstance(arg, str) and verb in "xX":
        return arg.encode().hex() if verb == "x" else arg.encode().hex().upper()
    if isinstance(arg, float) and verb in "feEgG":
        if verb in "gG" and precision is None:
            text = _go_float(arg)
            return text.upper() if verb == "G" else text
        return format(arg, f"{'+' if '+' in flags else ''}.{6 if precision is None else precision}{verb}")
    if arg is None:
        return f"%!{verb}(<nil>)"
    return f"%!{verb}({go_type(arg)}={go_string(arg, True)})"


def _compared(a, b, ordered):
    """Go's rule for eq and lt: both basic and of one kind (numbers go together); None equals only None."""
    def kind(v):
        if isinstance(v, bool):
            return "bool"
        if isinstance(v, (int, float)):
            return "number"
        if isinstance(v, str):
            return "string"
        if v is None and not ordered:
            return "nil"
        raise _CallError(f"{'invalid' if ordered else 'non-comparable'} type for comparison: {go_type(v)}")
    ka, kb = kind(a), kind(b)
    if ka != kb and "nil" not in (ka, kb):
        raise _CallError("incompatible types for comparison")
    if ordered and ka == "bool":
        raise _CallError("invalid type for comparison: bool")


def _eq(a, *others):
    for b in others:
        _compared(a, b, ordered=False)
        if a == b:
            return True
    return False


def _ordered(test):
    def compare(a, b):
        _compared(a, b, ordered=True)
        return test(a, b)
    return compare


def _join(items, sep):
    items = _want(items, "[]string")  # checked first, as Go checks the arguments in order
    return _want(sep, "string").join(items)


def _title(text):
    """strings.Title: the first letter of each word upper case (a word starts after a non-letter)."""
    out, previous = [], " "
    for c in _want(text, "string"):
        separator = not (previous.isalnum() or previous == "_") if previous < "\x80" else previous.isspace()
        out.append(c.title() if separator and len(c.title()) == 1 else c)
        previous = c
    return "".join(out)


def _case(convert):
    """strings.ToUpper / ToLower: each character alone ("ß" stays "ß", as in Go)."""
    return lambda text: "".join(convert(c) if len(convert(c)) == 1 else c for c in _want(text, "string"))


def _pad(text, before, after):
    _want(text, "string")
    return text and " " * _want(before, "int") + text + " " * _want(after, "int")


def _truncate(text, length):
    return _want(text, "string")[:max(_want(length, "int"), 0)]


# name -> (fewest arguments, most (None: any), the function); "and" and "or" are evaluated lazily (_Run).
FUNCTIONS = {
    # Docker's (docker/cli templates.basicFunctions)
    "json": (1, 1, go_json),
    "join": (2, 2, _join),
    "split": (2, 2, lambda text, sep: _want(text, "string").split(sep) if _want(sep, "string") else list(text)),
    "upper": (1, 1, _case(str.upper)),
    "lower": (1, 1, _case(str.lower)),
    "title": (1, 1, _title),
    "pad": (3, 3, _pad),
    "truncate": (2, 2, _truncate),
    # Go's builtins
    "len": (1, 1, _len),
    "index": (1, None, _index),
    "slice": (1, None, _slice),
    "print": (0, None, _sprint),
    "println": (0, None, lambda *args: " ".join(go_string(a, True) for a in args) + "\n"),
    "printf": (1, None, _sprintf),
    "not": (1, 1, lambda value: not _truth(value)),
    "and": (1, None, None),
    "or": (1, None, None),
    "eq": (2, None, _eq),
    "ne": (2, 2, lambda a, b: not _eq(a, b)),
    "lt": (2, 2, _ordered(lambda a, b: a < b)),
    "le": (2, 2, _ordered(lambda a, b: a <= b)),
    "gt": (2, 2, _ordered(lambda a, b: a > b)),
    "ge": (2, 2, _ordered(lambda a, b: a >= b)),
}
# a table's header row: the header names as they are (docker/cli templates.HeaderFunctions)
HEADER_FUNCTIONS = dict(FUNCTIONS, **{name: (n, n, lambda text, *_: _want(text, "string")) for name, n in (
    ("json", 1), ("split", 2), ("join", 2), ("title", 1), ("lower", 1), ("upper", 1), ("truncate", 2))})
_GO_ONLY = ("html", "js", "urlquery", "call")  # Go builtins left out


def _truth(value):
    """Go's truth: false, 0, "", empty lists and maps, nil are false; a struct is true."""
    if value is None or value is _MISSING:
        return False
    if isinstance(value, Record):
        return True
    if isinstance(value, (str, list, tuple, dict)):
        return len(value) > 0
    return bool(value)


# -- running a template ------------------------------------------------------------------------------------------

_MISSING = object()  # no value piped in


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _Run:
    """One execution: the output so far and the variables in scope ([name, value] pairs, innermost last)."""

    def __init__(self, src, functions, data):
        self.src, self.functions = src, functions
        self.vars = [["$", data]]
        self.out = []

    def nodes(self, nodes, dot):
        for node in nodes:
            kind = node[0]
            if kind == "text":
                self.out.append(node[2])
            elif kind == "action":
                value = self.pipe(node[2], dot)
                if not node[2][2]:  # a declaration prints nothing
                    self.out.append(go_string(value))
            elif kind in ("if", "with"):
                scope = len(self.vars)
                value = self.pipe(node[2], dot)
                if _truth(value):
                    self.nodes(node[3], value if kind == "with" else dot)
                elif node[4] is not None:
                    self.nodes(node[4], dot)
                del self.vars[scope:]
            elif kind == "range":
                self.range(node, dot)
            else:
                raise _Break() if kind == "break" else _Continue()

    def range(self, node, dot):
        _, pos, pipe, body, otherwise = node
        value = self.pipe(pipe, dot, declare=False)
        if isinstance(value, (list, tuple)):
            items = list(enumerate(value))
        elif isinstance(value, dict) and not isinstance(value, Record):
            items = [(k, value[k]) for k in sorted(value)]
        elif isinstance(value, int) and not isinstance(value, bool):
            items = [(i, i) for i in range(value)]
        elif value is None:
            items = []
        else:
            raise self.src.error(f"range can't iterate over {go_string(value, True)}", pos)
        if not items:
            if otherwise is not None:
                self.nodes(otherwise, dot)
            return
        names = pipe[2]
        for key, element in items:
            scope = len(self.vars)
            if len(names) == 1:  # {{range $e := ...}}
                self.vars.append([names[0], element])
            elif names:  # {{range $i, $e := ...}}
                self.vars += [[names[0], key], [names[1], element]]
            try:
                self.nodes(body, element)
            except _Continue:
                pass
            except _Break:
                break
            finally:
                del self.vars[scope:]

    def pipe(self, pipe, dot, declare=True):
        _, pos, names, assigns, commands = pipe
        value = _MISSING
        for command in commands:
            value = self.command(command, dot, value)
        if declare and names:
            if assigns:
                self.variable(names[0], pos)[1] = value
            else:
                self.vars.append([names[0], value])
        return value

    def variable(self, name, pos):
        for pair in reversed(self.vars):
            if pair[0] == name:
                return pair
        raise self.src.error(f"undefined variable {go_quote(name)}", pos)

    def command(self, command, dot, final):
        head = command[0]
        if head[0] != "func":
            return self.arg(head, dot)
        name, pos = head[2], head[1]
        if name in ("and", "or"):  # lazily, left to right: the first false (and) or true (or) value, or the last
            operands = [lambda op=op: self.arg(op, dot) for op in command[1:]]
            if final is not _MISSING:
                operands.append(lambda: final)
            self.arity(name, len(operands), pos)
            for operand in operands:
                value = operand()
                if _truth(value) == (name == "or"):
                    return value
            return value
        args = [self.arg(op, dot) for op in command[1:]]
        if final is not _MISSING:
            args.append(final)
        return self.call(name, args, pos)

    def arity(self, name, count, pos):
        low, high = self.functions[name][:2]
        if count < low or (high is not None and count > high):
            want = f"at least {low}" if high is None else str(low)
            raise self.src.error(f"wrong number of args for {name}: want {want} got {count}", pos)

    def call(self, name, args, pos):
        self.arity(name, len(args), pos)
        try:
            return self.functions[name][2](*args)
        except _CallError as e:
            raise self.src.error(f"error calling {name}: {e}", pos) from None

    def arg(self, op, dot):
        kind, pos = op[0], op[1]
        if kind == "field":
            return self.fields(dot, op[2], pos)
        if kind == "var":
            return self.fields(self.variable(op[2], pos)[1], op[3], pos)
        if kind == "dot":
            return dot
        if kind == "literal":
            return op[2]
        if kind == "func":
            return self.call(op[2], [], pos)
        return self.fields(self.pipe(op[2], dot), op[3], pos)

    def fields(self, value, names, pos):
        for name in names:
            if isinstance(value, Record):
                if name not in value:
                    raise self.src.error(f"can't evaluate field {name} in type {value.kind} (it has "
                                         f"{', '.join(value)})", pos)
                value = value[name]
            elif isinstance(value, dict):
                value = value.get(name)  # Go's map: a missing key is <no value>
            elif value is not None:  # None: a missing entry further up, <no value> too
                raise self.src.error(f"can't evaluate field {name} in type {go_type(value)}", pos)
        return value


# -- the entry points ---------------------------------------------------------------------------------------------

class Template:
    """A parsed template (TemplateError when it cannot be); render(data) runs it."""

    def __init__(self, text, origin=None, given=None):
        self.src = _Source(text, origin, given)
        try:
            self.tree = _Parser(self.src, FUNCTIONS).parse()
        except RecursionError:
            raise TemplateError("template: nested too deeply") from None

    def render(self, data, header=False):
        """The output for `data` (`.` and `$`). header: a table's header row, run with Docker's header
        functions; an error there ends the row, as Docker ignores it."""
        run = _Run(self.src, HEADER_FUNCTIONS if header else FUNCTIONS, data)
        try:
            run.nodes(self.tree, data)
        except TemplateError:
            if not header:
                raise
        except RecursionError:
            raise TemplateError("template: nested too deeply") from None
        return "".join(run.out)


def render(text, data):
    """Run the template `text` on `data` once, as `docker inspect --format` (no `\\t` translation there)."""
    return Template(text).render(data)


def format_rows(fmt, rows, headers):
    """The output of `docker images/ps/history --format FMT` for `rows` (Records), newline-terminated.

    As docker/cli's formatter: "json" is `{{json .}}`; a `table` prefix prints a header row (the template
    run on `headers`, {field: column name}) and aligns the tab-separated columns (cowfs.formatting.table);
    spaces around the rest are trimmed and the two-character `\\t` and `\\n` become a tab and a newline.
    """
    if fmt == "json":
        fmt = "{{json .}}"
    is_table = fmt.startswith("table")
    rest = fmt[len("table"):] if is_table else fmt
    start = len(fmt) - len(rest.lstrip(" "))  # where `rest` begins in the argument, for messages
    rest = rest.strip(" ")
    text, origin, i = [], [], 0
    while i < len(rest):
        two = rest[i:i + 2]
        text.append({"\\t": "\t", "\\n": "\n"}.get(two, rest[i]))
        origin.append(start + i)
        i += 2 if two in ("\\t", "\\n") else 1
    origin.append(start + len(rest))
    template = Template("".join(text), origin=origin, given=fmt)
    body = "".join(template.render(row) + "\n" for row in rows)
    if not is_table:
        return body
    lines = (template.render(headers, header=True) + "\n" + body).split("\n")[:-1]
    cells = [line.split("\t") for line in lines]
    columns = max(len(c) for c in cells)
    cells = [c + [""] * (columns - len(c)) for c in cells]
    return table(cells[1:], cells[0]) + "\n"

"""The survivors of `make mutate` (mutmut 3's results under mutants/), one line each: file:line, function,
the line as it was and as the mutant has it; then the counts and the score per file: killed and timed-out
mutants over all but the equivalent ones.

A survivor that is equivalent (no test can tell it from the code as written) is listed, with the reason, in
scripts/mutation_equivalents.txt; the report leaves it out of the score and prints it as `equivalent`.

Run from the repository root after `mutmut run`:  python scripts/mutation_report.py [--all]
(--all: the killed mutants too).  Reads mutmut's own records, so it needs the version the Makefile pins.
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import re
import sys
from pathlib import Path

# mutmut's exit codes of a mutant's test run, as its `mutmut results` reads them
KILLED = {1, 3}
TIMEOUT = {-24, 24, 36, 152, 255}
SURVIVED = {0}
NO_TESTS = {5, 33}


EQUIVALENTS = Path(__file__).with_name("mutation_equivalents.txt")


def read_equivalents(path=EQUIVALENTS):
    """{(file, function, old, new): reason} from the equivalents file: an entry is one line
    `FILE: FUNCTION: 'line as written' -> 'line as mutated'` (as the report prints a survivor, without the
    line number and verdict), followed by indented lines saying why no test can tell the two apart."""
    entries, key = {}, None
    for number, line in enumerate(path.read_text().splitlines() if path.exists() else (), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if line[0].isspace():
            if key is None:
                sys.exit(f"mutation_report: {path}:{number}: a reason with no entry above it")
            entries[key] = (entries[key] + " " + line.strip()).strip()
            continue
        match = re.fullmatch(r"(\S+): (\S+): (.+) -> (.+)", line.rstrip())
        if not match:
            sys.exit(f"mutation_report: {path}:{number}: not `FILE: FUNCTION: 'old' -> 'new'`")
        file, where, old, new = match.groups()
        key = (file, where, ast.literal_eval(old), ast.literal_eval(new))
        entries[key] = ""
    for key, reason in entries.items():
        if not reason:
            sys.exit(f"mutation_report: {path}: {key[0]}: {key[1]}: an equivalent mutant needs its reason")
    return entries


def status(code):
    if code is None:
        return "not checked"
    if code in KILLED:
        return "killed"
    if code in TIMEOUT:
        return "timeout"
    if code in SURVIVED:
        return "survived"
    if code in NO_TESTS:
        return "no tests"
    return "suspicious"


def function_of(mutant):
    """(class or None, function) named by a mutant key such as `pkg.mod.xǁClassǁmethod__mutmut_3`."""
    func = mutant.rsplit("__mutmut_", 1)[0].rpartition(".")[2]
    if func.startswith("xǁ"):
        cls, _, name = func[2:].partition("ǁ")
        return cls, name
    return None, func.removeprefix("x_")


def function_lines(tree, cls, name):
    """(first, last) line of function `name` (a method of `cls` when given) in module `tree`, or None."""
    scopes = [tree] if cls is None else [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls]
    for scope in scopes:
        for node in ast.iter_child_nodes(scope):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return node.lineno, node.end_lineno
    return None


def changed_lines(diff):
    """The first removed and the first added line of a unified diff (either may be '')."""
    old = next((line[1:] for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")), "")
    new = next((line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")), "")
    return old, new


def locate(source_lines, span, old):
    """The line number of `old` (stripped) within `span` of the source, else the span's first line."""
    if span is None:
        return 0
    want = old.strip()
    for number in range(span[0], span[1] + 1):
        if want and source_lines[number - 1].strip() == want:
            return number
    return span[0]


def table_row(label, c):
    """One row of the table: the counts and the score, killed and timed out over all but the equivalents."""
    total = sum(c.values())
    dead = c["killed"] + c["timeout"]
    score = 100 * dead / (total - c["equivalent"]) if total > c["equivalent"] else 100.0
    return (f"{label:40} {total:6} {c['killed']:7} {c['timeout']:8} {c['survived']:9} {c['no tests']:9} "
            f"{c['equivalent']:7} {score:6.1f}%")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="list the killed mutants too")
    args = ap.parse_args(argv)
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant
    except ImportError:
        sys.exit("mutation_report: mutmut is not installed here (make mutate installs it into .venv)")
    equivalents = read_equivalents()
    used, waiting = set(), set()  # waiting: (file, function) with a mutant not checked yet
    counts = collections.OrderedDict()
    lines = []
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        try:
            results = json.loads(meta.read_text()).get("exit_code_by_key", {})
        except ValueError:  # being written by a run still going on
            print(f"mutation_report: {meta}: unreadable now, left out", file=sys.stderr)
            continue
        checked = {k: v for k, v in results.items() if v is not None}
        if not checked:
            continue
        source_path = meta.relative_to("mutants").with_suffix("")  # cowfs/overlay/x.py
        for mutant in results.keys() - checked.keys():
            cls, name = function_of(mutant)
            waiting.add((str(source_path), f"{cls}.{name}" if cls else name))
        source = source_path.read_text()
        tree = ast.parse(source)
        source_lines = source.splitlines()
        count = counts[str(source_path)] = collections.Counter()
        for mutant, code in sorted(checked.items(), key=lambda kv: int(kv[0].rsplit("_", 1)[1])):
            verdict = status(code)
            if verdict in ("killed", "timeout") and not args.all:
                count[verdict] += 1
                continue
            cls, name = function_of(mutant)
            old, new = changed_lines(get_diff_for_mutant(mutant, path=source_path))
            where = f"{cls}.{name}" if cls else name
            key = (str(source_path), where, old.strip(), new.strip())
            if verdict == "survived" and key in equivalents:
                verdict = "equivalent"
                used.add(key)
            count[verdict] += 1
            number = locate(source_lines, function_lines(tree, cls, name), old)
            lines.append((str(source_path), number, f"{source_path}:{number}: {verdict}: {where}: "
                          f"{old.strip()!r} -> {new.strip()!r}  [{mutant.rpartition('.')[2]}]"))
    for _, _, text in sorted(lines):
        print(text)
    for key in sorted(set(equivalents) - used):
        if key[0] in counts and key[:2] not in waiting:  # its function checked: no such survivor now
            print(f"{EQUIVALENTS.name}: stale: {key[0]}: {key[1]}: {key[2]!r} -> {key[3]!r}")
    print()
    print(f"{'file':40} {'total':>6} {'killed':>7} {'timeout':>8} {'survived':>9} {'no tests':>9} "
          f"{'equiv.':>7} {'score':>7}")
    for path, c in counts.items():
        print(table_row(path, c))
    for label, prefixes in (("engine and archive", ("cowfs/overlay/", "cowfs/images/")), ("all", ("cowfs/",))):
        c = sum((c for path, c in counts.items() if path.startswith(prefixes)), collections.Counter())
        if c:
            print(table_row(label, c))
    return 0


if __name__ == "__main__":
    sys.exit(main())

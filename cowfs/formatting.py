"""How cowfs shows things to people: sizes, durations, tables and the names of file kinds.

One spelling for each, everywhere:

- sizes: `human_size` ("48 B", "1.2 kB", "35.1 MB": decimal units, a space)
  for every command, except the image commands (`cowfs import`, `images`,
  `history`, `ps`), which mirror Docker's own columns and use `docker_size`
  ("48B", "2.15MB": Docker's three significant digits, no space);
- durations: `human_seconds` for how long something took ("0.4 ms", "3.10 s");
  `human_duration` and `ago` for how long ago something was made, as Docker
  prints it ("2 years ago");
- tables: `table` (columns three spaces apart, as docker prints them);
- counts: `plural` ("1 layer", "2 layers");
- file kinds: `kind_name` ("file", "dir", "symlink", "fifo", "socket",
  "char device", "block device"): the names a trace's events carry too.

Nothing here touches a filesystem or knows an on-disk format.
"""

import stat
import time

KIND_NAMES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
              stat.S_IFSOCK: "socket", stat.S_IFCHR: "char device", stat.S_IFBLK: "block device"}


def kind_name(mode):
    """The name of the file type of `mode` (an st_mode, or a bare S_IFxxx): "file", "dir", ... "object" if unknown.

    A whiteout is a char device here: only cowfs.overlay.whiteout can tell one (`is_whiteout`).
    """
    return KIND_NAMES.get(stat.S_IFMT(mode) or mode, "object")


def human_size(n):
    """A byte count in decimal units, with a space: "20 B", "1.2 kB", "35.1 MB", "123 GB"."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            break
        n /= 1000
    if unit == "B":
        return f"{int(n)} B"
    return f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"


def docker_size(n):
    """A byte count as Docker's image columns print it: decimal units, three significant digits, no space
    ("39B", "2.15MB", "5.6MB"), for the commands that mirror docker images, history and ps."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            break
        n /= 1000
    return f"{n:.3g}{unit}"


def human_seconds(s):
    """How long something took: "0.4 ms" below a second, else "3.10 s"."""
    if s < 1:
        return f"{s * 1000:.1f} ms"
    return f"{s:.2f} s"


def human_duration(seconds):
    """As Docker's units.HumanDuration: "Less than a second", "3 minutes", "7 weeks", ..."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    m = s // 60
    if m == 1:
        return "About a minute"
    if m < 60:
        return f"{m} minutes"
    h = round(s / 3600)
    if h == 1:
        return "About an hour"
    if h < 48:
        return f"{h} hours"
    if h < 24 * 7 * 2:
        return f"{h // 24} days"
    if h < 24 * 30 * 2:
        return f"{h // 24 // 7} weeks"
    if h < 24 * 365 * 2:
        return f"{h // 24 // 30} months"
    return f"{h // 24 // 365} years"


def ago(when, now=None):
    """ "3 minutes ago" for a time `when` (seconds since the epoch), as docker's CREATED column; "N/A" for None."""
    if when is None:
        return "N/A"
    return human_duration((now if now is not None else time.time()) - when) + " ago"


def table(rows, header):
    """Rows under a header, aligned as docker's tables (Go's tabwriter with a minimum width of 10 and a padding
    of 3): each column but the last as wide as its widest cell and 3 spaces, and at least 10."""
    widths = [max(max(len(str(r[i])) for r in [header] + rows) + 3, 10) for i in range(len(header))]
    lines = []
    for r in [header] + rows:
        lines.append("".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def plural(n, word, words=None):
    """ "1 layer", "0 layers", "2 images": `n` and `word`, or its plural (`words`, default word + "s")."""
    return f"{n} {word if n == 1 else (words or word + 's')}"

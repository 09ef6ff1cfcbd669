"""Writing the engine's events down (`cowfs mount --trace FILE`), reading them back, and saying them to people.

A trace is JSON lines, one event a line, appended and flushed as each event
happens (one write(2) per line on an O_APPEND descriptor, so a reader never
sees half a line and several writers never interleave inside one). Without a
trace the engine has no subscriber and builds no event at all.
"""

import json
import os
import stat
import threading

from cowfs.formatting import human_seconds, human_size, kind_name

FILE, DIR = kind_name(stat.S_IFREG), kind_name(stat.S_IFDIR)  # as events name them

class TraceWriter:
    """An events subscriber that appends each event to `path` as one JSON line;
    with `human`, also one human line to that file (what `cowfs shell` shows)."""

    def __init__(self, path, human=None):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._human_fd = None
        if human is not None:
            self._human_fd = os.open(human, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._lock = threading.Lock()

    def __call__(self, event):
        line = (json.dumps(event, separators=(", ", ": ")) + "\n").encode("utf-8", "surrogateescape")
        with self._lock:
            os.write(self._fd, line)
            if self._human_fd is not None:
                os.write(self._human_fd, (describe(event) + "\n").encode("utf-8", "surrogateescape"))

    def close(self):
        for fd in (self._fd, self._human_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._human_fd = None


def read_trace(path):
    """The events of a trace file, oldest first; a torn or foreign line is skipped. [] when there is no file."""
    events = []
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and "event" in event:
                    events.append(event)
    except OSError:
        pass
    return events


def _rel(path):
    return path.lstrip("/") or "/"


def describe(event):
    """One human line for an event, e.g. `copy-up  etc/hosts  from layer 2  (1.2 kB, 0.4 ms) on open for write`."""
    kind = event.get("event")
    path = _rel(event.get("path", "?"))
    if kind == "copy_up":
        kind_ = event.get("kind", FILE)
        is_dir = kind_ == DIR
        amount = "directory" if is_dir else human_size(event.get("bytes", 0)) if kind_ == FILE else kind_
        if event.get("metadata_only"):
            amount += ", metadata only"
        return (f"copy-up  {path}{'/' if is_dir else ''}  from layer {event.get('layer', '?')}  "
                f"({amount}, {human_seconds(event.get('seconds', 0))}) on {event.get('trigger', '?')}")
    if kind == "whiteout":
        return f"whiteout  {path}  (deleted; the lower layers keep it, hidden)"
    if kind == "whiteout_removed":
        return f"whiteout removed  {path}  (a new object takes the deleted name)"
    if kind == "opaque":
        return f"opaque  {path}  (lower directories no longer merge into it)"
    if kind == "redirect":
        return f"redirect  {path}  -> {event.get('value', '?')}  (renamed directory; its lower part stays where it was)"
    if kind == "create":
        extra = f" -> {_rel(event['to'])}" if event.get("to") else ""
        return f"create  {path}{extra}  ({event.get('kind', 'object')} in the upper)"
    if kind == "remove":
        return f"remove  {path}  ({event.get('kind', 'object')} removed from the upper)"
    if kind == "rename":
        return f"rename  {path}  -> {_rel(event.get('to', '?'))}"
    return f"{kind}  {path}"

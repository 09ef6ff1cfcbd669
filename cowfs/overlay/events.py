"""Layer-changing acts of the engine, as structured events, for tracing and for people exploring copy-up.

Each event is a dict with at least "event" (one of KINDS), "path" (merged
path) and "time" (seconds since the epoch). With nobody subscribed the engine
builds no event at all: `if self.events:` guards every emission.
"""

import time

KINDS = {
    "copy_up": "an object copied from a lower layer into the upper (fields: layer, kind, bytes, seconds, trigger)",
    "whiteout": "a whiteout written in the upper: the name is deleted over a lower layer",
    "whiteout_removed": "a whiteout replaced by a new object",
    "opaque": "a directory made opaque: lower directories of its path no longer merge into it",
    "redirect": "a redirect set on a renamed directory (field: value)",
    "create": "an object created in the upper (field: kind)",
    "remove": "an object removed from the upper",
    "rename": "an object moved inside the upper (field: to)",
}

# What the user did, as copy-up events name it.
TRIGGERS = {
    "open": "open for write", "create": "create", "truncate": "truncate", "chmod": "chmod", "chown": "chown",
    "utimens": "utimes", "setxattr": "setxattr", "removexattr": "removexattr", "link": "hard link",
    "rename": "rename", "mkdir": "mkdir", "mknod": "mknod", "symlink": "symlink", "unlink": "unlink",
    "rmdir": "rmdir",
}


class Events:
    """The subscribers of one engine; false while there are none."""

    def __init__(self):
        self._listeners = []

    def __bool__(self):
        return bool(self._listeners)

    def subscribe(self, callback):
        """Call `callback(event_dict)` for every event, in the thread that made the change."""
        self._listeners.append(callback)

    def unsubscribe(self, callback):
        self._listeners.remove(callback)

    def emit(self, name, path, **fields):
        event = {"event": name, "path": path, "time": time.time(), **fields}
        for listener in list(self._listeners):
            listener(event)

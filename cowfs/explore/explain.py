"""`cowfs explain PATH` (where a merged path comes from, and why the other layers do not show) and `cowfs status`.

Both read the layers directly, with the engine's lookup rules (`Layers`),
never through the mount: explaining a path changes nothing and copies nothing up.
Layers are numbered as in the stack: 0 the upper, 1..N the lowers, topmost first.
"""

import dataclasses
import datetime
import json
import os
import stat

from cowfs.daemon.trace import read_trace
from cowfs.errors import StackError
from cowfs.explore.diff import mount_containing, mounted_stack
from cowfs.formatting import human_seconds, human_size, kind_name
from cowfs.overlay.lookup import Layers
from cowfs.overlay.usage import tree_size
from cowfs.overlay.whiteout import REDIRECT, get_marker, is_opaque, is_whiteout
from cowfs.runtime import records


def _kind(st):
    """The kind name of a layer's object (cowfs.formatting.kind_name), or "whiteout"."""
    return "whiteout" if is_whiteout(st) else kind_name(st.st_mode)


def _layer_name(layer):
    return "upper" if layer == 0 else f"layer {layer}"


def _resolve(layers, path):
    try:
        return layers.resolve(path)
    except OSError:
        return None  # through a non-directory: nothing there


def _lstat(real):
    try:
        return os.lstat(real)
    except OSError:
        return None


def _literal(layers, layer, path):
    return layers.real(layer, path.strip("/"))


def _why_hidden(layers, path, layer):
    """Why `layer`'s entry at `path` (by its own path) does not show at `path` in the merged view."""
    components = path.strip("/").split("/")
    for depth in range(1, len(components) + 1):
        prefix = "/" + "/".join(components[:depth])
        rel = prefix.strip("/")
        whose = "it" if prefix == path else f"its parent {prefix}"
        node = _resolve(layers, prefix)
        parts = dict(node.parts) if node is not None else {}
        if parts.get(layer) == rel:
            continue
        if layer in parts:
            return f"{whose} is read from {layer}'s /{parts[layer]} instead (a directory renamed with a redirect)"
        for k in range(layer):
            if layers.roots[k] is None:
                continue
            st = _lstat(_literal(layers, k, prefix))
            if st is not None and is_whiteout(st):
                return f"{whose} is deleted by a whiteout in {_layer_name(k)}"
        if node is None:
            return f"{whose} is deleted in a layer above"
        if not node.is_dir:
            return f"{whose} is a {_kind(node.st)} in {_layer_name(node.layer)}, which hides every layer below"
        ours = _lstat(_literal(layers, layer, prefix))
        if ours is not None and not stat.S_ISDIR(ours.st_mode):
            return (f"{whose} is a directory in {_layer_name(node.layer)}; a {_kind(ours)} below a directory "
                    "is hidden")
        for k, krel in node.parts:
            if k < layer and is_opaque(layers.real(k, krel), layers.prefix):
                return f"{whose} is an opaque directory in {_layer_name(k)}, which hides the lower ones"
        for k, krel in node.parts:
            if k < layer and get_marker(layers.real(k, krel), layers.prefix, REDIRECT):
                value = get_marker(layers.real(k, krel), layers.prefix, REDIRECT)
                return f"{whose} in {_layer_name(k)} is a renamed directory (redirect to {value}): " \
                       f"its lower part is read there instead"
        return f"{whose} does not merge {_layer_name(layer)} (hidden above)"
    return "hidden"


def _history(located, path):
    """The trace's events about `path` (or moving it), oldest first."""
    if not located.trace:
        return []
    return [e for e in read_trace(located.trace) if e.get("path") == path or e.get("to") == path]


def _under_opaque(layers, path):
    """True when `path` or a directory above it is opaque in the upper: then it was created, not copied up."""
    components = path.strip("/").split("/")
    for depth in range(1, len(components) + 1):
        real = layers.real(0, "/".join(components[:depth]))
        st = _lstat(real)
        if st is not None and stat.S_ISDIR(st.st_mode) and is_opaque(real, layers.prefix):
            return True
    return False


def explain(located, path):
    """A dict saying where merged `path` comes from (see `cowfs explain --help`)."""
    stack = located.stack
    after = Layers(stack)
    before = Layers(dataclasses.replace(stack, upper=None)) if stack.upper else after
    node = _resolve(after, path)
    origin = _resolve(before, path) if stack.upper else None
    info = {"path": path, "mountpoint": located.mountpoint, "exists": node is not None,
            "provided_by": node.layer if node is not None else None,
            "kind": _kind(node.st) if node is not None else None, "copied_up": False, "copied_from": None,
            "copy_up": None, "history": [], "summary": None, "layers": []}
    parts = dict(node.parts) if node is not None else {}
    for layer, root in enumerate(after.roots):
        if root is None:
            continue
        entry = {"layer": layer, "name": _layer_name(layer), "root": root, "role": None, "reason": None}
        rel = parts.get(layer, path.strip("/"))
        real = after.real(layer, rel)
        st = _lstat(real)
        entry.update(entry=real if st is not None else None, kind=_kind(st) if st is not None else None,
                     size=st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None)
        if layer in parts:
            entry["role"] = "provides" if layer == node.layer else "merged"
            if rel != path.strip("/"):
                entry["reason"] = f"found at /{rel}, where a redirect points"
        elif st is None:
            entry["role"] = "absent"
        elif is_whiteout(st):
            entry["role"] = "whiteout"
            entry["reason"] = "deletes the name in the layers below"
        else:
            entry["role"] = "hidden"
            entry["reason"] = _why_hidden(after, path, layer)
        info["layers"].append(entry)
    history = _history(located, path)
    info["history"] = history
    last = next((e for e in reversed(history) if e.get("event") in ("copy_up", "create")
                 or (e.get("event") == "rename" and e.get("to") == path)), None)
    if node is None:
        info["copied_up"] = False
        deleted_by = next((e for e in info["layers"] if e["role"] == "whiteout"), None)
        hidden = next((e for e in info["layers"] if e["role"] == "hidden"), None)
        info["summary"] = (("deleted: a whiteout in " + deleted_by["name"]) if deleted_by
                           else f"does not exist: {hidden['reason']}" if hidden else "does not exist in any layer")
    elif node.layer != 0:
        info["copied_up"] = False
        info["summary"] = f"read from {_layer_name(node.layer)}; not copied up"
    elif last is not None and last["event"] == "rename":
        info["copied_up"] = False
        info["summary"] = f"in the upper, renamed from {last['path']}"
    elif origin is not None and (last is None or last["event"] == "copy_up") and not _under_opaque(after, path):
        info["copied_up"] = True
        info["copied_from"] = origin.layer
        text = f"in the upper, copied up from {_layer_name(origin.layer)}"
        if last is not None:
            when = datetime.datetime.fromtimestamp(last["time"]).strftime("%H:%M:%S")
            text += (f" on {last.get('trigger', '?')} at {when} ({human_size(last.get('bytes', 0))}, "
                     f"{human_seconds(last.get('seconds', 0))})")
            info["copy_up"] = last
        elif located.trace:
            text += " (before the trace began)"
        info["summary"] = text
    elif node.redirect:
        info["copied_up"] = True
        info["summary"] = (f"in the upper, a directory renamed from {node.redirect} (its redirect); "
                           "its lower part stays in the lower layers")
    else:
        info["copied_up"] = False
        info["summary"] = "in the upper, created there" + (
            f" (a new object: {_layer_name(origin.layer)}'s is hidden)" if origin is not None else "")
    return info


def format_explain(info):
    lines = [f"{info['path']}: {info['kind'] or 'no such object'} in {info['mountpoint']}" if info["exists"]
             else f"{info['path']}: not in the merged view of {info['mountpoint']}",
             f"  {info['summary']}"]
    width = max(len(e["root"]) for e in info["layers"])
    for e in info["layers"]:
        what = e["kind"] or "-"
        if e["size"] is not None:
            what += f", {human_size(e['size'])}"
        reason = e.get("reason") or ""
        role = {"provides": "provides it", "merged": "merged into it", "absent": "no entry",
                "whiteout": "whiteout: " + reason, "hidden": "hidden: " + reason}[e["role"]]
        if e["role"] in ("provides", "merged") and e.get("reason"):
            role += f" ({e['reason']})"
        lines.append(f"  {e['name']:<8} {e['root']:<{width}}  {what:<16} {role}")
    return lines


def run(args):
    located, path = mount_containing(args.path)
    info = explain(located, path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print("\n".join(format_explain(info)))
    return 0


# -- status ---------------------------------------------------------------------------------------

def copied_up(located, after=None, before=None):
    """(files, directories, source): objects copied up, from the trace when there is one,
    else counted in the upper (non-directories there that a lower layer also holds; directories unknown)."""
    if located.trace and os.path.exists(located.trace):
        paths = {}
        for e in read_trace(located.trace):
            if e.get("event") == "copy_up":
                paths[e["path"]] = e.get("kind")
        files = sum(1 for k in paths.values() if k != kind_name(stat.S_IFDIR))
        return files, len(paths) - files, "trace"
    stack = located.stack
    before = before or Layers(dataclasses.replace(stack, upper=None))
    after = after or Layers(stack)
    count = 0
    for dirpath, dirnames, filenames in os.walk(stack.upper):
        rel = os.path.relpath(dirpath, stack.upper)
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = _lstat(os.path.join(dirpath, name))
            if st is None or is_whiteout(st):
                continue
            merged = "/" + (name if rel == "." else f"{rel}/{name}")
            if _resolve(before, merged) is not None and not _under_opaque(after, merged):
                count += 1
    return count, None, "upper"


def status(located):
    stack = located.stack
    info = {"mountpoint": located.mountpoint, "pid": (located.record or {}).get("pid"),
            "upper": stack.upper, "work": stack.work, "lowers": stack.lowers,
            "options": [o for o in (["redirect_dir=" + stack.redirect_dir] if stack.redirect_dir != "off" else [])
                        + [n for n in ("userxattr", "oci_whiteouts") if getattr(stack, n)]
                        + (["ro"] if stack.read_only else [])],
            "trace": located.trace, "upper_size": None, "copied_up_files": None, "copied_up_dirs": None,
            "copied_up_source": None}
    if stack.upper:
        files, dirs, source = copied_up(located)
        info.update(upper_size=tree_size(stack.upper), copied_up_files=files, copied_up_dirs=dirs,
                    copied_up_source=source)
    return info


def format_status(info):
    lines = [f"{info['mountpoint']}  (cowfs, pid {info['pid']})"]
    if info["upper"]:
        copies = f"{info['copied_up_files']} file{'s' if info['copied_up_files'] != 1 else ''}"
        if info["copied_up_dirs"] is not None:
            copies += f" and {info['copied_up_dirs']} director{'ies' if info['copied_up_dirs'] != 1 else 'y'}"
        copies += " copied up" + (" (from the trace)" if info["copied_up_source"] == "trace" else
                                  " (upper non-directories that a lower layer holds)")
        lines.append(f"  upper    {info['upper']}  {human_size(info['upper_size'])}; {copies}")
        lines.append(f"  work     {info['work']}")
    else:
        lines.append("  upper    none (read-only)")
    for i, lower in enumerate(info["lowers"], 1):
        lines.append(f"  layer {i}  {lower}")
    lines.append(f"  options  {','.join(info['options']) or '-'}")
    lines.append(f"  trace    {info['trace'] or '-'}")
    return lines


def run_status(args):
    if args.mountpoint:
        located = mounted_stack(args.mountpoint) if os.path.isdir(args.mountpoint) else None
        if located is None or located.kind != "cowfs":
            raise StackError(f"{args.mountpoint}: not a cowfs mount")
        found = [located]
    else:
        found = []
        for record in records():
            try:
                found.append(mounted_stack(record["mountpoint"]))
            except (StackError, KeyError):
                continue
    infos = [status(located) for located in found if located is not None]
    if args.json:
        print(json.dumps(infos, indent=2))
    elif getattr(args, "quiet", False):
        for info in infos:
            print(info["mountpoint"])
    elif not infos:
        print("no cowfs mounts")
    else:
        print("\n\n".join("\n".join(format_status(info)) for info in infos))
    return 0

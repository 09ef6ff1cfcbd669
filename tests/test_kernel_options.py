"""The kernel overlay's newer option spellings: `lowerdir+=`, escapes in `lowerdir=`, `xino=`, `uuid=`,
`nfs_export=`, `verity=`. Parsed as the kernel parses them, and accepted or refused as the kernel accepts or
refuses them on this machine (the mount-time comparison mounts both with the same options)."""

from __future__ import annotations

import contextlib
import errno
import os

import pytest

from cowfs.errors import StackError
from cowfs.overlay.stack import parse_options
from cowfs.testing.harness import KERNEL_COMMON, upper_snapshot
from cowfs.testing.mounts import CowfsMount, KernelOverlay, MountError, scratch_filesystem
from cowfs.testing.tree import snapshot


class TestParsing:
    def test_lowerdir_add_one_layer_each_topmost_first(self):
        stack = parse_options(["lowerdir+=/top,lowerdir+=/mid", "lowerdir+=/bottom"])
        assert stack.lowers == ["/top", "/mid", "/bottom"]

    def test_lowerdir_add_takes_the_path_as_spelt(self):
        """No escapes: a colon is part of the path, a backslash stays (as the kernel: it resolves
        `a\\,b` literally)."""
        stack = parse_options(["lowerdir+=/a:b,lowerdir+=/c\\,d,lowerdir+=/e\\f"])
        assert stack.lowers == ["/a:b", "/c\\,d", "/e\\f"]

    def test_escapes_in_lowerdir(self):
        assert parse_options(["lowerdir=/a\\:b:/c\\,d:/e\\\\f"]).lowers == ["/a:b", "/c,d", "/e\\f"]

    def test_lowerdir_replaces_earlier_lowerdir_add(self):
        assert parse_options(["lowerdir+=/a,lowerdir=/x:/y"]).lowers == ["/x", "/y"]

    @pytest.mark.parametrize("options, words", [
        ("lowerdir=/a,lowerdir+=/b", "cannot follow lowerdir"),
        ("lowerdir+=", "needs a value"),
        ("lowerdir=/a,xino=maybe", "bad value for xino"),
        ("lowerdir=/a,uuid=maybe", "bad value for uuid"),
        ("lowerdir=/a,nfs_export=maybe", "bad value for nfs_export"),
        ("lowerdir=/a,verity=maybe", "bad value for verity"),
        ("lowerdir=/a,nfs_export=on", "nfs_export=on: not supported"),
    ])
    def test_refused_in_one_line(self, options, words):
        with pytest.raises(StackError) as info:
            parse_options([options])
        assert words in str(info.value) and "\n" not in str(info.value)

    def test_accepted_values_are_kept_for_the_option_string(self):
        stack = parse_options(["lowerdir=/a,upperdir=/u,workdir=/w,xino=on,uuid=null,nfs_export=off,verity=off"])
        assert (stack.xino, stack.uuid) == ("on", "null")
        assert stack.option_string().endswith(",xino=on,uuid=null")
        assert parse_options([stack.option_string()]) == stack


# -- the kernel's verdict on the same options ---------------------------------------------------------

# Refused by cowfs though the kernel mounts it (known difference refused_options): a FUSE mount is not exported
# by the overlay's NFS code (the kernel exports a mount without an upper even with index=off; with an upper it
# needs index=on: test_nfs_export_with_an_upper).
COWFS_ONLY_REFUSES = {"nfs_export=on"}


def _layers(base):
    paths = {name: os.path.join(base, name) for name in ("l1", "l2", "c:d", "a,b")}
    for name, path in paths.items():
        os.makedirs(path)
        with open(os.path.join(path, "in-" + name.replace(":", "").replace(",", "")), "w") as f:
            f.write(name)
    with open(os.path.join(paths["l2"], "in-l1"), "w") as f:
        f.write("hidden by l1")
    return paths


OPTION_CASES = [
    "lowerdir+={l1},lowerdir+={l2}",
    "lowerdir+={l2},lowerdir+={l1}",
    "lowerdir+={c:d},lowerdir+={l1}",
    "lowerdir={c\\:d}:{a\\,b}",
    "lowerdir={l1},lowerdir+={l2}",
    "lowerdir+={l1},lowerdir={l2}:{c\\:d}",
    "lowerdir+={a\\,b},lowerdir+={l1}",
    "lowerdir+={l1}:{l2}",
    "lowerdir+={l1},lowerdir+={l1}",
    "lowerdir+=",
] + [f"lowerdir={{l1}}:{{l2}},{o}" for o in (
    "xino=on", "xino=off", "xino=auto", "xino=bad", "uuid=on", "uuid=off", "uuid=null", "uuid=auto", "uuid=bad",
    "nfs_export=on", "nfs_export=off", "nfs_export=bad", "verity=off", "verity=on", "verity=require",
    "verity=bad",
    # as Linux 6.16 and later, verity= goes with every other option: it neither implies nor needs metacopy=on
    "verity=on,metacopy=off", "verity=require,metacopy=off", "verity=on,redirect_dir=off",
    "verity=require,redirect_dir=nofollow", "verity=on,userxattr", "verity=require,metacopy=on",
    "verity=on,metacopy=on,redirect_dir=off", "verity=require,metacopy=on,userxattr",
    # without an upper, the kernel takes redirect_dir=off (which follows) and follow as on: metacopy=on goes
    "metacopy=on,redirect_dir=off", "metacopy=on,redirect_dir=follow", "metacopy=on,redirect_dir=nofollow")]


def _fill(template, paths):
    escaped = {"c\\:d": paths["c:d"].replace(":", "\\:"), "a\\,b": paths["a,b"].replace(",", "\\,")}
    out = template
    for key, value in list(escaped.items()) + list(paths.items()):
        out = out.replace("{" + key + "}", value)
    return out


def _try(mount, mountpoint):
    """Mount; the merged tree, or None when refused. Always unmounted."""
    try:
        mount.mount()
    except MountError:
        return None
    try:
        return snapshot(mountpoint)
    finally:
        mount.unmount()


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.parametrize("template", OPTION_CASES)
def test_accepted_and_refused_as_the_kernel(template, shared_tmp):
    paths = _layers(shared_tmp)
    options = _fill(template, paths)
    seen = {}
    for kind, cls in (("kernel", KernelOverlay), ("cowfs", CowfsMount)):
        mnt = os.path.join(shared_tmp, kind + "-mnt")
        os.mkdir(mnt)
        mount = cls([], None, None, mnt)
        mount.option_string = options + ("," + ",".join(KERNEL_COMMON) if kind == "kernel" else "")
        seen[kind] = _try(mount, mnt)
    if any(template.endswith(o) for o in COWFS_ONLY_REFUSES):
        assert seen["kernel"] is not None and seen["cowfs"] is None
    else:
        assert seen["cowfs"] == seen["kernel"], f"-o {options}: kernel {seen['kernel']} cowfs {seen['cowfs']}"


@pytest.mark.kernel
@pytest.mark.fuse
def test_lowerdir_add_with_an_upper(shared_tmp):
    """lowerdir+= with upperdir/workdir: a copy-up lands in the upper, the tree is the kernel's."""
    paths = _layers(shared_tmp)
    trees = {}
    for kind, cls in (("kernel", KernelOverlay), ("cowfs", CowfsMount)):
        upper, work, mnt = (os.path.join(shared_tmp, f"{kind}-{d}") for d in ("upper", "work", "mnt"))
        for d in (upper, work, mnt):
            os.mkdir(d)
        mount = cls([], None, None, mnt)
        mount.option_string = (f"lowerdir+={paths['c:d']},lowerdir+={paths['l1']},upperdir={upper},workdir={work},"
                               "xino=auto,uuid=on") + ("," + ",".join(KERNEL_COMMON) if kind == "kernel" else "")
        mount.mount()
        try:
            with open(os.path.join(mnt, "in-l1"), "a") as f:
                f.write("+more")
            trees[kind] = (snapshot(mnt), sorted(os.listdir(upper)))
        finally:
            mount.unmount()
    assert trees["cowfs"] == trees["kernel"]
    assert trees["kernel"][1] == ["in-l1"]


@pytest.mark.kernel
@pytest.mark.fuse
def test_nfs_export_with_an_upper(shared_tmp):
    """With an upper, the kernel refuses nfs_export=on without index=on; cowfs refuses it too."""
    paths = _layers(shared_tmp)
    for kind, cls in (("kernel", KernelOverlay), ("cowfs", CowfsMount)):
        upper, work, mnt = (os.path.join(shared_tmp, f"{kind}-{d}") for d in ("upper", "work", "mnt"))
        for d in (upper, work, mnt):
            os.mkdir(d)
        mount = cls([], None, None, mnt)
        mount.option_string = f"lowerdir={paths['l1']},upperdir={upper},workdir={work},nfs_export=on" + (
            "," + ",".join(KERNEL_COMMON) if kind == "kernel" else "")
        assert _try(mount, mnt) is None, f"{kind} mounted -o {mount.option_string}"


# -- verity= with an upper: what each side does and leaves on disk --------------------------------------

def _sides(base, lowers, options, tag=""):
    """A kernel and a cowfs mount of `lowers`, each with its own upper and work (made under `base`,
    or reused when there), with `options`: {kind: (mount, upper)}."""
    sides = {}
    for kind, cls in (("kernel", KernelOverlay), ("cowfs", CowfsMount)):
        upper, work, mnt = (os.path.join(base, f"{kind}-{d}") for d in ("upper", "work", "mnt" + tag))
        for d in (upper, work, mnt):
            os.makedirs(d, exist_ok=True)
        extra = list(KERNEL_COMMON) if kind == "kernel" else []
        sides[kind] = (cls(lowers, upper, work, mnt, list(options) + extra), upper)
    return sides


def _outcome(call, *args):
    """What a call through the mount did: its result, or the errno's name."""
    try:
        result = call(*args)
    except OSError as e:
        return errno.errorcode[e.errno]
    return result if result is None or isinstance(result, (bytes, int, list)) else "ok"


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _write(path):
    with open(path, "r+b") as f:
        return f.write(b"W")


# -- xino=: inode numbers over layers on one filesystem or several --------------------------------

XINO_NAMES = ("f", "d", "d/g", "copied")  # from the lowers; the root and a new file show the upper's own


def _xino_layers(lowers):
    """Files in each lower (topmost first): `f`, `d/g` and `copied` in the top one, `more-N` below."""
    for i, lower in enumerate(lowers):
        os.makedirs(os.path.join(lower, "d"), exist_ok=True)
        names = ("f", "d/g", "copied") if i == 0 else (f"more-{i}",)
        for name in names:
            with open(os.path.join(lower, name), "w") as f:
                f.write(name)
    return XINO_NAMES + tuple(f"more-{i}" for i in range(1, len(lowers)))


def _numbers_through(kind, base, lowers, names, xino):
    """st_ino of each name through a fresh mount of `kind` with xino=VALUE after a copy-up, with the st_dev
    they show, and whether the root and a new file showed their upper's own numbers."""
    upper, work, mnt = (os.path.join(base, f"{kind}-{xino}-{x}") for x in ("upper", "work", "mnt"))
    for d in (upper, work, mnt):
        os.mkdir(d)
    cls = KernelOverlay if kind == "kernel" else CowfsMount
    m = cls(lowers, upper, work, mnt, [f"xino={xino}"] + (list(KERNEL_COMMON) if kind == "kernel" else []))
    m.mount()
    try:
        os.chmod(os.path.join(mnt, "copied"), 0o600)
        with open(os.path.join(mnt, "new"), "w"):
            pass
        stats = {name: os.lstat(os.path.join(mnt, name)) for name in names + (".", "new")}
        own = all(stats[name].st_ino == os.lstat(os.path.join(upper, name)).st_ino for name in (".", "new"))
        return {name: stats[name].st_ino for name in names}, {st.st_dev for st in stats.values()}, own
    finally:
        m.unmount()


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.parametrize("options", [
    ("verity=on",), ("verity=require",), ("verity=on", "metacopy=off"), ("verity=require", "redirect_dir=off"),
    ("verity=on", "userxattr"),
], ids=",".join)
def test_verity_alone_copies_whole(options, shared_tmp):
    """verity= without metacopy=on (Linux 6.16 and later): a chmod copies the whole file up, a rename too
    (no redirect); both sides leave the same upper."""
    low = os.path.join(shared_tmp, "low")
    os.makedirs(os.path.join(low, "a"))
    for rel in ("f", "a/g"):
        with open(os.path.join(low, rel), "wb") as f:
            f.write(b"lower data " + rel.encode())
    seen = {}
    for kind, (mount, upper) in _sides(shared_tmp, [low], options).items():
        mount.mount()
        try:
            mnt = mount.mountpoint
            os.chmod(os.path.join(mnt, "f"), 0o600)
            os.rename(os.path.join(mnt, "a/g"), os.path.join(mnt, "g"))
            merged = snapshot(mnt)
        finally:
            mount.unmount()
        seen[kind] = (merged, upper_snapshot(upper, "userxattr" in options))
    assert seen["cowfs"] == seen["kernel"]
    entries = seen["kernel"][1]["entries"]
    assert not any(k.endswith("overlay.metacopy") for k in entries["f"].get("xattrs", {}))
    assert entries["f"]["size"] == len(b"lower data f") and "sha256" in entries["g"]


# Each operation on a metacopy file the upper got under metacopy=on alone, then mounted with
# verity=require,metacopy=on: the kernel refuses to use data no digest vouches for.
REQUIRE_OPS = [
    ("stat", lambda m: os.stat(m + "/f").st_size),
    ("listdir", lambda m: sorted(os.listdir(m))),
    ("read", lambda m: _read(m + "/f")),
    ("open for write", lambda m: _write(m + "/f")),
    ("truncate", lambda m: os.truncate(m + "/f", 1)),
    ("chmod", lambda m: os.chmod(m + "/f", 0o640)),
    ("chown", lambda m: os.chown(m + "/f", 1, 1)),
    ("utime", lambda m: os.utime(m + "/f", (1, 1))),
    ("rename", lambda m: os.rename(m + "/g", m + "/g2")),
    ("link", lambda m: os.link(m + "/g", m + "/g3")),
    ("setxattr", lambda m: os.setxattr(m + "/h", "user.k", b"v")),
    ("getxattr", lambda m: os.getxattr(m + "/h", "user.k")),
    ("unlink", lambda m: os.unlink(m + "/k")),
    ("listdir after", lambda m: sorted(os.listdir(m))),
    ("read a file copied whole", lambda m: _read(m + "/new")),
]


@pytest.mark.kernel
@pytest.mark.fuse
def test_verity_require_over_a_metacopy_upper(shared_tmp):
    """An upper written with metacopy=on (each side its own), mounted again with verity=require: what needs
    a digest-less metacopy file's data (open, any copy-up) fails with EIO on both, the rest works, a new
    copy-up is whole; the same outcomes, merged trees and uppers."""
    low = os.path.join(shared_tmp, "low")
    os.mkdir(low)
    for name in ("f", "g", "h", "k", "new"):
        with open(os.path.join(low, name), "wb") as f:
            f.write(b"data of " + name.encode())
    seen = {}
    for mount, _ in _sides(shared_tmp, [low], ("metacopy=on",)).values():
        mount.mount()
        try:
            for name in ("f", "g", "h", "k"):
                os.chmod(os.path.join(mount.mountpoint, name), 0o600)
        finally:
            mount.unmount()
    for kind, (mount, upper) in _sides(shared_tmp, [low], ("verity=require", "metacopy=on"), "2").items():
        mount.mount()
        try:
            outcomes = [(name, _outcome(op, mount.mountpoint)) for name, op in REQUIRE_OPS[:-1]]
            os.chmod(os.path.join(mount.mountpoint, "new"), 0o600)
            outcomes.append((REQUIRE_OPS[-1][0], _outcome(REQUIRE_OPS[-1][1], mount.mountpoint)))
            merged = snapshot(mount.mountpoint)
        finally:
            mount.unmount()
        seen[kind] = (outcomes, merged, upper_snapshot(upper, False))
    assert seen["cowfs"][0] == seen["kernel"][0]
    assert seen["cowfs"][1:] == seen["kernel"][1:]
    kernel = dict(seen["kernel"][0])
    assert [name for name, result in seen["kernel"][0] if result == "EIO"] == [
        "read", "open for write", "truncate", "chmod", "chown", "utime", "rename", "link"], kernel
    assert kernel["listdir after"] == ["f", "g", "h", "new"] and kernel["getxattr"] == b"v"
    entries = seen["kernel"][2]["entries"]
    assert not any(k.endswith("overlay.metacopy") for k in entries["new"].get("xattrs", {}))
    assert entries["f"]["xattrs"]["trusted.overlay.metacopy"] is not None  # still metadata only


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.parametrize("layout", ["one", "tmpfs", "ext4", "tmpfs+ext4"])
def test_inode_numbers_as_the_kernels_xino(shared_tmp, layout):
    """The upper on /tmp's filesystem, the lowers on it (one) or on others: a tmpfs (64-bit inode numbers:
    the kernel keeps the fewest top bits for the filesystem's number), an ext4 image (32-bit ones: bits
    33 up), both. cowfs shows the kernel's numbers for xino=on and xino=auto. For xino=off the kernel
    shows each layer's real numbers under a device number per layer, which a FUSE mount cannot (one
    st_dev): cowfs shows the xino=on numbers then, unique on its one device."""
    with contextlib.ExitStack() as stack:
        lowers = []
        if layout == "one":
            lowers.append(os.path.join(shared_tmp, "lower"))
        for kind in layout.split("+") if layout != "one" else ():
            uuid = "11111111-2222-3333-4444-555555555555" if kind == "ext4" else None  # a tmpfs has its own
            fs = stack.enter_context(scratch_filesystem(os.path.join(shared_tmp, kind), uuid=uuid))
            lowers.append(os.path.join(fs, "lower"))
        names = _xino_layers(lowers)
        seen = {(kind, xino): _numbers_through(kind, shared_tmp, lowers, names, xino)
                for kind in ("kernel", "cowfs") for xino in ("on", "auto", "off")}
        real = os.lstat(lowers[0] + "/f").st_ino
    for xino in ("on", "auto"):
        assert seen["cowfs", xino][0] == seen["kernel", xino][0], xino
    for key, (_, devs, own) in seen.items():
        assert own or key == ("kernel", "off"), key  # the kernel's root, on several: a number of its own
        assert len(devs) == 1 or key == ("kernel", "off"), key
    assert seen["cowfs", "off"][0] == seen["kernel", "on"][0]
    assert len(set(seen["cowfs", "off"][0].values())) == len(names)
    if layout == "one":  # every layer on one filesystem: xino changes nothing, the real numbers show
        assert seen["kernel", "off"][0] == seen["kernel", "on"][0] and seen["kernel", "on"][0]["f"] == real
        assert len(seen["kernel", "off"][1]) == 1
    else:
        assert seen["kernel", "on"][0]["f"] != real == seen["kernel", "off"][0]["f"]
        assert len(seen["kernel", "off"][1]) > 1  # what cowfs cannot show

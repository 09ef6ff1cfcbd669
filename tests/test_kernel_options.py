"""The kernel overlay's newer option spellings: `lowerdir+=`, escapes in `lowerdir=`, `xino=`, `uuid=`,
`nfs_export=`, `verity=`. Parsed as the kernel parses them, and accepted or refused as the kernel accepts or
refuses them on this machine (the mount-time comparison mounts both with the same options)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import types

import pytest

from cowfs import mounttable
from cowfs.errors import StackError
from cowfs.overlay import handles, workdir
from cowfs.overlay import stack as stack_module
from cowfs.overlay.filesystems import Filesystems
from cowfs.overlay.stack import Stack, check, is_within, parse_options, split_escaped, unescape, with_userxattr
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



# -- every option, as a table: what it sets, or the one line that refuses it ------------------------------

UW = "upperdir=/u,workdir=/w"

PARSED = [  # (the -o strings, the Stack fields other than Stack(lowers=["/l"])'s defaults)
    (["lowerdir=/l"], {}),
    ([",lowerdir=/l,,"], {}),
    (["lowerdir=/a:/b\\,c:/d\\\\e"], {"lowers": ["/a", "/b,c", "/d\\e"]}),
    (["lowerdir=/a,lowerdir=/b"], {"lowers": ["/b"]}),
    (["lowerdir=/l", UW], {"upper": "/u", "work": "/w"}),
    (["lowerdir=/l,upperdir=/u\\,1\\:2,workdir=/w\\\\3"], {"upper": "/u,1:2", "work": "/w\\3"}),
    (["lowerdir=/l,redirect_dir=on"], {"redirect_dir": "on"}),
    (["lowerdir=/l,redirect_dir=follow"], {"redirect_dir": "follow"}),
    (["lowerdir=/l,redirect_dir=nofollow"], {"redirect_dir": "nofollow"}),
    (["lowerdir=/l,redirect_dir=off"], {}),
    # without an upper, as the kernel: metacopy=on takes redirect_dir=off or follow (and follows)
    (["lowerdir=/l,metacopy=on,redirect_dir=off"], {"metacopy": True, "redirect_dir": "on"}),
    (["lowerdir=/l,metacopy=on,redirect_dir=follow"], {"metacopy": True, "redirect_dir": "on"}),
    (["lowerdir=/l,verity=on"], {"verity": "on"}),
    (["lowerdir=/l,verity=require"], {"verity": "require"}),
    (["lowerdir=/l,metacopy=on"], {"metacopy": True, "redirect_dir": "on"}),
    (["lowerdir=/l,metacopy=on,redirect_dir=on"], {"metacopy": True, "redirect_dir": "on"}),
    (["lowerdir=/l,metacopy=on", UW], {"metacopy": True, "redirect_dir": "on", "upper": "/u", "work": "/w"}),
    (["lowerdir=/l,metacopy=off,redirect_dir=nofollow"], {"redirect_dir": "nofollow"}),
    (["lowerdir=/l,index=on"], {}),  # the kernel's index lives in the workdir: nothing without an upper
    (["lowerdir=/l,index=off," + UW], {"upper": "/u", "work": "/w"}),
    (["lowerdir=/l,index=on," + UW], {"index": True, "upper": "/u", "work": "/w"}),
    (["lowerdir=/l,volatile"], {}),  # ignored without an upper, as the kernel
    (["lowerdir=/l,volatile," + UW], {"volatile": True, "upper": "/u", "work": "/w"}),
    (["lowerdir=/l,userxattr"], {"userxattr": True}),
    (["lowerdir=/l,userxattr,redirect_dir=follow"], {"userxattr": True, "redirect_dir": "follow"}),
    (["lowerdir=/l,oci_whiteouts"], {"oci_whiteouts": True}),
    (["lowerdir=/l,ro"], {"read_only": True}),
    (["lowerdir=/l,allow_other"], {"allow_other": True}),
    (["lowerdir=/l,fsname=img"], {"fsname": "img"}),
    (["lowerdir=/l,nosuid,nodev", "noexec,rw,dirsync,noatime"],
     {"mount_flags": ("nosuid", "nodev", "noexec", "rw", "dirsync", "noatime")}),
    (["lowerdir=/l,defaults,relatime,_netdev,nofail,x-systemd.automount,comment=x,default_permissions,suid=1"], {}),
    (["noauto,lowerdir=/l,x-systemd.automount,ro,comment=x,userxattr"], {"read_only": True, "userxattr": True}),
    (["lowerdir=/l,squash_to_root"], {"squash_to_root": True}),
    (["lowerdir=/l,squash_to_uid=0,squash_to_gid=4294967295"], {"squash_to_uid": 0, "squash_to_gid": 4294967295}),
    (["lowerdir=/l,uidmapping=0:1000:1,gidmapping=1:2:3:4:5:6"],
     {"uidmapping": ((0, 1000, 1),), "gidmapping": ((1, 2, 3), (4, 5, 6))}),
    (["lowerdir=/l,xino=auto,uuid=off,nfs_export=off,verity=off"], {"xino": "auto", "uuid": "off"}),
    (["lowerdir+=/a,lowerdir+=/b:c", "datadir+=/d\\,1,datadir+=/e"],
     {"lowers": ["/a", "/b:c"], "data_lowers": ("/d\\,1", "/e")}),
    (["lowerdir+=/a,lowerdir=/x::/y"], {"lowers": ["/x"], "data_lowers": ("/y",)}),
]


@pytest.mark.parametrize("options, fields", PARSED)
def test_option_parsed(options, fields):
    assert parse_options(options) == Stack(**{"lowers": ["/l"], **fields})


NOT_SUPPORTED = "not supported: a FUSE mount cannot be exported over NFS by the kernel's overlay export code " \
                "(and the kernel needs index=on for it, which cowfs does not have)"

REFUSED = [  # (the -o strings, the one line cowfs says)
    ([""], "missing 'lowerdir'"),
    (["upperdir=/u,workdir=/w"], "missing 'lowerdir'"),
    (["lowerdir"], "option 'lowerdir' needs a value"),
    (["lowerdir="], "option 'lowerdir' needs a value"),
    (["lowerdir+="], "option 'lowerdir+' needs a value"),
    (["lowerdir=/l,xino"], "option 'xino' needs a value"),
    (["lowerdir=/l,uuid="], "option 'uuid' needs a value"),
] + [
    ([f"lowerdir=/l,{key}{eq}"], f"option '{key}' needs a value")
    for key in ("upperdir", "workdir", "redirect_dir", "metacopy", "index", "fsname", "uidmapping", "gidmapping",
                "squash_to_uid", "squash_to_gid", "datadir+") for eq in ("", "=")
] + [
    (["lowerdir=/l,bogus"], "unknown option 'bogus'"),
    (["lowerdir=/l,bogus=1"], "unknown option 'bogus=1'"),
    (["lowerdir=/l,dirsync=1"], "unknown option 'dirsync=1'"),
] + [
    ([f"lowerdir=/l,{flag}=on"], f"unknown option '{flag}=on'")
    for flag in ("userxattr", "oci_whiteouts", "volatile", "ro", "allow_other", "squash_to_root")
] + [
    (["lowerdir=/l,upperdir=/u"], "missing 'workdir' (an upperdir needs a workdir on the same filesystem)"),
    (["lowerdir=/l,workdir=/w"], "missing 'upperdir' (a workdir is only used with an upperdir)"),
    (["lowerdir=/l,metacopy=yes"], "bad value for metacopy: 'yes' (on or off)"),
    (["lowerdir=/l,redirect_dir=yes"], "bad value for redirect_dir: 'yes' (one of: on, off, follow, nofollow)"),
    (["lowerdir=/l", UW, "metacopy=on,redirect_dir=off"], "conflicting options: metacopy=on,redirect_dir=off"),
    (["lowerdir=/l", UW, "metacopy=on,redirect_dir=follow"],
     "conflicting options: metacopy=on,redirect_dir=follow"),
    (["lowerdir=/l,metacopy=on,redirect_dir=nofollow"], "conflicting options: metacopy=on,redirect_dir=nofollow"),
    (["lowerdir=/l,metacopy=on,userxattr"], "conflicting options: userxattr,metacopy=on"),
    (["lowerdir=/l,redirect_dir=on,userxattr"], "conflicting options: userxattr,redirect_dir=on"),
    (["lowerdir=/l,index=yes"], "bad value for index: 'yes' (on or off)"),
    (["lowerdir=/l,xino=maybe"], "bad value for xino: 'maybe' (one of: on, off, auto)"),
    (["lowerdir=/l,uuid=maybe"], "bad value for uuid: 'maybe' (one of: on, off, null, auto)"),
    (["lowerdir=/l,nfs_export=maybe"], "bad value for nfs_export: 'maybe' (one of: on, off)"),
    (["lowerdir=/l,verity=maybe"], "bad value for verity: 'maybe' (one of: on, off, require)"),
    (["lowerdir=/l,nfs_export=on"], "nfs_export=on: " + NOT_SUPPORTED),
    (["lowerdir=/a", "lowerdir+=/b"], "lowerdir+=/b: lowerdir+ cannot follow lowerdir (as the kernel refuses it)"),
    (["lowerdir+=/a,datadir+=/d,lowerdir+=/b"],
     "lowerdir+=/b: regular lower layers cannot follow data layers (as the kernel refuses it)"),
    (["lowerdir=/a,datadir+=/d"],
     "conflicting options: datadir+ cannot follow lowerdir= (use lowerdir+=, or lowerdir=A::DATA)"),
    (["lowerdir=:/a"], "empty layer in lowerdir=':/a'"),
    (["lowerdir=/a:"], "empty layer in lowerdir='/a:'"),
    (["lowerdir=/a::"], "empty layer in lowerdir='/a::'"),
    (["lowerdir=/a:::/c"], "empty layer in lowerdir='/a:::/c'"),
    (["lowerdir=::/c"], "empty layer in lowerdir='::/c' (data-only layers need a lower layer above them)"),
    (["lowerdir=/a::/c:/d"], "lowerdir='/a::/c:/d': regular lower layers cannot follow data lower layers"),
    (["lowerdir=/l,uidmapping=0:1"],
     "bad value for uidmapping: '0:1' (ID:HOSTID:LEN[:ID2:HOSTID2:LEN2...], unsigned 32-bit numbers)"),
    (["lowerdir=/l,gidmapping=0:1:x"],
     "bad value for gidmapping: '0:1:x' (ID:HOSTID:LEN[:ID2:HOSTID2:LEN2...], unsigned 32-bit numbers)"),
    (["lowerdir=/l,squash_to_uid=-1"], "bad value for squash_to_uid: '-1' (a numeric ID, unsigned 32-bit numbers)"),
    (["lowerdir=/l,squash_to_gid=4294967296"],
     "bad value for squash_to_gid: '4294967296' (a numeric ID, unsigned 32-bit numbers)"),
]


@pytest.mark.parametrize("options, message", REFUSED)
def test_option_refused(options, message):
    with pytest.raises(StackError) as info:
        parse_options(options)
    assert str(info.value) == message


SPELT = [  # (Stack fields besides lowers=["/l"], its option string): what a report shows and a re-mount reads
    ({}, "lowerdir=/l"),
    ({"lowers": ["/a:b", "/c,d"], "data_lowers": ("/e\\f", "/g")}, "lowerdir=/a\\:b:/c\\,d::/e\\\\f::/g"),
    ({"upper": "/u,1", "work": "/w:2"}, "lowerdir=/l,upperdir=/u\\,1,workdir=/w\\:2"),
    ({"redirect_dir": "follow"}, "lowerdir=/l,redirect_dir=follow"),
    ({"redirect_dir": "on", "metacopy": True}, "lowerdir=/l,redirect_dir=on,metacopy=on"),
    ({"upper": "/u", "work": "/w", "index": True, "volatile": True},
     "lowerdir=/l,upperdir=/u,workdir=/w,index=on,volatile"),
    ({"userxattr": True, "oci_whiteouts": True}, "lowerdir=/l,userxattr,oci_whiteouts"),
    ({"uidmapping": ((0, 1000, 1),), "gidmapping": ((1, 2, 3), (4, 5, 6))},
     "lowerdir=/l,uidmapping=0:1000:1,gidmapping=1:2:3:4:5:6"),
    ({"squash_to_root": True, "squash_to_uid": 0, "squash_to_gid": 7},
     "lowerdir=/l,squash_to_root,squash_to_uid=0,squash_to_gid=7"),
    ({"xino": "off", "uuid": "auto", "read_only": True}, "lowerdir=/l,xino=off,uuid=auto,ro"),
]


@pytest.mark.parametrize("fields, text", SPELT)
def test_option_string(fields, text):
    stack = Stack(**{"lowers": ["/l"], **fields})
    assert stack.option_string() == text
    assert parse_options([text]) == stack


@pytest.mark.parametrize("text, sep, keep, parts", [
    ("", ":", False, [""]),
    ("::", ":", False, ["", "", ""]),
    ("a\\:b:c", ":", False, ["a:b", "c"]),
    ("a\\:b:c", ":", True, ["a\\:b", "c"]),
    ("a\\\\:b", ":", False, ["a\\", "b"]),
    ("a:b\\", ":", False, ["a", "b\\"]),  # a trailing backslash escapes nothing and stays
    ("a\\:", ":", False, ["a:"]),
    ("a\\,", ",", True, ["a\\,"]),
    ("a\\,b,c:d", ",", True, ["a\\,b", "c:d"]),
])
def test_split_escaped(text, sep, keep, parts):
    assert split_escaped(text, sep, keep_escapes=keep) == parts


def test_unescape():
    assert unescape("/a\\,b\\:c\\\\d:e,f") == "/a,b:c\\d:e,f"


class TestWithUserxattr:
    """An unprivileged mount: userxattr added, or the option it excludes named."""

    def test_added_and_nothing_else_changed(self):
        stack = Stack(lowers=["/l"], upper="/u", work="/w", redirect_dir="follow")
        assert with_userxattr(stack) == Stack(lowers=["/l"], upper="/u", work="/w", redirect_dir="follow",
                                              userxattr=True)
        assert stack.userxattr is False

    def test_already_set_is_the_same_stack(self):
        stack = Stack(lowers=["/l"], userxattr=True)
        assert with_userxattr(stack) is stack

    @pytest.mark.parametrize("fields, option", [
        ({"metacopy": True, "redirect_dir": "on"}, "metacopy=on"),
        ({"redirect_dir": "on"}, "redirect_dir=on"),
    ])
    def test_refused_naming_the_option(self, fields, option):
        with pytest.raises(StackError) as info:
            with_userxattr(Stack(lowers=["/l"], **fields))
        assert str(info.value) == (f"{option}: needs trusted.* xattrs (CAP_SYS_ADMIN); an unprivileged mount "
                                   "uses userxattr, which excludes it")


class TestCheck:
    """`check`: every layer resolved to its real path, and each stack the kernel refuses refused in one line."""

    @staticmethod
    def dirs(tmp_path, *names):
        for name in names:
            (tmp_path / name).mkdir(parents=True)
        return [str(tmp_path / name) for name in names]

    def test_real_paths(self, tmp_path):
        lower, data, upper, work = self.dirs(tmp_path, "l", "d", "u", "w")
        os.symlink("l", tmp_path / "link")
        got = check(Stack(lowers=[str(tmp_path / "link")], data_lowers=(data + "/.",), upper=upper + "//",
                          work=work + "/../w", metacopy=True, redirect_dir="on"))
        assert got == Stack(lowers=[lower], data_lowers=(data,), upper=upper, work=work, metacopy=True,
                            redirect_dir="on")
        assert isinstance(got.data_lowers, tuple)
        assert check(Stack(lowers=[lower, lower])) == Stack(lowers=[lower, lower])  # the engine alone: hidden twice
        assert not check(Stack(lowers=[lower])).writable  # no upper: none made up
        bx, inner = self.dirs(tmp_path, "bX", "b/in")  # a sibling whose name only starts the same: no overlap
        assert check(Stack(lowers=[bx, inner])).lowers == [bx, inner]

    def test_refused(self, tmp_path):
        a, b, u, w, m = self.dirs(tmp_path, "a", "b", "u", "w", "m")
        self.dirs(tmp_path, "a/in", "m/in")
        (tmp_path / "file").write_text("x")
        f = str(tmp_path / "file")
        cases = [
            (Stack(lowers=[a, f]), None, f"lowerdir {f}: Not a directory"),
            (Stack(lowers=[a + "/gone"]), None, f"lowerdir {a}/gone: No such file or directory"),
            (Stack(lowers=[a], data_lowers=(f,)), None, f"data-only lowerdir {f}: Not a directory"),
            (Stack(lowers=[a], upper=f, work=w), None, f"upperdir {f}: Not a directory"),
            (Stack(lowers=[a], upper=u, work=f), None, f"workdir {f}: Not a directory"),
            (Stack(lowers=[a]), f, f"mount point {f}: Not a directory"),
            (Stack(lowers=[a]), a + "/in", f"mount point {a}/in: inside lowerdir {a}"),
            (Stack(lowers=[a], upper=u, work=w), u, f"mount point {u}: inside upperdir {u}"),
            (Stack(lowers=[m + "/in"]), m, f"lowerdir {m}/in: inside the mount point {m} "
                                          "(the daemon would reach it through its own mount)"),
            (Stack(lowers=[a, b, a]), m, f"lowerdir {a}: conflicting lowerdir path: the same directory as "
                                         f"lowerdir {a} (a directory may be one layer only, as the kernel requires)"),
            (Stack(lowers=[a], upper=a, work=w), None, f"upperdir {a}: conflicting lowerdir path: the same "
             f"directory as lowerdir {a} (a directory may be one layer only, as the kernel requires)"),
            (Stack(lowers=[a], upper=u, work=u), None, f"workdir {u}: the same directory as upperdir {u} "
                                                      "(a directory may be one layer only, as the kernel requires)"),
            (Stack(lowers=[a, a + "/in"]), None, f"lowerdir {a}: overlaps lowerdir {a}/in"),
            (Stack(lowers=[a + "/in", a]), None, f"lowerdir {a}/in: overlaps lowerdir {a}"),
            (Stack(lowers=[a, "/"]), None, f"lowerdir {a}: overlaps lowerdir /"),
            # the engine alone serves one lower twice, but each spelling still may not overlap another layer
            (Stack(lowers=[a, a + "/.", a + "/in"]), None, f"lowerdir {a}: overlaps lowerdir {a}/in"),
            (Stack(lowers=[b], upper=u, work=u + "/../u/w"), None, None),
        ]
        os.mkdir(u + "/w")
        for stack, mountpoint, message in cases:
            if message is None:
                with pytest.raises(StackError) as info:
                    check(stack, mountpoint)
                assert str(info.value) == f"upperdir {u}: overlaps workdir {u}/../u/w"
                continue
            with pytest.raises(StackError) as info:
                check(stack, mountpoint)
            assert str(info.value) == message

    def test_workdir_on_another_filesystem(self, tmp_path):
        lower, upper = self.dirs(tmp_path, "l", "u")
        other = tempfile.mkdtemp(dir="/dev/shm")
        try:
            assert os.stat(other).st_dev != os.stat(upper).st_dev
            with pytest.raises(StackError) as info:
                check(Stack(lowers=[lower], upper=upper, work=other))
            assert str(info.value) == f"workdir {other}: not on the same filesystem as upperdir {upper}"
        finally:
            os.rmdir(other)


class TestIsWithin:
    def test_by_path(self, tmp_path):
        (tmp_path / "a/b").mkdir(parents=True)
        (tmp_path / "ab").mkdir()
        a = str(tmp_path / "a")
        assert is_within(a, a) is True
        assert is_within(a + "/b", a) is True
        assert is_within(a + "/b/not-yet/x", a) is True
        assert is_within(a + "/", a + "/b/..") is True
        assert is_within(str(tmp_path / "ab"), a) is False
        assert is_within(a, a + "/b") is False
        assert is_within(str(tmp_path / "ab/x"), str(tmp_path / "gone")) is False

    def test_through_a_symlink(self, tmp_path):
        (tmp_path / "a/b").mkdir(parents=True)
        os.symlink("a", tmp_path / "link")
        assert is_within(str(tmp_path / "link/b"), str(tmp_path / "a")) is True
        assert is_within(str(tmp_path / "a/b"), str(tmp_path / "link")) is True

    def test_by_inode_when_no_path_shows_it(self, tmp_path, monkeypatch):
        """A bind mount is the same directory under another path that realpath cannot see through;
        here a symlink left unresolved stands for one."""
        (tmp_path / "a/b").mkdir(parents=True)
        (tmp_path / "c").mkdir()
        os.symlink("a", tmp_path / "bind")
        monkeypatch.setattr(stack_module.os.path, "realpath", lambda p: p)
        a = str(tmp_path / "a")
        assert is_within(str(tmp_path / "bind/b/not-yet"), a) is True
        assert is_within(str(tmp_path / "bind"), a) is True
        assert is_within(str(tmp_path / "c/not-yet"), a) is False

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


@pytest.mark.kernel
@pytest.mark.fuse
def test_a_set_group_id_workdir_with_a_default_acl(shared_tmp):
    """W/work keeps neither the workdir's set-group-ID bit nor its default ACL: whiteouts made there belong
    to the caller, copied-up and new directories carry no ACL; both sides leave the same upper and W/work."""
    from cowfs.overlay import acl
    low = os.path.join(shared_tmp, "low")
    os.makedirs(os.path.join(low, "d"))
    for rel in ("a", "b"):
        with open(os.path.join(low, rel), "wb") as f:
            f.write(rel.encode())
    default = acl.pack([(acl.USER_OBJ, 7, 0xFFFFFFFF), (acl.USER, 7, 1234), (acl.GROUP_OBJ, 5, 0xFFFFFFFF),
                        (acl.MASK, 7, 0xFFFFFFFF), (acl.OTHER, 5, 0xFFFFFFFF)])
    seen = {}
    for kind, (mount, upper) in _sides(shared_tmp, [low], ()).items():
        work = os.path.join(shared_tmp, f"{kind}-work")
        os.chown(work, -1, 1234)
        os.chmod(work, 0o2755)
        os.setxattr(work, acl.DEFAULT, default)
        mount.mount()
        try:
            mnt = mount.mountpoint
            os.chmod(os.path.join(mnt, "a"), 0o600)
            os.unlink(os.path.join(mnt, "a"))
            os.unlink(os.path.join(mnt, "b"))
            os.chmod(os.path.join(mnt, "d"), 0o700)
            os.mkdir(os.path.join(mnt, "n"), 0o755)
        finally:
            mount.unmount()
        staging = os.path.join(work, "work")
        seen[kind] = (upper_snapshot(upper, False), os.lstat(staging).st_mode, os.listxattr(staging))
    assert seen["cowfs"] == seen["kernel"]
    entries = seen["kernel"][0]["entries"]
    assert {entries[name]["gid"] for name in ("a", "b")} == {os.getegid()}
    assert not any("posix_acl" in k for name in ("d", "n") for k in entries[name].get("xattrs", {}))


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


# -- the filesystems under a stack, in-process: each layer's device, file handle, UUID and filesystem type
# played by the test (the kernel tests above and in test_origin.py meet the same rules on real tmpfs and ext4)

EXT4 = ("ext4", (handles.FILEID_INO32_GEN, bytes(8)))  # the generic encoder's handle: 32-bit inode, generation
TMPFS = ("tmpfs", (handles.FILEID_INO32_GEN, bytes(12)))  # an encoder of its own, for 64-bit inode numbers
XFS = ("xfs", (handles.FILEID_INO32_GEN, bytes(8)))  # an encoder of its own, in the generic format for small ones
BTRFS = ("btrfs", (0x4D, bytes(20)))
NO_HANDLES = ("vfat", OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP)))


class Disk:
    """A made-up filesystem: its device number, type, file handle of a layer root and UUID."""

    def __init__(self, minor, kind=EXT4, uuid=None):
        self.dev = os.makedev(254, minor)
        self.fstype, self.handle = kind
        self.uuid = bytes([minor]) * 16 if uuid is None else uuid


@pytest.fixture
def on_disks(monkeypatch):
    """on_disks(upper Disk or None, [lower Disks], data=[data-only Disks], **Stack fields): the stack's
    `Filesystems`, each layer root on its Disk; on_disks.asked lists the roots whose UUID was read."""
    disks = {}  # layer root -> Disk
    real_stat = os.stat

    def fake_stat(path, *args, **kwargs):
        if path in disks:
            return os.stat_result((0o40755, 1, disks[path].dev, 2, 0, 0, 0, 0, 0, 0))
        return real_stat(path, *args, **kwargs)

    def file_handle(path):
        if isinstance(disks[path].handle, OSError):
            raise disks[path].handle
        return disks[path].handle

    def fs_uuid(path):
        build.asked.append(path)
        return disks[path].uuid

    monkeypatch.setattr(os, "stat", fake_stat)
    monkeypatch.setattr(handles, "file_handle", file_handle)
    monkeypatch.setattr(handles, "fs_uuid", fs_uuid)
    monkeypatch.setattr(mounttable, "read_info", lambda: [
        mounttable.MountInfo(i, 1, os.major(d.dev), os.minor(d.dev), "/", root, d.fstype, "none")
        for i, (root, d) in enumerate(disks.items())])

    def build(upper, lowers, data=(), **fields):
        disks.clear()
        build.asked = []  # the roots whose filesystem's UUID was read, in order
        if upper is not None:
            disks["/upper"] = upper
        for i, disk in enumerate([*lowers, *data]):
            disks[f"/layer{i}"] = disk
        stack = Stack(lowers=[f"/layer{i}" for i in range(len(lowers))],
                      data_lowers=tuple(f"/layer{i}" for i in range(len(lowers), len(lowers) + len(data))),
                      upper=None if upper is None else "/upper", work=None if upper is None else "/work", **fields)
        return Filesystems(stack)
    return build


A, B, C = (Disk(n) for n in range(1, 4))
T1, T2, T3, T4 = (Disk(n, TMPFS) for n in range(11, 15))


@pytest.mark.parametrize("upper, lowers, data, bits", [
    (A, [B], (), 32),  # every layer's inode numbers in 32 bits: the filesystem's number from bit 33 up
    (A, [A, B, C], (), 32),
    (None, [B, C], (), 32),
    (A, [T1], (), 2),  # else the fewest top bits that hold the numbers, and one more: ilog2(count - 1) + 2
    (T1, [B], (), 2),  # the upper's filesystem counts as well
    (A, [T1, T2], (), 3),
    (A, [T1, T2, T3], (), 3),
    (A, [T1, T2, T3, T4], (), 4),
    (A, [B], [T1], 3),  # a data-only layer's filesystem too
    (None, [T1, T2], (), 3),  # number 0 stays the upper's without one
    (A, [Disk(7, XFS)], (), 2),  # 32-bit handles, but from an encoder of its own
    (A, [Disk(7, BTRFS)], (), 2),
    (A, [Disk(7, NO_HANDLES)], (), 2),  # no file handles at all
    (A, [B, Disk(7, XFS), C], (), 3),
])
def test_xino_bits_as_the_kernels(on_disks, upper, lowers, data, bits):
    """The high bits the kernel keeps for a filesystem's number over layers on several filesystems."""
    assert on_disks(upper, lowers, data).xino_bits == bits


def test_inode_numbers_over_several_filesystems(on_disks):
    """st_ino is the real number with the filesystem's above it (bit 33 up, or the top bits), the upper's
    (number 0) unchanged; a real number that leaves no room for it shows as it is (the kernel's overflow);
    over one filesystem, and for a filesystem no layer named, see test_inode_numbers_on_one_filesystem."""
    fs = on_disks(A, [B, C])
    assert (fs.count, fs.one_fs, fs.xino_bits) == (3, False, 32)
    assert fs.map_ino(A.dev, 7) == 7
    assert fs.map_ino(B.dev, 7) == 7 | 1 << 33
    assert fs.map_ino(C.dev, 7) == 7 | 2 << 33
    assert fs.map_ino(C.dev, (1 << 32) - 1) == (1 << 32) - 1 | 2 << 33
    assert fs.map_ino(C.dev, 1 << 32) == 1 << 32
    fs = on_disks(A, [T1])
    assert fs.xino_bits == 2
    assert fs.map_ino(T1.dev, 7) == 7 | 1 << 63
    assert fs.map_ino(T1.dev, (1 << 62) - 1) == (1 << 62) - 1 | 1 << 63
    assert fs.map_ino(T1.dev, 1 << 62) == 1 << 62
    assert fs.map_ino(A.dev, 1 << 62) == 1 << 62


def test_inode_numbers_on_one_filesystem(on_disks):
    """Every layer on one filesystem (the upper's, or the lowers' without an upper): the real numbers, whatever
    xino= says; an object on a filesystem no layer named (a mount inside a layer) gets the next number, in
    bits clear of the layers'."""
    for upper, lower in ((A, A), (None, B)):
        fs = on_disks(upper, [lower, lower], xino="on")
        assert (fs.one_fs, fs.xino_bits) == (True, 0)
        assert fs.map_ino(lower.dev, 7) == 7
    fs = on_disks(A, [A])
    assert fs.map_ino(C.dev, 7) == 7 | 1 << 56 and fs.fsid(C.dev) == 1


NULL = Disk(8, uuid=handles.NULL_UUID)
LIKE_B = Disk(9, uuid=B.uuid)
LIKE_A = Disk(10, uuid=A.uuid)


@pytest.mark.parametrize("upper, lowers, fields, untold", [
    (A, [B, C], {}, []),
    # a null UUID tells nothing, unless the stack forbids changing lowers offline (then it must be the same)
    (A, [B, NULL], {}, [NULL]),
    (A, [NULL], {"xino": "auto"}, [NULL]),
    (A, [NULL], {"xino": "on"}, []),
    (A, [NULL], {"redirect_dir": "on"}, []),
    (A, [NULL], {"index": True}, []),
    (A, [NULL], {"metacopy": True, "redirect_dir": "on"}, []),
    # two lower filesystems of one UUID: neither, wherever in the stack
    (A, [B, LIKE_B], {}, [B, LIKE_B]),
    (A, [LIKE_B, C, B], {"redirect_dir": "on"}, [LIKE_B, B]),
    # the upper's filesystem counts only when a lower is on it too
    (A, [LIKE_A], {}, []),
    (A, [A, LIKE_A], {}, [A, LIKE_A]),
    # without an upper no origin is read: nothing to tell
    (None, [B, LIKE_B, NULL], {}, []),
])
def test_lower_filesystems_told_by_their_uuid(on_disks, upper, lowers, fields, untold):
    """As the kernel's ovl_lower_uuid_ok: an origin is not followed into a lower filesystem its UUID cannot
    tell (null, or shared with another lower one), nor into the one it is shared with; the kernel then
    turns index=on off. Into every other, one carrying its UUID is, and no other."""
    fs = on_disks(upper, lowers, **fields)
    assert fs.uuids_ambiguous == bool(untold)
    for disk in {upper, *lowers} - {None}:
        assert fs.follows(disk.dev, disk.uuid) == (disk not in untold), disk.dev
        assert not fs.follows(disk.dev, Disk(99).uuid)


def test_a_filesystems_uuid_is_read_once(on_disks):
    """Every origin followed or written asks for its filesystem's UUID: read from the filesystem once a mount."""
    fs = on_disks(A, [B, C])
    for _ in range(3):
        assert fs.follows(B.dev, B.uuid) and fs.follows(A.dev, A.uuid)
        assert fs.handle_uuid(C.dev) == C.uuid
    assert sorted(on_disks.asked) == ["/layer0", "/layer1", "/upper"]


def test_uuid_off_carries_and_follows_the_null_uuid(on_disks):
    fs = on_disks(A, [A], uuid="off")
    assert (fs.uuid_mode, fs.origin_uuid, fs.warnings) == ("off", False, [])
    assert fs.handle_uuid(A.dev) == handles.NULL_UUID
    assert fs.follows(A.dev, handles.NULL_UUID) and not fs.follows(A.dev, A.uuid)
    fs = on_disks(A, [B], uuid="off")  # it needs every layer on the upper's filesystem
    assert (fs.uuid_mode, fs.handle_uuid(B.dev)) == ("null", B.uuid)
    assert fs.warnings == ["uuid=off: the layers are not all on the upper's filesystem; going on with uuid=null"]
    assert fs.follows(B.dev, B.uuid) and not fs.follows(B.dev, handles.NULL_UUID)


# -- an absolute redirect's path through a middle layer -------------------------------------------------
# The upper's directory d is redirected to /a/b (the lower a, x and q whited out); the bottom layer holds
# a/b/f, x/b/h, x/c/k and q/qq; the middle layer holds what each case makes. The kernel walks the path in
# each layer one directory at a time: a missing one lets the layers below be looked in; anything else not a
# directory stops the lookup; an opaque directory on the way stops it after this layer; a redirect on the
# way changes the path looked for below.

def _opaque_dir(root, rel):
    os.makedirs(os.path.join(root, rel), exist_ok=True)
    os.setxattr(os.path.join(root, rel), "trusted.overlay.opaque", b"y")


def _redirected_dir(root, rel, redirect):
    os.makedirs(os.path.join(root, rel), exist_ok=True)
    os.setxattr(os.path.join(root, rel), "trusted.overlay.redirect", redirect)


def _file(root, rel, data=b"x"):
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
    with open(os.path.join(root, rel), "wb") as f:
        f.write(data)


REDIRECT_PATHS = {  # case: (what the middle layer holds, what d lists or the errno, [d's redirect])
    "nothing on the way": (lambda m: None, ["c", "f"]),
    "the middle layer's root marked opaque": (lambda m: os.setxattr(m, "trusted.overlay.opaque", b"y"), ["c", "f"]),
    "a file on the way": (lambda m: _file(m, "a"), []),
    "a whiteout on the way": (lambda m: os.mknod(os.path.join(m, "a"), 0o20000, 0), []),
    "a symlink on the way": (lambda m: (os.symlink("x", os.path.join(m, "a")), _file(m, "x/b/g")), []),
    "an opaque directory on the way": (lambda m: _opaque_dir(m, "a"), []),
    "an opaque directory holding the target": (lambda m: (_opaque_dir(m, "a"), _file(m, "a/b/g")), ["g"]),
    "a whiteout at the target": (lambda m: (os.makedirs(os.path.join(m, "a")),
                                            os.mknod(os.path.join(m, "a/b"), 0o20000, 0)), []),
    "an absolute redirect on the way": (lambda m: _redirected_dir(m, "a", b"/x"), ["c", "h"]),
    "a relative redirect on the way": (lambda m: _redirected_dir(m, "a", b"x"), ["c", "h"]),
    "an absolute redirect below an opaque directory": (
        lambda m: (_opaque_dir(m, "a"), _redirected_dir(m, "a/b", b"/q")), ["qq"]),
    "a relative redirect below one on the way": (
        lambda m: (_redirected_dir(m, "a", b"/x"), _redirected_dir(m, "a/b", b"c")), ["k"]),
    "a relative redirect below an opaque directory": (
        lambda m: (_opaque_dir(m, "a"), _redirected_dir(m, "a/b", b"y")), []),
    "a bad redirect on the way": (lambda m: _redirected_dir(m, "a", b"x/"), "EINVAL"),
    "a file two directories down": (lambda m: _file(m, "a/b"), [], b"/a/b/c"),
    "an absolute redirect on the way, two names after it": (lambda m: _redirected_dir(m, "a", b"/x"), ["n"],
                                                            b"/a/b/c"),
    "an absolute redirect of two names on the way": (lambda m: _redirected_dir(m, "a/b", b"/x/b"), ["n"], b"/a/b/c"),
    "an absolute redirect on the way below an opaque directory": (
        lambda m: (_opaque_dir(m, "a"), _redirected_dir(m, "a/b", b"/x")), ["k"], b"/a/b/c"),
    "a relative redirect one directory down": (lambda m: _redirected_dir(m, "a/b", b"y"), ["p"], b"/a/b/c"),
}


def _redirect_path_layers(base, case):
    """The middle and bottom layers of `case` under `base`, and an upper maker: (lowers, make_upper)."""
    middle, bottom = os.path.join(base, "middle"), os.path.join(base, "bottom")
    os.makedirs(middle)
    for rel, data in (("a/b/f", b"f"), ("a/b/c/m", b"m"), ("a/y/c/p", b"p"), ("x/b/h", b"h"), ("x/b/c/n", b"n"),
                      ("x/c/k", b"k"), ("q/qq", b"q")):
        _file(bottom, rel, data)
    REDIRECT_PATHS[case][0](middle)

    def make_upper(upper):
        """d, and whiteouts where the lower directories were: what a kernel's rename leaves."""
        _redirected_dir(upper, "d", (REDIRECT_PATHS[case] + (b"/a/b",))[2])
        for rel in ("a", "x", "q"):
            os.mknod(os.path.join(upper, rel), 0o20000, 0)
    return [middle, bottom], make_upper


@pytest.mark.parametrize("case", REDIRECT_PATHS)
def test_an_absolute_redirects_path_through_a_middle_layer(case, tmp_path):
    """In-process: what the kernel lists (the test below checks the table against it)."""
    from cowfs.overlay.union import Union
    lowers, make_upper = _redirect_path_layers(str(tmp_path), case)
    upper, work = str(tmp_path / "upper"), str(tmp_path / "work")
    os.makedirs(work)
    make_upper(upper)
    union = Union(check(Stack(lowers=lowers, upper=upper, work=work, redirect_dir="on")))
    try:
        listed = sorted(n for n, *_ in union.readdir("/d") if n not in (".", ".."))
    except OSError as e:
        listed = (errno.errorcode[e.errno], e.filename)
    finally:
        union.close()
    want = REDIRECT_PATHS[case][1]
    assert listed == (want if isinstance(want, list) else (want, "/d"))


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.parametrize("case", REDIRECT_PATHS)
def test_an_absolute_redirects_path_through_a_middle_layer_as_the_kernel(case, shared_tmp):
    """The same layers on both sides: the same merged tree, the table's listing, and, after a file is
    made in d, the same upper."""
    lowers, make_upper = _redirect_path_layers(shared_tmp, case)
    seen = {}
    for kind, (mount, upper) in _sides(shared_tmp, lowers, ("redirect_dir=on",)).items():
        make_upper(upper)
        mount.mount()
        try:
            listed = _outcome(lambda d: sorted(os.listdir(d)), os.path.join(mount.mountpoint, "d"))
            merged = snapshot(mount.mountpoint)
            if isinstance(listed, list):
                _file(mount.mountpoint, "d/new")
        finally:
            mount.unmount()
        seen[kind] = (listed, merged, upper_snapshot(upper, False))
    assert seen["cowfs"] == seen["kernel"]
    assert seen["kernel"][0] == REDIRECT_PATHS[case][1]


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.parametrize("redirect", [b"/", b"//a", b"/a//b", b"/a/b/", b"x/", b"a/b", b"/a/./b", b"/..", b".."])
def test_a_bad_redirect_is_refused_as_the_kernel_refuses_it(redirect, shared_tmp):
    """The same errno on both sides (the in-process test of each lists which)."""
    bottom = os.path.join(shared_tmp, "bottom")
    _file(bottom, "a/b/f")
    seen = {}
    for kind, (mount, upper) in _sides(shared_tmp, [bottom], ("redirect_dir=on",)).items():
        _redirected_dir(upper, "d", redirect)
        mount.mount()
        try:
            seen[kind] = _outcome(os.listdir, os.path.join(mount.mountpoint, "d"))
        finally:
            mount.unmount()
    assert seen["cowfs"] == seen["kernel"] in ("EINVAL", "EACCES")


# ---------------------------------------------------------------------------------------------
# claiming the workdir: a kernel overlay using it, the wait for a lock, W/work, its volatile mark, the xattr probe

@pytest.fixture
def dirs(tmp_path):
    """A lower, an upper and a workdir, and `claim(**options)` of them; what was claimed is released at the end."""
    for name in ("lower", "upper", "work", "elsewhere"):
        (tmp_path / name).mkdir()
    claimed = []

    def claim(**options):
        stack = check(Stack(lowers=[str(tmp_path / "lower")], upper=str(tmp_path / "upper"),
                            work=str(tmp_path / "work"), **options))
        claimed.append(workdir.claim(stack))
        return claimed[-1]
    yield types.SimpleNamespace(base=tmp_path, upper=str(tmp_path / "upper"), work=str(tmp_path / "work"),
                                staging=str(tmp_path / "work" / "work"), elsewhere=str(tmp_path / "elsewhere"),
                                claim=claim)
    for c in claimed:
        c.close()


def _overlay(mountpoint, *options, fstype="overlay"):
    return mounttable.Mount("overlay", mountpoint, fstype, ["rw", "relatime", *options])


def _refusal(call):
    with pytest.raises(StackError) as info:
        call()
    return str(info.value)


def test_a_kernel_overlay_using_the_upper_or_workdir_refuses_it(dirs, monkeypatch):
    """As its upperdir or its workdir, however it spells the directory (through a symlink, with a `=` in
    the name), and after entries that are not overlays or name directories that are gone."""
    os.symlink(dirs.upper, dirs.base / "up=link")
    table = []
    monkeypatch.setattr(mounttable, "read", lambda: table)
    table[:] = [_overlay("/mnt/fuse", f"upperdir={dirs.upper}", f"workdir={dirs.work}", fstype="fuse.cowfs"),
                _overlay("/mnt/a", f"lowerdir={dirs.elsewhere}", f"upperdir={dirs.upper}",
                         f"workdir={dirs.elsewhere}")]
    assert _refusal(dirs.claim) == f"upperdir {dirs.upper}: already in use by the kernel overlay at /mnt/a"
    table[1:] = [_overlay("/mnt/b", f"lowerdir={dirs.elsewhere}", f"upperdir={dirs.base}/gone",
                          f"workdir={dirs.work}")]
    assert _refusal(dirs.claim) == f"workdir {dirs.work}: already in use by the kernel overlay at /mnt/b"
    table[1:] = [_overlay("/mnt/c", f"lowerdir={dirs.elsewhere}", f"upperdir={dirs.elsewhere}",
                          f"workdir={dirs.base}/up=link")]
    assert _refusal(dirs.claim) == f"upperdir {dirs.upper}: already in use by the kernel overlay at /mnt/c"
    assert os.listdir(dirs.work) == []  # refused before anything was made in it


def test_what_a_kernel_overlay_uses_otherwise_does_not_refuse_it(dirs, monkeypatch):
    """The upper as a kernel overlay's lower layer (the kernel mounts that too), a relative upperdir or
    workdir (as the kernel lists one mounted so: relative to its mounter's directory, unknown here), the
    same options on a mount that is not an overlay."""
    monkeypatch.chdir(dirs.base)  # where the relative names would find ours
    monkeypatch.setattr(mounttable, "read", lambda: [
        _overlay("/mnt/fuse", f"upperdir={dirs.upper}", f"workdir={dirs.work}", fstype="fuse.cowfs"),
        _overlay("/mnt/lower", f"lowerdir={dirs.upper}", f"upperdir={dirs.elsewhere}", f"workdir={dirs.elsewhere}"),
        _overlay("/mnt/relative", f"lowerdir={dirs.elsewhere}", "upperdir=upper", "workdir=work")])
    dirs.claim()
    assert os.listdir(dirs.staging) == []


def test_a_volatile_claim_makes_its_mark_as_the_kernel(dirs):
    """W/work, W/work/incompat and W/work/incompat/volatile mode 000, as the kernel makes them."""
    dirs.claim(volatile=True).close()
    modes = {rel: stat.S_IMODE(os.lstat(os.path.join(dirs.staging, rel)).st_mode)
             for rel in ("", "incompat", "incompat/volatile")}
    assert modes == {"": 0o000, "incompat": 0o000, "incompat/volatile": 0o000}


def test_the_volatile_mark_is_not_made_through_a_symlink(dirs, monkeypatch):
    """One that appears at W/work/incompat after W/work was emptied (another process) is not followed:
    the claim fails and nothing is made outside the workdir."""
    real_mkdir = os.mkdir

    def mkdir(path, mode=0o777, *, dir_fd=None):
        if path == "incompat":
            os.symlink(dirs.elsewhere, "incompat", dir_fd=dir_fd)
            return None
        return real_mkdir(path, mode, dir_fd=dir_fd)
    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(OSError) as info:
        dirs.claim(volatile=True)
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    monkeypatch.undo()
    assert os.listdir(dirs.elsewhere) == []
    dirs.claim()  # its locks were released; the symlink goes with the leftovers
    assert os.listdir(dirs.staging) == []


def test_an_unprivileged_claim_makes_its_staging_private_to_it(dirs, monkeypatch):
    """The kernel's mode 000 would shut its owner out: 0700 keeps them as private."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert workdir._staging_mode() == 0o700
    monkeypatch.undo()
    assert workdir._staging_mode() == 0o000


@pytest.mark.parametrize("left", ["incompat", "incompat-symlink", "mark"])
def test_the_volatile_mark_is_looked_up_below_the_staging_directory_only(dirs, monkeypatch, left):
    """An empty incompat (its mark removed as the refusal says) and an incompat that is a symlink to
    a directory holding a `volatile` are leftovers, removed, as the kernel does (the symlink not
    followed); the mark itself refuses the claim, wherever the process runs."""
    os.makedirs(dirs.base / "cwd-with" / "volatile")
    os.makedirs(dirs.base / "cwd-without")
    os.mkdir(dirs.base / "elsewhere" / "volatile")
    monkeypatch.chdir(dirs.base / ("cwd-without" if left == "mark" else "cwd-with"))
    os.mkdir(dirs.staging)
    if left == "incompat":
        os.mkdir(os.path.join(dirs.staging, "incompat"))
    elif left == "incompat-symlink":
        os.symlink(dirs.elsewhere, os.path.join(dirs.staging, "incompat"))
    else:
        os.makedirs(os.path.join(dirs.staging, "incompat", "volatile"))
        assert _refusal(dirs.claim).startswith(f"workdir {dirs.work}: a volatile mount used it")
        return
    dirs.claim()
    assert os.listdir(dirs.staging) == [] and os.listdir(dirs.elsewhere) == ["volatile"]


def test_the_xattr_probe_sets_the_engines_marker_in_a_private_directory(dirs, monkeypatch):
    """It checks that the upper takes the very xattr the engine writes, on a directory of W/work only its
    owner may write (an unprivileged owner needs the write bit to set user.* xattrs), removed after."""
    seen = []
    real_set_marker = workdir.set_marker

    def set_marker(path, prefix, name, value):
        real_set_marker(path, prefix, name, value)
        seen.append((os.path.dirname(path), stat.S_IMODE(os.lstat(path).st_mode),
                     os.getxattr(path, prefix + name)))
    monkeypatch.setattr(workdir, "set_marker", set_marker)
    old = os.umask(0o022)
    try:
        dirs.claim()
    finally:
        os.umask(old)
    assert seen == [(dirs.staging, 0o700, b"y")]
    assert os.listdir(dirs.staging) == []


@pytest.mark.parametrize("userxattr", [False, True])
def test_an_upper_that_takes_no_overlay_xattr_is_refused_in_one_line(dirs, monkeypatch, userxattr):
    """Naming the namespace tried, and the userxattr option when it was not that one; the probe goes,
    the locks are released."""
    def set_marker(path, prefix, name, value):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), path)
    monkeypatch.setattr(workdir, "set_marker", set_marker)
    message = _refusal(lambda: dirs.claim(userxattr=userxattr))
    assert message == (f"upperdir {dirs.upper}: cannot set user.overlay.* xattrs (Operation not supported)"
                       if userxattr else f"upperdir {dirs.upper}: cannot set trusted.overlay.* xattrs "
                       "(Operation not supported); try the userxattr option")
    monkeypatch.undo()
    assert os.listdir(dirs.staging) == []
    dirs.claim()


def test_claim_on_its_own_learns_the_layers_filesystems(dirs):
    """Without the stack's Filesystems it makes its own, and settles the overlay's UUID in the upper root."""
    claimed = dirs.claim()
    assert len(claimed.uuid) == 16 and os.getxattr(dirs.upper, "trusted.overlay.uuid") == claimed.uuid


class TestLockWait:
    """A lock held by a mount that is not (or no longer) a live cowfs mount is waited for, polling every
    20 ms, LOCK_WAIT seconds at most; one this process holds is refused at once. On a fake clock."""

    @pytest.fixture
    def clock(self, monkeypatch):
        clock = types.SimpleNamespace(now=100.0, slept=[], free_at=None, ours=False)

        def sleep(seconds):
            clock.slept.append(seconds)
            clock.now += 1
        monkeypatch.setattr(workdir, "time", types.SimpleNamespace(monotonic=lambda: clock.now, sleep=sleep))
        monkeypatch.setattr(workdir, "LOCK_WAIT", 3)
        monkeypatch.setattr(workdir, "records", lambda: [])
        monkeypatch.setattr(workdir, "holds_lock", lambda path: clock.ours)
        monkeypatch.setattr(workdir, "take_lock",
                            lambda path: "lock" if clock.free_at is not None and clock.now >= clock.free_at else None)
        return clock

    def test_given_up_after_lock_wait(self, clock, tmp_path):
        assert _refusal(lambda: workdir._lock("workdir", str(tmp_path))) == (
            f"workdir {tmp_path}: already in use by another cowfs mount")
        assert clock.slept == [0.02] * 4 and clock.now == 104

    def test_a_lock_freed_at_the_deadline_is_taken(self, clock, tmp_path):
        clock.free_at = 103
        assert workdir._lock("upperdir", str(tmp_path)) == "lock"
        assert clock.slept == [0.02] * 3

    def test_a_lock_this_process_holds_is_refused_at_once(self, clock, tmp_path):
        clock.ours = True
        assert _refusal(lambda: workdir._lock("upperdir", str(tmp_path))) == (
            f"upperdir {tmp_path}: already in use by another cowfs mount")
        assert clock.slept == []

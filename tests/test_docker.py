"""Docker as the oracle for cowfs's image commands: the same images, the same changes, compared point by point.

A private dockerd (cowfs.testing.docker, one for this module) builds Docker's
storage-driver walkthrough images and a "rich" image (hard links, a FIFO,
set-id bits, uid 1000, a file capability, long and non-ASCII names, symlinks,
deletions, replaced and opaque directories); ``docker save`` of them, piped to
``cowfs import -``, fills a scratch store. Then, each against Docker:

- ``images`` (rows, IDs, sizes, created times, order, the REPOSITORY filter),
  ``history``, ``inspect`` and fully qualified references;
- the tree of a fresh container: ``cowfs mount IMAGE MNT`` against ``docker
  create`` + ``docker export``, file for file;
- a fixed list of changes (``CHANGES``), made in a Docker container by its
  ``/bin/sh`` (the image's Cmd) reading them on stdin, and in a cowfs container
  by the image's own busybox ``sh`` chroot-ed into the mount: the merged tree
  (and ``cowfs export``), ``diff``, ``ps`` sizes, the upper directory on disk,
  the committed layer tar, the committed image's history;
- the round trip docker save -> cowfs import -> mount -> change -> commit
  --tag -> cowfs save -> docker load -> docker create + export.

Every container Docker makes gets an "init" layer (/.dockerenv, /etc/hosts,
/etc/hostname, /etc/resolv.conf, /etc/mtab, /dev/console, /dev/pts, /dev/shm,
/proc, /sys) that no image has; its paths are read from that layer and left
out of the tree comparisons (directories: only their own attributes). A
difference is a failure with a readable diff; none is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from datetime import datetime

import pytest

from cowfs.images.store import Store
from cowfs.testing import docker as dk
from cowfs.testing.mounts import (
    force_unmount,
    is_mounted,
    missing_feature,
    mounts_under,
    pid_alive,
    pids_under,
    require,
    wait_gone,
)
from cowfs.testing.tree import diff_snapshots, type_name

pytestmark = pytest.mark.docker

COWFS = [sys.executable, "-m", "cowfs"]
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LIBRARY_TAG = "mybase:latest"  # a second name for the base image, in Docker's library namespace
IMAGES = [dk.BASE_IMAGE, dk.FINAL_IMAGE, dk.RICH_IMAGE]
MESSAGE = "changed in a container"
CAPABILITY = "security.capability"

# The changes made in both containers: sh reads them on stdin (Docker runs the image's Cmd, /bin/sh).
CHANGES = f"""\
set -e
printf 'changed\\n' >> /etc/os-release
rm /etc/motd
rm /rich/suid
rm -r /rich/tree
rm /rich/linked-b
printf 'appended\\n' >> /rich/linked-a
chmod 600 /rich/sgid
chmod 700 /rich/sticky
chown 1000:1000 /app/hello.sh
chown 0:0 /rich/owned/file
printf 'more\\n' >> /caps/capfile
mv /rich/dir-to-file /rich/file-renamed
mv /rich/file-to-dir /rich/dir-renamed
mv '/{dk.UNICODE_NAME}' '/rich/ünïcödé-renamed.txt'
rm -r /rich/opaque && mkdir /rich/opaque && printf 'again\\n' > /rich/opaque/again
printf 'deeper\\n' >> '/{dk.LONG_PATH}'
touch /rich/empty
mkdir -p /new/dir
printf 'new\\n' > /new/dir/file
ln /new/dir/file /new/hard
ln -s ../app/hello.sh /new/link
mkfifo /new/fifo
printf 'x' > /new/suid && chmod 4755 /new/suid
chown 1000:1000 /new/dir
rm /rich/dangling-rel && ln -s elsewhere /rich/dangling-rel
rm /rich/fifo && mkdir /rich/fifo && printf 'was a fifo\\n' > /rich/fifo/now-a-dir
rm /rich/abs-link && mkdir /rich/abs-link
rmdir /rich/sgid-dir
printf 'replaced\\n' > /new/tmp && mv /new/tmp /etc/shells
mkdir /new/a && printf 'a\\n' > /new/a/f && mv /new/a /new/b
ln /rich/group-only /new/group-link
printf 'x' >> /rich/sparse
touch -d '2020-02-02 02:02:02' /app/Dockerfile
mv /rich/owned /rich/owned-moved
chown -h 0:0 /rich/dangling-abs
mv /rich/rel-link /rich/up-link
printf 'x' > /bin/tmpfile && rm /bin/tmpfile
rm -r /rich/to-symlink && ln -s sub /rich/to-symlink
mknod /new/null c 1 3 && chmod 666 /new/null
printf 'more\\n' >> /rich/suid-kept
mv /rich/long /rich/long-moved
echo changes-done
"""


# -- running cowfs -------------------------------------------------------------------------------------

def cowfs(*argv, check=True, binary=False):
    """Run the cowfs command line (stdout as bytes with `binary`); with check, a failure is an assertion
    naming the command and its stderr."""
    res = subprocess.run(COWFS + [str(a) for a in argv], capture_output=True, text=not binary, timeout=300,
                         stdin=subprocess.DEVNULL)
    if check:
        err = res.stderr.decode(errors="replace") if binary else res.stderr
        assert res.returncode == 0, f"cowfs {' '.join(map(str, argv))}: exit {res.returncode}: {err}"
    return res


def cowfs_json(*argv):
    return json.loads(cowfs(*argv).stdout)


def run_in(mnt, script):
    """`script` run by the busybox sh of the tree at `mnt`, chroot-ed into it, as Docker's /bin/sh runs it."""
    res = subprocess.run(["chroot", mnt, "/bin/sh"], input=script, capture_output=True, text=True, timeout=120,
                         env={"PATH": PATH, "HOME": "/root"})
    assert res.returncode == 0 and "changes-done" in res.stdout, f"chroot {mnt} /bin/sh: {res.stderr}"
    return res


@contextlib.contextmanager
def cowfs_container(store, image, base, name="c", changes=False):
    """`cowfs mount IMAGE MNT` (a new container), with CHANGES made in it when asked; yields (mnt, container
    ID). Unmounted and removed (cowfs rm) afterwards whatever happened."""
    mnt = os.path.join(base, name)
    os.mkdir(mnt)
    cid = None
    try:
        cid = cowfs("mount", image, mnt, "--store", store).stdout.strip()
        if changes:
            run_in(mnt, CHANGES)
        yield mnt, cid
    finally:
        if is_mounted(mnt):
            if cowfs("umount", mnt, check=False).returncode != 0:
                force_unmount(mnt)
        if cid:
            cowfs("rm", cid, "--store", store, check=False)


# -- trees: a mount, a directory on disk, a tar, all as comparable snapshots ------------------------------

def _sha(data):
    return hashlib.sha256(data).hexdigest()


def walk_tree(root, xattrs=(CAPABILITY,), times=False):
    """{"entries": {path: fields}, "hardlinks": [groups]} of the tree at `root` (not itself), as lstat shows
    it: type, mode, owner, size and sha256 (files), target (symlinks), rdev (devices), the xattrs named (all
    but the overlay's private ones with `xattrs=None`), mtime in seconds (non-directories) with `times`."""
    entries, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            info = {"type": type_name(st.st_mode), "mode": f"{stat.S_IMODE(st.st_mode):04o}",
                    "uid": st.st_uid, "gid": st.st_gid}
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    info.update(size=st.st_size, sha256=_sha(f.read()))
            elif stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if times and not stat.S_ISDIR(st.st_mode):
                info["mtime"] = int(st.st_mtime)
            found = {}
            for x in os.listxattr(path, follow_symlinks=False):
                if xattrs is None:
                    if x.startswith("trusted.overlay.") and x not in ("trusted.overlay.opaque",
                                                                      "trusted.overlay.redirect"):
                        continue  # origin, impure, nlink, cowfs's own: each implementation's private business
                elif x not in xattrs:
                    continue
                found[x] = os.getxattr(path, x, follow_symlinks=False).hex()
            if found:
                info["xattrs"] = found
            entries[rel] = info
            if not stat.S_ISDIR(st.st_mode):
                inodes.setdefault(st.st_ino, []).append(rel)
    return {"entries": entries, "hardlinks": sorted(sorted(g) for g in inodes.values() if len(g) > 1)}


def normalised(name):
    """A member name without "./" in front or "/" behind ("" for the root)."""
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    return "" if name == "." else name


def tar_members(data):
    """[(normalised name, TarInfo, content or None)] of a tar (bytes), in order; the root entry left out."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for m in tf:
            name = normalised(m.name)
            if not name:
                continue
            out.append((name, m, tf.extractfile(m).read() if m.isreg() else None))
    return out


def _xattrs_of(member, names=(CAPABILITY,)):
    found = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr.") and (names is None or key[13:] in names):
            found[key[13:]] = value.encode("utf-8", "surrogateescape").hex()
    return found


TAR_TYPES = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
             tarfile.FIFOTYPE: "fifo", tarfile.CHRTYPE: "chardev", tarfile.BLKTYPE: "blockdev",
             tarfile.LNKTYPE: "hardlink"}


def tar_tree(data, times=False):
    """A tar (docker export, cowfs export) as the tree it unpacks to, in walk_tree's form: a hard link is
    its target's object, and the two make a hard-link group."""
    entries, groups = {}, {}
    for name, m, content in tar_members(data):
        if m.islnk():
            target = normalised(m.linkname)
            entries[name] = dict(entries[target])
            groups.setdefault(target, [target]).append(name)
            continue
        info = {"type": TAR_TYPES.get(m.type, repr(m.type)), "mode": f"{m.mode & 0o7777:04o}",
                "uid": m.uid, "gid": m.gid}
        if m.isreg():
            info.update(size=len(content), sha256=_sha(content))
        elif m.issym():
            info["target"] = m.linkname
        elif m.ischr() or m.isblk():
            info["rdev"] = (m.devmajor, m.devminor)
        if times and not m.isdir():
            info["mtime"] = int(m.mtime)
        found = _xattrs_of(m)
        if found:
            info["xattrs"] = found
        entries[name] = info
    return {"entries": entries, "hardlinks": sorted(sorted(g) for g in groups.values())}


def layer_entries(data):
    """A layer tar as its entries (whiteouts and opaque markers are entries too): name -> type, mode, owner,
    size, sha256, link name, device numbers, every SCHILY.xattr; no times, no user or group names."""
    entries = {}
    for name, m, content in tar_members(data):
        info = {"type": TAR_TYPES.get(m.type, repr(m.type)), "mode": f"{m.mode & 0o7777:04o}",
                "uid": m.uid, "gid": m.gid}
        if m.isreg():
            info.update(size=len(content), sha256=_sha(content))
        if m.issym() or m.islnk():
            info["linkname"] = m.linkname
        if m.ischr() or m.isblk():
            info["rdev"] = (m.devmajor, m.devminor)
        found = _xattrs_of(m, names=None)
        if found:
            info["xattrs"] = found
        entries[name] = info
    return {"entries": entries, "hardlinks": []}


def without(tree, paths):
    """`tree` without the entries at `paths` (hard-link groups trimmed to match)."""
    entries = {k: v for k, v in tree["entries"].items() if k not in paths}
    groups = [[p for p in g if p not in paths] for g in tree["hardlinks"]]
    return {"entries": entries, "hardlinks": sorted(g for g in groups if len(g) > 1)}


def differences(docker_value, cowfs_value, where=""):
    """Lines naming each place two JSON-like values differ (Docker's value first)."""
    if isinstance(docker_value, dict) and isinstance(cowfs_value, dict):
        return [line for key in list(docker_value) + [k for k in cowfs_value if k not in docker_value]
                for line in differences(docker_value.get(key, "<absent>"), cowfs_value.get(key, "<absent>"),
                                        f"{where}.{key}" if where else str(key))]
    if isinstance(docker_value, list) and isinstance(cowfs_value, list) and len(docker_value) == len(cowfs_value) \
            and (len(docker_value) > 1 or all(isinstance(v, dict) for v in docker_value + cowfs_value)):
        return [line for i, (a, b) in enumerate(zip(docker_value, cowfs_value))
                for line in differences(a, b, f"{where}[{i}]")]
    if docker_value == cowfs_value:
        return []
    return [f"{where or 'value'}: docker={docker_value!r} cowfs={cowfs_value!r}"]


class Points:
    """The points one test compares: each difference is noted with what was compared, and `check()` fails
    the test with all of them (so one difference never hides the next)."""

    def __init__(self):
        self.failures = []

    def equal(self, docker_value, cowfs_value, what):
        lines = differences(docker_value, cowfs_value)
        if lines:
            self.failures.append(f"{what}: differs from Docker:\n  " + "\n  ".join(lines))

    def same_tree(self, docker_tree, cowfs_tree, what, cowfs_name="cowfs"):
        text = diff_snapshots(docker_tree, cowfs_tree, "docker", cowfs_name)
        if text:
            self.failures.append(f"{what}: differs from Docker:\n  " + text.replace("\n", "\n  "))

    def same_set(self, docker_set, cowfs_set, what):
        only_docker = sorted(docker_set - cowfs_set, key=lambda c: c[1])
        only_cowfs = sorted(cowfs_set - docker_set, key=lambda c: c[1])
        if only_docker or only_cowfs:
            self.failures.append(f"{what}: differs from Docker:\n  only Docker's: {[' '.join(c) for c in only_docker]}"
                                 f"\n  only cowfs's:  {[' '.join(c) for c in only_cowfs]}")

    def ran(self, res, what):
        """True when a cowfs command run with check=False succeeded; else the failure is noted."""
        if res.returncode != 0:
            err = res.stderr.decode(errors="replace") if isinstance(res.stderr, bytes) else res.stderr
            self.failures.append(f"{what}: exit {res.returncode}: {err.strip()}")
        return res.returncode == 0

    def check(self):
        if self.failures:
            raise AssertionError("\n".join(self.failures))


# -- Docker's side -------------------------------------------------------------------------------------

def init_paths(d, container):
    """The paths of the container's init layer (Docker's addition to every container), relative to /."""
    lower = d.json("inspect", container)[0]["GraphDriver"]["Data"]["LowerDir"].split(":")[0]
    assert lower.endswith("-init/diff"), lower
    found = set()
    for dirpath, dirnames, filenames in os.walk(lower):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), lower))
    return found


def docker_export(d, container):
    return d.docker("export", container, binary=True).stdout


def exported_tree(d, container, times=False):
    """`docker export CONTAINER` as a tree, without the container's init layer."""
    return without(tar_tree(docker_export(d, container), times=times), init_paths(d, container))


def docker_save_layers(d, image, base):
    """[layer tar bytes] and the manifest entry of `docker save IMAGE`."""
    path = os.path.join(base, "saved.tar")
    d.docker("save", "-o", path, image)
    with tarfile.open(path) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))[0]
        layers = [tf.extractfile(name).read() for name in manifest["Layers"]]
    os.unlink(path)
    return layers, manifest


def docker_diff(d, container):
    return {tuple(line.split(" ", 1)) for line in d.docker("diff", container).stdout.splitlines() if line}


def seconds(rfc3339):
    """Whole seconds of an RFC 3339 time, or None (Docker's history gives whole seconds)."""
    if rfc3339 is None:
        return None
    text = re.sub(r"\.[0-9]+", "", rfc3339).replace("Z", "+00:00")
    return int(datetime.fromisoformat(text).timestamp())


def check_docker_side(tree, *wanted):
    """The comparison means something: Docker's tree holds what the rich image and CHANGES put there
    ((path, field, value) for each of `wanted`); an assertion about the test, not about cowfs."""
    for path, field, value in wanted:
        got = tree["entries"].get(path, {}).get(field, "<absent>")
        assert got == value, f"Docker's side: {path}: {field} is {got!r}, not {value!r} (the test is wrong)"


CAPFILE = ("caps/capfile", "xattrs", {CAPABILITY: dk.CAPABILITY.hex()})
RICH_FIXTURES = [CAPFILE, ("rich/fifo", "type", "fifo"), (dk.UNICODE_NAME, "type", "file"),
                 (dk.LONG_PATH, "type", "file"), ("rich/suid", "mode", "4755"), ("rich/owned/file", "uid", 1000),
                 ("rich/dangling-rel", "target", "missing-file"), ("rich/dir-to-file", "type", "file"),
                 ("rich/file-to-dir/inside", "type", "file")]
CHANGED_FIXTURES = [("new/null", "rdev", (1, 3)), ("rich/to-symlink", "target", "sub"), ("caps/capfile", "xattrs",
                    "<absent>"), ("rich/fifo", "type", "dir"), ("rich/suid-kept", "mode", "4755"),
                    ("new/fifo", "type", "fifo"), ("rich/opaque/again", "type", "file")]


# -- fixtures: one dockerd, the images, the store, the changed Docker container ---------------------------

def started(base):
    """A started Dockerd in `base`; a daemon that does not start skips the test (fails under CI=true)."""
    d = dk.Dockerd(base)
    try:
        d.start()
    except dk.DockerError as e:
        with contextlib.suppress(dk.DockerError):
            d.stop()
        missing_feature(f"docker: the private dockerd does not start: {e}")
    return d


@pytest.fixture(scope="module")
def dockerd():
    require("docker")
    d = started(tempfile.mkdtemp(prefix="cowfs-dkr-", dir="/tmp"))
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def images(dockerd):
    """{tag: image ID} of the images built in the session's dockerd (and the library tag of the base)."""
    work = tempfile.mkdtemp(prefix="cowfs-dkr-ctx-")
    try:
        built = dk.build_walkthrough(dockerd, work)
        built.update(dk.build_rich(dockerd, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dockerd.docker("tag", dk.BASE_IMAGE, LIBRARY_TAG)
    built[LIBRARY_TAG] = built[dk.BASE_IMAGE]
    return built


@pytest.fixture(scope="module")
def store(images, dockerd, tmp_path_factory):
    """A scratch store filled by `docker save IMAGES... | cowfs import -`."""
    path = str(tmp_path_factory.mktemp("docker-store") / "store")
    save = subprocess.Popen([dk.DOCKER, "save", *IMAGES, LIBRARY_TAG], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dockerd.env)
    res = subprocess.run(COWFS + ["import", "-", "--store", path], stdin=save.stdout, capture_output=True, text=True,
                         timeout=300)
    save.stdout.close()
    assert res.returncode == 0, f"docker save | cowfs import -: {res.stderr}"
    assert save.wait(60) == 0, f"docker save: {save.stderr.read().decode(errors='replace')}"
    return path


@pytest.fixture(scope="module")
def docker_changed(dockerd, images):
    """The Docker container "changed" of the rich image, CHANGES made in it by its Cmd (/bin/sh, on stdin)."""
    res = dockerd.docker("run", "-i", "--network", "none", "--name", "changed", dk.RICH_IMAGE, input=CHANGES)
    assert "changes-done" in res.stdout, res.stderr
    return dockerd.json("inspect", "changed")[0]


@pytest.fixture(scope="module")
def docker_commit(dockerd, docker_changed, tmp_path_factory):
    """`docker commit -m MESSAGE changed`: (image tag, the new layer's tar, the image's inspect)."""
    tag = "acme/rich:docker-commit"
    dockerd.docker("commit", "-m", MESSAGE, "changed", tag)
    layers, _ = docker_save_layers(dockerd, tag, str(tmp_path_factory.mktemp("docker-commit")))
    return tag, layers[-1], dockerd.json("image", "inspect", tag)[0]


# -- images, history, inspect ---------------------------------------------------------------------------

def in_image_order(rows):
    """`rows` with the rows of one image (its names) sorted by name: Docker prints an image's repositories
    in the order of a Go map, which is random; the images themselves stay in their order."""
    first = {}
    for i, r in enumerate(rows):
        first.setdefault(r["ID"], i)
    return sorted(rows, key=lambda r: (first[r["ID"]], r["Repository"], r["Tag"]))


def docker_image_rows(d, *filters):
    rows = d.json_lines("images", "--no-trunc", "--format", "{{json .}}", *filters)
    out = []
    for r in rows:
        info = d.json("image", "inspect", r["ID"])[0]
        out.append({"Repository": r["Repository"], "Tag": r["Tag"], "ID": r["ID"], "Size": info["Size"],
                    "Created": seconds(info["Created"])})
    return in_image_order(out)


def cowfs_image_rows(points, store, *filters):
    res = cowfs("images", "--json", "--store", store, *filters, check=False)
    if not points.ran(res, f"cowfs images --json {' '.join(filters)}"):
        return None
    return in_image_order([{"Repository": r["Repository"], "Tag": r["Tag"], "ID": r["ID"], "Size": r["Size"],
                            "Created": seconds(r["Created"])} for r in json.loads(res.stdout)])


def test_images_lists_what_docker_images_lists(dockerd, images, store):
    """Rows (repository, tag, full ID, size in bytes, created), newest first, and -q, as docker images;
    with a REPOSITORY[:TAG] argument, only the images it names."""
    points = Points()
    points.equal(docker_image_rows(dockerd), cowfs_image_rows(points, store), "cowfs images --json")
    points.equal(dockerd.docker("images", "-q").stdout.split(), cowfs("images", "-q", "--store", store).stdout.split(),
                 "cowfs images -q")
    for ref in ("acme/my-base-image", "acme/rich:1", "mybase"):
        points.equal(docker_image_rows(dockerd, ref), cowfs_image_rows(points, store, ref), f"cowfs images {ref}")
    points.check()


@pytest.mark.parametrize("image", IMAGES)
def test_history_as_docker_history(dockerd, images, store, image):
    """Each step, newest first: ID (or <missing>), created (seconds), CREATED BY, size in bytes, comment."""
    points = Points()
    docker_rows = [{"ID": r["ID"], "Created": seconds(r["CreatedAt"]), "CreatedBy": r["CreatedBy"],
                    "Size": int(r["Size"]), "Comment": r["Comment"]}
                   for r in dockerd.json_lines("history", "--no-trunc", "--human=false", "--format", "{{json .}}",
                                               image)]
    cowfs_rows = [{"ID": r["ID"], "Created": seconds(r["Created"]), "CreatedBy": r["CreatedBy"], "Size": r["Size"],
                   "Comment": r["Comment"]} for r in cowfs_json("history", "--json", "--store", store, image)]
    points.equal(docker_rows, cowfs_rows, f"cowfs history --json {image}")
    points.equal(dockerd.docker("history", "-q", image).stdout.split(),
                 cowfs("history", "-q", "--store", store, image).stdout.split(), f"cowfs history -q {image}")
    points.check()


INSPECT_KEYS = ("Id", "RepoTags", "Created", "Architecture", "Os", "Config", "RootFS", "Size")


@pytest.mark.parametrize("image", IMAGES)
def test_inspect_as_docker_image_inspect(dockerd, images, store, image):
    docker_info = dockerd.json("image", "inspect", image)[0]
    cowfs_info = cowfs_json("inspect", "--store", store, image)[0]
    points = Points()
    points.equal({k: docker_info.get(k, "<absent>") for k in INSPECT_KEYS},
                 {k: cowfs_info.get(k, "<absent>") for k in INSPECT_KEYS}, f"cowfs inspect {image}")
    points.check()


def test_fully_qualified_references_name_the_same_images(dockerd, images, store):
    """docker.io/NAME and docker.io/library/NAME are the names Docker stores; both name the image."""
    points = Points()
    for ref, tag in (("docker.io/acme/rich:1", dk.RICH_IMAGE), ("docker.io/library/mybase:latest", LIBRARY_TAG),
                     ("docker.io/library/mybase", LIBRARY_TAG), ("library/mybase", LIBRARY_TAG)):
        want = dockerd.docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()
        assert want == images[tag]
        res = cowfs("inspect", "--store", store, ref, check=False)
        if points.ran(res, f"cowfs inspect {ref}"):
            points.equal(want, json.loads(res.stdout)[0]["Id"], f"cowfs inspect {ref}: Id")
        res = cowfs("history", "-q", "--no-trunc", "--store", store, ref, check=False)
        if points.ran(res, f"cowfs history -q --no-trunc {ref}"):
            points.equal(want, res.stdout.split()[0], f"cowfs history -q --no-trunc {ref} (the first row)")
    points.check()


FORMATS = [
    ("images", "{{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}", "acme/rich"),
    ("images", "table {{.Repository}}\t{{.Tag}}\t{{.ID}}", "acme/my-final-image"),
    ("images", "{{json .Repository}} {{.CreatedAt}}", "acme/rich"),
    ("history", "{{.ID}}|{{.CreatedBy}}|{{.Size}}|{{.Comment}}", dk.RICH_IMAGE),
    ("history", "{{.CreatedAt}} {{.CreatedBy}}", "--no-trunc", dk.FINAL_IMAGE),
    ("inspect", "{{.Id}} {{.Os}}/{{.Architecture}} {{index .RepoTags 0}}", dk.FINAL_IMAGE),
    ("inspect", "{{json .RootFS.Layers}} {{json .Config.Cmd}}", dk.RICH_IMAGE),
    ("inspect", "{{range .RootFS.Layers}}{{println .}}{{end}}", dk.BASE_IMAGE),
]


def test_format_templates_print_what_docker_prints(dockerd, images, store):
    """--format TEMPLATE (Go templates) of images, history and inspect: the same text as Docker's."""
    points = Points()
    for command, template, *args in FORMATS:
        docker_argv = (["image", "inspect"] if command == "inspect" else [command]) + ["--format", template, *args]
        want = dockerd.docker(*docker_argv).stdout
        res = cowfs(command, "--format", template, "--store", store, *args, check=False)
        if points.ran(res, f"cowfs {command} --format {template!r}"):
            points.equal(want.splitlines(), res.stdout.splitlines(), f"cowfs {command} --format {template!r}")
    points.check()


# -- a fresh container -----------------------------------------------------------------------------------

@pytest.mark.fuse
@pytest.mark.parametrize("image", IMAGES)
def test_fresh_container_shows_what_docker_export_shows(dockerd, images, store, shared_tmp, image):
    """docker create + docker export against the cowfs mount, file for file (times of non-directories too)."""
    name = "fresh-" + image.replace("/", "-").replace(":", "-")
    dockerd.docker("create", "--name", name, image)
    try:
        init = init_paths(dockerd, name)
        exported = without(tar_tree(docker_export(dockerd, name), times=True), init)
    finally:
        dockerd.docker("rm", name)
    if image == dk.RICH_IMAGE:
        check_docker_side(exported, *RICH_FIXTURES)
        assert ["rich/linked-a", "rich/linked-b", "rich/tree/linked-c"] in exported["hardlinks"]
    with cowfs_container(store, image, shared_tmp) as (mnt, _):
        mounted = without(walk_tree(mnt, times=True), init)
    points = Points()
    points.same_tree(exported, mounted, f"cowfs mount {image} (fresh)")
    points.check()


# -- after the same changes ----------------------------------------------------------------------------

@pytest.mark.fuse
def test_changed_container_shows_what_docker_export_shows(dockerd, docker_changed, store, shared_tmp):
    """The merged tree after CHANGES: docker export against the cowfs mount and against cowfs export."""
    exported = exported_tree(dockerd, "changed")
    init = init_paths(dockerd, "changed")
    check_docker_side(exported, *CHANGED_FIXTURES)
    points = Points()
    with cowfs_container(store, dk.RICH_IMAGE, shared_tmp, changes=True) as (mnt, cid):
        points.same_tree(exported, without(walk_tree(mnt), init), "the cowfs mount after CHANGES")
        res = cowfs("export", cid, "--store", store, binary=True, check=False)
        if points.ran(res, "cowfs export"):
            points.same_tree(exported, without(tar_tree(res.stdout), init), "cowfs export after CHANGES",
                             cowfs_name="cowfs-export")
    points.check()


@pytest.mark.fuse
def test_diff_lists_what_docker_diff_lists(dockerd, docker_changed, store, shared_tmp):
    """The changes as sets of (A|C|D, path): docker diff CONTAINER against cowfs diff MOUNTPOINT."""
    with cowfs_container(store, dk.RICH_IMAGE, shared_tmp, changes=True) as (mnt, _):
        got = {(c["kind"], c["path"]) for c in cowfs_json("diff", "--json", mnt)["changes"]}
    points = Points()
    points.same_set(docker_diff(dockerd, "changed"), got, "cowfs diff MOUNTPOINT (against docker diff)")
    points.check()


@pytest.mark.fuse
def test_ps_sizes_as_docker_ps(dockerd, docker_changed, store, shared_tmp):
    """SIZE as docker ps -s prints it ("NB (virtual M)"), and the bytes of the container layer (SizeRw),
    for a fresh container and for the changed one."""
    dockerd.docker("create", "--name", "ps-fresh", dk.RICH_IMAGE)
    try:
        docker_rows = {r["Names"]: r for r in dockerd.json_lines("ps", "-as", "--format", "{{json .}}")}
        docker_rw = {n: dockerd.json("inspect", "--size", n)[0]["SizeRw"] for n in ("ps-fresh", "changed")}
    finally:
        dockerd.docker("rm", "ps-fresh")
    with cowfs_container(store, dk.RICH_IMAGE, shared_tmp, "fresh") as (_, fresh), \
            cowfs_container(store, dk.RICH_IMAGE, shared_tmp, "changed", changes=True) as (_, changed):
        rows = {r["ID"]: r for r in cowfs_json("ps", "--json", "--no-trunc", "--store", store)}
        table = cowfs("ps", "--no-trunc", "--store", store).stdout.splitlines()
        at = table[0].index("SIZE")
        sizes = {line.split()[0]: line[at:].strip() for line in table[1:]}
    points = Points()
    points.equal({n: {"SizeRw": docker_rw[n], "SIZE": docker_rows[n]["Size"]} for n in ("ps-fresh", "changed")},
                 {n: {"SizeRw": rows[cid]["Size"], "SIZE": sizes[cid]}
                  for n, cid in (("ps-fresh", fresh), ("changed", changed))},
                 "cowfs ps (SizeRw: its --json Size; SIZE: its column)")
    points.check()


def without_whiteout_links(tree):
    """`tree` with whiteouts out of its hard-link groups: since Linux 5.8 the kernel makes each new whiteout
    a hard link of one shared whiteout inode (a space saving; it falls back to separate ones), so the
    whiteouts of a kernel upper are one hard-link group, which says nothing about what they delete."""
    def whiteout(p):
        return tree["entries"][p]["type"] == "chardev" and tree["entries"][p]["rdev"] == (0, 0)

    groups = [[p for p in g if not whiteout(p)] for g in tree["hardlinks"]]
    return dict(tree, hardlinks=sorted(g for g in groups if len(g) > 1))


@pytest.mark.fuse
def test_upper_directory_is_what_docker_keeps(dockerd, docker_changed, store, shared_tmp):
    """The container layer on disk: names, types, modes, owners, sizes and data, whiteouts (char 0/0), hard
    links, xattrs (trusted.overlay.opaque/redirect and the rest, not the overlay's private ones)."""
    docker_upper = without_whiteout_links(walk_tree(docker_changed["GraphDriver"]["Data"]["UpperDir"], xattrs=None))
    check_docker_side(docker_upper, ("rich/suid", "rdev", (0, 0)),
                      ("rich/opaque", "xattrs", {"trusted.overlay.opaque": b"y".hex()}), ("new/null", "rdev", (1, 3)))
    with cowfs_container(store, dk.RICH_IMAGE, shared_tmp, changes=True) as (_, cid):
        cowfs_upper = without_whiteout_links(walk_tree(os.path.join(store, "containers", cid, "upper"),
                                                       xattrs=None))
    points = Points()
    points.same_tree(docker_upper, cowfs_upper, "the container's upper directory")
    points.check()


@pytest.mark.fuse
def test_commit_writes_the_layer_docker_commit_writes(dockerd, docker_commit, store, shared_tmp):
    """The committed layer tar, entry for entry (whiteouts and opaque markers are entries): type, mode,
    owner, size, data, link name, xattrs; times and user names aside."""
    _, docker_layer, _ = docker_commit
    out = os.path.join(shared_tmp, "layer.tar")
    with cowfs_container(store, dk.RICH_IMAGE, shared_tmp, changes=True) as (mnt, _):
        cowfs("commit", mnt, "-o", out)
    with open(out, "rb") as f:
        cowfs_layer = f.read()
    docker_entries = layer_entries(docker_layer)
    check_docker_side(docker_entries, ("rich/.wh.suid", "type", "file"), ("rich/opaque/.wh..wh..opq", "type", "file"),
                      ("new/hard", "linkname", "new/dir/file"))
    points = Points()
    points.same_tree(docker_entries, layer_entries(cowfs_layer), "cowfs commit MOUNTPOINT -o (its tar)")
    points.check()


@pytest.mark.fuse
def test_committed_image_as_docker_commit_makes_it(dockerd, docker_commit, store, shared_tmp, images):
    """The committed image: its parent's layers plus one; history with the parent chain's IDs, CREATED BY
    (docker commit records the container's Cmd: here the image's, /bin/sh), the comment, the layer's size."""
    tag, _, docker_info = docker_commit
    with cowfs_container(store, dk.RICH_IMAGE, shared_tmp, changes=True) as (mnt, _):
        cowfs("commit", mnt, "--tag", "acme/rich:cowfs-commit", "-m", MESSAGE, "--store", store)
    points = Points()
    try:
        cowfs_info = cowfs_json("inspect", "--store", store, "acme/rich:cowfs-commit")[0]
        points.equal(docker_info["RootFS"]["Layers"][:-1], cowfs_info["RootFS"]["Layers"][:-1],
                     "the committed image's parent layers")
        points.equal(len(docker_info["RootFS"]["Layers"]), len(cowfs_info["RootFS"]["Layers"]), "its layer count")

        def rows(records, own_id, extra=0):
            return [{"ID": "<the image>" if r["ID"] == own_id else r["ID"], "CreatedBy": r["CreatedBy"],
                     "Size": int(r["Size"]) + (extra if r["ID"] == own_id else 0), "Comment": r["Comment"]}
                    for r in records]

        # A known difference of Docker's own: `docker commit` sizes the new layer with its symlinks' targets
        # counted, while a layer that `docker load` or a build makes counts regular files alone (test_images
        # compares those); cowfs sizes every layer the second way. So Docker's row is cowfs's plus exactly the
        # targets of the symlinks in the committed layer.
        new_layer = Store(store).layer_path(cowfs_info["RootFS"]["Layers"][-1])
        links = sum(len(os.fsencode(os.readlink(os.path.join(top, n)))) for top, dirs, files in os.walk(new_layer)
                    for n in dirs + files if os.path.islink(os.path.join(top, n)))
        assert links > 0  # the changes make symlinks: the difference is there to be accounted for
        points.equal(rows(dockerd.json_lines("history", "--no-trunc", "--human=false", "--format", "{{json .}}", tag),
                          docker_info["Id"]),
                     rows(cowfs_json("history", "--json", "--store", store, "acme/rich:cowfs-commit"),
                          cowfs_info["Id"], extra=links), "cowfs history of the committed image")
    finally:
        cowfs("rmi", "acme/rich:cowfs-commit", "--store", store, check=False)
    points.check()


def image_id(store, ref):
    return cowfs_json("inspect", "--store", store, ref)[0]["Id"]


@pytest.mark.fuse
def test_container_ids_as_docker_takes_them(dockerd, docker_changed, store, shared_tmp):
    """docker diff, commit and inspect take a container ID or a unique prefix of one: so do cowfs's."""
    assert dockerd.json("inspect", docker_changed["Id"][:12])[0]["Id"] == docker_changed["Id"]
    points = Points()
    with cowfs_container(store, dk.RICH_IMAGE, shared_tmp, changes=True) as (mnt, cid):
        by_mount = cowfs_json("diff", "--json", mnt)["changes"]
        res = cowfs("diff", "--json", cid[:12], "--store", store, check=False)
        if points.ran(res, "cowfs diff --json CONTAINER-ID"):
            points.equal(by_mount, json.loads(res.stdout)["changes"], "cowfs diff CONTAINER-ID (vs MOUNTPOINT)")
        by_mount = cowfs("commit", mnt).stdout.split()[0]
        res = cowfs("commit", cid[:12], "--store", store, check=False)
        if points.ran(res, "cowfs commit CONTAINER-ID"):
            points.equal(by_mount, res.stdout.split()[0], "cowfs commit CONTAINER-ID (its diff ID, vs MOUNTPOINT)")
        res = cowfs("inspect", "--store", store, cid[:12], check=False)
        if points.ran(res, "cowfs inspect CONTAINER-ID"):
            info = json.loads(res.stdout)[0]
            points.equal({"Id": cid, "Image": image_id(store, dk.RICH_IMAGE)},
                         {"Id": info.get("Id"), "Image": info.get("Image")}, "cowfs inspect CONTAINER-ID")
    points.check()


# -- the round trip through docker load --------------------------------------------------------------------

def check_docker_load_round_trip(dockerd, store, image, tag, base):
    """Mount `image`, make CHANGES, cowfs commit --tag `tag`, cowfs save, docker load, docker create +
    docker export: the tree Docker shows is the mount's, and the image ID is the same."""
    archive = os.path.join(base, "saved.tar")
    with cowfs_container(store, image, base, changes=True) as (mnt, _):
        mounted = walk_tree(mnt)
        cowfs("commit", mnt, "--tag", tag, "--store", store)
    points = Points()
    try:
        if points.ran(cowfs("save", tag, "-o", archive, "--store", store, check=False), f"cowfs save {tag}"):
            loaded = dockerd.docker("load", "-i", archive).stdout
            assert f"Loaded image: {tag}" in loaded, loaded
            name = "loaded-" + tag.replace("/", "-").replace(":", "-")
            dockerd.docker("create", "--name", name, tag, "/bin/sh")  # an image cowfs imported has no Cmd
            try:
                init = init_paths(dockerd, name)
                points.same_tree(without(tar_tree(docker_export(dockerd, name)), init), without(mounted, init),
                                 f"docker load of cowfs save {tag}, created and exported")
            finally:
                dockerd.docker("rm", name)
            points.equal(dockerd.docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip(),
                         image_id(store, tag), "the loaded image's ID")
    finally:
        cowfs("rmi", tag, "--store", store, check=False)
        dockerd.docker("rmi", tag, check=False)
    points.check()


@pytest.mark.fuse
def test_round_trip_docker_save_to_docker_load(dockerd, images, store, shared_tmp):
    """docker save -> cowfs import -> cowfs mount -> change -> cowfs commit --tag -> cowfs save -> docker load
    -> docker create + export: Docker shows what the cowfs mount showed."""
    check_docker_load_round_trip(dockerd, store, dk.RICH_IMAGE, "acme/rich:round-trip", shared_tmp)


@pytest.mark.fuse
def test_round_trip_of_an_image_cowfs_wrote(dockerd, images, store, shared_tmp):
    """The same from an image whose layer cowfs wrote itself (cowfs export of a fresh container of the rich
    image, imported as a one-layer image): cowfs save gives Docker what the mount shows."""
    rootfs = os.path.join(shared_tmp, "rootfs.tar")
    with cowfs_container(store, dk.RICH_IMAGE, shared_tmp, "fresh") as (_, cid):
        cowfs("export", cid, "-o", rootfs, "--store", store)
    cowfs("import", rootfs, "--name", "acme/flat:1", "--store", store)
    try:
        check_docker_load_round_trip(dockerd, store, "acme/flat:1", "acme/flat:round-trip", shared_tmp)
    finally:
        cowfs("rmi", "acme/flat:1", "--store", store, check=False)


def test_private_dockerd_leaves_nothing_behind():
    """Start a second private dockerd, leave a container running in it, stop it: no process, mount or
    directory of it stays (the session's daemon is stopped the same way)."""
    base = tempfile.mkdtemp(prefix="cowfs-dkr-", dir="/tmp")
    d = started(base)
    try:
        rootfs = os.path.join(base, "rootfs.tar")
        dk.busybox_tar(rootfs)
        d.docker("import", rootfs, "acme/mini:1")
        d.docker("run", "-d", "--network", "none", "--name", "running", "--stop-timeout", "2", "acme/mini:1",
                 "/bin/sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait")  # PID 1 ignores an untrapped SIGTERM
        assert len(mounts_under(base)) >= 2, "dockerd mounts its data-root and the running container's root"
        pids = {d.proc.pid} | pids_under(base)
    finally:
        d.stop()
    assert not mounts_under(base) and not os.path.exists(base)
    assert wait_gone(pids, 5), f"still running: {[p for p in pids if pid_alive(p)]}"


# -- Docker with the kernel's redirect_dir / metacopy on ---------------------------------------------------

OVERLAY_PARAMETERS = "/sys/module/overlay/parameters"
# What each variant turns on in the kernel's defaults (Docker's overlay2 passes neither option, so the
# module's defaults decide; metacopy=on needs redirects), and the cowfs options that mean the same.
VARIANTS = {"redirect_dir": ({"redirect_dir": "Y"}, "redirect_dir=on"),
            "metacopy": ({"redirect_dir": "Y", "metacopy": "Y"}, "redirect_dir=on,metacopy=on")}


@contextlib.contextmanager
def overlay_defaults(values):
    """The overlay module's default options set to `values` for the block, and restored after it whatever
    happens (they are the machine's: only mounts made meanwhile, without these options, see them)."""
    saved = {}
    try:
        for name, value in values.items():
            path = os.path.join(OVERLAY_PARAMETERS, name)
            with open(path) as f:
                saved[name] = f.read().strip()
            with open(path, "w") as f:
                f.write(value)
        yield
    finally:
        for name, value in saved.items():
            with open(os.path.join(OVERLAY_PARAMETERS, name), "w") as f:
                f.write(value)


@pytest.mark.fuse
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_docker_with_redirects_or_metacopy_on(dockerd, images, store, shared_tmp, variant):
    """Docker's overlay2 follows the kernel's defaults; with redirect_dir (and metacopy) on, a renamed lower
    directory becomes a redirect in its upper and docker diff/commit fall back to comparing merged views.
    The same CHANGES in a cowfs container mounted with those options: the same merged tree, the same diff,
    the same committed layer."""
    defaults, options = VARIANTS[variant]
    if not os.access(os.path.join(OVERLAY_PARAMETERS, "redirect_dir"), os.W_OK):
        missing_feature(f"docker: cannot set the overlay module's defaults in {OVERLAY_PARAMETERS}")
    saved = os.path.join(shared_tmp, "rich.tar")
    dockerd.docker("save", "-o", saved, dk.RICH_IMAGE)
    points = Points()
    with overlay_defaults(defaults):
        d = started(tempfile.mkdtemp(prefix="cowfs-dkr-", dir="/tmp"))
        try:
            d.docker("load", "-i", saved)
            res = d.docker("run", "-i", "--network", "none", "--name", "changed", dk.RICH_IMAGE, input=CHANGES)
            assert "changes-done" in res.stdout, res.stderr
            upper = d.json("inspect", "changed")[0]["GraphDriver"]["Data"]["UpperDir"]
            docker_upper = walk_tree(upper, xattrs=None)
            # (with metacopy=Y Docker's upper holds no metacopy copy for these changes: the variant still shows
            # what the second option changes in Docker, nothing in the tree, diff or layer)
            wanted = {"trusted.overlay.redirect"}
            found = {name for e in docker_upper["entries"].values() for name in e.get("xattrs", {})}
            assert wanted <= found, f"Docker's side: its upper has no {sorted(wanted - found)} (the test is wrong)"
            exported = exported_tree(d, "changed")
            init = init_paths(d, "changed")
            docker_changes = docker_diff(d, "changed")
            d.docker("commit", "changed", "acme/rich:variant")
            docker_layer = docker_save_layers(d, "acme/rich:variant", shared_tmp)[0][-1]
        finally:
            d.stop()
        mnt = os.path.join(shared_tmp, "c")
        os.mkdir(mnt)
        cid = None
        layer = os.path.join(shared_tmp, "layer.tar")
        try:
            cid = cowfs("mount", dk.RICH_IMAGE, mnt, "-o", options, "--store", store).stdout.strip()
            run_in(mnt, CHANGES)
            cowfs_upper = walk_tree(os.path.join(store, "containers", cid, "upper"), xattrs=None)
            found = {name for e in cowfs_upper["entries"].values() for name in e.get("xattrs", {})}
            points.equal(sorted(wanted & found), sorted(wanted), f"the overlay xattrs of cowfs's upper ({options})")
            points.same_tree(exported, without(walk_tree(mnt), init), f"the cowfs mount ({options}) after CHANGES")
            got = {(c["kind"], c["path"]) for c in cowfs_json("diff", "--json", mnt)["changes"]}
            points.same_set(docker_changes, got, f"cowfs diff ({options})")
            cowfs("commit", mnt, "-o", layer)
        finally:
            if is_mounted(mnt) and cowfs("umount", mnt, check=False).returncode != 0:
                force_unmount(mnt)
            if cid:
                cowfs("rm", cid, "--store", store, check=False)
    with open(layer, "rb") as f:
        points.same_tree(layer_entries(docker_layer), layer_entries(f.read()), f"cowfs commit ({options})")
    points.check()


# -- through a registry ------------------------------------------------------------------------------------

@pytest.mark.fuse
@pytest.mark.registry
def test_docker_pulls_what_cowfs_pushed(dockerd, images, store, shared_tmp):
    """cowfs push of the rich image to a private loopback registry, docker pull (Docker takes 127.0.0.0/8 for
    an insecure registry without being told), docker create + export: the cowfs mount, file for file, and
    the same image ID."""
    from cowfs.testing.registry import private_registry

    running = contextlib.ExitStack()
    try:
        reg = running.enter_context(private_registry(base=os.path.join(shared_tmp, "registry")))
    except RuntimeError as e:  # the registry did not start (a failure below is the test's)
        running.close()
        missing_feature(f"registry: {e}")
    ref = f"{reg.host}/acme/rich:pushed"
    with running:
        try:
            cowfs("tag", dk.RICH_IMAGE, ref, "--store", store)
            cowfs("push", ref, "--store", store)
            dockerd.docker("pull", ref)
            assert dockerd.json("image", "inspect", ref)[0]["Id"] == Store(store).resolve(ref)
            dockerd.docker("create", "--name", "pulled", ref)
            try:
                init = init_paths(dockerd, "pulled")
                exported = without(tar_tree(docker_export(dockerd, "pulled"), times=True), init)
            finally:
                dockerd.docker("rm", "pulled")
                dockerd.docker("rmi", ref)
        finally:
            cowfs("rmi", ref, "--store", store, check=False)
    with cowfs_container(store, dk.RICH_IMAGE, shared_tmp) as (mnt, _):
        mounted = without(walk_tree(mnt, times=True), init)
    points = Points()
    points.same_tree(exported, mounted, f"docker pull of cowfs push {dk.RICH_IMAGE}")
    points.check()

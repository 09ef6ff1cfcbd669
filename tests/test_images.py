"""Image layers: the layer store, import of docker save / OCI / bare layer archives, hostile archives, commit.

Every archive is built here with tarfile; every store is a temporary
directory passed with --store. The round-trip tests at the end mount the
kernel overlay (and cowfs) over layers imported into a store, change the
merged view, commit the upper and check that the committed layer, imported
on top of the same layers, shows exactly the tree the mount showed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile

import pytest

from cowfs.cli import images as image_cli
from cowfs.images.archive import ArchiveError, unpack_layer, write_layer
from cowfs.images.store import Store
from cowfs.testing import unprivileged
from cowfs.testing.tree import diff_snapshots, snapshot

MTIME = 1_000_000_000  # fixed, old: the snapshots compare it exactly


# -- building archives ---------------------------------------------------------------------------

def member(name, kind="file", data=b"", mode=None, target=None, pax=None, major=0, minor=0):
    info = tarfile.TarInfo(name)
    info.mtime = MTIME
    info.uid = info.gid = 0
    types = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
             "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}
    info.type = types[kind]
    info.mode = mode if mode is not None else (0o755 if kind == "dir" else 0o644)
    if target is not None:
        info.linkname = target
    if kind in ("chr", "blk"):
        info.devmajor, info.devminor = major, minor
    if pax:
        info.pax_headers = pax
    if kind == "file":
        info.size = len(data)
        return info, data
    return info, None


def layer_tar(*members):
    """A layer tar (bytes) from member(...) results, in the order given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def add_bytes(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = MTIME
    tf.addfile(info, io.BytesIO(data))


def history_entry(created_by, empty=False, created="2024-01-01T00:00:00Z"):
    entry = {"created": created, "created_by": created_by}
    if empty:
        entry["empty_layer"] = True
    return entry


def image_config(layers, history=None):
    diff_ids = [sha(layer) for layer in layers]
    history = history or [history_entry(f"step {i}") for i in range(len(layers))]
    return json.dumps({"architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
                       "config": {"Cmd": ["/bin/sh"]}, "rootfs": {"type": "layers", "diff_ids": diff_ids},
                       "history": history}, sort_keys=True).encode()


def docker_save(path, images, compress=False, diff_ids=None, mangle=None):
    """Write a `docker save` archive: images is [(repo_tags, [layer tar bytes], history or None)]."""
    manifest = []
    with tarfile.open(path, "w") as tf:
        written = set()
        for tags, layers, history in images:
            config = image_config(layers, history)
            if diff_ids is not None:
                c = json.loads(config)
                c["rootfs"]["diff_ids"] = diff_ids
                config = json.dumps(c).encode()
            config_name = hashlib.sha256(config).hexdigest() + ".json"
            add_bytes(tf, config_name, config)
            names = []
            for layer in layers:
                name = hashlib.sha256(layer).hexdigest() + "/layer.tar"
                if name not in written:
                    data = gzip.compress(layer, mtime=0) if compress else layer
                    add_bytes(tf, name, mangle(layer, data) if mangle else data)
                    written.add(name)
                names.append(name)
            manifest.append({"Config": config_name, "RepoTags": tags, "Layers": names})
        add_bytes(tf, "manifest.json", json.dumps(manifest).encode())
    return path


def oci_layout(root, layers, ref="acme/oci:1.0", compress=True, as_tar=None):
    """Write an OCI image layout directory (and, with as_tar, a tar of it)."""
    blobs = os.path.join(root, "blobs", "sha256")
    os.makedirs(blobs)

    def blob(data):
        with open(os.path.join(blobs, hashlib.sha256(data).hexdigest()), "wb") as f:
            f.write(data)
        return {"digest": sha(data), "size": len(data)}

    config = image_config(layers)
    layer_descs = []
    for layer in layers:
        data = gzip.compress(layer, mtime=0) if compress else layer
        layer_descs.append(dict(blob(data), mediaType="application/vnd.oci.image.layer.v1.tar"
                                + ("+gzip" if compress else "")))
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": dict(blob(config), mediaType="application/vnd.oci.image.config.v1+json"),
                           "layers": layer_descs}).encode()
    index = {"schemaVersion": 2,
             "manifests": [dict(blob(manifest), mediaType="application/vnd.oci.image.manifest.v1+json",
                                annotations={"io.containerd.image.name": ref,
                                             "org.opencontainers.image.ref.name": ref.split(":")[-1]})]}
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(root, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    if as_tar:
        with tarfile.open(as_tar, "w") as tf:
            for name in sorted(os.listdir(root)):
                tf.add(os.path.join(root, name), name)
        return as_tar
    return root


BASE_LAYERS = [
    layer_tar(member("bin", "dir"), member("bin/sh", data=b"#!shell\n", mode=0o755),
              member("etc", "dir"), member("etc/os-release", data=b"ID=test\n"),
              member("etc/gone", data=b"deleted later\n"), member("old", "dir"), member("old/x", data=b"x")),
    layer_tar(member("etc", "dir"), member("etc/.wh.gone"), member("old", "dir"), member("old/.wh..wh..opq"),
              member("old/y", data=b"y"), member("usr", "dir"), member("usr/lib", "symlink", target="/lib")),
]
APP_LAYERS = [
    layer_tar(member("app", "dir"), member("app/hello.sh", data=b"#!/bin/sh\necho hello\n", mode=0o644)),
    layer_tar(member("app", "dir"), member("app/hello.sh", data=b"#!/bin/sh\necho hello\n", mode=0o755)),
]


def cli(store, *argv):
    """Run an image command in-process: (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="cowfs")
    sub = parser.add_subparsers(dest="command")
    image_cli.add_commands(sub)
    args = parser.parse_args([argv[0], "--store", str(store), *argv[1:]])
    out, err = io.StringIO(), io.StringIO()
    rc = image_cli.run(args, out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def store_state(store):
    """Everything in the store, times included (the staging directory's own mtime aside)."""
    if not os.path.exists(store):
        return None
    state = snapshot(store, all_xattrs=True, exact_times=True)
    state["entries"]["tmp"].pop("mtime_ns")
    return state


@pytest.fixture
def store(tmp_path):
    return tmp_path / "store"


# -- the layer store and import ------------------------------------------------------------------------

def test_docker_save_import_unpacks_each_layer_once_in_overlay_format(tmp_path, store):
    base = docker_save(tmp_path / "base.tar", [(["acme/my-base-image:1.0"], BASE_LAYERS, None)])
    final = docker_save(tmp_path / "final.tar", [(["acme/my-final-image:1.0"], BASE_LAYERS + APP_LAYERS, None)],
                        compress=True)
    rc, out, err = cli(store, "import", str(base))
    assert rc == 0, err
    assert "Loaded image: acme/my-base-image:1.0" in out
    rc, out, err = cli(store, "import", str(final))
    assert rc == 0, err
    assert out.count("already stored") == 2 and out.count("unpacked") == 2
    s = Store(store)
    assert sorted(s.layer_ids()) == sorted(sha(layer) for layer in BASE_LAYERS + APP_LAYERS)
    assert len(os.listdir(store / "layers")) == 4  # the two shared layers are stored once

    top = s.layer_path(sha(BASE_LAYERS[1]))
    gone = os.lstat(os.path.join(top, "etc", "gone"))
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert not os.path.lexists(os.path.join(top, "etc", ".wh.gone"))
    assert os.getxattr(os.path.join(top, "old"), "trusted.overlay.opaque") == b"y"
    assert not os.path.lexists(os.path.join(top, "old", ".wh..wh..opq"))
    assert os.readlink(os.path.join(top, "usr", "lib")) == "/lib"  # absolute symlink targets are content
    sh = os.lstat(os.path.join(s.layer_path(sha(BASE_LAYERS[0])), "bin", "sh"))
    assert stat.S_IMODE(sh.st_mode) == 0o755 and sh.st_mtime == MTIME


def test_images_history_inspect_and_rmi(tmp_path, store):
    history = [history_entry("/bin/sh -c #(nop) ADD "
                             "file:f278386b0cef68136129f5f58c52445590a417b624d62bca158d4dc926c340df in /"),
               history_entry('/bin/sh -c #(nop)  CMD ["/bin/sh"]', empty=True),
               history_entry("RUN /bin/sh -c apk add --no-cache bash # buildkit")]
    final_history = history + [history_entry("COPY . /app # buildkit"),
                               history_entry("RUN /bin/sh -c chmod +x /app/hello.sh # buildkit"),
                               history_entry('CMD ["/bin/sh" "-c" "/app/hello.sh"]', empty=True)]
    docker_save(tmp_path / "both.tar", [(["acme/my-base-image:1.0"], BASE_LAYERS, history),
                                        (["acme/my-final-image:1.0"], BASE_LAYERS + APP_LAYERS, final_history)])
    assert cli(store, "import", str(tmp_path / "both.tar"))[0] == 0

    rc, out, _ = cli(store, "images")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["REPOSITORY", "TAG"]
    s = Store(store)
    base_size = sum(s.layer_info(sha(layer))["size"] for layer in BASE_LAYERS)
    app_size = sum(s.layer_info(sha(layer))["size"] for layer in APP_LAYERS)
    final_row = next(line for line in lines if line.startswith("acme/my-final-image"))
    assert final_row.split()[-2:] == [f"{base_size}B", f"{app_size}B"]  # SHARED SIZE, UNIQUE SIZE
    assert f"sharing saves {base_size}B" in lines[-1]

    rc, out, _ = cli(store, "history", "acme/my-final-image:1.0")
    rows = out.splitlines()[1:]
    assert len(rows) == 6
    final_id = s.resolve("acme/my-final-image:1.0")
    assert rows[0].startswith(final_id[7:19]) and all(r.startswith("<missing>") for r in rows[1:])
    assert "0B" in rows[0] and f"{s.layer_info(sha(APP_LAYERS[1]))['size']}B" in rows[1]
    assert "/bin/sh -c #(nop) ADD file:f278386b0cef68136…" in rows[-1]  # truncated at 45 like Docker

    rc, out, _ = cli(store, "inspect", "acme/my-final-image:1.0")
    info = json.loads(out)[0]
    assert info["RootFS"]["Layers"] == [sha(layer) for layer in BASE_LAYERS + APP_LAYERS]
    assert info["Id"] == final_id and info["RepoTags"] == ["acme/my-final-image:1.0"]
    rc, out, _ = cli(store, "inspect", "--format", "lowerdir", "acme/my-final-image:1.0")
    assert out.strip().split(":") == [s.layer_path(sha(layer)) for layer in reversed(BASE_LAYERS + APP_LAYERS)]

    rc, out, _ = cli(store, "rmi", "acme/my-final-image:1.0")
    assert rc == 0 and "Untagged: acme/my-final-image:1.0" in out
    assert sorted(s.layer_ids()) == sorted(sha(layer) for layer in BASE_LAYERS)  # shared layers kept
    assert os.path.isdir(s.layer_path(sha(BASE_LAYERS[0])))
    rc, out, _ = cli(store, "rmi", "acme/my-base-image")  # ":latest" is not it
    assert rc == 1
    rc, out, _ = cli(store, "rmi", "acme/my-base-image:1.0")
    assert rc == 0 and s.layer_ids() == [] and s.image_ids() == []


def test_oci_layout_directory_and_tar(tmp_path, store):
    layers = BASE_LAYERS + APP_LAYERS[:1]
    d = oci_layout(tmp_path / "oci", layers, ref="acme/oci:1.0")
    rc, out, err = cli(store, "import", str(d))
    assert rc == 0, err
    assert "Loaded image: acme/oci:1.0" in out
    t = oci_layout(tmp_path / "oci2", layers, ref="acme/oci:2.0", compress=False, as_tar=tmp_path / "oci.tar")
    rc, out, err = cli(store, "import", str(t), "--name", "acme/renamed:3")
    assert rc == 0, err
    assert out.count("already stored") == 3 and "Loaded image: acme/renamed:3" in out
    s = Store(store)
    assert s.image_layers(s.resolve("acme/renamed:3")) == [sha(layer) for layer in layers]


def test_oci_blob_with_wrong_content_is_refused(tmp_path, store):
    d = oci_layout(tmp_path / "oci", BASE_LAYERS)
    blobs = tmp_path / "oci" / "blobs" / "sha256"
    layer_blob = next(p for p in blobs.iterdir() if p.read_bytes()[:2] == b"\x1f\x8b")
    layer_blob.write_bytes(gzip.compress(gzip.decompress(layer_blob.read_bytes()), mtime=12345))
    rc, _, err = cli(store, "import", str(d))
    assert rc == 1 and "blob digest mismatch" in err and layer_blob.name in err
    assert Store(store).layer_ids() == []


@pytest.mark.parametrize("compression", ["plain", "gzip", "zstd"])
def test_bare_layer_tarballs(tmp_path, store, compression):
    data = BASE_LAYERS[0]
    path = tmp_path / f"layer.{compression}"
    if compression == "gzip":
        path.write_bytes(gzip.compress(data))
    elif compression == "zstd":
        assert shutil.which("zstd"), "make venv installs the zstd package; the test needs its command"
        raw = tmp_path / "raw.tar"
        raw.write_bytes(data)
        subprocess.run(["zstd", "-q", "-f", str(raw), "-o", str(path)], check=True)
    else:
        path.write_bytes(data)
    rc, out, err = cli(store, "import", str(path), "--name", "acme/rootfs")
    assert rc == 0, err
    s = Store(store)
    assert s.image_layers(s.resolve("acme/rootfs:latest")) == [sha(data)]
    assert open(os.path.join(s.layer_path(sha(data)), "etc", "os-release"), "rb").read() == b"ID=test\n"


def test_progress_lines_on_stderr(tmp_path, store, monkeypatch):
    from cowfs.images import archive
    monkeypatch.setattr(archive.Progress, "INTERVAL", 0.0)
    big = layer_tar(member("big", data=os.urandom(3 << 20)))
    path = docker_save(tmp_path / "big.tar", [(["acme/big:1"], [big], None)])
    rc, _, err = cli(store, "import", str(path))
    assert rc == 0
    assert f"cowfs: importing {path}:" in err and "of " in err and "%)" in err


def test_failed_import_leaves_store_unchanged(tmp_path, store):
    assert cli(store, "import", str(docker_save(tmp_path / "a.tar", [(["acme/a:1"], BASE_LAYERS, None)])))[0] == 0
    before = store_state(store)
    # two new good layers, then a broken one (a gzip stream cut short) inside a sound archive
    third = layer_tar(member("big", data=os.urandom(50000)))
    path = docker_save(tmp_path / "b.tar", [(["acme/b:1"], BASE_LAYERS + APP_LAYERS + [third], None)], compress=True,
                       mangle=lambda layer, data: data[:len(data) // 2] if layer is third else data)
    rc, out, err = cli(store, "import", str(path))
    assert rc == 1 and err.count("\n") == 1 and str(path) in err and "truncated" in err, err
    assert out.count("unpacked") == 2  # the two new layers were unpacked, then thrown away
    assert diff_snapshots(before, store_state(store)) == ""
    assert os.listdir(store / "tmp") == []


# -- hostile and broken archives -------------------------------------------------------------------------

HOSTILE = {
    "absolute": ([member("/etc/evil", data=b"x")], "absolute path", "/etc/evil"),
    "dotdot": ([member("a", "dir"), member("a/../../evil", data=b"x")], "'..'", "a/../../evil"),
    "through-symlink": ([member("etc", "symlink", target="/etc"), member("etc/passwd", data=b"x")],
                        "goes through the symlink 'etc'", "etc/passwd"),
    "through-relative-symlink": ([member("up", "symlink", target=".."), member("up/evil", data=b"x")],
                                 "goes through the symlink 'up'", "up/evil"),
    "hardlink-absolute": ([member("shadow", "hardlink", target="/etc/shadow")], "hard link to an absolute path",
                          "shadow"),
    "hardlink-dotdot": ([member("shadow", "hardlink", target="../../etc/shadow")], "hard link out of the layer",
                        "shadow"),
    "hardlink-missing": ([member("a", data=b"a"), member("b", "hardlink", target="nothere")],
                         "not an earlier file", "b"),
    "hardlink-through-symlink": ([member("s", "symlink", target="/etc"), member("b", "hardlink", target="s/passwd")],
                                 "not an earlier file", "b"),
    "duplicate": ([member("a", data=b"first"), member("./a", data=b"second")], "duplicate entry", "./a"),
    "duplicate-type": ([member("d", "dir"), member("d", "symlink", target="/")], "duplicate entry", "d"),
    "overlay-xattr": ([member("d", "dir", pax={"SCHILY.xattr.trusted.overlay.redirect": "/etc"})],
                      "overlay's own xattr", "d"),
    "whiteout-over-own-member": ([member("a", data=b"a"), member(".wh.a")], "whiteout for a member", ".wh.a"),
    "recorded-attributes-xattr": ([member("f", data=b"x", pax={
        "SCHILY.xattr.user.containers.override_stat": "0:0:4755:file"})], "recorded-attributes xattr", "f"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layer_is_refused_and_changes_nothing(tmp_path, store, case):
    members, reason, bad = HOSTILE[case]
    assert cli(store, "import", str(docker_save(tmp_path / "ok.tar", [(["acme/ok:1"], BASE_LAYERS, None)])))[0] == 0
    before = store_state(store)
    path = docker_save(tmp_path / "evil.tar", [(["acme/evil:1"], [BASE_LAYERS[0], layer_tar(*members)], None)])
    rc, out, err = cli(store, "import", str(path))
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("cowfs import: ")
    assert str(path) in err and repr(bad) in err and reason in err, err
    assert diff_snapshots(before, store_state(store)) == ""
    assert not os.path.lexists("/etc/evil") and os.listdir(store / "tmp") == []
    # the same layer as a bare tarball: the same refusal
    bare = tmp_path / "evil-layer.tar"
    bare.write_bytes(layer_tar(*members))
    rc, _, err = cli(store, "import", str(bare))
    assert rc == 1 and reason in err and str(bare) in err
    assert diff_snapshots(before, store_state(store)) == ""


def test_device_nodes_refused_unless_root(tmp_path, monkeypatch):
    """Unless attributes are recorded (which a user's unpack does: see the rootless tests at the end)."""
    data = layer_tar(member("dev", "dir"), member("dev/null", "chr", major=1, minor=3))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    os.mkdir(tmp_path / "d")
    with pytest.raises(ArchiveError, match=r"member 'dev/null': device node"):
        unpack_layer(io.BytesIO(data), str(tmp_path / "d"), "dev.tar", record=False)
    monkeypatch.undo()
    if os.geteuid() == 0:
        os.mkdir(tmp_path / "e")
        unpack_layer(io.BytesIO(data), str(tmp_path / "e"), "dev.tar")
        assert os.lstat(tmp_path / "e" / "dev" / "null").st_rdev == os.makedev(1, 3)


def test_symlink_targets_outside_are_content_not_refused(tmp_path):
    data = layer_tar(member("abs", "symlink", target="/etc/passwd"), member("rel", "symlink", target="../../x"),
                     member("f", data=b"f"), member("hl", "hardlink", target="f"))
    os.mkdir(tmp_path / "d")
    diff_id, _ = unpack_layer(io.BytesIO(data), str(tmp_path / "d"), "ok.tar")
    assert diff_id == sha(data)
    assert os.readlink(tmp_path / "d" / "abs") == "/etc/passwd"
    assert os.stat(tmp_path / "d" / "hl").st_ino == os.stat(tmp_path / "d" / "f").st_ino


def test_digest_mismatch_is_refused(tmp_path, store):
    wrong = [sha(BASE_LAYERS[0]), sha(b"something else")]
    path = docker_save(tmp_path / "bad.tar", [(["acme/bad:1"], BASE_LAYERS, None)], diff_ids=wrong)
    rc, _, err = cli(store, "import", str(path))
    assert rc == 1 and "digest mismatch" in err and wrong[1] in err
    assert Store(store).layer_ids() == [] and Store(store).image_ids() == []


@pytest.mark.parametrize("where", ["gzip-middle", "plain-middle", "plain-member-boundary", "outer"])
def test_truncated_archives_are_refused(tmp_path, store, where):
    data = layer_tar(member("a", data=os.urandom(5000)), member("b", data=b"b" * 3000))
    path = tmp_path / "layer.tar"
    if where == "gzip-middle":
        z = gzip.compress(data)
        path.write_bytes(z[:len(z) // 2])
    elif where == "plain-middle":
        path.write_bytes(data[:2500])
    elif where == "plain-member-boundary":
        path.write_bytes(data[:data.index(b"b" * 3000) + 3072])  # ends right after member b: no end blocks
    else:
        full = docker_save(tmp_path / "img.tar", [(["acme/t:1"], BASE_LAYERS, None)])
        blob = full.read_bytes()
        path.write_bytes(blob[:len(blob) // 2])
    rc, _, err = cli(store, "import", str(path))
    assert rc == 1 and "truncated" in err and str(path) in err, err
    assert not os.path.exists(store / "layers") or os.listdir(store / "layers") == []


def test_not_an_archive(tmp_path, store):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello, this is not a tar file at all\n" * 40)
    rc, _, err = cli(store, "import", str(path))
    assert rc == 1 and str(path) in err and err.count("\n") == 1


# -- commit ---------------------------------------------------------------------------------------------

def make_upper(root):
    """An upper directory in the kernel's format: a changed file, a whiteout, an opaque dir, a hard link."""
    os.makedirs(root / "etc")
    (root / "etc" / "os-release").write_bytes(b"ID=changed\n")
    os.mknod(root / "etc" / "gone", stat.S_IFCHR, os.makedev(0, 0))
    os.mkdir(root / "old")
    os.setxattr(root / "old", "trusted.overlay.opaque", b"y")
    (root / "old" / "new").write_bytes(b"new")
    os.link(root / "old" / "new", root / "old" / "new-link")
    os.setxattr(root / "old" / "new", "user.note", b"kept")
    for p in (root / "etc" / "os-release", root / "old" / "new"):
        os.utime(p, (MTIME, MTIME))


def tar_listing(data):
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [(m.name, m.type, m.linkname, m.mtime, m.uname, m.pax_headers.get("SCHILY.xattr.user.note"))
                for m in tf.getmembers()]


def test_commit_converts_markers_and_is_reproducible(tmp_path, store):
    upper = tmp_path / "upper"
    make_upper(upper)
    out1, out2 = tmp_path / "1.tar", tmp_path / "2.tar"
    rc, stdout, err = cli(store, "commit", str(upper), "-o", str(out1))
    assert rc == 0, err
    assert cli(store, "commit", str(upper), "-o", str(out2))[0] == 0
    data = out1.read_bytes()
    assert data == out2.read_bytes()
    assert stdout.strip() == sha(data)
    names = {name: (kind, link, mtime, uname, note) for name, kind, link, mtime, uname, note in tar_listing(data)}
    assert list(names) == sorted(names, key=lambda n: [p for p in n.split("/")]) or True
    assert names["etc/.wh.gone"][0] == tarfile.REGTYPE and names["etc/.wh.gone"][2] == 0
    assert "etc/gone" not in names
    assert "old/.wh..wh..opq" in names
    assert names["old/new-link"][0] == tarfile.LNKTYPE and names["old/new-link"][1] == "old/new"
    assert names["old/new"][2] == MTIME and names["old/new"][3] == "" and names["old/new"][4] == "kept"
    order = [n for n, *_ in tar_listing(data)]
    assert order == ["etc", "etc/.wh.gone", "etc/os-release", "old", "old/.wh..wh..opq", "old/new", "old/new-link"]

    # importing the committed layer gives back the upper (in the overlay format)
    layer = tmp_path / "layer.tar"
    layer.write_bytes(data)
    os.mkdir(tmp_path / "back")
    unpack_layer(open(layer, "rb"), str(tmp_path / "back"), str(layer))
    assert diff_snapshots(snapshot(upper, all_xattrs=True), snapshot(tmp_path / "back", all_xattrs=True)) == ""


def test_commit_expands_redirected_directory(tmp_path):
    lower = tmp_path / "lower"
    os.makedirs(lower / "src" / "sub")
    (lower / "src" / "a").write_bytes(b"a")
    (lower / "src" / "sub" / "b").write_bytes(b"b")
    upper = tmp_path / "upper"
    os.makedirs(upper / "dst")
    os.setxattr(upper / "dst", "trusted.overlay.redirect", b"/src")
    os.mknod(upper / "src", stat.S_IFCHR, os.makedev(0, 0))
    (upper / "dst" / "c").write_bytes(b"c")
    os.mknod(upper / "dst" / "a", stat.S_IFCHR, os.makedev(0, 0))  # a deleted after the rename
    with pytest.raises(ArchiveError, match="redirected directory"):
        write_layer(str(upper), io.BytesIO())
    buf = io.BytesIO()
    write_layer(str(upper), buf, [str(lower)])
    names = [n for n, *_ in tar_listing(buf.getvalue())]
    assert names == ["dst", "dst/.wh..wh..opq", "dst/c", "dst/sub", "dst/sub/b", ".wh.src"] or \
        names == [".wh.src", "dst", "dst/.wh..wh..opq", "dst/c", "dst/sub", "dst/sub/b"]


def test_commit_with_tag_adds_an_image(tmp_path, store):
    assert cli(store, "import", str(docker_save(tmp_path / "b.tar", [(["acme/base:1"], BASE_LAYERS, None)])))[0] == 0
    upper = tmp_path / "upper"
    make_upper(upper)
    rc, out, err = cli(store, "commit", str(upper), "--from", "acme/base:1", "--tag", "acme/next:1", "-m", "hi")
    assert rc == 0, err
    diff_id = out.splitlines()[0]
    s = Store(store)
    assert s.image_layers(s.resolve("acme/next:1")) == [sha(layer) for layer in BASE_LAYERS] + [diff_id]
    rc, out, _ = cli(store, "history", "acme/next:1")
    assert "cowfs commit" in out.splitlines()[1] and "hi" in out.splitlines()[1]
    # the same with --lower paths of the store, found back to the parent image
    lowers = cli(store, "inspect", "--format", "lowerdir", "acme/base:1")[1].strip()
    rc, out, err = cli(store, "commit", str(upper), "--lower", lowers, "--tag", "acme/next:2")
    assert rc == 0, err
    assert out.splitlines()[0] == diff_id
    assert s.image_layers(s.resolve("acme/next:2")) == s.image_layers(s.resolve("acme/next:1"))
    rc, _, err = cli(store, "commit", str(upper), "--lower", str(tmp_path), "--tag", "acme/x:1")
    assert rc == 1 and "--tag needs the lowers from the store" in err


def test_help_has_examples():
    parser = argparse.ArgumentParser(prog="cowfs")
    sub = parser.add_subparsers(dest="command")
    image_cli.add_commands(sub)
    for name in image_cli.COMMANDS:
        text = sub.choices[name].format_help()
        assert "example" in text and f"cowfs {name}" in text, name


def test_archive_truncated_midway_leaves_store_unchanged(tmp_path, store):
    assert cli(store, "import", str(docker_save(tmp_path / "a.tar", [(["acme/a:1"], BASE_LAYERS, None)])))[0] == 0
    before = store_state(store)
    path = docker_save(tmp_path / "b.tar", [(["acme/b:1"], BASE_LAYERS + APP_LAYERS, None)])
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    rc, _, err = cli(store, "import", str(path))
    assert rc == 1 and err.count("\n") == 1 and str(path) in err
    assert diff_snapshots(before, store_state(store)) == ""
    assert os.listdir(store / "tmp") == []


# -- round trip through a mount ----------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cowfs.testing.mounts import cowfs_mount, kernel_overlay  # noqa: E402

ROUND_TRIP_LAYERS = [
    layer_tar(member("d1", "dir"), member("d1/a", data=b"a1"), member("d1/b", data=b"b1"),
              member("d2", "dir"), member("d2/sub", "dir"), member("d2/sub/c", data=b"c1"), member("d2/y", data=b"y"),
              member("f", data=b"f1"), member("g", data=b"g1", mode=0o600)),
    layer_tar(member("d1", "dir"), member("d1/.wh.b"), member("d1/e", data=b"e2"),
              member("d2", "dir", mode=0o750), member("d2/.wh..wh..opq"), member("d2/x", data=b"x2"),
              member("s", "symlink", target="d1/a")),
]
PATHS = ("f", "g", "s", "n", "d1", "d1/a", "d1/b", "d1/e", "d1/n", "d2", "d2/x", "d2/sub", "d2/n", "n/a")

OPS = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(PATHS), st.binary(max_size=20)),
    st.tuples(st.just("append"), st.sampled_from(PATHS), st.binary(min_size=1, max_size=5)),
    st.tuples(st.just("unlink"), st.sampled_from(PATHS)),
    st.tuples(st.just("rmtree"), st.sampled_from(PATHS)),
    st.tuples(st.just("mkdir"), st.sampled_from(PATHS)),
    st.tuples(st.just("rename"), st.sampled_from(PATHS), st.sampled_from(PATHS)),
    st.tuples(st.just("chmod"), st.sampled_from(PATHS), st.sampled_from([0o700, 0o644, 0o755])),
    st.tuples(st.just("symlink"), st.sampled_from(["/etc", "d1", "../x"]), st.sampled_from(PATHS)),
    st.tuples(st.just("link"), st.sampled_from(PATHS), st.sampled_from(PATHS)),
    st.tuples(st.just("setxattr"), st.sampled_from(PATHS), st.binary(min_size=1, max_size=4)),
)


def apply_ops(root, ops):
    for op, *args in ops:
        p = [os.path.join(root, a) if isinstance(a, str) and a in PATHS else a for a in args]
        try:
            if op == "write":
                with open(p[0], "wb") as f:
                    f.write(p[1])
            elif op == "append":
                with open(p[0], "ab") as f:
                    f.write(p[1])
            elif op == "unlink":
                os.unlink(p[0])
            elif op == "rmtree":
                shutil.rmtree(p[0])
            elif op == "mkdir":
                os.mkdir(p[0])
            elif op == "rename":
                os.rename(p[0], p[1])
            elif op == "chmod":
                os.chmod(p[0], p[1], follow_symlinks=False)
            elif op == "symlink":
                os.symlink(args[0], p[1])
            elif op == "link":
                os.link(p[0], p[1], follow_symlinks=False)
            elif op == "setxattr":
                os.setxattr(p[0], "user.k", p[1], follow_symlinks=False)
        except (OSError, NotImplementedError):
            pass


@pytest.fixture(scope="module")
def round_trip_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("rt") / "store"
    path = docker_save(store.parent / "img.tar", [(["acme/rt:1"], ROUND_TRIP_LAYERS, None)])
    assert cli(store, "import", str(path))[0] == 0
    s = Store(store)
    return s, s.resolve("acme/rt:1")


def commit_bytes(upper, lowers, clamp=None):
    buf = io.BytesIO()
    write_layer(str(upper), buf, lowers, clamp_mtime=clamp)
    return buf.getvalue()


def check_round_trip(base, store, image_id, ops, with_cowfs):
    lowers = [store.layer_path(d) for d in reversed(store.image_layers(image_id))]
    before = [snapshot(p, all_xattrs=True, exact_times=True) for p in lowers]
    dirs = {n: os.path.join(base, n) for n in ("u", "w", "m", "u2", "w2", "m2", "new")}
    for d in dirs.values():
        os.mkdir(d)
    with kernel_overlay(lowers, dirs["u"], dirs["w"], dirs["m"], options=["redirect_dir=on", "metacopy=off"]):
        apply_ops(dirs["m"], ops)
        merged = snapshot(dirs["m"])
    layer = commit_bytes(dirs["u"], lowers)
    assert commit_bytes(dirs["u"], lowers) == layer  # reproducible
    diff_id, _ = unpack_layer(io.BytesIO(layer), dirs["new"], "committed")
    assert diff_id == sha(layer)
    with kernel_overlay([dirs["new"]] + lowers, None, None, dirs["m2"]):
        again = snapshot(dirs["m2"])
    assert diff_snapshots(merged, again, "mount", "committed") == "", f"ops={ops!r}"
    assert [snapshot(p, all_xattrs=True, exact_times=True) for p in lowers] == before
    if with_cowfs:
        with cowfs_mount(lowers, dirs["u2"], dirs["w2"], dirs["m"], options=["redirect_dir=on"]):
            apply_ops(dirs["m"], ops)
        clamp = MTIME + 1
        kernel_layer, cowfs_layer = commit_bytes(dirs["u"], lowers, clamp), commit_bytes(dirs["u2"], lowers, clamp)
        if kernel_layer != cowfs_layer:
            pytest.fail(f"ops={ops!r}: layer from the kernel's upper {tar_listing(kernel_layer)} != layer from "
                        f"cowfs's upper {tar_listing(cowfs_layer)}")


@pytest.mark.kernel
def test_round_trip_fixed_cases(shared_tmp, round_trip_store):
    store, image_id = round_trip_store
    cases = [
        [("rename", "d1", "n"), ("write", "n/a", b"new a")],  # a redirected directory, then changed
        [("rmtree", "d2"), ("mkdir", "d2"), ("write", "d2/n", b"n")],  # opaque directory over a whiteout
        [("unlink", "f"), ("link", "g", "d1/n"), ("append", "g", b"+"), ("setxattr", "d1/e", b"v")],
        [("rename", "d2/sub", "d1/n"), ("chmod", "d2", 0o700), ("symlink", "/etc", "f")],
    ]
    for i, ops in enumerate(cases):
        base = os.path.join(shared_tmp, f"case{i}")
        os.mkdir(base)
        check_round_trip(base, store, image_id, ops, with_cowfs=False)


@pytest.mark.kernel
@pytest.mark.fuse
def test_round_trip_kernel_and_cowfs_commit_the_same_layer(shared_tmp, round_trip_store):
    store, image_id = round_trip_store
    ops = [("rename", "d1", "n"), ("write", "n/a", b"new a"), ("rmtree", "d2"), ("mkdir", "d2"),
           ("unlink", "f"), ("link", "g", "d2/n"), ("setxattr", "n/e", b"v"), ("symlink", "/etc", "f")]
    check_round_trip(shared_tmp, store, image_id, ops, with_cowfs=True)


@pytest.mark.kernel
@pytest.mark.fuse
@settings(max_examples=int(os.environ.get("COWFS_IMAGE_EXAMPLES", "12")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=1, max_size=8))
def test_round_trip_property(shared_tmp, round_trip_store, ops):
    store, image_id = round_trip_store
    base = tempfile.mkdtemp(dir=shared_tmp)
    check_round_trip(base, store, image_id, ops, with_cowfs=True)


# -- containers: cowfs mount IMAGE MOUNTPOINT, cowfs commit MOUNTPOINT, cowfs rm, cowfs shell IMAGE ----------

import sys  # noqa: E402

from cowfs.testing.mounts import force_unmount, is_mounted  # noqa: E402

COWFS = [sys.executable, "-m", "cowfs"]


def run_cowfs(*argv, **kwargs):
    return subprocess.run(COWFS + [str(a) for a in argv], capture_output=True, text=True, timeout=120,
                          stdin=kwargs.pop("stdin", subprocess.DEVNULL), **kwargs)


def unmount_all(*mountpoints):
    for mnt in mountpoints:
        if is_mounted(os.path.realpath(mnt)):
            if run_cowfs("umount", mnt).returncode != 0:
                force_unmount(mnt)


def app_store(base):
    store = os.path.join(base, "store")
    path = docker_save(os.path.join(base, "app.tar"), [(["acme/app:1"], BASE_LAYERS + APP_LAYERS, None)])
    rc, _, err = cli(store, "import", str(path), "-q")
    assert rc == 0, err
    return store


def containers_of(store):
    root = os.path.join(store, "containers")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


@pytest.mark.fuse
def test_mount_image_gives_a_container_layer_kept_until_rm(shared_tmp):
    store = app_store(shared_tmp)
    s = Store(store)
    image_id = s.resolve("acme/app:1")
    m1, m2 = os.path.join(shared_tmp, "m1"), os.path.join(shared_tmp, "m2")
    os.mkdir(m1)
    os.mkdir(m2)
    try:
        r1 = run_cowfs("mount", "acme/app:1", m1, "--store", store)
        assert r1.returncode == 0, r1.stderr
        r2 = run_cowfs("mount", "--store", store, image_id[7:19], m2)  # by a short image ID, options first
        assert r2.returncode == 0, r2.stderr
        c1, c2 = r1.stdout.strip(), r2.stdout.strip()
        assert len(c1) == 64 and len(c2) == 64 and c1 != c2  # the same image twice: two containers
        assert containers_of(store) == sorted([c1, c2])
        # the image's layers, topmost first, whiteouts and opaque directories applied
        with open(os.path.join(m1, "app/hello.sh"), "rb") as f:
            assert f.read() == b"#!/bin/sh\necho hello\n"
        assert stat.S_IMODE(os.stat(os.path.join(m1, "app/hello.sh")).st_mode) == 0o755
        assert not os.path.exists(os.path.join(m1, "etc/gone")) and os.listdir(os.path.join(m1, "old")) == ["y"]
        with open(os.path.join(m1, "etc/new"), "w") as f:
            f.write("only in c1\n")
        os.unlink(os.path.join(m1, "bin/sh"))
        assert not os.path.exists(os.path.join(m2, "etc/new")) and os.path.exists(os.path.join(m2, "bin/sh"))
        upper = os.path.join(store, "containers", c1, "upper")
        assert os.path.isfile(os.path.join(upper, "etc/new"))  # the writes land in the container's layer
        with open(os.path.join(store, "containers", c1, "container.json")) as f:
            record = json.load(f)
        assert record["Image"] == image_id and record["Mountpoint"] == os.path.realpath(m1)
        ps = run_cowfs("ps", "--store", store)
        assert ps.returncode == 0 and f"{c1[:12]}   acme/app:1" in ps.stdout and f"mounted at {m1}" in ps.stdout
        # refused while mounted, and so is removing the image the containers use
        r = run_cowfs("rm", c1[:12], "--store", store)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "is mounted at" in r.stderr
        r = run_cowfs("rmi", "acme/app:1", "--store", store)
        assert r.returncode == 1 and "used by container" in r.stderr and s.resolve("acme/app:1") == image_id
        assert run_cowfs("umount", m1).returncode == 0
        # kept after unmounting, with its changes
        assert os.path.isfile(os.path.join(upper, "etc/new"))
        r = run_cowfs("rm", c1[:12], "--store", store)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == c1 and containers_of(store) == [c2]
        assert os.listdir(os.path.join(store, "tmp")) == []
    finally:
        unmount_all(m1, m2)
    assert run_cowfs("rm", c2, "--store", store).returncode == 0 and containers_of(store) == []


def test_mount_of_a_missing_image_is_one_line_and_makes_nothing(shared_tmp):
    store = app_store(shared_tmp)
    m = os.path.join(shared_tmp, "m")
    os.mkdir(m)
    r = run_cowfs("mount", "acme/nope:1", m, "--store", store)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "acme/nope:1" in r.stderr
    assert "no such image" in r.stderr and containers_of(store) == [] and not is_mounted(m)


@pytest.mark.fuse
def test_commit_mountpoint_of_a_container_makes_a_child_image(shared_tmp):
    store = app_store(shared_tmp)
    s = Store(store)
    parent = s.image_layers(s.resolve("acme/app:1"))
    m, m2 = os.path.join(shared_tmp, "m"), os.path.join(shared_tmp, "m2")
    os.mkdir(m)
    os.mkdir(m2)
    try:
        r = run_cowfs("mount", "acme/app:1", m, "--store", store)
        assert r.returncode == 0, r.stderr
        cid = r.stdout.strip()
        with open(os.path.join(m, "app/hello.sh"), "a") as f:
            f.write("echo again\n")
        os.unlink(os.path.join(m, "etc/os-release"))
        os.mkdir(os.path.join(m, "data"))
        # no --from, no --lower: the mount says where the upper and the lowers are, the container which image
        r = run_cowfs("commit", m, "--tag", "acme/app:2", "-m", "from a mount", "--clamp-mtime", MTIME,
                      "--store", store)
        assert r.returncode == 0, r.stderr
        diff_id = r.stdout.splitlines()[0]
        assert r.stdout.splitlines()[1] == f"Tagged acme/app:2 as {s.resolve('acme/app:2')}"
        assert s.image_layers(s.resolve("acme/app:2")) == parent + [diff_id]
        history = run_cowfs("history", "acme/app:2", "--store", store).stdout.splitlines()
        assert "cowfs commit" in history[1] and "from a mount" in history[1] and len(history) == 1 + len(parent) + 1
        # the same layer as committing the container's upper directory with the image's lowers
        lowers = cli(store, "inspect", "--format", "lowerdir", "acme/app:1")[1].strip()
        upper = os.path.join(store, "containers", cid, "upper")
        r = run_cowfs("commit", upper, "--lower", lowers, "--clamp-mtime", MTIME)
        assert r.returncode == 0 and r.stdout.strip() == diff_id, r.stderr
        # a mount that is no container: its lowers come from the mount record
        out = os.path.join(shared_tmp, "plain.tar")
        r = run_cowfs("commit", m, "-o", out, "--clamp-mtime", MTIME)
        assert r.returncode == 0 and r.stdout.strip() == diff_id == sha(open(out, "rb").read()), r.stderr
        assert run_cowfs("umount", m).returncode == 0
        # the new image shows the change
        r = run_cowfs("mount", "acme/app:2", m2, "--store", store)
        assert r.returncode == 0, r.stderr
        with open(os.path.join(m2, "app/hello.sh")) as f:
            assert f.read().endswith("echo again\n")
        assert not os.path.exists(os.path.join(m2, "etc/os-release")) and os.path.isdir(os.path.join(m2, "data"))
        assert run_cowfs("umount", m2).returncode == 0
    finally:
        unmount_all(m, m2)


@pytest.mark.fuse
def test_commit_of_a_read_only_mount_is_refused(shared_tmp):
    store = app_store(shared_tmp)
    s = Store(store)
    m = os.path.join(shared_tmp, "m")
    os.mkdir(m)
    lowers = cli(store, "inspect", "--format", "lowerdir", "acme/app:1")[1].strip()
    try:
        r = run_cowfs("mount", "-o", f"lowerdir={lowers}", m)
        assert r.returncode == 0, r.stderr
        r = run_cowfs("commit", m, "--store", store)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no upper layer" in r.stderr
        assert s.image_ids() == [s.resolve("acme/app:1")]
    finally:
        unmount_all(m)


@pytest.mark.fuse
def test_shell_on_an_image_uses_a_throwaway_layer(shared_tmp):
    store = app_store(shared_tmp)
    before = store_state(store)
    script = "cat app/hello.sh\necho hi > newfile\nrm etc/os-release\nexit\n"
    r = subprocess.run(COWFS + ["shell", "--store", store, "acme/app:1"], input=script, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, SHELL="/bin/sh"))
    assert r.returncode == 0, r.stderr
    assert "image acme/app:1" in r.stdout and "echo hello" in r.stdout
    assert "A /newfile" in r.stdout and "D /etc/os-release" in r.stdout
    assert diff_snapshots(before, store_state(store)) == ""  # nothing kept in the store
    merged = r.stdout.split(", mounted at ")[1].split()[0]
    assert merged.endswith("/merged") and not is_mounted(merged) and not os.path.exists(merged)


# -- rootless: images with other owners, set-id files and devices, imported and mounted by a user ---------


OVERRIDE = "user.containers.override_stat"


def owned(m, uid, gid):
    """A member(...) result with another owner."""
    m[0].uid, m[0].gid = uid, gid
    return m


ROOTLESS_LAYER = layer_tar(
    member("bin", "dir"), member("bin/su", data=b"#!/bin/sh\n", mode=0o4755),
    member("dev", "dir"), member("dev/null", "chr", mode=0o666, major=1, minor=3),
    owned(member("dev/sda", "blk", mode=0o660, major=8, minor=0), 0, 6),
    member("etc", "dir"), owned(member("etc/shadow", data=b"root:*:1::::::\n", mode=0o640), 0, 42),
    member("etc/shared", data=b"for everyone\n", mode=0o666),
    member("home", "dir"), owned(member("home/bob", "dir", mode=0o700), 1000, 1000),
    member("run", "dir"), member("run/initctl", "fifo", mode=0o600),
    member("tmp", "dir", mode=0o1777),
    member("usr", "dir"), member("usr/sbin", "symlink", target="../bin", mode=0o777))
# What an unprivileged import records: (type on disk, mode on disk, the xattr's value)
ROOTLESS_RECORDS = {
    "": ("dir", None, "0:0:0755:dir"),
    "bin/su": ("file", 0o4755, "0:0:4755:file"),
    "dev/null": ("file", 0o600, "0:0:0666:char-1-3"),
    "dev/sda": ("file", 0o600, "0:6:0660:block-8-0"),
    "etc/shadow": ("file", 0o640, "0:42:0640:file"),
    "etc/shared": ("file", 0o666, "0:0:0666:file"),
    "home/bob": ("dir", 0o700, "1000:1000:0700:dir"),
    "run/initctl": ("file", 0o600, "0:0:0600:pipe"),
    "tmp": ("dir", 0o1777, "0:0:1777:dir"),
    "usr/sbin": ("symlink", None, None),  # no user.* xattr on a symlink: its owner is the user's
}
# What the mount shows of them: (uid, gid, st_mode, rdev)
ROOTLESS_SHOWN = {
    "bin/su": (0, 0, stat.S_IFREG | 0o4755, 0),
    "dev/null": (0, 0, stat.S_IFCHR | 0o666, os.makedev(1, 3)),
    "dev/sda": (0, 6, stat.S_IFBLK | 0o660, os.makedev(8, 0)),
    "etc/shadow": (0, 42, stat.S_IFREG | 0o640, 0),
    "home/bob": (1000, 1000, stat.S_IFDIR | 0o700, 0),
    "run/initctl": (0, 0, stat.S_IFIFO | 0o600, 0),
    "tmp": (0, 0, stat.S_IFDIR | 0o1777, 0),
}


def test_recorded_unpack_writes_back_the_same_entries(tmp_path):
    """In-process (no other user needed): an unpack that records attributes, written back as a layer,
    gives every entry its owner, mode, type and device number, and never the xattr itself."""
    os.mkdir(tmp_path / "d")
    diff_id, _ = unpack_layer(io.BytesIO(ROOTLESS_LAYER), str(tmp_path / "d"), "rootless.tar", record=True)
    assert diff_id == sha(ROOTLESS_LAYER)  # the digest is the tar's, whatever is made of it
    for rel, (_, _, value) in ROOTLESS_RECORDS.items():
        got = os.getxattr(tmp_path / "d" / rel, OVERRIDE, follow_symlinks=False).decode() if value else None
        assert got == value, rel
    assert stat.S_ISREG(os.lstat(tmp_path / "d" / "dev/null").st_mode)
    out = io.BytesIO()
    write_layer(str(tmp_path / "d"), out)

    def entries(data):
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            found = {}
            for m in tf.getmembers():
                assert not any(OVERRIDE in key for key in m.pax_headers), m.name
                found[m.name.rstrip("/")] = (m.type, m.uid, m.gid, m.mode, m.devmajor, m.devminor, m.size,
                                             m.linkname)
            return found
    written, original = entries(out.getvalue()), entries(ROOTLESS_LAYER)
    written["usr/sbin"] = written["usr/sbin"][:1] + (0, 0) + written["usr/sbin"][3:]  # a symlink's owner is lost
    assert written == original


def test_marked_upper_is_written_as_root_would_write_it(tmp_path):
    """In a marked upper a whiteout is the unprivileged user's: its marker is written as root's, and an
    opaque directory's marker takes the directory's recorded owner, as with a privileged upper."""
    upper = tmp_path / "upper"
    os.makedirs(upper / "etc")
    os.setxattr(upper, OVERRIDE, b"0:0:0755:dir")
    os.setxattr(upper / "etc", OVERRIDE, b"0:0:0755:dir")
    os.chown(upper / "etc", 1234, 1234)
    os.mknod(upper / "etc" / "gone", stat.S_IFCHR, os.makedev(0, 0))
    os.chown(upper / "etc" / "gone", 1234, 1234)
    os.setxattr(upper / "etc", "trusted.overlay.opaque", b"y")
    out = io.BytesIO()
    write_layer(str(upper), out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        owners = {m.name: (m.uid, m.gid) for m in tf.getmembers()}
    assert owners == {"etc": (0, 0), "etc/.wh..wh..opq": (0, 0), "etc/.wh.gone": (0, 0)}


class Rootless:
    """The suite's unprivileged user (cowfs.testing.unprivileged), and cowfs run as that user."""

    def __init__(self, user):
        self.user, self.uid, self.gid = user, user.uid, user.gid
        self.python = unprivileged.user_python()

    def run(self, argv, **kwargs):
        return unprivileged.run_as_user(argv, timeout=120, **kwargs)

    def cowfs(self, *argv):
        return self.run(unprivileged.cowfs_argv(*argv))

    def python_json(self, code, *args):
        r = unprivileged.run_python_as_user("import json, os, sys\n" + code, args=[str(a) for a in args])
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def home_in(self, base, name="user"):
        path = os.path.join(base, name)
        os.mkdir(path, 0o755)
        os.chown(path, self.uid, self.gid)
        return path


@pytest.fixture(scope="module")
def rootless():
    if not unprivileged.can_switch_users():
        pytest.skip("these tests import as root and as another user: run them as root")
    return Rootless(unprivileged.require("user", "setpriv", "python", "fuse"))


def rootless_import(user, base, data=ROOTLESS_LAYER, name="acme/rootless:1"):
    """Import the layer tar `data` as the user into a store of the user's under `base`; returns the store."""
    tar = os.path.join(base, "layer.tar")
    with open(tar, "wb") as f:
        f.write(data)
    store = os.path.join(base, "store")
    r = user.cowfs("import", "-q", "--store", store, "--name", name, tar)
    assert r.returncode == 0, r.stderr
    return store


SHOW = """
out = {}
for rel in sys.argv[2:]:
    st = os.lstat(os.path.join(sys.argv[1], rel))
    out[rel] = [st.st_uid, st.st_gid, st.st_mode, st.st_rdev, os.listxattr(os.path.join(sys.argv[1], rel),
                follow_symlinks=False) if not os.path.islink(os.path.join(sys.argv[1], rel)) else []]
print(json.dumps(out))
"""


def shown(user, mnt, rels):
    """{rel: (uid, gid, st_mode, rdev)} as the user's stat sees them through the mount; no xattr of it shows."""
    found = user.python_json(SHOW, mnt, *rels)
    for rel, (*_, names) in found.items():
        assert OVERRIDE not in names, rel
    return {rel: tuple(v[:4]) for rel, v in found.items()}


def user_unmount(user, *mountpoints):
    for mnt in mountpoints:
        if is_mounted(os.path.realpath(mnt)):
            if user.cowfs("umount", mnt).returncode != 0:
                force_unmount(mnt)


def test_rootless_import_records_owners_modes_and_devices(shared_tmp, rootless):
    base = rootless.home_in(shared_tmp)
    store = rootless_import(rootless, base)
    s = Store(store, create=False)
    assert s.layer_ids() == [sha(ROOTLESS_LAYER)]  # the diff ID is the tar's: recording changes nothing of it
    layer = s.layer_path(sha(ROOTLESS_LAYER))
    for rel, (kind, mode, value) in ROOTLESS_RECORDS.items():
        path = os.path.join(layer, rel)
        st = os.lstat(path)
        assert st.st_uid == rootless.uid, rel  # nothing could be given to another owner
        assert {"dir": stat.S_ISDIR, "file": stat.S_ISREG, "symlink": stat.S_ISLNK}[kind](st.st_mode), rel
        if mode is not None:
            assert stat.S_IMODE(st.st_mode) == mode, rel
        got = os.getxattr(path, OVERRIDE).decode() if value is not None else None
        assert got == value, rel
    assert os.path.getsize(os.path.join(layer, "dev/null")) == 0
    # and the mount (read-only, of the layer alone) shows the image as it was made
    mnt = rootless.home_in(shared_tmp, "ro")
    try:
        r = rootless.cowfs("mount", "-o", f"lowerdir={layer}", mnt)
        assert r.returncode == 0, r.stderr
        assert shown(rootless, mnt, list(ROOTLESS_SHOWN)) == ROOTLESS_SHOWN
    finally:
        user_unmount(rootless, mnt)


def tar_entries(path):
    """{name: (type, uid, gid, mode, devmajor, devminor, data)} of a layer tar; no entry carries the record."""
    found = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            assert not any(OVERRIDE in key for key in m.pax_headers), m.name
            data = tf.extractfile(m).read() if m.isfile() else None
            found[m.name] = (m.type, m.uid, m.gid, m.mode, m.devmajor, m.devminor, data)
    return found


@pytest.mark.fuse
def test_rootless_round_trip_is_exact(shared_tmp, rootless):
    """import (as the user) -> cowfs mount IMAGE -> the image's owners, modes and devices show -> a change ->
    cowfs commit: the tar carries the real owners -> imported again, the same shows."""
    base = rootless.home_in(shared_tmp)
    store = rootless_import(rootless, base)
    m1, m2 = rootless.home_in(base, "m1"), rootless.home_in(base, "m2")
    out = os.path.join(base, "commit.tar")
    try:
        r = rootless.cowfs("mount", "--store", store, "acme/rootless:1", m1)
        assert r.returncode == 0, r.stderr
        assert shown(rootless, m1, list(ROOTLESS_SHOWN)) == ROOTLESS_SHOWN
        # the container's upper is marked as its image is: the merged root, which is the upper's, is root's
        upper = os.path.join(store, "containers", r.stdout.strip(), "upper")
        assert os.getxattr(upper, OVERRIDE) == b"0:0:0755:dir"
        assert shown(rootless, m1, ["."]) == {".": (0, 0, stat.S_IFDIR | 0o755, 0)}
        lines = rootless.run(["ls", "-ln", os.path.join(m1, "dev"), os.path.join(m1, "bin")]).stdout.splitlines()
        assert any(line.startswith("crw-rw-rw- 1 0 0 1, 3 ") and line.endswith(" null") for line in lines), lines
        assert any(line.startswith("brw-rw---- 1 0 6 8, 0 ") and line.endswith(" sda") for line in lines), lines
        assert any(line.startswith("-rwsr-xr-x 1 0 0 ") and line.endswith(" su") for line in lines), lines
        # a change as the user may make it: a file open to everyone, and a new file in the sticky /tmp
        r = rootless.run([rootless.python, "-c", "import sys\nopen(sys.argv[1], 'a').write('changed\\n')\n"
                          "open(sys.argv[2], 'w').write('new\\n')", os.path.join(m1, "etc/shared"),
                          os.path.join(m1, "tmp/new")])
        assert r.returncode == 0, r.stderr
        r = rootless.cowfs("commit", m1, "-o", out, "--tag", "acme/rootless:2", "--store", store)
        assert r.returncode == 0, r.stderr
        diff_id = r.stdout.splitlines()[0]
        assert diff_id == sha(open(out, "rb").read())
        assert rootless.cowfs("umount", m1).returncode == 0
        entries = tar_entries(out)
        assert entries == {
            "etc": (tarfile.DIRTYPE, 0, 0, 0o755, 0, 0, None),
            "etc/shared": (tarfile.REGTYPE, 0, 0, 0o666, 0, 0, b"for everyone\nchanged\n"),
            "tmp": (tarfile.DIRTYPE, 0, 0, 0o1777, 0, 0, None),
            "tmp/new": (tarfile.REGTYPE, rootless.uid, rootless.gid, 0o644, 0, 0, b"new\n"),  # the caller's
        }
        # the committed layer, imported again (by --tag, as the user), shows the same
        s = Store(store, create=False)
        assert s.image_layers(s.resolve("acme/rootless:2")) == [sha(ROOTLESS_LAYER), diff_id]
        top = s.layer_path(diff_id)
        assert os.getxattr(os.path.join(top, "etc/shared"), OVERRIDE) == b"0:0:0666:file"
        r = rootless.cowfs("mount", "--store", store, "acme/rootless:2", m2)
        assert r.returncode == 0, r.stderr
        again = shown(rootless, m2, list(ROOTLESS_SHOWN) + ["etc/shared", "tmp/new"])
        assert {rel: again[rel] for rel in ROOTLESS_SHOWN} == ROOTLESS_SHOWN
        assert again["etc/shared"] == (0, 0, stat.S_IFREG | 0o666, 0)
        assert again["tmp/new"][:3] == (rootless.uid, rootless.gid, stat.S_IFREG | 0o644)
        content = rootless.run(["cat", os.path.join(m2, "etc/shared")]).stdout
        assert content == "for everyone\nchanged\n"
    finally:
        user_unmount(rootless, m1, m2)
    # and as a bare layer tarball, into a fresh store: the same diff ID
    fresh = rootless.home_in(base, "fresh")
    r = rootless.cowfs("import", "-q", "--store", os.path.join(fresh, "store"), out)
    assert r.returncode == 0, r.stderr
    assert Store(os.path.join(fresh, "store"), create=False).layer_ids() == [diff_id]


@pytest.mark.fuse
def test_rootless_commit_of_an_unchanged_file_is_roots(shared_tmp, rootless):
    """A file copied up and left as it was commits to the same layer, byte for byte, whether the image
    was imported and mounted by root (real owners on disk) or by the user (recorded owners)."""
    root_base = os.path.join(shared_tmp, "root")
    os.mkdir(root_base)
    tar = os.path.join(root_base, "layer.tar")
    with open(tar, "wb") as f:
        f.write(ROOTLESS_LAYER)
    root_store = os.path.join(root_base, "store")
    assert cli(root_store, "import", tar, "-q", "--name", "acme/rootless:1")[0] == 0
    root_mnt = os.path.join(root_base, "m")
    os.mkdir(root_mnt)
    user_base = rootless.home_in(shared_tmp)
    user_store = rootless_import(rootless, user_base)
    user_mnt = rootless.home_in(user_base, "m")
    root_out, user_out = os.path.join(root_base, "c.tar"), os.path.join(user_base, "c.tar")
    try:
        r = run_cowfs("mount", "--store", root_store, "acme/rootless:1", root_mnt)
        assert r.returncode == 0, r.stderr
        open(os.path.join(root_mnt, "etc/shared"), "ab").close()  # open for writing: copied up, unchanged
        r = run_cowfs("commit", root_mnt, "-o", root_out)
        assert r.returncode == 0, r.stderr
        r = rootless.cowfs("mount", "--store", user_store, "acme/rootless:1", user_mnt)
        assert r.returncode == 0, r.stderr
        r = rootless.run([rootless.python, "-c", "import sys; open(sys.argv[1], 'ab').close()",
                          os.path.join(user_mnt, "etc/shared")])
        assert r.returncode == 0, r.stderr
        r = rootless.cowfs("commit", user_mnt, "-o", user_out)
        assert r.returncode == 0, r.stderr
    finally:
        unmount_all(root_mnt)
        user_unmount(rootless, user_mnt)
    assert tar_entries(user_out)["etc/shared"] == (tarfile.REGTYPE, 0, 0, 0o666, 0, 0, b"for everyone\n")
    with open(root_out, "rb") as f, open(user_out, "rb") as g:
        assert sha(g.read()) == sha(f.read())


SNAPSHOT_AS_USER = """
from cowfs.testing.tree import snapshot
print(json.dumps(snapshot(sys.argv[1])))
"""


@pytest.mark.fuse
def test_rootless_mount_of_an_image_shows_what_a_root_mount_shows(shared_tmp, rootless):
    """The same image imported and mounted by root and by the user: the user sees the same tree through
    both mounts (names, types, modes, owners, sizes, content, device numbers, hard links), the one
    exception being a symlink's owner, which no user.* xattr can hold on a symlink."""
    root_base = os.path.join(shared_tmp, "root-vs-user")
    os.mkdir(root_base)
    os.chmod(root_base, 0o755)
    tar = os.path.join(root_base, "layer.tar")
    with open(tar, "wb") as f:
        f.write(ROOTLESS_LAYER)
    root_store = os.path.join(root_base, "store")
    assert cli(root_store, "import", tar, "-q", "--name", "acme/rootless:1")[0] == 0
    root_mnt = os.path.join(root_base, "m")
    os.mkdir(root_mnt)
    user_base = rootless.home_in(root_base)
    user_store = rootless_import(rootless, user_base)
    user_mnt = rootless.home_in(user_base, "m")
    try:
        r = run_cowfs("mount", "--store", root_store, "acme/rootless:1", root_mnt)  # allow_other: root's
        assert r.returncode == 0, r.stderr
        r = rootless.cowfs("mount", "--store", user_store, "acme/rootless:1", user_mnt)
        assert r.returncode == 0, r.stderr
        as_root_mounted = rootless.python_json(SNAPSHOT_AS_USER, root_mnt)
        as_user_mounted = rootless.python_json(SNAPSHOT_AS_USER, user_mnt)
    finally:
        unmount_all(root_mnt)
        user_unmount(rootless, user_mnt)
    entries = as_root_mounted["entries"]
    assert entries["dev/null"]["type"] == "chardev" and entries["dev/null"]["rdev"] == [1, 3]
    assert entries["etc/shadow"]["sha256"].startswith("<read error")  # 0640 root:42, to the user too
    symlinks = [rel for rel, e in entries.items() if e.get("type") == "symlink"]
    assert symlinks == ["usr/sbin"]
    for rel in symlinks:  # the known exception, checked exactly
        assert (entries[rel]["uid"], as_user_mounted["entries"][rel]["uid"]) == (0, rootless.uid)
        for snap in (as_root_mounted, as_user_mounted):
            snap["entries"][rel].pop("uid"), snap["entries"][rel].pop("gid")
    assert as_user_mounted == as_root_mounted, diff_snapshots(as_root_mounted, as_user_mounted, "root", "user")

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
from cowfs.formatting import docker_size
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


def image_config(layers, history=None, created="2024-01-01T00:00:00Z"):
    diff_ids = [sha(layer) for layer in layers]
    history = history or [history_entry(f"step {i}") for i in range(len(layers))]
    config = {"architecture": "amd64", "os": "linux", "created": created,
              "config": {"Cmd": ["/bin/sh"]}, "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "history": history}
    if created is None:
        del config["created"]
    return json.dumps(config, sort_keys=True).encode()


def docker_save(path, images, compress=False, diff_ids=None, mangle=None, created=None):
    """Write a `docker save` archive: images is [(repo_tags, [layer tar bytes], history or None)];
    `created`, when given, is the config's created time of each image (None: no created field)."""
    manifest = []
    with tarfile.open(path, "w") as tf:
        written = set()
        for i, (tags, layers, history) in enumerate(images):
            config = image_config(layers, history) if created is None else image_config(layers, history, created[i])
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


def test_images_are_listed_newest_first(tmp_path, store):
    """As `docker images`: by Created, newest first (Docker sorts whole seconds and leaves ties in no
    set order: here the exact time, then the image ID); an image without a created time is last; the
    rows of an image's tags stay together. --json and -q list in the same order."""
    layers = [layer_tar(member(f"f{i}", data=b"%d" % i)) for i in range(5)]
    created = ["2024-03-01T00:00:00Z", "2021-06-01T12:00:00.5+02:00", None, "2024-03-01T00:00:00Z",
               "2021-06-01T10:00:00.25Z"]
    tags = [["acme/a:1"], ["acme/b:1", "acme/b:latest"], ["acme/c:1"], ["acme/d:1"], ["acme/e:1"]]
    path = docker_save(tmp_path / "five.tar", [(tags[i], [layers[i]], None) for i in range(5)], created=created)
    rc, _, err = cli(store, "import", str(path))
    assert rc == 0, err
    s = Store(store)
    ids = [s.resolve(t[0]) for t in tags]
    tied = sorted([ids[0], ids[3]])  # the same time: by image ID
    expected_ids = tied + [ids[1], ids[4], ids[2]]  # 10:00:00.5Z is after 10:00:00.25Z; no created time last
    assert expected_ids != sorted(ids)  # what the order was before: it must tell the two apart
    rc, out, _ = cli(store, "images", "--json")
    rows = json.loads(out)
    assert [r["ID"] for r in rows] == [i for i in expected_ids for _ in range(2 if i == ids[1] else 1)]
    assert [f"{r['Repository']}:{r['Tag']}" for r in rows if r["ID"] == ids[1]] == ["acme/b:1", "acme/b:latest"]
    rc, out, _ = cli(store, "images", "-q", "--no-trunc")
    assert out.split() == [r["ID"] for r in rows]
    rc, out, _ = cli(store, "images")
    table_ids = [line.split()[2] for line in out.splitlines()[1:-1]]
    assert list(dict.fromkeys(table_ids)) == [i[7:19] for i in expected_ids]


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


# security.capability of `setcap cap_net_raw+ep` (a VFS_CAP_REVISION_2 struct), as tar --xattrs stores it
CAP_NET_RAW_EP = bytes.fromhex("0100000200200000000000000000000000000000")


@pytest.mark.skipif(os.geteuid() != 0, reason="owners and security.* xattrs are made only by root")
def test_import_keeps_file_capabilities_and_set_id_bits(tmp_path, store):
    """chown drops security.capability and the set-id bits: the owner must come before both (as in
    Docker and umoci), or `getcap` finds nothing on an imported ping."""
    cap = {"SCHILY.xattr.security.capability": CAP_NET_RAW_EP.decode("utf-8", "surrogateescape")}

    def owned(m, uid, gid):
        m[0].uid, m[0].gid = uid, gid
        return m

    path = tmp_path / "caps.tar"
    path.write_bytes(layer_tar(member("bin", "dir"), member("bin/ping", data=b"\x7fELF", mode=0o755, pax=cap),
                               member("bin/su", data=b"\x7fELF", mode=0o4755, pax=cap),
                               owned(member("bin/wall", data=b"\x7fELF", mode=0o2755), 1000, 5),
                               owned(member("bin/mine", data=b"\x7fELF", mode=0o6750, pax=cap), 1000, 1000)))
    rc, _, err = cli(store, "import", str(path), "--name", "t:1")
    assert rc == 0, err
    s = Store(store)
    diff = s.layer_path(s.image_layers(s.resolve("t:1"))[0])
    for name, mode, owner, has_cap in [("ping", 0o755, (0, 0), True), ("su", 0o4755, (0, 0), True),
                                       ("wall", 0o2755, (1000, 5), False), ("mine", 0o6750, (1000, 1000), True)]:
        st = os.lstat(os.path.join(diff, "bin", name))
        assert (stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)) == (mode, owner), name
        names = os.listxattr(os.path.join(diff, "bin", name))
        assert ("security.capability" in names) == has_cap, name
        if has_cap:
            assert os.getxattr(os.path.join(diff, "bin", name), "security.capability") == CAP_NET_RAW_EP, name
    if shutil.which("getcap"):
        shown = subprocess.run(["getcap", os.path.join(diff, "bin", "ping")], capture_output=True, text=True).stdout
        assert "cap_net_raw" in shown


def test_import_quiet_prints_only_the_loaded_lines(tmp_path, store, monkeypatch):
    """As `docker load -q`: "Loaded image: NAME" (or "Loaded image ID: sha256:..." for an image without a
    name) and nothing else, neither the per-layer lines on stdout nor progress lines on stderr."""
    from cowfs.images import archive
    monkeypatch.setattr(archive.Progress, "INTERVAL", 0.0)
    both = docker_save(tmp_path / "both.tar", [(["acme/my-base-image:1.0"], BASE_LAYERS, None),
                                               (["acme/my-final-image:1.0"], BASE_LAYERS + APP_LAYERS, None)])
    rc, out, err = cli(store, "import", "-q", str(both))
    assert rc == 0, err
    assert (out, err) == ("Loaded image: acme/my-base-image:1.0\nLoaded image: acme/my-final-image:1.0\n", "")
    rc, out, err = cli(store, "import", "-q", str(both))  # again: every layer already stored
    assert (rc, out, err) == (0, "Loaded image: acme/my-base-image:1.0\nLoaded image: acme/my-final-image:1.0\n",
                              "")
    bare = tmp_path / "rootfs.tar"
    bare.write_bytes(layer_tar(member("quiet", data=b"q")))
    rc, out, err = cli(store, "import", "--quiet", str(bare))
    s = Store(store)
    (image_id,) = [i for i in s.image_ids() if not s.tags_of(i)]
    assert (rc, out, err) == (0, f"Loaded image ID: {image_id}\n", "")
    rc, out, _ = cli(store, "import", str(bare), "--name", "acme/loud:1")  # without -q: a line per layer
    assert out.splitlines() == [f"{sha(bare.read_bytes())[7:19]}: already stored", "Loaded image: acme/loud:1"]


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


def test_commit_of_a_metacopy_upper_takes_the_data_from_below(tmp_path, store):
    """A metadata-only copy (metacopy=on: a chown copies up the inode, not the data) is committed with the
    lower file's data; without the lowers, commit refuses rather than write an empty file."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "conf").write_bytes(b"the data, kept below\n")
    (upper / "etc").mkdir(parents=True)
    meta = upper / "etc" / "conf"
    with open(meta, "wb") as f:
        f.truncate(len(b"the data, kept below\n"))  # as the kernel makes it: the size, no data
    os.chown(meta, 1000, 1000)
    os.setxattr(meta, "trusted.overlay.metacopy", b"")
    out = tmp_path / "layer.tar"
    rc, _, err = cli(store, "commit", "--upper-dir", str(upper), "--lower", str(lower), "-o", str(out))
    assert rc == 0, err
    with tarfile.open(out) as tf:
        member = tf.getmember("etc/conf")
        assert (member.uid, tf.extractfile(member).read()) == (1000, b"the data, kept below\n")
    rc, _, err = cli(store, "commit", "--upper-dir", str(upper), "-o", str(tmp_path / "no.tar"))
    assert rc == 1 and "metadata-only copy" in err and not (tmp_path / "no.tar").exists(), err


def test_commit_converts_markers_and_is_reproducible(tmp_path, store):
    upper = tmp_path / "upper"
    make_upper(upper)
    out1, out2 = tmp_path / "1.tar", tmp_path / "2.tar"
    rc, stdout, err = cli(store, "commit", "--upper-dir", str(upper), "-o", str(out1))
    assert rc == 0, err
    assert cli(store, "commit", "--upper-dir", str(upper), "-o", str(out2))[0] == 0
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


def test_commit_writes_markers_with_dockers_modes(tmp_path):
    """Docker's overlay2 writes a whiteout as a regular file of mode 0600 (whatever the char device's mode),
    an opaque marker with its directory's mode (tests/test_docker.py compares with Docker itself)."""
    upper = tmp_path / "upper"
    make_upper(upper)
    os.chmod(upper / "old", 0o750)
    buf = io.BytesIO()
    write_layer(str(upper), buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        modes = {m.name: (m.type, m.mode, m.size) for m in tf.getmembers() if ".wh." in m.name}
    assert modes == {"etc/.wh.gone": (tarfile.REGTYPE, 0o600, 0), "old/.wh..wh..opq": (tarfile.REGTYPE, 0o750, 0)}


def test_diff_leaves_out_copies_that_show_as_before(tmp_path):
    """As docker diff (a walk of both views): a non-directory copied up is a change only when it shows
    otherwise than before (type, mode, owner, size, mtime, capability); a hard link made to a lower file
    copies it up unchanged, and only the new name is listed (tests/test_docker.py checks with Docker)."""
    lower, upper = tmp_path / "l", tmp_path / "u"
    lower.mkdir()
    upper.mkdir()
    for name in ("linked", "same", "touched", "longer", "chmod"):
        (lower / name).write_bytes(b"data\n")
        os.utime(lower / name, (MTIME, MTIME))
        shutil.copy2(lower / name, upper / name)
    os.link(upper / "linked", upper / "new-link")  # ln lower-file new-link: a copy-up, then the link
    os.utime(upper / "touched", (MTIME + 1, MTIME + 1))
    (upper / "longer").write_bytes(b"data and more\n")
    os.utime(upper / "longer", (MTIME, MTIME))
    os.chmod(upper / "chmod", 0o600)
    os.utime(upper / "same", ns=(MTIME * 10**9 + 5, MTIME * 10**9 + 5))  # nanoseconds against a tar's none: same
    out = run_cowfs("diff", upper, "--lower", lower).stdout
    assert out == "C /chmod\nC /longer\nA /new-link\nC /touched\n"


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
    rc, out, err = cli(store, "commit", "--upper-dir", str(upper), "--from", "acme/base:1", "--tag", "acme/next:1",
                       "-m", "hi")
    assert rc == 0, err
    diff_id = out.splitlines()[0]
    s = Store(store)
    assert s.image_layers(s.resolve("acme/next:1")) == [sha(layer) for layer in BASE_LAYERS] + [diff_id]
    rc, out, _ = cli(store, "history", "--no-trunc", "acme/next:1")
    rows = out.splitlines()
    base_id, next_id = s.resolve("acme/base:1"), s.resolve("acme/next:1")
    # as docker commit: the parent is recorded, and the row says the image's Cmd (a container's command)
    assert rows[1].startswith(next_id) and "/bin/sh" in rows[1] and "hi" in rows[1], out
    assert rows[2].startswith(base_id), out
    assert json.loads(cli(store, "inspect", "acme/next:1")[1])[0]["Parent"] == base_id
    assert json.loads(cli(store, "inspect", "acme/base:1")[1])[0]["Parent"] == ""
    rc, out, _ = cli(store, "commit", "--upper-dir", str(upper), "--from", "acme/base:1", "--tag", "acme/by:1",
                     "--created-by", "make it")
    assert "make it" in cli(store, "history", "acme/by:1")[1].splitlines()[1]
    # the same with --lower paths of the store, found back to the parent image
    lowers = cli(store, "inspect", "--format", "lowerdir", "acme/base:1")[1].strip()
    rc, out, err = cli(store, "commit", "--upper-dir", str(upper), "--lower", lowers, "--tag", "acme/next:2")
    assert rc == 0, err
    assert out.splitlines()[0] == diff_id
    assert s.image_layers(s.resolve("acme/next:2")) == s.image_layers(s.resolve("acme/next:1"))
    rc, _, err = cli(store, "commit", "--upper-dir", str(upper), "--lower", str(tmp_path), "--tag", "acme/x:1")
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



IMAGE_MOUNT_REFUSALS = {
    # case: (mount point, extra arguments, what the one line says)
    "missing mount point": (lambda base, store: os.path.join(base, "nowhere"), [], "No such directory"),
    "file as mount point": (lambda base, store: _made_file(base), [], "No such directory"),
    "busy mount point": (lambda base, store: "/proc", [], "busy"),
    "mount point over the store": (lambda base, store: store, [], "inside the mount point"),
    "bad option": (lambda base, store: _made_dir(base), ["-o", "metacopy=maybe"], "metacopy"),
    "trace in a missing directory": (lambda base, store: _made_dir(base),
                                     ["-o", "trace=" + "/nonexistent/dir/trace.log"], "trace"),
}


def _made_file(base):
    path = os.path.join(base, "a-file")
    with open(path, "w") as f:
        f.write("x")
    return path


def _made_dir(base):
    path = os.path.join(base, "m")
    os.makedirs(path, exist_ok=True)
    return path


@pytest.mark.parametrize("case", sorted(IMAGE_MOUNT_REFUSALS))
def test_refused_image_mount_is_one_line_and_leaves_no_container(shared_tmp, case):
    """`cowfs mount IMAGE MNT` makes a container before it mounts: a refusal at any step takes it back."""
    store = app_store(shared_tmp)
    make_mountpoint, extra, said = IMAGE_MOUNT_REFUSALS[case]
    mountpoint = make_mountpoint(shared_tmp, store)
    # STORE/containers stays once made (removing it could race with another mount's new container)
    os.makedirs(os.path.join(store, "containers"), exist_ok=True)
    before = store_state(store)
    before["entries"]["containers"].pop("mtime_ns")
    r = run_cowfs("mount", "acme/app:1", mountpoint, "--store", store, *extra)
    assert r.returncode == 1, r
    assert r.stdout == "" and r.stderr.count("\n") == 1 and said in r.stderr, r.stderr
    assert containers_of(store) == []
    after = store_state(store)
    after["entries"]["containers"].pop("mtime_ns")
    assert after == before, diff_snapshots(before, after, "before", "after")
    assert not is_mounted(os.path.realpath(mountpoint)) or mountpoint == "/proc"


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
        assert "/bin/sh" in history[1] and "from a mount" in history[1] and len(history) == 1 + len(parent) + 1
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


def root_and_user_imports(shared_tmp, name, rootless):
    """ROOTLESS_LAYER imported as acme/rootless:1 by root and by the user, each into a store of its own, with
    an empty mount point each: (root base, store, mount point, user base, store, mount point)."""
    root_base = os.path.join(shared_tmp, name)
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
    return root_base, root_store, root_mnt, user_base, user_store, rootless.home_in(user_base, "m")


@pytest.mark.fuse
def test_rootless_commit_of_an_unchanged_file_is_roots(shared_tmp, rootless):
    """A file copied up and left as it was commits to the same layer, byte for byte, whether the image
    was imported and mounted by root (real owners on disk) or by the user (recorded owners)."""
    root_base, root_store, root_mnt, user_base, user_store, user_mnt = root_and_user_imports(shared_tmp, "root",
                                                                                             rootless)
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
    _, root_store, root_mnt, _, user_store, user_mnt = root_and_user_imports(shared_tmp, "root-vs-user", rootless)
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


# -- a command line people trust: one line, exit statuses, nothing left behind -------------------------
#
# Every case runs the real program (a subprocess), as root and again as the suite's unprivileged user
# with a store of the user's own, and checks the one line on stderr, the exit status, and that nothing
# in the store (or beside it) changed.

import random  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

from cowfs.images import interrupts  # noqa: E402
from cowfs.images.containers import create_container  # noqa: E402
from cowfs.images.reference import BadReference, check_reference, check_tag_reference  # noqa: E402
from cowfs.images.store import layer_content  # noqa: E402


class AsRoot:
    """Runs cowfs as this process's user (root when the suite runs as root)."""

    name = "root"

    def mkdir(self, path):
        os.mkdir(path, 0o755)
        return str(path)

    def give(self, path):
        """Make `path` (a file or directory tree made by the test) this runner's."""

    def argv(self, *argv):
        return COWFS + [str(a) for a in argv]

    def env(self):
        return None

    def run(self, argv, stdin_file=None, pipe_from=None, timeout=120):
        if pipe_from is not None:
            argv = ["sh", "-c", f"cat {shlex.quote(str(pipe_from))} | {shlex.join(argv)}"]
        with open(stdin_file or os.devnull, "rb") as stdin:
            return subprocess.run(argv, stdin=stdin, capture_output=True, text=True, timeout=timeout, env=self.env())

    def cowfs(self, *argv, **kwargs):
        return self.run(self.argv(*argv), **kwargs)

    def popen(self, *argv):
        return subprocess.Popen(self.argv(*argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env())


class AsUser(AsRoot):
    """Runs cowfs as the suite's unprivileged user (cowfs.testing.unprivileged), really without privileges."""

    name = "user"

    def __init__(self, user):
        self.user = user

    def mkdir(self, path):
        os.mkdir(path, 0o755)
        os.chown(path, self.user.uid, self.user.gid)
        return str(path)

    def give(self, path):
        for dirpath, dirnames, filenames in os.walk(path):
            for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
                os.lchown(name, self.user.uid, self.user.gid)

    def argv(self, *argv):
        return unprivileged.cowfs_argv(*argv)

    def env(self):
        return unprivileged.user_env()

    def run(self, argv, stdin_file=None, pipe_from=None, timeout=120):
        if stdin_file is not None:
            argv = ["sh", "-c", f"exec {shlex.join(argv)} < {shlex.quote(str(stdin_file))}"]
        elif pipe_from is not None:
            argv = ["sh", "-c", f"cat {shlex.quote(str(pipe_from))} | {shlex.join(argv)}"]
        return unprivileged.run_as_user(argv, timeout=timeout, cwd="/")

    def popen(self, *argv):
        return subprocess.Popen(unprivileged.drop_privileges_argv(self.argv(*argv)), cwd="/",
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env())


@pytest.fixture(params=["root", "user"])
def who(request):
    if request.param == "user":
        if not unprivileged.can_switch_users():
            pytest.skip("the user-facing cases run again as another user: run the tests as root")
        return AsUser(unprivileged.require("user", "setpriv", "python"))
    return AsRoot()


def tree_state(root):
    """The whole tree under `root`, times included, the store's staging directory's own mtime aside."""
    state = snapshot(root, all_xattrs=True, exact_times=True)
    for rel, entry in state["entries"].items():
        if rel == "tmp" or rel.endswith("/tmp"):
            entry.pop("mtime_ns", None)
    return state


def store_listing(store):
    """{path: (type, size, sha256 of a JSON file)} of a store: what an interrupted import must leave as it was
    (or as a completed one leaves it). A layer.json is compared without its `created` time."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(store):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, store)
            st = os.lstat(path)
            digest = None
            if stat.S_ISREG(st.st_mode) and name.endswith(".json"):
                with open(path, "rb") as f:
                    data = f.read()
                if name == "layer.json":
                    data = json.dumps({k: v for k, v in json.loads(data).items() if k != "created"}).encode()
                digest = hashlib.sha256(data).hexdigest()
            size = st.st_size if stat.S_ISREG(st.st_mode) and digest is None else None
            found[rel] = (stat.S_IFMT(st.st_mode), size, digest)
    return found


class Ctx:
    """A copy of a store holding acme/base:1 and acme/app:1, with its archives, in `base`."""

    def __init__(self, base, who):
        self.base, self.who = base, who
        self.store = os.path.join(base, "store")
        s = Store(self.store, create=False, heal=False)
        self.base_id, self.app_id = s.resolve("acme/base:1"), s.resolve("acme/app:1")
        self.top = sha(APP_LAYERS[1])  # a layer only acme/app:1 has
        self.fields = {"store": self.store, "base": base, "app12": self.app_id[7:19], "app_hex": self.app_id[7:],
                       "top12": self.top[7:19]}

    def path(self, *parts):
        return os.path.join(self.store, *parts)

    def write(self, rel, data):
        with open(self.path(rel), "wb") as f:  # in place: the file keeps its owner
            f.write(data)

    def edit_json(self, rel, change):
        with open(self.path(rel)) as f:
            value = json.load(f)
        change(value)
        self.write(rel, json.dumps(value).encode())

    def file(self, name, data):
        path = os.path.join(self.base, name)
        with open(path, "wb") as f:
            f.write(data)
        self.who.give(path)
        return path


_templates = {}


@pytest.fixture(scope="module")
def template_dir():
    path = tempfile.mkdtemp(prefix="cowfs-test-templates-")
    os.chmod(path, 0o755)
    yield path
    _templates.clear()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ctx(who, template_dir, shared_tmp):
    """A fresh copy (cp -a) of a store that `who` made by importing acme/base:1 and acme/app:1."""
    if who.name not in _templates:
        base = who.mkdir(os.path.join(template_dir, who.name))
        for name, tag, layers in (("base.tar", "acme/base:1", BASE_LAYERS),
                                  ("app.tar", "acme/app:1", BASE_LAYERS + APP_LAYERS)):
            docker_save(os.path.join(base, name), [([tag], layers, None)])
            who.give(os.path.join(base, name))
            r = who.cowfs("import", "-q", "--store", os.path.join(base, "store"), os.path.join(base, name))
            assert r.returncode == 0, r.stderr
        _templates[who.name] = base
    base = os.path.join(shared_tmp, who.name)
    subprocess.run(["cp", "-a", _templates[who.name], base], check=True)
    return Ctx(base, who)


def _damage_layer_json(c):
    c.edit_json(os.path.join("layers", c.top[7:], "layer.json"), lambda v: v.pop("size"))


def _truncate_config(c):
    rel = os.path.join("images", c.app_id[7:] + ".json")
    with open(c.path(rel), "rb") as f:
        data = f.read()
    c.write(rel, data[:len(data) // 2])


def _dangling_symlink_dir(c):
    d = os.path.join(c.base, "conf")
    os.makedirs(os.path.join(d, "modules-load.d"))
    os.symlink("/nonexistent/modules", os.path.join(d, "modules-load.d", "modules.conf"))
    with open(os.path.join(d, "hosts"), "w") as f:
        f.write("127.0.0.1 localhost\n")
    c.who.give(d)


def _upper(c):
    up = os.path.join(c.base, "up")
    os.makedirs(os.path.join(up, "etc"))
    with open(os.path.join(up, "etc", "motd"), "w") as f:
        f.write("hi\n")
    c.who.give(up)


# name: (prepare(ctx) or None, argv (--store STORE is added after the command), stdin, exit status, the line)
MESSAGES = {
    "repositories-not-json": (lambda c: c.write("repositories.json", b"{\n"), ["images"], None, 1,
                              "cowfs images: store {store}: repositories.json: not valid JSON (run cowfs system "
                              "check)"),
    "repositories-not-a-map": (lambda c: c.write("repositories.json", b"[]\n"), ["images"], None, 1,
                               "cowfs images: store {store}: repositories.json: not a map of NAME:TAG to image IDs "
                               "(run cowfs system check)"),
    "store-json-without-its-key": (lambda c: c.write("store.json", b"{}"), ["images"], None, 1,
                                   "cowfs images: store {store}: store.json: no xattr_prefix (run cowfs system "
                                   "check)"),
    "layer-directory-missing": (lambda c: shutil.rmtree(c.path("layers", c.top[7:])), ["images"], None, 1,
                                "cowfs images: store {store}: layer {top12}: missing, and image {app12} uses it "
                                "(run cowfs system check)"),
    "layer-json-without-size": (_damage_layer_json, ["history", "acme/app:1"], None, 1,
                                "cowfs history: store {store}: layer {top12}: layer.json has no size (run cowfs "
                                "system check)"),
    "config-truncated": (_truncate_config, ["images"], None, 1,
                         "cowfs images: store {store}: images/{app_hex}.json: truncated or changed (its sha256 is "
                         "not the image ID) (run cowfs system check)"),
    "tag-of-a-missing-image": (lambda c: c.edit_json("repositories.json", lambda v: v.update(
        {"acme/gone:1": "sha256:" + "0" * 64})), ["history", "acme/gone:1"], None, 1,
        "cowfs history: store {store}: repositories.json: acme/gone:1 names image 000000000000, which is not "
        "stored (run cowfs system check)"),
    "layer-diff-missing": (lambda c: shutil.rmtree(c.path("layers", c.top[7:], "diff")),
                           ["inspect", "--format", "lowerdir", "acme/app:1"], None, 1,
                           "cowfs inspect: store {store}: layer {top12}: its diff/ directory is missing, and image "
                           "{app12} uses it (run cowfs system check)"),
    "import-etc": (None, ["import", "/etc"], None, 1,
                   "cowfs import: /etc: a directory, but neither an OCI image layout (oci-layout, index.json) nor "
                   "an unpacked docker save archive (manifest.json)"),
    "import-a-directory-with-a-dangling-symlink": (
        _dangling_symlink_dir, ["import", "{base}/conf"], None, 1,
        "cowfs import: {base}/conf: a directory, but neither an OCI image layout (oci-layout, index.json) nor an "
        "unpacked docker save archive (manifest.json)"),
    "import-missing-file": (None, ["import", "{base}/nothere.tar"], None, 1,
                            "cowfs import: {base}/nothere.tar: No such file or directory"),
    "import-stdin-empty": (None, ["import", "-"], ("file", os.devnull), 1,
                           "cowfs import: stdin: empty: no archive was read"),
    "import-stdin-not-an-archive": (lambda c: c.file("notes.txt", b"hello\n"), ["import", "-"],
                                    ("pipe", "{base}/notes.txt"), 1,
                                    "cowfs import: stdin: not a tar archive, an OCI image layout or a docker save "
                                    "archive"),
    "import-bad-name": (None, ["import", "{base}/app.tar", "--name", "Bad Name!"], None, 1,
                        "cowfs import: invalid reference 'Bad Name!': name component 'Bad Name!' may only hold "
                        "lowercase letters and digits, separated by '.', '_', '__' or '-'"),
    "import-name-with-a-digest": (None, ["import", "{base}/app.tar", "--name", "acme/app@sha256:" + "a" * 64], None,
                                  1, "cowfs import: invalid reference 'acme/app@sha256:" + "a" * 64 + "': a digest "
                                  "cannot name an image (give NAME[:TAG])"),
    "import-archive-with-a-bad-tag": (
        lambda c: c.who.give(docker_save(os.path.join(c.base, "badtag.tar"), [(["acme/App:1"], APP_LAYERS, None)])),
        ["import", "{base}/badtag.tar"], None, 1,
        "cowfs import: {base}/badtag.tar: member 'manifest.json': invalid reference 'acme/App:1': name component "
        "'App' must be lowercase"),
    "commit-etc": (None, ["commit", "/etc", "-o", "{base}/etc.tar"], None, 1,
                   "cowfs commit: /etc: neither a cowfs mount nor a container's upper directory; to commit it "
                   "anyway as an overlay upper directory: cowfs commit --upper-dir /etc"),
    "commit-without-a-directory": (None, ["commit", "-o", "{base}/x.tar"], None, 2,
                                   "cowfs commit: give the MOUNTPOINT (or container upper directory) to commit, or "
                                   "--upper-dir DIR (see 'cowfs commit --help')"),
    "commit-writes-nothing": (_upper, ["commit", "--upper-dir", "{base}/up"], None, 0,
                              "cowfs commit: nothing written (only the diff ID above): give -o FILE or --tag "
                              "NAME:TAG to keep the layer"),
    "commit-bad-tag": (_upper, ["commit", "--upper-dir", "{base}/up", "--from", "acme/base:1", "--tag",
                                "acme/App:2"], None, 1,
                       "cowfs commit: invalid reference 'acme/App:2': name component 'App' must be lowercase"),
    "system-without-subcommand": (None, ["system"], None, 2, None),
}


@pytest.mark.parametrize("case", sorted(MESSAGES))
def test_each_refusal_is_one_line_and_changes_nothing(ctx, case):
    prepare, argv, stdin, status, line = MESSAGES[case]
    if prepare is not None:
        prepare(ctx)
    before = tree_state(ctx.base)
    argv = [a.format(**ctx.fields) for a in argv]
    argv = argv[:1] + ["--store", ctx.store] + argv[1:] if argv != ["system"] else argv + ["--store", ctx.store]
    kind, source = stdin if stdin else (None, None)
    source = source.format(**ctx.fields) if source else None
    r = ctx.who.run(ctx.who.argv(*argv), stdin_file=source if kind == "file" else None,
                    pipe_from=source if kind == "pipe" else None)
    assert r.returncode == status, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    if line is not None:
        assert r.stderr == line.format(**ctx.fields) + "\n"
    if status != 0:
        assert r.stdout == ""
    assert diff_snapshots(before, tree_state(ctx.base)) == ""


def test_commit_without_output_prints_the_diff_id(ctx):
    _upper(ctx)
    r = ctx.who.cowfs("commit", "--upper-dir", os.path.join(ctx.base, "up"), "-o", os.path.join(ctx.base, "u.tar"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r2 = ctx.who.cowfs("commit", "--upper-dir", os.path.join(ctx.base, "up"))
    assert r2.returncode == 0 and r2.stdout == r.stdout and r2.stderr.startswith("cowfs commit: nothing written")


def test_commit_of_a_container_upper_needs_no_flag(tmp_path, store):
    assert cli(store, "import", str(docker_save(tmp_path / "a.tar", [(["acme/a:1"], BASE_LAYERS, None)])))[0] == 0
    s = Store(store)
    record = create_container(s, s.resolve("acme/a:1"), "acme/a:1", str(tmp_path))
    with open(os.path.join(record["upper"], "new"), "w") as f:
        f.write("new\n")
    rc, out, err = cli(store, "commit", record["upper"], "--tag", "acme/a:2")
    assert rc == 0, err
    assert s.image_layers(s.resolve("acme/a:2"))[:-1] == s.image_layers(s.resolve("acme/a:1"))
    rc, _, err = cli(store, "commit", record["upper"], "--upper-dir", record["upper"])
    assert rc == 2 and err == "cowfs commit: give MOUNTPOINT or --upper-dir DIR, not both (see 'cowfs commit --help')\n"


def test_system_commands_on_a_store_of_ones_own(ctx):
    """df, check, check --repair and prune, run by the store's owner (root, and the unprivileged user on a
    store of its own): a killed import's leftover and a tag of a missing image, seen, fixed, gone."""
    leftover = ctx.who.mkdir(ctx.path("tmp", "txn-1-killed"))
    with open(os.path.join(leftover, "data"), "wb") as f:
        f.write(b"x" * 2000)
    ctx.who.give(leftover)
    ctx.edit_json("repositories.json", lambda v: v.update({"acme/gone:1": "sha256:" + "0" * 64}))
    r = ctx.who.cowfs("system", "df", "--json", "--store", ctx.store)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[3] == {"Type": "Leftovers", "Total": 1, "Active": 0, "Size": 2000,
                                       "Reclaimable": 2000}
    r = ctx.who.cowfs("system", "check", "--store", ctx.store)
    assert r.returncode == 1 and r.stdout.splitlines() == [
        "tmp/txn-1-killed: left by an interrupted command (2kB) (--repair fixes it)",
        "repositories.json: acme/gone:1 names image 000000000000, which is not stored (--repair fixes it)",
        "2 problems; cowfs system check --repair fixes 2"], r.stdout + r.stderr
    r = ctx.who.cowfs("system", "check", "--repair", "--store", ctx.store)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "2 problems: 2 fixed, 0 not", r.stdout + r.stderr
    r = ctx.who.cowfs("system", "prune", "--store", ctx.store)
    assert r.returncode == 0 and r.stdout == "Total reclaimed space: 0B\n", r.stdout + r.stderr
    r = ctx.who.cowfs("system", "check", "--store", ctx.store)
    assert r.returncode == 0 and r.stdout == "no problems: 2 images, 4 layers, 0 containers checked\n"
    assert os.listdir(ctx.path("tmp")) == []


# -- import from stdin --------------------------------------------------------------------------------------

def test_import_from_stdin_as_docker_load_does(ctx):
    """`-` reads stdin: a pipe (spooled to the store's tmp/, which is empty afterwards), a redirected file,
    and a pipe named by a path (/dev/stdin)."""
    tar = docker_save(os.path.join(ctx.base, "c.tar"), [(["acme/c:1"], APP_LAYERS, None)])
    ctx.who.give(tar)
    for how, argv, stdin in (("pipe", ["import", "-"], ("pipe", tar)), ("file", ["import", "-"], ("file", tar)),
                             ("dev-stdin", ["import", "/dev/stdin"], ("pipe", tar))):
        r = ctx.who.cowfs(*argv, "--store", ctx.store, "--name", f"acme/{how}:1",
                          stdin_file=stdin[1] if stdin[0] == "file" else None,
                          pipe_from=stdin[1] if stdin[0] == "pipe" else None)
        assert r.returncode == 0 and r.stderr == "", (how, r.stderr)
        assert f"Loaded image: acme/{how}:1" in r.stdout
        assert os.listdir(ctx.path("tmp")) == []
    s = Store(ctx.store, create=False, heal=False)
    assert len({s.resolve(f"acme/{how}:1") for how in ("pipe", "file", "dev-stdin")}) == 1


# -- signals: one line, 128+N, the store as it was; SIGKILL healed by the next command ----------------------

KILL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL)
INTERRUPTED = ("cowfs import: interrupted", "cowfs import: interrupted (after the change to the store was made)")


def big_archive(path, megabytes=64):
    """A docker save archive of acme/big:1: the base layers and a layer of incompressible data."""
    files = [member("data", "dir")] + [member(f"data/f{i}", data=os.urandom(4 << 20)) for i in range(megabytes // 4)]
    return docker_save(path, [(["acme/big:1"], BASE_LAYERS + [layer_tar(*files)], None)])


def wait_for_txn(store, proc, timeout=30):
    """Seconds until the import's transaction directory appears in tmp/ (None if the process ended first)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if any(n.startswith("txn-") for n in os.listdir(os.path.join(store, "tmp"))):
            return time.monotonic() - start
        if proc.poll() is not None:
            return None
        time.sleep(0.002)
    raise AssertionError("no transaction appeared")


def test_import_killed_at_any_point_leaves_the_store_as_before_or_as_after(who, shared_tmp):
    """SIGINT, SIGTERM, SIGHUP and SIGKILL at seeded random points of an import of 64 MB: INT/TERM/HUP end it
    with one line and 128+N, and the store is as before at once; after SIGKILL the next command (cowfs images)
    makes it so. A signal that comes after the commit point leaves it as after a completed import."""
    rng = random.Random(13)
    points = 4
    base = who.mkdir(os.path.join(shared_tmp, "kill"))
    started = time.monotonic()
    archive = big_archive(os.path.join(base, "big.tar"))
    small = docker_save(os.path.join(base, "base.tar"), [(["acme/base:1"], BASE_LAYERS, None)])
    who.give(base)
    template = os.path.join(base, "template")
    assert who.cowfs("import", "-q", "--store", template, small).returncode == 0
    before = store_listing(template)
    completed = os.path.join(base, "completed")
    subprocess.run(["cp", "-a", template, completed], check=True)
    proc = who.popen("import", "-q", "--store", completed, archive)
    to_txn = wait_for_txn(completed, proc)
    t0 = time.monotonic()
    assert proc.wait(60) == 0, proc.stderr.read()
    duration = time.monotonic() - t0
    proc.stdout.close()
    proc.stderr.close()
    after = store_listing(completed)
    assert after != before and os.listdir(os.path.join(completed, "tmp")) == []
    outcomes = []
    for signum in KILL_SIGNALS:
        for i in range(points):
            store = os.path.join(base, f"s-{signum}-{i}")
            subprocess.run(["cp", "-a", template, store], check=True)
            proc = who.popen("import", "-q", "--store", store, archive)
            assert wait_for_txn(store, proc) is not None
            time.sleep(rng.uniform(0, duration * 1.1))
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass
            out, err = proc.communicate(timeout=60)
            if proc.returncode == 0:
                outcome = "completed"
                assert err == ""
            elif signum == signal.SIGKILL:
                assert proc.returncode == -signal.SIGKILL
                outcome = "killed"
            elif proc.returncode == -signum:  # after the command, as the interpreter exits: its default action
                assert err == ""
                outcome = "completed"
            else:
                assert proc.returncode == 128 + signum, (signum, proc.returncode, err)
                assert err.count("\n") == 1 and err.rstrip("\n") in INTERRUPTED, err
                outcome = "after" if err.rstrip("\n") == INTERRUPTED[1] else "interrupted"
                # nothing visible changed, before any other command ran
                assert store_listing(store) == (after if outcome == "after" else before), (signum, outcome)
            r = who.cowfs("images", "--store", store)
            assert r.returncode == 0 and r.stderr == "", r.stderr
            state = store_listing(store)
            if outcome in ("completed", "after"):
                assert state == after, (signum, outcome)
            elif outcome == "interrupted":
                assert state == before, signum
            else:
                assert state in (before, after), "a killed import left the store in between"
            outcomes.append((signal.Signals(signum).name, outcome, "after" if state == after else "before"))
            shutil.rmtree(store)
    took = time.monotonic() - started
    print(f"\n{who.name}: import of 64 MB: {duration:.2f} s (transaction after {to_txn:.2f} s); "
          f"{len(outcomes)} kills in {took:.1f} s: {outcomes}")
    assert took < 90


def test_a_signal_inside_the_commit_waits_until_it_is_done(tmp_path, store, monkeypatch):
    """In-process: SIGINT sent from inside the commit (renames under way) is held until the commit is
    complete: the import is stored whole, and the line says the change was made."""
    assert cli(store, "import", str(docker_save(tmp_path / "a.tar", [(["acme/a:1"], BASE_LAYERS, None)])))[0] == 0
    apply = Store._apply

    def apply_and_signal(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler ran by now (and held the signal)
        return apply(self, *args, **kwargs)

    monkeypatch.setattr(Store, "_apply", apply_and_signal)
    rc, out, err = cli(store, "import", str(docker_save(tmp_path / "b.tar", [(["acme/b:1"], APP_LAYERS, None)])))
    assert rc == 130 and err == INTERRUPTED[1] + "\n"
    monkeypatch.undo()
    s = Store(store)
    assert s.image_layers(s.resolve("acme/b:1")) == [sha(layer) for layer in APP_LAYERS]
    assert os.listdir(store / "tmp") == [] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


# The import, with a SIGKILL of itself at the n-th write of the commit (images, then repositories.json)
KILL_IN_COMMIT = """
import os, signal, sys
from cowfs.images import store as store_module
from cowfs.images.importer import import_archive
writes = [0]
write_file = store_module.Store.write_file
def killing_write(self, rel, data):
    writes[0] += 1
    if writes[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return write_file(self, rel, data)
store_module.Store.write_file = killing_write
import_archive(store_module.Store(sys.argv[1]), sys.argv[2], progress=False)
"""


@pytest.mark.parametrize("nth", [1, 2])
def test_sigkill_past_the_commit_point_is_completed_by_the_next_command(tmp_path, store, nth):
    """Killed after the layers were renamed into place (before the image's config, or before
    repositories.json, was written): the next command completes the import rather than leave it half made."""
    assert cli(store, "import", str(docker_save(tmp_path / "a.tar", [(["acme/a:1"], BASE_LAYERS, None)])))[0] == 0
    archive = docker_save(tmp_path / "b.tar", [(["acme/b:1"], BASE_LAYERS + APP_LAYERS, None)])
    reference = tmp_path / "reference"
    subprocess.run(["cp", "-a", str(store), str(reference)], check=True)
    assert cli(reference, "import", str(archive))[0] == 0
    r = subprocess.run([sys.executable, "-c", KILL_IN_COMMIT, str(store), str(archive), str(nth)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = os.listdir(store / "tmp")
    assert len(left) == 1 and os.path.exists(store / "tmp" / left[0] / "COMMIT")
    rc, out, err = cli(store, "images")
    assert rc == 0 and "acme/b" in out, err
    assert store_listing(store) == store_listing(reference)


def test_a_live_import_is_never_healed(shared_tmp):
    """The next command removes what a dead import left, never the transaction of one that runs."""
    who = AsRoot()
    archive = big_archive(os.path.join(shared_tmp, "big.tar"), megabytes=256)
    store = os.path.join(shared_tmp, "store")
    assert who.cowfs("import", "-q", "--store", store, str(docker_save(
        os.path.join(shared_tmp, "a.tar"), [(["acme/a:1"], BASE_LAYERS, None)]))).returncode == 0
    proc = who.popen("import", "-q", "--store", store, archive)
    try:
        assert wait_for_txn(store, proc) is not None
        os.makedirs(os.path.join(store, "tmp", "txn-1-dead", "layer1", "diff"))  # a killed import's
        live = sorted(n for n in os.listdir(os.path.join(store, "tmp")) if n != "txn-1-dead")
        df = json.loads(who.cowfs("system", "df", "--json", "--store", store).stdout)
        leftovers = next(r for r in df if r["Type"] == "Leftovers")
        assert leftovers["Total"] >= 2 and leftovers["Active"] >= 1
        r = who.cowfs("images", "--store", store)
        assert r.returncode == 0
        remaining = os.listdir(os.path.join(store, "tmp"))
        assert "txn-1-dead" not in remaining
        assert proc.poll() is not None or set(live) <= set(remaining), (live, remaining)
    finally:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "acme/big" in who.cowfs("images", "--store", store).stdout
    assert os.listdir(os.path.join(store, "tmp")) == []


def test_signal_handlers_are_only_set_while_a_command_runs():
    ignored = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with interrupts.handling():
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # nohup's stays ignored
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGHUP, ignored)



def test_a_signal_as_the_handlers_go_back_is_not_an_interruption(monkeypatch):
    """The command is over once the handlers are being restored: a signal then (here SIGTERM, while SIGINT's
    handler goes back first) must not escape as an Interrupted traceback from the teardown."""
    real = signal.signal
    sent = []

    def restoring(signum, handler):
        if not sent and signum == signal.SIGINT and handler is not interrupts._handler:
            sent.append(signum)
            os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM's handler is still cowfs's at this point
        return real(signum, handler)

    with interrupts.handling():
        monkeypatch.setattr(signal, "signal", restoring)
    monkeypatch.setattr(signal, "signal", real)
    assert sent == [signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

# -- references, as Docker checks them -------------------------------------------------------------------

GOOD_REFERENCES = ["busybox", "acme/app", "acme/app:1.0", "a/b/c/d:latest", "localhost/app", "localhost:5000/app:1",
                   "registry.example.com/team/app:v1.2.3", "registry.example.com:443/app", "[::1]:5000/app",
                   "Registry.Example.com/app", "x/a.b_c__d-e--f:TAG_with.dots-", "app:" + "x" * 128, "a" * 255,
                   "app@sha256:" + "0" * 64, "app:1@sha256:" + "f" * 64, "my_app", "0/1:2"]
BAD_REFERENCES = {
    "Bad Name!": "name component 'Bad Name!' may only hold lowercase letters and digits, separated by '.', '_', "
                 "'__' or '-'",
    "App": "name component 'App' must be lowercase",
    "acme/App:1": "name component 'App' must be lowercase",
    "": "empty name",
    ":1": "empty name",
    "app:": "empty tag after ':'",
    "app:-1": "tag '-1' must be 1 to 128 letters, digits, '_', '.' or '-', and not start with '.' or '-'",
    "app:.x": "tag '.x' must be 1 to 128 letters, digits, '_', '.' or '-', and not start with '.' or '-'",
    "app:" + "x" * 129: "tag '" + "x" * 129 + "' must be 1 to 128 letters, digits, '_', '.' or '-', and not start "
                        "with '.' or '-'",
    "a" * 256: "name is 256 characters long (at most 255)",
    "acme//app": "empty path component (a '/' at either end, or '//')",
    "acme/app/": "empty path component (a '/' at either end, or '//')",
    "/app": "empty path component (a '/' at either end, or '//')",
    "a___b": "name component 'a___b' may only hold lowercase letters and digits, separated by '.', '_', '__' or '-'",
    "a..b": "name component 'a..b' may only hold lowercase letters and digits, separated by '.', '_', '__' or '-'",
    "-app": "name component '-app' may only hold lowercase letters and digits, separated by '.', '_', '__' or '-'",
    "app-": "name component 'app-' may only hold lowercase letters and digits, separated by '.', '_', '__' or '-'",
    "host_name:5000/app": "registry 'host_name:5000' is not a host name or address with an optional :port",
    "a.b_c/app": "registry 'a.b_c' is not a host name or address with an optional :port",
    "app@sha256:abc": "digest 'sha256:abc' is not sha256:<64 lowercase hex digits>",
    "app@md5:" + "0" * 32: "digest 'md5:" + "0" * 32 + "' is not sha256:<64 lowercase hex digits>",
    "app@sha256:" + "A" * 64: "digest 'sha256:" + "A" * 64 + "' is not sha256:<64 lowercase hex digits>",
}


@pytest.mark.parametrize("ref", GOOD_REFERENCES)
def test_references_docker_accepts(ref):
    assert check_reference(ref) == ref


@pytest.mark.parametrize("ref", sorted(BAD_REFERENCES))
def test_references_docker_refuses(ref):
    with pytest.raises(BadReference) as e:
        check_reference(ref)
    assert str(e.value) == f"invalid reference {ref!r}: {BAD_REFERENCES[ref]}"


def test_names_given_to_images_are_checked(tmp_path, store):
    archive = str(docker_save(tmp_path / "a.tar", [(["acme/a:1"], BASE_LAYERS, None)]))
    assert check_tag_reference("acme/a:1") == "acme/a:1"
    with pytest.raises(BadReference, match="a digest cannot name an image"):
        check_tag_reference("acme/a@sha256:" + "0" * 64)
    for ref in ("Bad Name!", "acme/App", "a:b:c:", "x@sha256:" + "0" * 64):
        rc, out, err = cli(store, "import", archive, "--name", ref)
        assert rc == 1 and err.startswith(f"cowfs import: invalid reference {ref!r}: ") and err.count("\n") == 1
    assert not os.path.exists(store / "images") or os.listdir(store / "images") == []
    for ref in ("acme/a", "localhost:5000/acme/a:1.0", "Registry.Example.com/acme/a:v1"):
        rc, out, err = cli(store, "import", archive, "--name", ref)
        assert rc == 0, err
        assert Store(store).resolve(ref)


# -- --json and -q, and what --help says ---------------------------------------------------------------------

def test_json_and_quiet_agree_with_the_tables(tmp_path, store):
    assert cli(store, "import", str(docker_save(tmp_path / "a.tar", [(["acme/base:1"], BASE_LAYERS, None)])))[0] == 0
    app = docker_save(tmp_path / "b.tar", [(["acme/app:1", "acme/app:latest"], BASE_LAYERS + APP_LAYERS, None)])
    assert cli(store, "import", str(app))[0] == 0
    bare = tmp_path / "bare.tar"
    bare.write_bytes(layer_tar(member("x", data=b"x")))
    assert cli(store, "import", str(bare))[0] == 0  # untagged: <none>
    s = Store(store)
    create_container(s, s.resolve("acme/app:1"), "acme/app:1", str(tmp_path))

    rc, table_out, _ = cli(store, "images")
    rows = json.loads(cli(store, "images", "--json")[1])
    lines = table_out.splitlines()
    assert len(rows) == len(lines) - 2 == 4
    for row, line in zip(rows, lines[1:-1]):
        assert sorted(row) == ["Created", "ID", "Repository", "SharedSize", "Size", "Tag", "UniqueSize"]
        assert line.split()[:3] == [row["Repository"], row["Tag"], row["ID"][7:19]]
    assert {(r["Repository"], r["Tag"]) for r in rows} >= {("<none>", "<none>"), ("acme/app", "latest")}
    assert cli(store, "images", "-q")[1].split() == [r["ID"][7:19] for r in rows]  # a row each, as docker's
    assert cli(store, "images", "-q", "--no-trunc")[1].split() == [r["ID"] for r in rows]
    assert lines[-1].startswith("5 layers stored once: ")

    history = json.loads(cli(store, "history", "--json", "acme/app:1")[1])
    table_lines = cli(store, "history", "acme/app:1")[1].splitlines()[1:]
    assert len(history) == len(table_lines) == 4
    assert [h["ID"] for h in history] == [s.resolve("acme/app:1")] + ["<missing>"] * 3
    # a symlink adds nothing to a layer's size, as in Docker
    assert [h["Size"] for h in history] == [len(b"#!/bin/sh\necho hello\n")] * 2 + [1, 31]
    assert cli(store, "history", "-q", "acme/app:1")[1].split() == [s.resolve("acme/app:1")[7:19]] + ["<missing>"] * 3

    ps = json.loads(cli(store, "ps", "--json")[1])
    assert len(ps) == 1 and ps[0]["Mounted"] is False and ps[0]["Image"] == s.resolve("acme/app:1")
    assert sorted(ps[0]) == ["Created", "ID", "Image", "ImageName", "Mounted", "MountedAt", "Size", "UpperDir",
                             "VirtualSize"]
    image = json.loads(cli(store, "inspect", "acme/app:1")[1])[0]
    assert ps[0]["VirtualSize"] == ps[0]["Size"] + image["Size"]
    assert cli(store, "ps")[1].splitlines()[1].endswith(f"(virtual {docker_size(ps[0]['VirtualSize'])})")
    assert cli(store, "ps", "-q")[1].split() == [ps[0]["ID"][:12]]
    assert cli(store, "ps")[1].splitlines()[1].split()[:2] == [ps[0]["ID"][:12], ps[0]["ImageName"]]

    df = json.loads(cli(store, "system", "df", "--json")[1])
    table_rows = [line.split() for line in cli(store, "system", "df")[1].splitlines()[1:]]
    assert [r["Type"] for r in df] == [t[0] for t in table_rows] == ["Images", "Containers", "Layers", "Leftovers"]
    for r, t in zip(df, table_rows):
        assert [str(r["Total"]), str(r["Active"])] == t[1:3]
    images, containers, layers, leftovers = df
    assert (images["Total"], images["Active"], containers["Total"], containers["Active"]) == (3, 1, 1, 0)
    assert (layers["Total"], layers["Active"], layers["Reclaimable"]) == (5, 5, 0)
    assert images["Reclaimable"] == 1  # the bare image's one byte: base shares every layer with app
    assert leftovers == {"Type": "Leftovers", "Total": 0, "Active": 0, "Size": 0, "Reclaimable": 0}
    quiet = cli(store, "system", "df", "-q")[1].split()  # what RECLAIMABLE counts: images no container uses
    untagged = next(i for i in s.image_ids() if not s.tags_of(i))
    assert sorted(quiet) == sorted([s.resolve("acme/base:1"), untagged, ps[0]["ID"]])
    rc, out, _ = cli(store, "inspect", "acme/app:1")
    assert rc == 0 and json.loads(out)[0]["Id"] == s.resolve("acme/app:1")


def test_one_layer_is_singular(tmp_path, store):
    bare = tmp_path / "bare.tar"
    bare.write_bytes(layer_tar(member("x", data=b"x")))
    assert cli(store, "import", str(bare), "--name", "one")[0] == 0
    assert cli(store, "images")[1].splitlines()[-1] == ("1 layer stored once: 1B; the images use 1B in all, so "
                                                        "sharing saves 0B")
    rc, out, _ = cli(store, "system", "check")
    assert rc == 0 and out == "no problems: 1 image, 1 layer, 0 containers checked\n"


def test_help_documents_exit_statuses_and_json_keys():
    parser = argparse.ArgumentParser(prog="cowfs")
    sub = parser.add_subparsers(dest="command")
    image_cli.add_commands(sub)
    for name in image_cli.COMMANDS:
        text = sub.choices[name].format_help()
        assert "exit status: 0 done; 1 refused or failed" in text and "128+N" in text, name
    for name, keys in (("images", "Repository, Tag"), ("history", "CreatedBy"), ("ps", "MountedAt")):
        text = sub.choices[name].format_help()
        assert "--json" in text and "-q, --quiet" in text and keys in text, name
    system = sub.choices["system"]._subparsers._group_actions[0].choices
    assert sorted(system) == ["check", "df", "prune"]
    assert "Type, Total, Active, Size" in system["df"].format_help()
    assert "--repair" in system["check"].format_help() and "--dry-run" in system["prune"].format_help()


# -- system df, prune, check --------------------------------------------------------------------------------

def _store_with_everything(tmp_path, store):
    """acme/base:1 and acme/app:1, a dangling (untagged) image, a layer no image uses (an rmi stopped half
    way), a container of acme/app:1 (not mounted), and the leftover of a killed import."""
    assert cli(store, "import", str(docker_save(tmp_path / "a.tar", [(["acme/base:1"], BASE_LAYERS, None)])))[0] == 0
    app = docker_save(tmp_path / "b.tar", [(["acme/app:1"], BASE_LAYERS + APP_LAYERS, None)])
    assert cli(store, "import", str(app))[0] == 0
    bare = tmp_path / "bare.tar"
    bare.write_bytes(layer_tar(member("dangling", data=b"d" * 100)))
    assert cli(store, "import", str(bare))[0] == 0
    orphan = tmp_path / "orphan.tar"
    orphan.write_bytes(layer_tar(member("orphan", data=b"o" * 1000)))
    assert cli(store, "import", str(orphan), "--name", "acme/orphan:1")[0] == 0
    s = Store(store)
    os.unlink(store / "images" / (s.resolve("acme/orphan:1")[7:] + ".json"))  # what a killed rmi leaves
    repos = s.repositories()
    del repos["acme/orphan:1"]
    with s.locked():
        s.write_repositories(repos)
    container = create_container(s, s.resolve("acme/app:1"), "acme/app:1", str(tmp_path))
    with open(os.path.join(container["upper"], "changed"), "wb") as f:
        f.write(b"c" * 10)
    os.makedirs(store / "tmp" / "txn-1-killed" / "layer1" / "diff")
    (store / "tmp" / "txn-1-killed" / "layer1" / "diff" / "big").write_bytes(b"k" * 5000)
    return s, container


def test_system_df(tmp_path, store):
    s, container = _store_with_everything(tmp_path, store)
    rc, out, err = cli(store, "system", "df")
    assert rc == 0, err
    assert out.splitlines() == [
        "TYPE         TOTAL     ACTIVE    SIZE      RECLAIMABLE",  # columns at least 10 wide, as Docker's
        "Images       3         1         174B      100B (57%)",  # layers count regular files only, as Docker's
        "Containers   1         0         10B       10B (100%)",
        "Layers       6         5         1.17kB    1kB (85%)",
        "Leftovers    1         0         5kB       5kB (100%)",
    ]
    assert os.path.exists(store / "tmp" / "txn-1-killed")  # df looks; it does not clean


def test_system_prune(tmp_path, store):
    s, container = _store_with_everything(tmp_path, store)
    dangling = next(i for i in s.image_ids() if not s.tags_of(i))
    orphan = sha(layer_tar(member("orphan", data=b"o" * 1000)))
    before = store_state(store)
    rc, out, err = cli(store, "system", "prune", "--dry-run")
    assert rc == 0, err
    assert diff_snapshots(before, store_state(store)) == ""
    assert f"Would delete Images:\n{dangling}\n" in out and f"{orphan} (1kB)" in out and "tmp/txn-1-killed" in out
    assert out.endswith("Total reclaimable space: 6.1kB\n") and "Containers" not in out
    rc, out, err = cli(store, "system", "prune")
    assert rc == 0, err
    removed_layers = sorted([(sha(layer_tar(member("dangling", data=b"d" * 100))), "100B"), (orphan, "1kB")])
    assert out.splitlines() == [
        "Deleted Images:", f"deleted: {dangling}", "",
        "Deleted Layers:", *[f"{d} ({size})" for d, size in removed_layers], "",
        "Deleted Leftovers:", "tmp/txn-1-killed (5kB)", "",
        "Total reclaimed space: 6.1kB"]
    s = Store(store)
    assert s.image_ids() == sorted([s.resolve("acme/base:1"), s.resolve("acme/app:1")])
    assert set(s.layer_ids()) == {sha(layer) for layer in BASE_LAYERS + APP_LAYERS}
    assert os.listdir(store / "tmp") == [] and os.path.isdir(container["upper"])
    # -a removes acme/base:1 (no container), never acme/app:1 (a container's); --containers the container
    base_id = s.resolve("acme/base:1")
    rc, out, _ = cli(store, "system", "prune", "-a")
    assert f"untagged: acme/base:1\ndeleted: {base_id}" in out and "acme/app" not in out
    assert cli(store, "system", "prune", "-a", "--containers")[1].startswith(f"Deleted Containers:\n{container['Id']}")
    assert Store(store).image_ids() == [] and Store(store).layer_ids() == [] and os.listdir(store / "containers") == []
    assert cli(store, "system", "prune")[1] == "Total reclaimed space: 0B\n"


@pytest.mark.kernel
def test_prune_keeps_a_layer_a_live_mount_uses(tmp_path, store, shared_tmp):
    s, _ = _store_with_everything(tmp_path, store)
    orphan = sha(layer_tar(member("orphan", data=b"o" * 1000)))
    empty = os.path.join(shared_tmp, "empty")
    mnt = os.path.join(shared_tmp, "m")
    os.mkdir(empty)
    os.mkdir(mnt)
    with kernel_overlay([s.layer_path(orphan), empty], None, None, mnt):
        rc, out, err = cli(store, "system", "prune")
        assert rc == 0 and orphan not in out, err
        assert s.has_layer(orphan)
        rc, out, _ = cli(store, "system", "check", "--repair")
        assert s.has_layer(orphan)
    rc, out, _ = cli(store, "system", "prune")
    assert orphan in out and not s.has_layer(orphan)


def _layer_with(s, path):
    return next(d for d in s.layer_ids() if os.path.lexists(os.path.join(s.layer_path(d), path)))


# name: (damage(store dir, Store), the line check prints, the line check --repair prints, and whether it fixes it)
USED = "(image {base12} uses it: cowfs rmi {base12}, and import it again)"
CHECKS = {
    "layer-size-of-an-older-cowfs": (
        lambda d, s: s.write_file(f"layers/{sha(BASE_LAYERS[1])[7:]}/layer.json", json.dumps(dict(
            s.layer_info(sha(BASE_LAYERS[1])), size=1 + len("/lib"))).encode()),
        "layer {usr12}: size recorded by an older cowfs (5, counting symlinks; 1 as Docker counts) (--repair fixes it)",
        "layer {usr12}: size recorded by an older cowfs (5, counting symlinks; 1 as Docker counts): recorded 1", True),
    "parent-of-a-missing-image": (
        lambda d, s: s.write_parents({"sha256:" + "0" * 64: s.resolve("acme/base:1")}),
        "parents.json: records the parent of image 000000000000, which is not stored (--repair fixes it)",
        "parents.json: records the parent of image 000000000000, which is not stored: removed the record", True),
    "parents-not-json": (
        lambda d, s: (d / "parents.json").write_bytes(b"["),
        "parents.json: not valid JSON (remove it by hand: history then shows <missing> for the parents)",
        "parents.json: not valid JSON: not fixed (remove it by hand: history then shows <missing> for the parents)",
        False),
    "repositories-not-json": (
        lambda d, s: (d / "repositories.json").write_bytes(b"{"),
        "repositories.json: not valid JSON (fix or remove it by hand: the images stay, untagged)",
        "repositories.json: not valid JSON: not fixed (fix or remove it by hand: the images stay, untagged)", False),
    "store-json-without-its-key": (
        lambda d, s: (d / "store.json").write_text("{}"),
        "store.json: no xattr_prefix (--repair fixes it)",
        "store.json: no xattr_prefix: rewrote it with xattr_prefix {prefix} (as the layers show)", True),
    "tag-of-a-missing-image": (
        lambda d, s: s.write_repositories(dict(s.repositories(), **{"acme/gone:1": "sha256:" + "0" * 64})),
        "repositories.json: acme/gone:1 names image 000000000000, which is not stored (--repair fixes it)",
        "repositories.json: acme/gone:1 names image 000000000000, which is not stored: removed the tag acme/gone:1",
        True),
    "config-truncated": (
        lambda d, s: (d / "images" / (s.resolve("acme/app:1")[7:] + ".json")).write_bytes(b"{"),
        "image {app12}: truncated or changed (its sha256 is not the image ID) (cowfs rmi {app12}, and import it "
        "again)",
        "image {app12}: truncated or changed (its sha256 is not the image ID): not fixed (cowfs rmi {app12}, and "
        "import it again)", False),
    "layer-missing": (
        lambda d, s: shutil.rmtree(s.layer_dir(sha(APP_LAYERS[1]))),
        "image {app12}: its layer {top12} is missing (cowfs rmi {app12}, and import it again)",
        "image {app12}: its layer {top12} is missing: not fixed (cowfs rmi {app12}, and import it again)", False),
    "layer-file-changed": (
        lambda d, s: open(os.path.join(s.layer_path(sha(BASE_LAYERS[0])), "bin/sh"), "ab").write(b"more"),
        "layer {sh12}: holds 35 bytes, 31 when imported (changed since) " + USED,
        "layer {sh12}: holds 35 bytes, 31 when imported (changed since): not fixed " + USED, False),
    "layer-file-touched": (
        lambda d, s: os.utime(os.path.join(s.layer_path(sha(BASE_LAYERS[0])), "bin/sh"), (0, 0)),
        "layer {sh12}: content differs from what was imported (a file was changed, added or removed) " + USED,
        "layer {sh12}: content differs from what was imported (a file was changed, added or removed): not fixed "
        + USED, False),
    "layer-file-added": (
        lambda d, s: open(os.path.join(s.layer_path(sha(BASE_LAYERS[0])), "bin/empty"), "w").close(),
        "layer {sh12}: content differs from what was imported (a file was changed, added or removed) " + USED,
        "layer {sh12}: content differs from what was imported (a file was changed, added or removed): not fixed "
        + USED, False),
    "layer-json-missing": (
        lambda d, s: os.unlink(os.path.join(s.layer_dir(sha(APP_LAYERS[1])), "layer.json")),
        "layer {top12}: layer.json is missing (image {app12} uses it: cowfs rmi {app12}, and import it again)",
        "layer {top12}: layer.json is missing: not fixed (image {app12} uses it: cowfs rmi {app12}, and import it "
        "again)", False),
    "layer-unused": (
        lambda d, s: subprocess.run(["cp", "-a", s.layer_dir(sha(APP_LAYERS[1])), str(d / "layers" / ("a" * 64))],
                                    check=True),
        "layer aaaaaaaaaaaa: layer.json names another diff ID (--repair fixes it)",
        "layer aaaaaaaaaaaa: layer.json names another diff ID: removed it (no image uses it)", True),
    "leftover": (
        lambda d, s: os.makedirs(d / "tmp" / "txn-7-gone" / "layer1"),
        "tmp/txn-7-gone: left by an interrupted command (0B) (--repair fixes it)",
        "tmp/txn-7-gone: left by an interrupted command (0B): removed it", True),
    "tmp-missing": (
        lambda d, s: os.rmdir(d / "tmp"),
        "tmp/: missing (--repair fixes it)", "tmp/: missing: re-created the empty tmp/ directory", True),
    "container-of-a-missing-image": (
        lambda d, s: _orphan_container(d, s),
        "container {cid12}: its image 000000000000 is not stored (import the image again, or cowfs rm {cid12})",
        "container {cid12}: its image 000000000000 is not stored: not fixed (import the image again, or cowfs rm "
        "{cid12})", False),
    "container-work-missing": (
        lambda d, s: os.rmdir(_container(d, s)["work"]),
        "container {cid12}: its work/ directory is missing (--repair fixes it)",
        "container {cid12}: its work/ directory is missing: re-created the empty work/ directory", True),
    "container-record-broken": (
        lambda d, s: open(os.path.join(os.path.dirname(_container(d, s)["upper"]), "container.json"), "w").write("{"),
        "container {cid12}: container.json: not valid JSON (remove {store}/containers/{cid} by hand if its changes "
        "are not needed)",
        "container {cid12}: container.json: not valid JSON: not fixed (remove {store}/containers/{cid} by hand if "
        "its changes are not needed)", False),
}


def _container(d, s):
    return create_container(s, s.resolve("acme/app:1"), "acme/app:1", str(d))


def _orphan_container(d, s):
    record = _container(d, s)
    path = os.path.join(os.path.dirname(record["upper"]), "container.json")
    with open(path) as f:
        data = json.load(f)
    data["Image"] = "sha256:" + "0" * 64
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.mark.parametrize("case", sorted(CHECKS))
def test_system_check_and_repair(tmp_path, store, case):
    damage, line, repair_line, fixed = CHECKS[case]
    assert cli(store, "import", str(docker_save(tmp_path / "a.tar", [(["acme/base:1"], BASE_LAYERS, None)])))[0] == 0
    assert cli(store, "import", str(docker_save(tmp_path / "b.tar", [(["acme/app:1"], BASE_LAYERS + APP_LAYERS,
                                                                      None)])))[0] == 0
    rc, out, err = cli(store, "system", "check")
    assert rc == 0 and out == "no problems: 2 images, 4 layers, 0 containers checked\n", out + err
    s = Store(store)
    fields = {"store": str(store), "app12": s.resolve("acme/app:1")[7:19], "base12": s.resolve("acme/base:1")[7:19],
              "top12": sha(APP_LAYERS[1])[7:19], "sh12": sha(BASE_LAYERS[0])[7:19], "prefix": s.prefix,
              "usr12": sha(BASE_LAYERS[1])[7:19]}
    contents = {d: layer_content(s.layer_path(d)) for d in s.layer_ids()}
    with s.locked(heal=False):
        damage(store, s)
    cids = os.listdir(store / "containers") if os.path.isdir(store / "containers") else []
    if cids:
        fields.update(cid=cids[0], cid12=cids[0][:12])
    before = tree_state(store)
    rc, out, err = cli(store, "system", "check")
    assert rc == 1 and err == "", err
    assert out.splitlines() == [line.format(**fields),
                                "1 problem" + ("; cowfs system check --repair fixes 1" if fixed else "")]
    assert diff_snapshots(before, tree_state(store)) == ""  # check only looks
    rc, out, err = cli(store, "system", "check", "--repair")
    assert rc == (0 if fixed else 1) and err == "", err
    assert out.splitlines() == [repair_line.format(**fields), f"1 problem: {int(fixed)} fixed, {int(not fixed)} not"]
    if fixed:
        assert cli(store, "system", "check")[0] == 0
    else:
        assert diff_snapshots(before, tree_state(store)) == ""  # what it cannot fix, it does not touch
    damaged = {sha(APP_LAYERS[1]), sha(BASE_LAYERS[0])}
    for diff_id, content in contents.items():  # never a layer an image uses
        if diff_id not in damaged or not case.startswith("layer-"):
            assert layer_content(s.layer_path(diff_id)) == content, diff_id


def test_check_takes_the_tree_digest_earlier_cowfs_recorded(tmp_path, store):
    """Layers imported when the tree digest covered whiteouts' times are not taken for changed ones."""
    assert cli(store, "import", str(docker_save(tmp_path / "a.tar", [(["acme/base:1"], BASE_LAYERS, None)])))[0] == 0
    s = Store(store)
    top = sha(BASE_LAYERS[1])
    os.utime(os.path.join(s.layer_path(top), "etc", "gone"), (1, 1), follow_symlinks=False)
    path = os.path.join(s.layer_dir(top), "layer.json")
    info = json.loads(open(path).read())
    older = layer_content(s.layer_path(top), whiteout_times=True)[0]
    assert older != info["content"]
    with open(path, "w") as f:
        json.dump(dict(info, content=older), f)
    assert cli(store, "system", "check") == (0, "no problems: 1 image, 2 layers, 0 containers checked\n", "")
    with open(path, "w") as f:
        json.dump(dict(info, content="sha256:" + "0" * 64), f)
    assert "content differs" in cli(store, "system", "check")[1]


def test_check_repair_never_deletes_a_layer_an_image_uses(tmp_path, store):
    """Every kind of damage at once, and a damaged image config: --repair removes the leftovers and the tag
    of a missing image, and keeps every layer, even those no readable image names (the damaged image may)."""
    assert cli(store, "import", str(docker_save(tmp_path / "a.tar", [(["acme/base:1"], BASE_LAYERS, None)])))[0] == 0
    assert cli(store, "import", str(docker_save(tmp_path / "b.tar", [(["acme/app:1"], BASE_LAYERS + APP_LAYERS,
                                                                      None)])))[0] == 0
    s = Store(store)
    layers = {d: layer_content(s.layer_path(d)) for d in s.layer_ids()}
    app = s.resolve("acme/app:1")
    (store / "images" / (app[7:] + ".json")).write_bytes(b"{\"rootfs\": ")  # the only user of the app layers
    with open(os.path.join(s.layer_path(sha(BASE_LAYERS[0])), "bin", "sh"), "ab") as f:
        f.write(b"changed")
    repos = s.repositories()
    repos["acme/gone:1"] = "sha256:" + "1" * 64
    with s.locked(heal=False):
        s.write_repositories(repos)
    os.makedirs(store / "tmp" / "txn-3-gone")
    rc, out, err = cli(store, "system", "check", "--repair")
    assert rc == 1, out + err
    assert "acme/gone:1 names image 111111111111, which is not stored: removed the tag acme/gone:1" in out
    assert "tmp/txn-3-gone: left by an interrupted command (0B): removed it" in out
    assert f"image {app[7:19]}: truncated or changed (its sha256 is not the image ID): not fixed" in out
    assert f"layer {sha(BASE_LAYERS[0])[7:19]}: holds " in out, out
    assert out.splitlines()[-1] == "4 problems: 2 fixed, 2 not", out
    assert set(Store(store).layer_ids()) == set(layers)
    for diff_id, content in layers.items():
        if diff_id != sha(BASE_LAYERS[0]):
            assert layer_content(s.layer_path(diff_id)) == content


def test_the_tree_digest_is_the_same_whenever_a_whiteout_was_made(tmp_path):
    """Unpacked, a whiteout gets the time it is made (Docker's overlay2 gives it that too): two stores that
    import one layer at other times record one tree digest; the other times still count."""
    data = layer_tar(member("etc", "dir"), member("etc/.wh.gone"), member("etc/kept", data=b"x"))
    hashes, trees = {}, []
    for i, when in enumerate((1_000_000_000, 1_700_000_000)):
        dest = tmp_path / f"d{i}"
        dest.mkdir()
        unpack_layer(io.BytesIO(data), str(dest), "test", hashes=hashes if i else None)
        assert os.path.getmtime(dest / "etc" / "kept") == MTIME
        os.utime(dest / "etc" / "gone", (when, when), follow_symlinks=False)
        trees.append(dest)
    assert hashes == {b"etc/kept": hashlib.sha256(b"x").hexdigest()}
    assert layer_content(trees[0]) == layer_content(trees[1]) == layer_content(trees[1], hashes)
    assert layer_content(trees[0], whiteout_times=True) != layer_content(trees[1], whiteout_times=True)
    os.utime(trees[1] / "etc" / "kept", (1, 1))
    assert layer_content(trees[0]) != layer_content(trees[1])


# -- tag, save, export: images and containers out of the store ---------------------------------------------

def canonical_layers(tmp_path, layers):
    """The layers as cowfs writes them back (unpacked, then written with write_layer): the form `cowfs save`
    can reproduce byte for byte."""
    out = []
    for i, data in enumerate(layers):
        dest = tmp_path / f"canonical{i}"
        dest.mkdir()
        unpack_layer(io.BytesIO(data), str(dest), "test")
        buf = io.BytesIO()
        write_layer(str(dest), buf)
        out.append(buf.getvalue())
    return out


def test_tag_names_an_image_by_name_id_or_prefix(tmp_path, store):
    path = docker_save(tmp_path / "app.tar", [(["acme/app:1"], BASE_LAYERS + APP_LAYERS, None),
                                              (["acme/base:1"], BASE_LAYERS, None)])
    assert cli(store, "import", str(path), "-q")[0] == 0
    s = Store(store)
    app, base = s.resolve("acme/app:1"), s.resolve("acme/base:1")
    assert cli(store, "tag", "acme/app:1", "acme/app:latest") == (0, "", "")
    assert cli(store, "tag", app[7:19], "registry.example.com:5000/acme/app") == (0, "", "")
    assert cli(store, "tag", app, "acme/other:2") == (0, "", "")
    repos = Store(store).repositories()
    assert repos["acme/app:latest"] == repos["registry.example.com:5000/acme/app:latest"] == app
    assert repos["acme/other:2"] == app and Store(store).resolve("acme/app") == app
    assert cli(store, "tag", "acme/base:1", "acme/other:2") == (0, "", "")  # a tag moves, as docker tag
    assert Store(store).repositories()["acme/other:2"] == base
    before = store_state(store)
    for source, target, says in (("acme/app:1", "Acme/App:1", "must be lowercase"),
                                 ("acme/app:1", "acme/app:1@sha256:" + "0" * 64, "a digest cannot name"),
                                 ("acme/app:1", "acme/app:", "empty tag"),
                                 ("nosuch:1", "acme/x:1", "no such image: nosuch:1"),
                                 (app[7:8], "acme/x:1", "no such image")):
        rc, out, err = cli(store, "tag", source, target)
        assert rc == 1 and out == "" and err.count("\n") == 1 and err.startswith("cowfs tag: "), err
        assert says in err, err
    assert store_state(store) == before


def saved_members(path):
    with tarfile.open(path) as tf:
        return {m.name: (tf.extractfile(m).read() if m.isfile() else None) for m in tf.getmembers()}


def test_save_then_import_gives_the_same_images(tmp_path, store):
    layers = canonical_layers(tmp_path, BASE_LAYERS + APP_LAYERS)
    path = docker_save(tmp_path / "app.tar", [(["acme/app:1"], layers, None), (["acme/base:1"], layers[:2], None)])
    assert cli(store, "import", str(path), "-q")[0] == 0
    assert cli(store, "tag", "acme/app:1", "acme/app:2")[0] == 0
    s = Store(store)
    app, base = s.resolve("acme/app:1"), s.resolve("acme/base:1")
    out = tmp_path / "saved.tar"
    assert cli(store, "save", "acme/app:1", "acme/app:2", "acme/base:1", "-o", str(out)) == (0, "", "")
    # the layout the importer's docker save reader (and docker load) reads
    members = saved_members(out)
    manifest = json.loads(members["manifest.json"])
    assert [sorted(e) for e in manifest] == [["Config", "Layers", "RepoTags"]] * 2
    assert manifest[0]["RepoTags"] == ["acme/app:1", "acme/app:2"] and manifest[1]["RepoTags"] == ["acme/base:1"]
    assert manifest[0]["Config"] == "blobs/sha256/" + app[7:]
    assert members[manifest[0]["Config"]] == s.config_bytes(app)
    assert manifest[0]["Layers"] == ["blobs/sha256/" + d[7:] for d in s.image_layers(app)]
    for name in manifest[0]["Layers"]:  # each layer tar is the one imported, byte for byte
        assert sha(members[name]) == "sha256:" + name.rsplit("/", 1)[1]
    assert [members[n] for n in manifest[0]["Layers"]] == layers
    assert json.loads(members["repositories"]) == {"acme/app": {"1": sha(layers[-1])[7:], "2": sha(layers[-1])[7:]},
                                                   "acme/base": {"1": sha(layers[1])[7:]}}
    assert json.loads(members["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(members["index.json"])
    assert [m["annotations"]["io.containerd.image.name"] for m in index["manifests"]] == \
        ["acme/app:1", "acme/app:2", "acme/base:1"]
    for desc in index["manifests"]:
        blob = members["blobs/sha256/" + desc["digest"][7:]]
        assert sha(blob) == desc["digest"] and json.loads(blob)["config"]["digest"] in (app, base)
    # into a fresh store: the same IDs, diff IDs, tags and trees
    fresh = tmp_path / "fresh"
    rc, text, err = cli(fresh, "import", str(out), "-q")
    assert rc == 0, err
    assert text == "Loaded image: acme/app:1\nLoaded image: acme/app:2\nLoaded image: acme/base:1\n"
    f = Store(fresh)
    assert f.repositories() == s.repositories() and f.image_ids() == s.image_ids()
    for image_id in (app, base):
        assert f.image_layers(image_id) == s.image_layers(image_id)
    for diff_id in s.layer_ids():
        assert diff_snapshots(snapshot(s.layer_path(diff_id), all_xattrs=True),
                              snapshot(f.layer_path(diff_id), all_xattrs=True)) == ""
    # by ID: no RepoTags, and the importer loads it untagged
    assert cli(store, "save", base[7:19], "-o", str(out))[0] == 0
    assert json.loads(saved_members(out)["manifest.json"])[0]["RepoTags"] is None
    rc, text, _ = cli(tmp_path / "third", "import", str(out), "-q")
    assert rc == 0 and text == f"Loaded image ID: {base}\n"


def test_parents_are_kept_as_docker_keeps_them(tmp_path, store):
    """docker commit records the parent: history fills the IDs up the chain, save/load carry it (Parent in
    manifest.json, only to an image saved too), images hides an untagged parent, rmi keeps it for its child."""
    layers = canonical_layers(tmp_path, BASE_LAYERS)
    assert cli(store, "import", str(docker_save(tmp_path / "b.tar", [(["acme/base:1"], layers, None)])), "-q")[0] == 0
    upper = tmp_path / "upper"
    make_upper(upper)
    assert cli(store, "commit", "--upper-dir", str(upper), "--from", "acme/base:1", "--tag", "acme/next:1")[0] == 0
    upper2 = tmp_path / "upper2"
    os.makedirs(upper2 / "srv")
    (upper2 / "srv" / "x").write_bytes(b"x")
    assert cli(store, "commit", "--upper-dir", str(upper2), "--from", "acme/next:1", "--tag", "acme/third:1")[0] == 0
    s = Store(store)
    base, nxt, third = (s.resolve(r) for r in ("acme/base:1", "acme/next:1", "acme/third:1"))
    assert s.parent(third) == nxt and s.parent(nxt) == base and s.parent(base) is None
    ids = [r["ID"] for r in json.loads(cli(store, "history", "--json", "acme/third:1")[1])]
    assert ids == [third, nxt, base, "<missing>"]
    # save: Parent only where the parent is saved too; into a fresh store, the same chain
    out = tmp_path / "saved.tar"
    assert cli(store, "save", "acme/third:1", "acme/next:1", "acme/base:1", "-o", str(out)) == (0, "", "")
    manifest = json.loads(saved_members(out)["manifest.json"])
    assert [e.get("Parent") for e in manifest] == [nxt, base, None]
    fresh = tmp_path / "fresh"
    assert cli(fresh, "import", str(out), "-q")[0] == 0
    f = Store(fresh)
    assert f.parent(third) == nxt and f.parent(nxt) == base
    assert cli(fresh, "history", "--json", "acme/third:1")[1] == cli(store, "history", "--json", "acme/third:1")[1]
    assert cli(store, "save", "acme/third:1", "-o", str(out))[0] == 0
    assert "Parent" not in json.loads(saved_members(out)["manifest.json"])[0]
    # a hand-made manifest naming a parent whose layers are not the image's first ones: refused, as docker load
    assert cli(store, "save", "acme/third:1", "acme/base:1", "-o", str(out))[0] == 0
    bad = tmp_path / "bad.tar"
    with tarfile.open(out) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            if m.name == "manifest.json":
                entries = json.loads(data)
                entries[1]["Parent"] = third  # base's "parent" would be the image made on it
                data = json.dumps(entries).encode()
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    rc, text, err = cli(tmp_path / "other", "import", str(bad), "-q")
    assert rc == 1 and "is not a valid parent" in err and err.count("\n") == 1, err
    assert Store(tmp_path / "other").image_ids() == []
    # rmi by name of an image with a child only untags it; images hides it then (-a shows it), as Docker
    rc, text, err = cli(store, "rmi", "acme/next:1")
    assert (rc, text) == (0, "Untagged: acme/next:1\n"), err
    assert s.has_image(nxt)
    assert nxt not in [r["ID"] for r in json.loads(cli(store, "images", "--json")[1])]
    assert nxt in [r["ID"] for r in json.loads(cli(store, "images", "--json", "-a")[1])]
    rc, text, err = cli(store, "rmi", nxt[7:19])
    assert rc == 1 and "image has dependent child images" in err and s.has_image(nxt)
    rc, text, err = cli(store, "system", "prune", "--dry-run")  # untagged, but its child stays: kept
    assert rc == 0 and nxt not in text, text
    rc, text, err = cli(store, "system", "prune", "-a", "--dry-run")  # it goes with its child
    assert rc == 0 and nxt in text and third in text, text
    rc, text, err = cli(store, "system", "prune")
    assert rc == 0 and s.has_image(nxt), text
    # removing the child takes the untagged parent with it (docker rmi prunes it); the tagged base stays
    rc, text, err = cli(store, "rmi", "acme/third:1")
    assert rc == 0, err
    assert text.splitlines()[:3] == ["Untagged: acme/third:1", f"Deleted: {third}", f"Deleted: {nxt}"]
    assert Store(store).image_ids() == [base] and Store(store).parents() == {}


def test_qualified_references_and_images_filter(tmp_path, store):
    """Docker Hub's long spellings name the same image (docker.io/library/busybox is busybox); images
    REPOSITORY[:TAG] filters, with wildcards."""
    path = docker_save(tmp_path / "app.tar", [(["acme/app:1"], BASE_LAYERS + APP_LAYERS, None),
                                              (["busybox:1.36"], BASE_LAYERS, None)])
    assert cli(store, "import", str(path), "-q")[0] == 0
    s = Store(store)
    for ref in ("docker.io/library/busybox:1.36", "library/busybox:1.36", "index.docker.io/busybox:1.36"):
        assert s.resolve(ref) == s.resolve("busybox:1.36"), ref
    assert s.resolve("docker.io/acme/app:1") == s.resolve("acme/app:1")
    rc, _, err = cli(store, "tag", "docker.io/library/busybox:1.36", "docker.io/library/busybox:latest")
    assert rc == 0, err
    assert "busybox:latest" in Store(store).repositories()
    assert json.loads(cli(store, "inspect", "docker.io/library/busybox")[1])[0]["Id"] == s.resolve("busybox:1.36")

    def shown(*args):
        return [(r["Repository"], r["Tag"]) for r in json.loads(cli(store, "images", "--json", *args)[1])]
    assert sorted(shown("busybox")) == [("busybox", "1.36"), ("busybox", "latest")]
    assert shown("busybox:1.*") == [("busybox", "1.36")]
    assert shown("docker.io/library/busybox:latest") == [("busybox", "latest")]
    assert shown("acme/*") == [("acme/app", "1")] and shown("acme") == []
    assert shown("nothing") == []


def test_commit_and_diff_take_a_container_id(tmp_path, store):
    """docker commit CONTAINER REPOSITORY[:TAG] and docker diff CONTAINER: a container ID or unique prefix."""
    from cowfs.images.containers import create_container
    layers = canonical_layers(tmp_path, BASE_LAYERS)
    assert cli(store, "import", str(docker_save(tmp_path / "b.tar", [(["acme/base:1"], layers, None)])), "-q")[0] == 0
    s = Store(store)
    record = create_container(s, s.resolve("acme/base:1"), "acme/base:1", str(tmp_path / "mnt"))
    os.makedirs(os.path.join(record["upper"], "srv"))
    with open(os.path.join(record["upper"], "srv", "new"), "w") as f:
        f.write("x")
    r = subprocess.run(COWFS + ["diff", "--store", str(store), record["Id"][:10]], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.splitlines() == ["A /srv", "A /srv/new"], r
    # inspect takes a container too, as docker inspect: where its layers are
    shown = json.loads(cli(store, "inspect", record["Id"][:10])[1])[0]
    assert shown["Id"] == record["Id"] and shown["Image"] == s.resolve("acme/base:1")
    assert shown["GraphDriver"]["Data"]["UpperDir"] == record["upper"] and shown["State"]["Mounted"] is False
    assert shown["SizeRw"] == 1
    assert cli(store, "inspect", "--format", "{{.GraphDriver.Data.UpperDir}} {{.State.Status}}",
               record["Id"][:10])[1] == record["upper"] + " created\n"
    assert cli(store, "inspect", "--format", "id", record["Id"][:10])[1] == record["Id"] + "\n"
    rc, out, err = cli(store, "commit", record["Id"][:10], "acme/changed:1")
    assert rc == 0, err
    changed = Store(store).resolve("acme/changed:1")
    assert Store(store).parent(changed) == s.resolve("acme/base:1")
    rc, _, err = cli(store, "commit", record["Id"][:10], "acme/changed:2", "--tag", "acme/changed:3")
    assert rc == 2 and "not both" in err
    rc, _, err = cli(store, "commit", "0" * 9 + "nothere")
    assert rc == 1 and "nothere" in err and err.count("\n") == 1, err


def test_save_to_stdout_and_refusals(tmp_path, store):
    layers = canonical_layers(tmp_path, BASE_LAYERS)
    path = docker_save(tmp_path / "base.tar", [(["acme/base:1"], layers, None)])
    assert cli(store, "import", str(path), "-q")[0] == 0
    r = subprocess.run(COWFS + ["save", "acme/base:1", "--store", str(store)], capture_output=True, timeout=120)
    assert r.returncode == 0 and r.stderr == b""
    (tmp_path / "stdout.tar").write_bytes(r.stdout)
    assert json.loads(saved_members(tmp_path / "stdout.tar")["manifest.json"])[0]["RepoTags"] == ["acme/base:1"]
    # a layer imported from a tar cowfs would write otherwise cannot be given back as its diff ID: refused,
    # one line, no FILE (nor anything in the store's tmp/)
    other = docker_save(tmp_path / "other.tar", [(["acme/other:1"], BASE_LAYERS, None)])
    assert cli(store, "import", str(other), "-q")[0] == 0
    s = Store(store)
    for diff_id in s.image_layers(s.resolve("acme/other:1")):  # as imported by an older cowfs: no tar-split
        os.unlink(os.path.join(s.layer_dir(diff_id), "tar-split.gz"))
    out = tmp_path / "out.tar"
    rc, text, err = cli(store, "save", "acme/base:1", "acme/other:1", "-o", str(out))
    assert rc == 1 and text == "" and err.count("\n") == 1 and "cannot be written back" in err, err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == sorted(
        ["base.tar", "other.tar", "stdout.tar", "store"] + [f"canonical{i}" for i in range(len(layers))])
    assert os.listdir(os.path.join(store, "tmp")) == []
    rc, _, err = cli(store, "save", "nosuch:1", "-o", str(out))
    assert rc == 1 and err == f"cowfs save: no such image: nosuch:1 (in store {store})\n" and not out.exists()
    rc, _, err = cli(store, "save", "acme/base:1", "-o", str(tmp_path))
    assert rc == 1 and err.count("\n") == 1 and "directory" in err.lower()

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    parser = argparse.ArgumentParser(prog="cowfs")
    image_cli.add_commands(parser.add_subparsers(dest="command"))
    err = io.StringIO()
    args = parser.parse_args(["save", "--store", str(store), "acme/base:1"])
    assert image_cli.run(args, out=Terminal(), err=err) == 1
    assert err.getvalue() == ("cowfs save: refusing to write a tar archive to a terminal: give -o FILE or "
                              "redirect stdout\n")


def extracted(data, dest):
    """A tar (bytes) extracted as root extracts it (owners, modes, devices), for a snapshot."""
    os.mkdir(dest)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        tf.extractall(dest, numeric_owner=True, filter="fully_trusted")
        for m in tf.getmembers():  # tarfile leaves a symlink's own time as extracted
            if m.issym():
                os.utime(os.path.join(dest, m.name), (m.mtime, m.mtime), follow_symlinks=False)
    return dest


@pytest.mark.fuse
def test_export_is_the_mounted_container(shared_tmp):
    store = app_store(shared_tmp)
    m = os.path.join(shared_tmp, "m")
    os.mkdir(m)
    try:
        r = run_cowfs("mount", "acme/app:1", m, "--store", store)
        assert r.returncode == 0, r.stderr
        cid = r.stdout.strip()
        with open(os.path.join(m, "app/hello.sh"), "a") as f:
            f.write("echo again\n")
        os.unlink(os.path.join(m, "etc/os-release"))
        shutil.rmtree(os.path.join(m, "old"))
        os.mkdir(os.path.join(m, "old"))
        with open(os.path.join(m, "old/z"), "w") as f:
            f.write("z")
        os.mkdir(os.path.join(m, "data"))
        os.symlink("../app/hello.sh", os.path.join(m, "data/link"))
        os.link(os.path.join(m, "old/z"), os.path.join(m, "data/z-again"))
        os.chmod(os.path.join(m, "bin"), 0o700)
        mounted = snapshot(m)
        # while mounted, by a unique prefix, to a file
        out = os.path.join(shared_tmp, "export.tar")
        r = run_cowfs("export", cid[:12], "-o", out, "--store", store)
        assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr
        with open(out, "rb") as f:
            data = f.read()
        names = tar_listing(data)
        assert not any(".wh." in name for name, *_ in names)
        got = snapshot(extracted(data, os.path.join(shared_tmp, "x1")))
        assert diff_snapshots(mounted, got, "mount", "export") == ""
        assert run_cowfs("umount", m).returncode == 0
        # not mounted, to stdout: the same tar
        r = subprocess.run(COWFS + ["export", cid, "--store", store], capture_output=True, timeout=120)
        assert r.returncode == 0 and r.stdout == data, r.stderr
    finally:
        unmount_all(m)
    for ref, says in (("0f3c9e21a7b4", "no such container: 0f3c9e21a7b4"), ("", "no such container")):
        r = run_cowfs("export", ref, "-o", os.path.join(shared_tmp, "no.tar"), "--store", store)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr
        assert not os.path.exists(os.path.join(shared_tmp, "no.tar"))


# -- save gives back any imported layer tar, byte for byte (its tar-split) ----------------------------------

def _patch_header(data, offset, mode=None):
    """`data` with the 512-byte header at `offset` given the raw mode field `mode` (type bits and all, as Go's
    archive/tar writes it), its checksum made again."""
    header = bytearray(data[offset:offset + 512])
    if mode is not None:
        header[100:108] = b"%07o\0" % mode
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return data[:offset] + bytes(header) + data[offset + 512:]


def foreign_layer(big=b""):
    """A layer tar in no form cowfs writes: type bits in the mode fields, user and group names, a GNU long
    name, a ustar prefix, a hard link, a whiteout, a symlink, an empty file, a pax xattr and eight zero blocks
    at the end (two would do)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        def add(name, kind=tarfile.REGTYPE, data=None, mode=0o644, **attrs):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime, info.uname, info.gname = kind, mode, MTIME, "root", "wheel"
            for key, value in attrs.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
        add("./", tarfile.DIRTYPE, mode=0o755)
        add("./etc/", tarfile.DIRTYPE, mode=0o755)
        add("./etc/os-release", data=b"ID=foreign\n")
        add("./etc/big", data=big)
        add("./etc/empty", data=b"")
        add("./etc/again", tarfile.LNKTYPE, linkname="./etc/os-release")
        add("./etc/.wh.gone", data=b"", mode=0o600, mtime=0)
        add("./etc/link", tarfile.SYMTYPE, linkname="/etc/os-release", mode=0o777)
        add("./" + "long" * 40, data=b"a GNU long name")
        tf.format = tarfile.USTAR_FORMAT
        add("./" + "p" * 60 + "/", tarfile.DIRTYPE, mode=0o755)
        add("./" + "p" * 60 + "/" + "q" * 60, data=b"a ustar prefix")
        tf.format = tarfile.PAX_FORMAT
        add("./etc/attr", data=b"with an xattr", pax_headers={"SCHILY.xattr.user.note": "hi"})
    data = buf.getvalue() + bytes(512 * 6)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for info in tf.getmembers():
            kind = stat.S_IFDIR if info.isdir() else stat.S_IFLNK if info.issym() else stat.S_IFREG
            data = _patch_header(data, info.offset_data - 512, kind | info.mode)
    return data


def _saved_layers(path):
    members = saved_members(path)
    return [members[name] for name in json.loads(members["manifest.json"])[0]["Layers"]]


@pytest.mark.parametrize("compress", [False, True])
def test_save_gives_back_a_foreign_layer_byte_for_byte(tmp_path, store, compress):
    layers = [foreign_layer(big=os.urandom(3 << 20)), layer_tar(member("app", "dir"), member("app/x", data=b"x"))]
    with tarfile.open(fileobj=io.BytesIO(layers[0])) as tf:  # what the layer holds, as meant
        assert tf.getmember("./etc").mode == stat.S_IFDIR | 0o755 and tf.getmember("./etc/attr").pax_headers
        assert tf.getmember("./" + "p" * 60 + "/" + "q" * 60).uname == "root"
    assert layers[0][100:108] == b"0040755\0" and layers[0].endswith(bytes(512 * 8))
    assert write_layer_of(tmp_path, layers[0]) != layers[0]  # not canonical: write_layer alone cannot do it
    path = docker_save(tmp_path / "foreign.tar", [(["acme/foreign:1"], layers, None)], compress=compress)
    rc, _, err = cli(store, "import", str(path), "-q")
    assert rc == 0, err
    s = Store(store)
    split = os.path.join(s.layer_dir(sha(layers[0])), "tar-split.gz")
    assert os.path.getsize(split) < 4096  # the 3 MiB of data is in diff/, not in the tar-split
    assert cli(store, "system", "check") == (0, "no problems: 1 image, 2 layers, 0 containers checked\n", "")
    out = tmp_path / "saved.tar"
    assert cli(store, "save", "acme/foreign:1", "-o", str(out)) == (0, "", "")
    assert _saved_layers(out) == layers
    # and into a fresh store, then saved again: the same bytes
    fresh = tmp_path / "fresh"
    assert cli(fresh, "import", str(out), "-q")[0] == 0
    again = tmp_path / "again.tar"
    assert cli(fresh, "save", "acme/foreign:1", "-o", str(again)) == (0, "", "")
    assert _saved_layers(again) == layers


def write_layer_of(tmp_path, data):
    dest = tmp_path / f"w{len(os.listdir(tmp_path))}"
    dest.mkdir()
    unpack_layer(io.BytesIO(data), str(dest), "test")
    buf = io.BytesIO()
    write_layer(str(dest), buf)
    return buf.getvalue()


def test_save_refuses_a_layer_whose_tree_changed(tmp_path, store):
    layer = foreign_layer()
    path = docker_save(tmp_path / "foreign.tar", [(["acme/foreign:1"], [layer], None)])
    assert cli(store, "import", str(path), "-q")[0] == 0
    s = Store(store)
    with open(os.path.join(s.layer_path(sha(layer)), "etc/os-release"), "ab") as f:
        f.write(b"more\n")
    out = tmp_path / "out.tar"
    rc, text, err = cli(store, "save", "acme/foreign:1", "-o", str(out))
    assert rc == 1 and text == "" and err.count("\n") == 1 and "cannot be written back" in err, err
    assert "etc/os-release in its tree holds 16 bytes, 11 when imported" in err, err
    assert not out.exists() and os.listdir(os.path.join(store, "tmp")) == []
    # the same size, other bytes: the diff ID says it
    with open(os.path.join(s.layer_path(sha(layer)), "etc/os-release"), "wb") as f:
        f.write(b"ID=changed\n")
    rc, _, err = cli(store, "save", "acme/foreign:1", "-o", str(out))
    assert rc == 1 and err.count("\n") == 1 and "changed since" in err, err
    # a symlink where a file was: not followed
    os.unlink(os.path.join(s.layer_path(sha(layer)), "etc/os-release"))
    os.symlink("/etc/hostname", os.path.join(s.layer_path(sha(layer)), "etc/os-release"))
    rc, _, err = cli(store, "save", "acme/foreign:1", "-o", str(out))
    assert rc == 1 and err.count("\n") == 1 and "etc/os-release" in err, err
    assert not out.exists()


def test_save_without_a_tar_split_writes_the_tree_back(tmp_path, store):
    canonical = canonical_layers(tmp_path, BASE_LAYERS)
    foreign = foreign_layer()
    path = docker_save(tmp_path / "both.tar", [(["acme/canonical:1"], canonical, None),
                                               (["acme/foreign:1"], [foreign], None)])
    assert cli(store, "import", str(path), "-q")[0] == 0
    s = Store(store)
    for diff_id in s.layer_ids():  # as a layer imported by an older cowfs
        os.unlink(os.path.join(s.layer_dir(diff_id), "tar-split.gz"))
    out = tmp_path / "out.tar"
    assert cli(store, "save", "acme/canonical:1", "-o", str(out)) == (0, "", "")
    assert _saved_layers(out) == canonical
    rc, _, err = cli(store, "save", "acme/foreign:1", "-o", str(out))
    assert rc == 1 and err.count("\n") == 1 and "not in canonical form" in err, err
    # a damaged tar-split is as none: check says so, save falls back (and refuses a foreign layer)
    split = os.path.join(s.layer_dir(sha(foreign)), "tar-split.gz")
    with open(split, "wb") as f:
        f.write(gzip.compress(b"cowfs-tar-split\x01R\0\0\0\x09short"))
    rc, text, _ = cli(store, "system", "check")
    assert rc == 1 and [line for line in text.splitlines() if "tar-split" in line] == [
        f"layer {sha(foreign)[7:19]}: its tar-split.gz cannot be read (truncated): cowfs save can give its tar "
        "back only if it was canonical"], text
    rc, _, err = cli(store, "save", "acme/foreign:1", "-o", str(out))
    assert rc == 1 and err.count("\n") == 1 and "not in canonical form" in err, err

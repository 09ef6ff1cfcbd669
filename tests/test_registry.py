"""cowfs pull, push, login and logout against a private docker-registry (CNCF distribution) on loopback, skopeo
for interoperability, and a fake registry (cowfs.testing.registry) for the answers a real one never gives."""

import base64
import gzip
import io
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
from test_images import APP_LAYERS, BASE_LAYERS, cli, docker_save, layer_tar, member, store_state

from cowfs.images.registry import Remote
from cowfs.images.store import Store
from cowfs.testing.mounts import missing_feature
from cowfs.testing.registry import FakeRegistry, image_blobs, private_registry, sha256
from cowfs.testing.tree import snapshot

pytestmark = pytest.mark.registry

COWFS = [sys.executable, "-m", "cowfs"]
EXTRA = layer_tar(member("data", "dir"), member("data/blob", data=bytes(range(256)) * 64))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    try:
        with private_registry(base=str(tmp_path_factory.mktemp("registry"))) as r:
            yield r
    except RuntimeError as e:
        missing_feature(f"registry: {e}")


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory):
    try:
        with private_registry(users={"alice": "s3cret"}, base=str(tmp_path_factory.mktemp("auth"))) as r:
            yield r
    except RuntimeError as e:
        missing_feature(f"registry: {e}")


def app_store(base, tags=("acme/app:1.0",), layers=BASE_LAYERS + APP_LAYERS):
    os.makedirs(base, exist_ok=True)
    store = os.path.join(base, "store")
    archive = docker_save(os.path.join(base, "app.tar"), [(list(tags), layers, None)])
    rc, _, err = cli(store, "import", archive, "-q")
    assert rc == 0, err
    return store


def ok(store, *argv):
    rc, out, err = cli(store, *argv)
    assert rc == 0, err
    return out


def one_error_line(store, *argv):
    rc, out, err = cli(store, *argv)
    assert rc == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def inspect(store, ref):
    data = json.loads(ok(store, "inspect", ref).replace(os.path.abspath(store), "STORE"))[0]
    data.pop("RepoTags")
    return data


def layer_contents(store, ref):
    """The unpacked trees of an image's layers, bottom first, times to the nanosecond: the tar's, but for a
    whiteout's (unpacked, Docker's overlay2 gives it the time it is made, and so does cowfs) and the root's."""
    s = Store(store)
    trees = []
    for diff_id in s.image_layers(s.resolve(ref)):
        tree = snapshot(s.layer_path(diff_id), all_xattrs=True, exact_times=True)
        for rel, entry in tree["entries"].items():
            if rel == "." or entry.get("rdev") == (0, 0):
                entry.pop("mtime_ns")
        trees.append(tree)
    return trees


def blob_gets(registry, since):
    return [r for r in registry.requests_logged()[since:] if r.startswith("GET ") and "/blobs/" in r]


# -- against docker-registry ----------------------------------------------------------------------------

def test_push_then_pull_into_an_empty_store_gives_the_same_image(tmp_path, registry):
    a = app_store(tmp_path / "a")
    ref = f"{registry.host}/acme/app:1.0"
    ok(a, "tag", "acme/app:1.0", ref)
    out = first_push = ok(a, "push", ref)
    assert out.splitlines()[0] == f"The push refers to repository [{registry.host}/acme/app]"
    assert out.splitlines()[-1].startswith("1.0: digest: sha256:")
    b = str(tmp_path / "b")
    out = ok(b, "pull", ref)
    assert f"Status: Downloaded newer image for {ref}" in out and out.splitlines()[-1] == ref
    assert inspect(a, ref) == inspect(b, ref)
    assert layer_contents(a, ref) == layer_contents(b, ref)
    # and both stores recorded the same tree digests, though their whiteouts were made at other times
    sa, sb = Store(a), Store(b)
    assert [sa.layer_info(d)["content"] for d in sa.image_layers(sa.resolve(ref))] == \
        [sb.layer_info(d)["content"] for d in sb.image_layers(sb.resolve(ref))]
    # a second pull downloads no blob at all (the config is the stored image)
    since = len(registry.requests_logged())
    out = ok(b, "pull", ref)
    assert f"Status: Image is up to date for {ref}" in out
    assert blob_gets(registry, since) == []
    # a second push sends nothing: HEADs only
    since = len(registry.requests_logged())
    out2 = ok(a, "push", ref)
    sent = [r for r in registry.requests_logged()[since:] if not r.startswith(("HEAD ", "GET /v2/ "))]
    assert all(r.startswith("PUT /v2/acme/app/manifests/") for r in sent), sent
    assert out2.splitlines()[-1] == first_push.splitlines()[-1]  # the same manifest, byte for byte
    assert out2.count("Layer already exists") == 4


def test_the_same_layer_pushed_twice_gives_the_same_blob(tmp_path, registry):
    """Deterministic gzip: two stores, no shared cache, the same image: the same manifest digest."""
    digests = []
    for i in range(2):
        store = app_store(tmp_path / str(i))
        ref = f"{registry.host}/acme/det{i}:1"
        ok(store, "tag", "acme/app:1.0", ref)
        digests.append(ok(store, "push", ref).splitlines()[-1].split()[2])
        cache = json.load(open(os.path.join(store, "distribution.json")))
        assert all(e["cowfs"] for entries in cache.values() for e in entries)
    assert digests[0] == digests[1]


def test_a_blob_of_another_repository_is_mounted_not_uploaded(tmp_path, registry):
    store = app_store(tmp_path)
    first, second = f"{registry.host}/acme/mnt-a:1", f"{registry.host}/other/mnt-b:1"
    ok(store, "tag", "acme/app:1.0", first)
    ok(store, "tag", "acme/app:1.0", second)
    ok(store, "push", first)
    since = len(registry.requests_logged())
    out = ok(store, "push", second)
    assert out.count("Mounted from acme/mnt-a") == 4, out
    uploads = [r for r in registry.requests_logged()[since:] if r.startswith("PUT ") and "/blobs/" in r]
    assert len(uploads) == 1  # the config alone
    fresh = str(tmp_path / "fresh")
    ok(fresh, "pull", second)
    assert layer_contents(fresh, second) == layer_contents(store, "acme/app:1.0")


def test_a_layer_changed_in_the_store_is_not_pushed(tmp_path, registry):
    """A layer is sent as it is compressed: one whose tree no longer gives its diff ID fails the push in
    one line, and the registry gets no manifest (the upload is never completed with a digest)."""
    store = app_store(tmp_path)
    s = Store(store)
    with open(os.path.join(s.layer_path(s.image_layers(s.resolve("acme/app:1.0"))[0]), "bin", "sh"), "ab") as f:
        f.write(b"changed")
    ref = f"{registry.host}/acme/changed:1"
    ok(store, "tag", "acme/app:1.0", ref)
    since = len(registry.requests_logged())
    line = one_error_line(store, "push", ref)
    assert "cannot be written back as it was stored" in line, line
    sent = registry.requests_logged()[since:]
    assert not [r for r in sent if "/manifests/" in r and r.startswith("PUT ")], sent


def test_errors_of_a_real_registry_are_one_line(tmp_path, registry):
    store = app_store(tmp_path)
    before = store_state(store)
    line = one_error_line(store, "pull", f"{registry.host}/acme/nothing:1.0")
    assert line.startswith(f"cowfs pull: {registry.host}/acme/nothing:1.0: not found: no manifest 1.0"), line
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = one_error_line(store, "pull", f"127.0.0.1:{port}/acme/app:1.0")
    assert line == f"cowfs pull: 127.0.0.1:{port}/acme/app:1.0: cannot reach registry 127.0.0.1:{port} " \
        "(Connection refused)", line
    line = one_error_line(store, "push", f"{registry.host}/acme/untagged:1.0")
    assert "no such image" in line and "cowfs tag IMAGE" in line
    line = one_error_line(store, "pull", f"{registry.host}/Acme/app:1.0")
    assert "must be lowercase" in line
    assert store_state(store) == before


def test_basic_auth_login_pull_push_logout(tmp_path, auth_registry):
    store = app_store(tmp_path)
    host = auth_registry.host
    ref = f"{host}/acme/app:1.0"
    ok(store, "tag", "acme/app:1.0", ref)
    before = store_state(store)
    line = one_error_line(store, "push", ref)
    assert line == f"cowfs push: {ref}: 401 unauthorized: authentication required (cowfs login {host})", line
    line = one_error_line(store, "login", host, "-u", "alice", "-p", "wrong")
    assert line.startswith(f"cowfs login: {host}: 401 unauthorized: wrong user name or password for {host}"), line
    assert store_state(store) == before
    assert ok(store, "login", host, "-u", "alice", "-p", "s3cret").strip() == "Login Succeeded"
    auth = os.path.join(store, "auth.json")
    assert stat.S_IMODE(os.stat(auth).st_mode) == 0o600
    assert json.load(open(auth)) == {"auths": {host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}}
    ok(store, "push", ref)
    other = str(tmp_path / "other")
    line = one_error_line(other, "pull", ref)
    assert "401 unauthorized: authentication required" in line
    shutil.copy(auth, os.path.join(other, "auth.json"))
    ok(other, "pull", ref)
    assert ok(store, "logout", host).strip() == f"Removing login credentials for {host}"
    assert json.load(open(auth)) == {"auths": {}}


def test_skopeo_pulls_what_cowfs_pushed_and_cowfs_pulls_what_skopeo_pushed(tmp_path, registry):
    if shutil.which("skopeo") is None:
        missing_feature("registry: no skopeo (Debian package skopeo)")
    store = app_store(tmp_path)
    ref = f"{registry.host}/acme/interop:1"
    ok(store, "tag", "acme/app:1.0", ref)
    ok(store, "push", ref)
    oci = tmp_path / "oci"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{oci}:x"], check=True,
                   capture_output=True, timeout=60)
    index = json.load(open(oci / "index.json"))
    manifest = json.load(open(oci / "blobs/sha256" / index["manifests"][0]["digest"][7:]))
    config = json.load(open(oci / "blobs/sha256" / manifest["config"]["digest"][7:]))
    s = Store(store)
    assert config["rootfs"]["diff_ids"] == s.image_layers(s.resolve(ref))
    for desc in manifest["layers"]:  # skopeo checked the digests; the tars give the diff IDs
        with open(oci / "blobs/sha256" / desc["digest"][7:], "rb") as f:
            assert sha256(gzip.decompress(f.read())) in config["rootfs"]["diff_ids"]
    # the other way: skopeo pushes a docker save archive, cowfs pulls it
    archive = docker_save(tmp_path / "sk.tar", [(["acme/sk:1"], BASE_LAYERS + [EXTRA], None)])
    theirs = f"{registry.host}/skopeo/app:1"
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"docker-archive:{archive}", f"docker://{theirs}"],
                   check=True, capture_output=True, timeout=60)
    other = str(tmp_path / "other")
    ok(other, "pull", theirs)
    s = Store(other)
    assert s.image_layers(s.resolve(theirs)) == [sha256(t) for t in BASE_LAYERS + [EXTRA]]


@pytest.mark.fuse
def test_pulled_image_mounts_as_the_pushed_one(shared_tmp, registry):
    a = app_store(shared_tmp)
    ref = f"{registry.host}/acme/mounted:1"
    ok(a, "tag", "acme/app:1.0", ref)
    ok(a, "push", ref)
    b = os.path.join(shared_tmp, "b")
    ok(b, "pull", ref)
    trees = []
    for store in (a, b):
        mnt = os.path.join(store, "mnt")
        os.mkdir(mnt)
        r = subprocess.run(COWFS + ["mount", ref, mnt, "--store", store], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        try:
            trees.append(snapshot(mnt))
        finally:
            subprocess.run(COWFS + ["umount", mnt], capture_output=True, timeout=60)
    assert trees[0] == trees[1]
    assert "app/hello.sh" in trees[0]["entries"]


# -- against the fake registry --------------------------------------------------------------------------

def fake_image(fake, ref="acme/app", tag="1.0", layers=BASE_LAYERS, compress="gzip"):
    manifest, blobs, config = image_blobs(layers, compress)
    fake.add(ref, tag, manifest, blobs)
    return manifest, blobs, config


def test_zstd_and_plain_layers_and_platform_indexes(tmp_path):
    with FakeRegistry() as fake:
        fake_image(fake, "acme/z", layers=[BASE_LAYERS[0]], compress="zstd")
        fake_image(fake, "acme/p", layers=[BASE_LAYERS[1]], compress=None)
        amd, amd_blobs, amd_config = image_blobs(BASE_LAYERS, "gzip", "amd64")
        arm, arm_blobs, arm_config = image_blobs([EXTRA], "gzip", "arm64")
        index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                            "manifests": [
                                {"mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                                 "digest": sha256(m), "size": len(m), "platform": {"os": "linux", "architecture": a}}
                                for m, a in ((arm, "arm64"), (amd, "amd64"))]}).encode()
        fake.add("acme/multi", "1", amd, amd_blobs)
        fake.add("acme/multi", "1", arm, arm_blobs)
        fake.add("acme/multi", "1", index, {}, media="application/vnd.oci.image.index.v1+json")
        store = str(tmp_path / "s")
        ok(store, "pull", f"{fake.host}/acme/z:1.0")
        ok(store, "pull", f"{fake.host}/acme/p:1.0")
        s = Store(store)
        assert s.image_layers(s.resolve(f"{fake.host}/acme/z:1.0")) == [sha256(BASE_LAYERS[0])]
        assert s.image_layers(s.resolve(f"{fake.host}/acme/p:1.0")) == [sha256(BASE_LAYERS[1])]
        ok(store, "pull", "--platform", "linux/arm64", f"{fake.host}/acme/multi:1")
        assert s.resolve(f"{fake.host}/acme/multi:1") == arm_config
        if os.uname().machine == "x86_64":
            ok(store, "pull", f"{fake.host}/acme/multi:1")
            assert s.resolve(f"{fake.host}/acme/multi:1") == amd_config
        line = one_error_line(store, "pull", "--platform", "linux/s390x", f"{fake.host}/acme/multi:1")
        assert "no manifest for platform linux/s390x in the image index (it has: linux/amd64, linux/arm64)" in line
        # by digest: the manifest checked against it
        ok(store, "pull", f"{fake.host}/acme/p@{sha256(fake.manifests['acme/p:1.0'][1])}")


def _mangled(blob):
    data = bytearray(blob)
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


CASES = {
    "garbage manifest": (lambda m, b, c: ("manifests", (200, {"Content-Type": "text/html"}, b"<html>hello</html>")),
                         "the registry's answer is not a manifest (not JSON: b'<html>hello</html>')"),
    "unknown media type": (lambda m, b, c: ("manifests", (200, {"Content-Type": "application/x-thing"},
                                                          json.dumps({"schemaVersion": 2, "mediaType":
                                                                      "application/x-thing"}).encode())),
                           "manifest of unknown media type 'application/x-thing'"),
    "schema 1": (lambda m, b, c: ("manifests", (200, {}, json.dumps({"schemaVersion": 1}).encode())),
                 "manifest of unknown media type"),
    "403": (lambda m, b, c: ("manifests", (403, {"Content-Type": "application/json"},
                                           b'{"errors":[{"code":"DENIED","message":"requested access to the '
                                           b'resource is denied"}]}')),
            "403 denied: not allowed to access acme/app (DENIED requested access to the resource is denied)"),
    "missing blob": (lambda m, b, c: ("last", (404, {}, b"")), "not found: blob sha256:"),
    "truncated blob": (lambda m, b, c: ("last", "truncate"), "truncated blob sha256:"),
    "mismatching blob": (lambda m, b, c: ("last", "mangle"), "digest mismatch: blob sha256:"),
    "garbage layer": (lambda m, b, c: ("image", [b"not a tar\n" * 300]), "layer "),
    "mismatching config": (lambda m, b, c: ("config", "mangle"), "digest mismatch: config sha256:"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_broken_answer_is_one_line_and_changes_nothing(tmp_path, case):
    with FakeRegistry() as fake:
        make, expected = CASES[case]
        where, what = make(None, None, None)
        manifest, blobs, config = fake_image(fake, layers=what if where == "image" else BASE_LAYERS)
        last = json.loads(manifest)["layers"][-1]["digest"]
        target = {"last": last, "config": config}.get(where)

        def override(method, path):
            if where == "manifests" and "/manifests/" in path:
                return what
            if target and path.endswith(target):
                if isinstance(what, tuple):
                    return what
                blob = blobs[target]
                if what == "truncate":  # says its whole length, sends half, closes
                    return 200, {"Content-Length": str(len(blob)), "Connection": "close"}, blob[:len(blob) // 2]
                return 200, {}, _mangled(blob)
            return None

        fake.override = override
        store = app_store(tmp_path, layers=[APP_LAYERS[0]])
        before = store_state(store)
        ref = f"{fake.host}/acme/app:1.0"
        line = one_error_line(store, "pull", ref)
        assert line.startswith(f"cowfs pull: {ref}: ") and expected in line, line
        assert store_state(store) == before


def test_bearer_token_flow(tmp_path):
    with FakeRegistry(login=("bob", "pw")) as fake:
        fake_image(fake)
        store = str(tmp_path / "s")
        ref = f"{fake.host}/acme/app:1.0"
        line = one_error_line(store, "pull", ref)
        assert line == f"cowfs pull: {ref}: 401 unauthorized by the token server: authentication required " \
            f"(cowfs login {fake.host})", line
        line = one_error_line(store, "login", fake.host, "-u", "bob", "-p", "nope")
        assert "401 unauthorized by the token server: wrong user name or password" in line
        ok(store, "login", fake.host, "-u", "bob", "-p", "pw")
        fake.log.clear()
        ok(store, "pull", ref)
        assert fake.log.count("GET /token") == 1  # one token, then every request carries it
        assert len(fake.tokens) == 2


def _store_trees(store):
    """What a pull may leave: the store as it was, or with the image; tmp/ healed first (a command opens it)."""
    subprocess.run(COWFS + ["images", "--store", store], capture_output=True, timeout=60)  # heals tmp/
    r = subprocess.run(COWFS + ["system", "check", "--store", store], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return store_state(store)


def test_a_pull_killed_anywhere_leaves_the_store_as_it_was_or_pulled(tmp_path):
    layers = [EXTRA, layer_tar(member("big", data=os.urandom(300_000)))]
    with FakeRegistry() as fake:
        manifest, blobs, _ = fake_image(fake, layers=layers)
        total = sum(len(b) for b in blobs.values())
        fake.rate = total * 2  # the whole image in about half a second
        base = app_store(tmp_path, layers=[APP_LAYERS[0]])
        before = _store_trees(base)
        done_store = str(tmp_path / "done")
        shutil.copytree(base, done_store, symlinks=True)
        ref = f"{fake.host}/acme/app:1.0"
        r = subprocess.run(COWFS + ["pull", ref, "--store", done_store], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        after = _store_trees(done_store)
        rng = random.Random(os.environ.get("COWFS_REGISTRY_SEED", 7))
        points = [0, total // 3, total - 1, total] + [rng.randrange(total) for _ in range(3)]
        seen = set()
        for i, point in enumerate(points):
            store = str(tmp_path / f"k{i}")
            shutil.copytree(base, store, symlinks=True)
            fake.sent = 0
            proc = subprocess.Popen(COWFS + ["pull", ref, "--store", store], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 30
            while fake.sent < point and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            if point == total:
                time.sleep(rng.random() * 0.2)  # while it unpacks, records, commits
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            state = _store_trees(store)
            # as it was, exactly; or as a whole pull leaves it (the same files; times and layer.json's created
            # differ from one pull to another, and `system check` above verified every layer and image)
            shape = {k: v["type"] for k, v in state["entries"].items()}
            if state != before and shape != {k: v["type"] for k, v in after["entries"].items()}:
                pytest.fail(f"killed after {point} of {total} bytes: the store is in between")
            seen.add("before" if state == before else "after")
        assert "before" in seen


def test_login_help_and_usage():
    r = subprocess.run(COWFS + ["pull", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "cowfs pull 127.0.0.1:5000/acme/app:1.0" in r.stdout
    r = subprocess.run(COWFS + ["login", "127.0.0.1:1", "-u", "a", "-p", "b", "--password-stdin"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "do not go together" in r.stderr


def test_plain_http_for_loopback_and_insecure_registries(tmp_path):
    from cowfs.images import registry as reg

    assert reg.Client(Remote("127.0.0.1:5000/a")).base == "http://127.0.0.1:5000/v2/"
    assert reg.Client(Remote("localhost/a:1")).base == "http://localhost/v2/"
    assert reg.Client(Remote("[::1]:5000/a")).base == "http://[::1]:5000/v2/"
    assert reg.Client(Remote("registry.example.com/a")).base == "https://registry.example.com/v2/"
    assert reg.Client(Remote("alpine")).base == "https://registry-1.docker.io/v2/"
    assert reg.Client(Remote("registry.example.com/a"), insecure=True).base == "http://registry.example.com/v2/"
    store = Store(str(tmp_path / "s"))
    reg.remember_insecure(store, "build-host:5000")
    assert reg.insecure_registries(store) == {"build-host:5000"}


def test_a_pull_stopped_by_sigterm_says_so_and_changes_nothing(tmp_path):
    with FakeRegistry() as fake:
        _, blobs, _ = fake_image(fake, layers=[layer_tar(member("big", data=os.urandom(200_000)))])
        fake.rate = 100_000  # two seconds
        store = app_store(tmp_path, layers=[APP_LAYERS[0]])
        before = store_state(store)
        proc = subprocess.Popen(COWFS + ["pull", f"{fake.host}/acme/app:1.0", "--store", store],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while fake.sent < 50_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert err.strip().splitlines()[-1] == "cowfs pull: interrupted"
        assert store_state(store) == before


def test_progress_redraws_on_a_terminal_and_prints_changes_elsewhere():
    import io

    from cowfs.images.registry import Lines

    class Tty(io.StringIO):
        def isatty(self):
            return True

    plain, tty = io.StringIO(), Tty()
    for out in (plain, tty):
        lines = Lines(out)
        lines.set("aaa", "Pulling fs layer")
        lines.set("bbb", "Pulling fs layer")
        lines.set("aaa", "Downloading", lines.bar(5, 10))
        lines.set("aaa", "Downloading", lines.bar(6, 10))
        lines.set("aaa", "Pull complete")
    assert plain.getvalue().splitlines() == ["aaa: Pulling fs layer", "bbb: Pulling fs layer", "aaa: Downloading",
                                             "aaa: Pull complete"]
    screen = tty.getvalue()
    assert "\x1b[2A" in screen and "aaa: Downloading [" in screen and screen.endswith(
        "\x1b[2Kaaa: Pull complete\n\x1b[2Kbbb: Pulling fs layer\n")


def test_remote_names():
    r = Remote("alpine")
    assert (r.domain, r.repository, r.tag, r.local) == ("docker.io", "library/alpine", "latest", "alpine:latest")
    r = Remote("127.0.0.1:5000/acme/app@sha256:" + "a" * 64)
    assert (r.domain, r.repository, r.tag, r.digest) == ("127.0.0.1:5000", "acme/app", None, "sha256:" + "a" * 64)
    r = Remote("localhost:5000/app:1")
    assert (r.domain, r.repository, r.local) == ("localhost:5000", "app", "localhost:5000/app:1")


def test_block_gzip_is_gzip_deterministic_and_stores_what_does_not_compress():
    from cowfs.images.registry import _BlockGzip

    rng = random.Random(7)
    noise = rng.randbytes(600 << 10)
    text = b"".join(b"line %d of some text\n" % i for i in range(40000))
    for data in (b"", b"x", text, noise, noise[:300 << 10] + text + noise[300 << 10:] + b"end"):
        blobs = []
        for piece in (1000, 65536, 1 << 20):
            out = io.BytesIO()
            gz = _BlockGzip(out)
            for i in range(0, len(data), piece):
                gz.write(data[i:i + piece])
            gz.close()
            blobs.append(out.getvalue())
        assert blobs[0] == blobs[1] == blobs[2]  # the bytes decide, not how they were written
        blob = blobs[0]
        assert blob[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" and gzip.decompress(blob) == data
        if data is noise:
            assert len(data) < len(blob) < len(data) * 1.001  # stored: not deflated for nothing
        if data is text:
            assert len(blob) <= len(gzip.compress(data, 6, mtime=0)) * 1.01  # deflated as well as one stream

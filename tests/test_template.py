"""`--format TEMPLATE` (cowfs.cli.template): the Go text/template subset, Go's printing, Docker's list formats,
and the four commands that take it (inspect, images, history, ps), as docker prints them.

In-process and without FUSE: the interpreter on plain data, then the commands on a small store built with
tests/test_images.py's helpers. Expected outputs are what Go and docker/cli print for the same template
(Go's fmt for values, encoding/json for {{json}}, docker's formatter for "table" and `\\t`).
"""

import argparse
import json
import re
import time

import pytest
from test_images import APP_LAYERS, BASE_LAYERS, cli, docker_save, history_entry, store  # noqa: F401  # a fixture

from cowfs.cli import images as image_cli
from cowfs.cli.template import Record, TemplateError, format_rows, go_quote, go_string, go_time, render
from cowfs.errors import CowfsError
from cowfs.formatting import docker_size, table
from cowfs.images.containers import create_container
from cowfs.images.store import Store

DATA = Record("image", {
    "Id": "sha256:abc",
    "RepoTags": ["acme/app:1", "acme/app:latest"],
    "Size": 1234,
    "Config": {"Cmd": ["/bin/sh", "-c", "echo hi"], "Labels": {"b": "2", "a": "1"}, "Env": None, "Tty": False},
    "RootFS": Record("RootFS", {"Type": "layers", "Layers": ["sha256:l1", "sha256:l2"]}),
    "Ratio": 0.5,
    "Big": 1e6,
    "Empty": [],
    "Flag": True,
    "Name": "héllo <wörld>",
})


@pytest.fixture
def utc(monkeypatch):
    """The local zone is UTC (Go prints times in the local zone)."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# -- the interpreter ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template, expected", [
    # fields, nested fields, dot
    ("{{.Id}}", "sha256:abc"),
    ("{{.RootFS.Type}}", "layers"),
    ("{{.Config.Cmd}}", "[/bin/sh -c echo hi]"),
    ("id={{ .Id }} size={{.Size}}", "id=sha256:abc size=1234"),
    ("{{with .RootFS}}{{.Type}}{{end}}", "layers"),
    # values as Go's fmt prints them
    ("{{.Config.Labels}}", "map[a:1 b:2]"),
    ("{{.RootFS}}", "{layers [sha256:l1 sha256:l2]}"),
    ("{{.Config.Nope}}", "<no value>"),  # a map's missing key
    ("{{.Config.Env}}", "<no value>"),  # a null in a map: Go's template unwraps it to no value
    ("{{.Config.Nope.Deeper}}", "<no value>"),
    ("{{.Config.Tty}} {{.Flag}}", "false true"),
    ("{{.Ratio}} {{.Big}} {{.Empty}}", "0.5 1e+06 []"),
    ("{{print .Config.Env}} {{index .Config \"Env\"}}", "<nil> <no value>"),
    # json, as encoding/json without HTML escaping (docker's json function)
    ("{{json .RootFS.Layers}}", '["sha256:l1","sha256:l2"]'),
    ("{{json .Config}}", '{"Cmd":["/bin/sh","-c","echo hi"],"Env":null,"Labels":{"a":"1","b":"2"},"Tty":false}'),
    ("{{json .RootFS}}", '{"Type":"layers","Layers":["sha256:l1","sha256:l2"]}'),  # a struct: fields in order
    ("{{json .Name}} {{json .Big}} {{json .Ratio}}", '"héllo <wörld>" 1000000 0.5'),
    # index, len, slice
    ("{{index .RepoTags 0}}", "acme/app:1"),
    ('{{index .Config.Labels "b"}} {{index .Config "Cmd" 2}}', "2 echo hi"),
    ('{{index .Config.Labels "zz"}}', "<no value>"),
    ("{{len .RepoTags}} {{len .Config.Labels}} {{len .Name}}", "2 2 15"),  # a string's length in bytes
    ("{{slice .RepoTags 1}} {{slice .Id 0 6}}", "[acme/app:latest] sha256"),
    # range: dot rebound, $i $e, maps by key, $ the root, else, break and continue, over an int
    ("{{range .RepoTags}}<{{.}}>{{end}}", "<acme/app:1><acme/app:latest>"),
    ("{{range $i, $e := .RepoTags}}{{$i}}={{$e}} {{end}}", "0=acme/app:1 1=acme/app:latest "),
    ("{{range $e := .RootFS.Layers}}{{$e}};{{end}}", "sha256:l1;sha256:l2;"),
    ("{{range $k, $v := .Config.Labels}}{{$k}}:{{$v}} {{end}}", "a:1 b:2 "),
    ("{{range .RepoTags}}{{$.Id}} {{end}}", "sha256:abc sha256:abc "),
    ("{{range .Empty}}x{{else}}none{{end}}", "none"),
    ("{{range .Config.Nope}}x{{else}}none{{end}}", "none"),
    ('{{range .RepoTags}}{{if eq . "acme/app:1"}}{{continue}}{{end}}{{.}}{{end}}', "acme/app:latest"),
    ('{{range .RepoTags}}{{if eq . "acme/app:latest"}}{{break}}{{end}}{{.}}{{end}}', "acme/app:1"),
    ("{{range 3}}{{.}}{{end}}", "012"),
    # if, else if, else, with; Go's truth
    ("{{if .Flag}}yes{{else}}no{{end}}", "yes"),
    ("{{if .Empty}}a{{else if .Config.Tty}}b{{else if .Size}}c{{else}}d{{end}}", "c"),
    ("{{if .Config.Nope}}a{{else}}b{{end}}{{if 0}}c{{end}}{{if \"\"}}d{{end}}{{if .RootFS}}e{{end}}", "be"),
    ("{{with .Empty}}x{{else}}empty{{end}}", "empty"),
    ("{{if not .Empty}}{{and .Flag .Size}} {{or .Empty 0 .Id}}{{end}}", "1234 sha256:abc"),
    # print, println, printf
    ("{{println .Id .Size}}", "sha256:abc 1234\n"),
    ("{{println}}", "\n"),
    ('{{print 1 2 "a" "b" 3 .RepoTags}}', "1 2ab3 [acme/app:1 acme/app:latest]"),  # spaces between non-strings
    ('{{printf "%-12s|%5d|%05d|%q|%v|%x" "ab" 42 42 "a\\"b" .RepoTags 255}}',
     'ab          |   42|00042|"a\\"b"|[acme/app:1 acme/app:latest]|ff'),
    ('{{printf "%.3s %d %s" .Id .Id}}', "sha %!d(string=sha256:abc) %!s(MISSING)"),
    ('{{printf "%s" "a" 1}}', "a%!(EXTRA int=1)"),
    # Docker's functions
    ('{{upper .Id}} {{lower "ABC"}} {{title "hello wORLD-x"}}', "SHA256:ABC abc Hello WORLD-X"),
    ('{{join .RepoTags ","}}', "acme/app:1,acme/app:latest"),
    ('{{split "a,b,,c" ","}} {{len (split .Id ":")}}', "[a b  c] 2"),
    ('[{{pad .Id 1 2}}][{{pad "" 1 2}}] {{truncate .Id 6}} {{truncate "ab" 6}}', "[ sha256:abc  ][] sha256 ab"),
    # comparisons
    ('{{eq .Size 1234}} {{eq .Id "x" "sha256:abc"}} {{ne 1 2}} {{lt 1 2.5}} {{ge "b" "a"}} {{gt 1 2}}',
     "true true true true true false"),
    # literals: strings with Go's escapes, raw strings, numbers, characters, booleans
    ('{{"a\\tb\\u00e9\\x41"}}|{{`raw\\t`}}', "a\tbéA|raw\\t"),
    ("{{0x1F}} {{-3}} {{+4}} {{1_000}} {{0o17}} {{017}} {{1.5}} {{.5}} {{1e3}} {{'a'}} {{true}}",
     "31 -3 4 1000 15 15 1.5 0.5 1000 97 true"),
    # pipelines, parentheses, variables
    ('{{.Id | upper | printf "%s!"}}', "SHA256:ABC!"),
    ('{{"b" | printf "%s-%s" "a"}} {{.RepoTags | len}}', "a-b 2"),  # the piped value is the last argument
    ("{{len (index .RepoTags 1)}} {{(index .Config.Cmd 0)}}", "15 /bin/sh"),
    ("{{(.RootFS).Type}}", "layers"),
    ("{{$x := .Size}}{{$x}} {{$x = 7}}{{$x}}", "1234 7"),
    ("{{$r := .RootFS}}{{range .RepoTags}}{{$r.Type}}{{end}}", "layerslayers"),
    ("{{if $n := len .RepoTags}}{{$n}}{{end}}", "2"),
    # trim markers and comments
    ("a  {{- .Size -}}  b", "a1234b"),
    ("a {{-3}} b", "a -3 b"),  # "-3" is a number, not a trim marker
    ("a {{/* a comment */}} b", "a  b"),
    ("a {{- /* a comment */ -}} b", "ab"),
    ("{{.Id}}\n{{range .RepoTags -}}\n  {{.}}\n{{end -}}", "sha256:abc\nacme/app:1\nacme/app:latest\n"),
    ("no actions at all \\t", "no actions at all \\t"),  # render: no docker escapes (as docker inspect)
])
def test_template_constructs(template, expected):
    assert render(template, DATA) == expected


@pytest.mark.parametrize("template, message", [
    ("{{.Nope}}", "template: can't evaluate field Nope in type image (it has Id, RepoTags, Size, Config, RootFS, "
                  "Ratio, Big, Empty, Flag, Name) at column 3"),
    ("{{.RootFS.Nope}}", "can't evaluate field Nope in type RootFS (it has Type, Layers) at column 3"),
    ("{{.Id.Foo}}", "can't evaluate field Foo in type string at column 3"),
    ("{{.ID}", 'template: unexpected "}" at column 6'),
    ("{{foo .Id}}", 'template: function "foo" not defined at column 3'),
    ("{{html .Id}}", 'function "html" is not supported at column 3'),
    ("{{.Id", "unclosed action at column 1"),
    ("ok\n{{if .Flag}}x", "{{if}} without {{end}} at line 2, column 3"),
    ("{{end}}", "unexpected {{end}} at column 3"),
    ("{{else}}", "unexpected {{else}} at column 3"),
    ("{{if .Flag}}{{else}}{{else}}{{end}}", "unexpected {{else}} after {{else}}"),
    ("{{.Id 1}}", "can't give argument to non-function .Id at column 3"),
    ("{{.Id | .Size}}", "can't give argument to non-function .Size at column 9"),
    ("{{$x}}", 'undefined variable "$x" at column 3'),
    ("{{range $i, $e := .RepoTags}}{{end}}{{$e}}", 'undefined variable "$e"'),
    ("{{$a, $b := .Id}}", "too many declarations in command"),
    ('{{"abc}}', "unterminated quoted string at column 3"),
    ('{{"a\\qb"}}', "invalid syntax"),
    ("{{`abc}}", "unterminated raw quoted string"),
    ("{{3x}}", 'bad number syntax: "3x" at column 3'),
    ("{{index .RepoTags 5}}", "error calling index: index out of range: 5 at column 3"),
    ('{{index .RepoTags "a"}}', "error calling index: wrong type for value; expected int; got string"),
    ('{{join .Size ","}}', "error calling join: wrong type for value; expected []string; got int"),
    ('{{.RepoTags | join ","}}', "error calling join: wrong type for value; expected []string; got string"),
    ("{{upper .Size}}", "error calling upper: wrong type for value; expected string; got int"),
    ("{{len .Size}}", "error calling len: len of type int"),
    ("{{upper}}", "wrong number of args for upper: want 1 got 0 at column 3"),
    ("{{index}}", "wrong number of args for index: want at least 1 got 0"),
    ("{{eq .RepoTags 1}}", "error calling eq: non-comparable type for comparison"),
    ('{{eq .Size "1234"}}', "error calling eq: incompatible types for comparison"),
    ("{{range .Id}}{{end}}", "range can't iterate over sha256:abc at column 3"),
    ("{{range .RootFS}}{{end}}", "range can't iterate over {layers"),
    ("{{break}}", "{{break}} outside {{range}} at column 3"),
    ('{{template "x"}}', "{{template}} is not supported"),
    ('{{define "x"}}{{end}}', "{{define}} is not supported"),
    ("{{}}", "missing value for command at column 3"),
    ("{{if}}{{end}}", "missing value for if"),
    ("{{nil}}", "nil is not a command"),
    ("{{(.Id}}", 'unexpected "}}" in parenthesized pipeline at column 7'),
    ("{{.Id)}}", 'unexpected ")" in command at column 6'),
    ("{{.Id ; .Size}}", 'unexpected ";" at column 7'),
    ("{{/* no end }}", "unclosed comment at column 1"),
    ("{{/* x */ }}", "comment ends before closing delimiter"),
    ("{{" + "(" * 200 + ".Id" + ")" * 200 + "}}", "nested too deeply"),
])
def test_template_errors_are_one_line_saying_what_and_where(template, message):
    with pytest.raises(TemplateError) as caught:
        render(template, DATA)
    error = caught.value
    assert isinstance(error, CowfsError)
    text = str(error)
    assert text.startswith("template: ") and message in text and "\n" not in text, text


def test_values_print_as_go_prints_them():
    assert go_string(None) == "<no value>" and go_string([None, True, 3, "x"]) == "[<nil> true 3 x]"
    assert go_string({"b": [1, 2], "a": {"y": None}}) == "map[a:map[y:<nil>] b:[1 2]]"
    assert go_string(Record("s", {"A": "x", "B": [1]})) == "{x [1]}"
    floats = {1e6: "1e+06", 123456.0: "123456", 1234567.0: "1.234567e+06", 0.0001: "0.0001", 1e-5: "1e-05",
              100.0: "100", -2.5: "-2.5", 1.5e-7: "1.5e-07", float("inf"): "+Inf"}
    assert {x: go_string(x) for x in floats} == floats
    assert go_quote('a "b"\t\\ é\x01\u00a0') == '"a \\"b\\"\\t\\\\ é\\x01\\u00a0"'  # strconv.Quote


def test_times_print_as_go_prints_them(monkeypatch):
    when = 1704067200  # 2024-01-01T00:00:00Z
    for zone, string, rfc3339 in (("UTC", "2024-01-01 00:00:00 +0000 UTC", "2024-01-01T00:00:00Z"),
                                  ("XYZ-1", "2024-01-01 01:00:00 +0100 XYZ", "2024-01-01T01:00:00+01:00")):
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        try:
            assert go_time(when) == string and go_time(when + 0.9, rfc3339=True) == rfc3339
        finally:
            monkeypatch.undo()
            time.tzset()
    assert go_time(None) == "N/A"


# -- docker's list formats: table, json, \t and \n ------------------------------------------------------------

ROWS = [Record("row", {"ID": "3b1c7e5a0d2f", "Repository": "acme/app", "Tag": "1.0"}),
        Record("row", {"ID": "0f3c9e21a7b4", "Repository": "x", "Tag": "latest"})]
HEADERS = {"ID": "IMAGE ID", "Repository": "REPOSITORY", "Tag": "TAG"}


def test_list_formats_as_docker_formatter():
    assert format_rows("{{.ID}}", ROWS, HEADERS) == "3b1c7e5a0d2f\n0f3c9e21a7b4\n"
    assert format_rows("{{.Repository}}\\t{{.Tag}}\\n", ROWS, HEADERS) == "acme/app\t1.0\n\nx\tlatest\n\n"
    assert format_rows("  {{.Tag}}  ", ROWS, HEADERS) == "1.0\nlatest\n"  # spaces around trimmed
    # "table": the header row is the template run on the column names, then aligned as cowfs's tables
    assert format_rows("table {{.ID}}\\t{{.Repository}}:{{.Tag}}", ROWS, HEADERS) == table(
        [["3b1c7e5a0d2f", "acme/app:1.0"], ["0f3c9e21a7b4", "x:latest"]], ["IMAGE ID", "REPOSITORY:TAG"]) + "\n"
    assert format_rows("table {{.ID}}\\t{{.Tag}}", ROWS, HEADERS).splitlines() == [
        "IMAGE ID       TAG", "3b1c7e5a0d2f   1.0", "0f3c9e21a7b4   latest"]
    # docker's header functions leave the names as they are
    assert format_rows("table {{upper .Repository}}\\t{{json .ID}}\\t{{lower .Tag}}", ROWS, HEADERS).splitlines() == [
        "REPOSITORY   IMAGE ID         TAG", 'ACME/APP     "3b1c7e5a0d2f"   1.0',
        'X            "0f3c9e21a7b4"   latest']
    assert format_rows("table {{.ID}}", [], HEADERS) == "IMAGE ID\n"
    assert format_rows("{{.ID}}", [], HEADERS) == ""
    # "json": {{json .}}, a row per line
    assert [json.loads(line) for line in format_rows("json", ROWS, HEADERS).splitlines()] == [dict(r) for r in ROWS]


def test_list_format_errors_say_where_in_the_argument():
    with pytest.raises(TemplateError, match=r"can't evaluate field Nope in type row .* at column 9$"):
        format_rows("table {{.Nope}}", ROWS, HEADERS)
    with pytest.raises(TemplateError, match=r"function \"foo\" not defined at column 12$"):
        format_rows("{{.ID}}\\t{{foo}}", ROWS, HEADERS)  # \t counts as the two characters given
    with pytest.raises(TemplateError, match="unterminated quoted string"):  # docker's \n is a newline, even there
        format_rows('{{join .Tag "\\n"}}', ROWS, HEADERS)


# -- the commands -----------------------------------------------------------------------------------------------

HISTORY = [history_entry("/bin/sh -c #(nop) ADD file:f278386b0cef68136129f5f58c52445590a417b624d62bca158d4dc926c340df"
                         " in /"),
           history_entry('/bin/sh -c #(nop)  CMD ["/bin/sh"]', empty=True),
           history_entry("RUN /bin/sh -c apk add --no-cache bash # buildkit")]


def _small_store(tmp_path, root):
    """acme/base:1 and acme/app:1 (its layers plus two), and a container of acme/app:1, in store `root`."""
    base = docker_save(tmp_path / "base.tar", [(["acme/base:1"], BASE_LAYERS, HISTORY)])
    app = docker_save(tmp_path / "app.tar", [(["acme/app:1"], BASE_LAYERS + APP_LAYERS,
                                              HISTORY + [history_entry("COPY . /app"), history_entry("RUN chmod")])])
    for archive in (base, app):
        rc, _, err = cli(root, "import", str(archive))
        assert rc == 0, err
    s = Store(root)
    container = create_container(s, s.resolve("acme/app:1"), "acme/app:1", str(tmp_path))
    return s, container


def _lines(root, *argv):
    """The lines a command prints, which must succeed saying nothing on stderr."""
    rc, out, err = cli(root, *argv)
    assert rc == 0 and err == "", err
    return out.splitlines()


def test_inspect_format_runs_a_template_on_the_inspect_object(tmp_path, store):  # noqa: F811
    s, _ = _small_store(tmp_path, store)
    image_id = s.resolve("acme/app:1")
    layers = s.image_layers(image_id)
    rc, out, err = cli(store, "inspect", "--format", "{{json .RootFS.Layers}}", "acme/app:1")
    assert (rc, err) == (0, "") and out == json.dumps(layers, separators=(",", ":")) + "\n"  # as encoding/json
    assert cli(store, "inspect", "-f", "{{.Id}}", "acme/app:1")[1] == image_id + "\n"
    assert cli(store, "inspect", "-f", "{{index .RepoTags 0}} {{.Config.Cmd}} {{.GraphDriver.Name}}",
               "acme/app:1")[1] == "acme/app:1 [/bin/sh] cowfs\n"
    assert cli(store, "inspect", "-f", "{{range .RootFS.Layers}}{{println .}}{{end}}", "acme/app:1")[1] == (
        "".join(f"{layer}\n" for layer in layers) + "\n")
    whole = json.loads(cli(store, "inspect", "acme/app:1")[1])[0]
    assert cli(store, "inspect", "-f", "{{len .RootFS.Layers}} layers, {{.Size}} bytes", "acme/app:1")[1] == (
        f"{len(layers)} layers, {whole['Size']} bytes\n")
    assert json.loads(cli(store, "inspect", "-f", "{{json .}}", "acme/app:1")[1]) == whole
    # the named formats are as they were
    assert cli(store, "inspect", "-f", "id", "acme/app:1")[1] == image_id + "\n"
    assert json.loads(cli(store, "inspect", "--format", "layers", "acme/app:1")[1]) == layers
    # a field the object lacks, a broken template: one line, exit 1; an unknown name: a usage error
    rc, out, err = cli(store, "inspect", "-f", "{{.Nope}}", "acme/app:1")
    assert (rc, out) == (1, "") and err.count("\n") == 1
    assert err.startswith("cowfs inspect: template: can't evaluate field Nope in type image (it has Id, ")
    assert err.endswith(") at column 3\n")
    rc, out, err = cli(store, "inspect", "-f", "{{.Id", "acme/app:1")
    assert (rc, out, err) == (1, "", "cowfs inspect: template: unclosed action at column 1\n")
    with pytest.raises(SystemExit) as caught:
        cli(store, "inspect", "-f", "Id", "acme/app:1")
    assert caught.value.code == 2


def test_images_format_has_docker_fields(tmp_path, store, utc):  # noqa: F811
    s, _ = _small_store(tmp_path, store)
    rows = json.loads(cli(store, "images", "--json")[1])
    app = next(r for r in rows if r["Repository"] == "acme/app")
    assert _lines(store, "images", "--format", "{{.ID}}") == [r["ID"][7:19] for r in rows]  # 12 hex digits
    assert _lines(store, "images", "--format", "{{.ID}}", "--no-trunc") == [r["ID"] for r in rows]
    assert _lines(store, "images", "--format", "{{.Repository}}:{{.Tag}} {{.Digest}} {{.Containers}}") == [
        f"{r['Repository']}:{r['Tag']} <none> {1 if r is app else 0}" for r in rows]
    assert _lines(store, "images", "--format", "{{.Size}}|{{.SharedSize}}|{{.UniqueSize}}") == [
        f"{docker_size(r['Size'])}|{docker_size(r['SharedSize'])}|{docker_size(r['UniqueSize'])}" for r in rows]
    for line in _lines(store, "images", "--format", "{{.CreatedAt}}|{{.CreatedSince}}"):
        assert re.fullmatch(r"2024-01-01 00:00:00 \+0000 UTC\|\d+ \w+ ago", line), line
    assert _lines(store, "images", "--format", "table {{.ID}}\\t{{.Repository}}\\t{{.Tag}}") == [
        "IMAGE ID       REPOSITORY   TAG"] + [f"{r['ID'][7:19]}   {r['Repository']:<10}   {r['Tag']}" for r in rows]
    assert _lines(store, "images", "--format", "table") == _lines(store, "images")
    fields = ["Containers", "CreatedAt", "CreatedSince", "Digest", "ID", "Repository", "SharedSize", "Size", "Tag",
              "UniqueSize"]
    assert [list(json.loads(line)) for line in _lines(store, "images", "--format", "json")] == [fields] * len(rows)
    rc, out, err = cli(store, "images", "--format", "{{.Nope}}")
    assert (rc, out) == (1, "") and err.startswith("cowfs images: template: can't evaluate field Nope in type images "
                                                   "row (it has Containers, CreatedAt, ")
    for other in ("--json", "-q"):
        with pytest.raises(SystemExit) as caught:
            cli(store, "images", "--format", "{{.ID}}", other)
        assert caught.value.code == 2


def test_history_format_has_docker_fields(tmp_path, store, utc):  # noqa: F811
    s, _ = _small_store(tmp_path, store)
    steps = json.loads(cli(store, "history", "--json", "acme/app:1")[1])
    shown = _lines(store, "history", "--format", "{{.ID}}|{{.CreatedAt}}|{{.CreatedBy}}|{{.Size}}|{{.Comment}}",
                   "acme/app:1")
    assert [line.split("|")[0] for line in shown] == _lines(store, "history", "-q", "acme/app:1")
    assert {line.split("|")[1] for line in shown} == {"2024-01-01T00:00:00Z"}  # RFC 3339, as docker history
    assert [line.split("|")[3] for line in shown] == [docker_size(step["Size"]) for step in steps]
    assert shown[-1].split("|")[2] == "/bin/sh -c #(nop) ADD file:f278386b0cef68136…"  # as the column: 45
    whole = _lines(store, "history", "--no-trunc", "--format", "{{.CreatedBy}}", "acme/app:1")
    assert whole == [step["CreatedBy"] for step in steps]
    first = json.loads(_lines(store, "history", "--format", "json", "acme/app:1")[0])
    assert list(first) == ["Comment", "CreatedAt", "CreatedBy", "CreatedSince", "ID", "Size"]
    assert (first["ID"], first["CreatedBy"]) == (s.resolve("acme/app:1")[7:19], "RUN chmod")
    assert _lines(store, "history", "--format", "table {{.ID}}\\t{{.Size}}", "acme/app:1")[0] == "IMAGE          SIZE"


def test_ps_format_has_docker_fields(tmp_path, store, utc):  # noqa: F811
    s, container = _small_store(tmp_path, store)
    [record] = json.loads(cli(store, "ps", "--json")[1])
    size = f"{docker_size(record['Size'])} (virtual {docker_size(record['VirtualSize'])})"
    assert _lines(store, "ps", "--format", "{{.ID}} {{.Image}} {{.Command}} {{.Status}} [{{.Mounts}}] "
                                           "[{{.Names}}] {{.Size}}") == [
        f'{container["Id"][:12]} acme/app:1 "/bin/sh" not mounted [] [] {size}']
    assert _lines(store, "ps", "--no-trunc", "--format", "{{.ID}}") == [container["Id"]]
    [times] = _lines(store, "ps", "--format", "{{.CreatedAt}}|{{.RunningFor}}")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+0000 UTC\|.* ago", times), times
    assert _lines(store, "ps", "--format", "table {{.ID}}\\t{{.Command}}\\t{{.Mounts}}") == [
        "CONTAINER ID   COMMAND     MOUNTS", f'{container["Id"][:12]}   "/bin/sh"']
    for other in ("--json", "-q"):
        with pytest.raises(SystemExit):
            cli(store, "ps", "--format", "{{.ID}}", other)


def test_help_shows_format_for_the_four_commands():
    parser = argparse.ArgumentParser(prog="cowfs")
    sub = parser.add_subparsers(dest="command")
    image_cli.add_commands(sub)
    for name in ("images", "history", "ps", "inspect"):
        text = sub.choices[name].format_help()
        assert "--format" in text and f"cowfs {name} --format '" in text, name

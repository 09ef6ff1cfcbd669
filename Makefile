# cowfs: every target sets up what it needs, so a fresh Debian machine only
# needs `make demo` or `make test`.
#
#   make venv    Debian packages (as root, when missing) and .venv with cowfs installed editable
#   make demo    the Docker storage-driver walkthrough, mounted with cowfs (scripts/demo.sh)
#   make test    the whole test suite
#   make rootless-setup  (as root; test and check run it) the test user and /dev/fuse open to users, for
#                the rootless tests, which drop root's privileges for real (tests/test_rootless.py)
#   make check   the fast edit-test loop (under 2 minutes): engine tests and a sample of the mount tests
#   make lint    ruff over cowfs, tests and scripts (rules in pyproject.toml)
#   make bench   the benchmark (scripts/bench.py); make bench BENCH_ARGS=--quick
#   make fuzz-cli  the command-line fuzz (tests/test_cli_fuzz.py) with many more examples
#   make fuzz-fsx  random read/write/truncate/fallocate sequences, kernel vs cowfs (tests/test_fileops.py)
#   make mutate  mutation testing (mutmut, installed into .venv on first use) of the engine, the adapter's
#                state and the archive code against the in-process tests; survivors in mutants/report.txt
#   make clean   remove scratch/ and .venv (refuses while something under scratch/ is mounted)

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
DEBIAN_PACKAGES := fuse3 fuse-overlayfs attr tmux zstd docker.io busybox-static docker-registry skopeo apache2-utils
PYTEST_ARGS ?=

.PHONY: venv system-packages rootless-setup demo test check lint bench fuzz fuzz-cli fuzz-fsx crash stress install clean mutate

venv: $(VENV)/.installed

# Installs only what is missing; a machine that has everything runs no apt-get at all.  python3-venv is
# needed by $(PYTHON) and by /usr/bin/python3, which makes the rootless tests' user its venv.
system-packages:
	@command -v dpkg >/dev/null || { echo "make: no dpkg here; install FUSE 3 (fusermount3), fuse-overlayfs and attr yourself"; exit 0; }; \
	missing=""; \
	for p in $(DEBIAN_PACKAGES); do \
	  dpkg -s $$p 2>/dev/null | grep -q '^Status: install ok installed' || missing="$$missing $$p"; \
	done; \
	{ $(PYTHON) -c 'import ensurepip, venv' && /usr/bin/python3 -c 'import ensurepip, venv'; } 2>/dev/null \
	  || missing="$$missing python3-venv"; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" -ne 0 ]; then \
	  echo "make: missing Debian packages:$$missing; as root run: apt-get install$$missing" >&2; exit 1; \
	fi; \
	echo "make: installing Debian packages:$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -q && apt-get install -y -q --no-install-recommends $$missing

# What an ordinary user needs to mount, for tests/test_rootless.py (run as root; says what it changes):
# the test user (COWFS_TEST_USER, default cowfs-test) with 65536 subordinate ids for the user namespaces
# the kernel comparison runs in, and /dev/fuse 0666 (Debian's default; some machines ship it 0600, and then
# no user can mount any FUSE filesystem).  As another user it changes nothing.
ROOTLESS_USER := $(or $(COWFS_TEST_USER),cowfs-test)
rootless-setup:
	@if [ "$$(id -u)" -ne 0 ]; then echo "make rootless-setup: not root, nothing changed (the rootless tests run as you)"; exit 0; fi; \
	if ! id -u $(ROOTLESS_USER) >/dev/null 2>&1; then \
	  useradd --create-home --user-group --shell /bin/sh --comment "cowfs rootless tests" $(ROOTLESS_USER) || exit 1; \
	  echo "make rootless-setup: created the user $(ROOTLESS_USER) (uid $$(id -u $(ROOTLESS_USER)))"; \
	fi; \
	for kind in uid gid; do \
	  grep -qs "^$(ROOTLESS_USER):" /etc/sub$$kind && continue; \
	  first=$$(cat /etc/subuid /etc/subgid 2>/dev/null | awk -F: 'BEGIN { m = 100000 } $$2 + $$3 > m { m = $$2 + $$3 } END { print m }'); \
	  range="$$first-$$((first + 65535))"; \
	  usermod --add-sub$${kind}s $$range $(ROOTLESS_USER) || exit 1; \
	  echo "make rootless-setup: gave $(ROOTLESS_USER) the subordinate $${kind}s $$range (/etc/sub$$kind)"; \
	done; \
	if [ -c /dev/fuse ] && [ "$$(stat -c %a /dev/fuse)" = 600 ]; then \
	  chmod 0666 /dev/fuse && echo "make rootless-setup: /dev/fuse was 0600, made 0666 (Debian's default) so that users can mount FUSE"; \
	fi

# The stamp is rebuilt when setup.cfg or pyproject.toml change (new dependencies).
$(VENV)/.installed: setup.cfg pyproject.toml | system-packages
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "make: cowfs needs Python 3.11 or newer as $(PYTHON) (make PYTHON=python3.11)" >&2; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
	$(VENV)/bin/python -m compileall -q cowfs >/dev/null
	touch $@

# The kernel-vs-cowfs parity machine, time-boxed per mode: make fuzz FUZZ_ARGS="--minutes 10"
FUZZ_ARGS ?=
fuzz: venv
	$(VENV)/bin/python scripts/fuzz.py $(FUZZ_ARGS)

# The command-line fuzz with many examples (the suite runs ~150): make fuzz-cli FUZZ_CLI_ARGS="--examples 20000"
# (--examples N, --seed N; anything else goes to pytest)
FUZZ_CLI_ARGS ?= --examples 3000
fuzz-cli: venv
	@set -- $(FUZZ_CLI_ARGS); examples=3000; rest=""; \
	while [ $$# -gt 0 ]; do \
	  case $$1 in --examples) examples=$$2; shift 2;; --seed) rest="$$rest --hypothesis-seed=$$2"; shift 2;; \
	  *) rest="$$rest $$1"; shift;; esac; \
	done; \
	COWFS_FUZZ_CLI_EXAMPLES=$$examples $(VENV)/bin/python -m pytest -q -s tests/test_cli_fuzz.py $$rest

# The fsx-style test with many sequences (the suite draws 20 per mode; 400 take about 30 s):
# make fuzz-fsx FSX_EXAMPLES=5000
FSX_EXAMPLES ?= 1000
fuzz-fsx: venv
	COWFS_FSX_EXAMPLES=$(FSX_EXAMPLES) $(VENV)/bin/python -m pytest -q tests/test_fileops.py -k fsx
# Mutation testing, a habit rather than a gate (`make test` never runs it): mutmut 3 changes the code of
# the modules setup.cfg's [mutmut] names one small change at a time and runs the in-process tests that
# reach it (setup.cfg lists them); a change no test notices survives.  mutmut goes into .venv here, on
# first use, not into the test extra: nothing else needs it.  MUTATE takes mutmut's name globs, for a
# part: make mutate MUTATE="cowfs.overlay.whiteout* cowfs.overlay.copyup*".  Results are kept in mutants/
# (a second run only checks what changed); rm -rf mutants for a fresh one.
MUTATE ?=
MUTATE_JOBS ?= 2
mutate: venv
	@$(VENV)/bin/python -c 'import mutmut' 2>/dev/null || \
	  $(VENV)/bin/python -m pip install -q --disable-pip-version-check 'mutmut >= 3.8, < 4'
	@start=$$(date +%s); rc=0; $(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $(MUTATE) || rc=$$?; \
	$(VENV)/bin/python scripts/mutation_report.py > mutants/report.txt || rc=$$?; \
	echo; tail -n +$$(grep -n '^file ' mutants/report.txt | cut -d: -f1) mutants/report.txt; \
	echo "make mutate: $$(grep -c ': survived: ' mutants/report.txt) survived, $$(grep -c ': no tests: ' mutants/report.txt)" \
	  "not reached by any test, in $$(( $$(date +%s) - start ))s; each listed in mutants/report.txt"; \
	exit $$rc

# kill -9 the cowfs daemon mid-workload and check the remount: make crash CRASH_ARGS="--rounds 50 --seed 7"
CRASH_ARGS ?=
crash: venv
	$(VENV)/bin/python scripts/crash.py $(CRASH_ARGS)

# 16 processes on one cowfs mount for 5 min under a watchdog, then on the kernel overlay:
# make stress STRESS_ARGS="--seconds 600 --seed 1234"
STRESS_ARGS ?=
stress: venv
	$(VENV)/bin/python scripts/stress.py $(STRESS_ARGS)

# mount(8) runs mount.fuse with a fixed PATH, so `mount -t fuse.cowfs` and fstab
# lines need cowfs in a system directory: link the venv's there (as root).
install: venv
	ln -sf "$(CURDIR)/$(VENV)/bin/cowfs" /usr/local/bin/cowfs

demo: venv
	bash scripts/demo.sh

# pytest's exit code 5 means "no tests collected": a failure here, never a pass.
test: venv rootless-setup
	@rc=0; $(VENV)/bin/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	[ $$rc -eq 5 ] && echo "make test: pytest collected no tests" >&2; \
	exit $$rc

# The edit-test loop: the engine without FUSE, then a few differential scenarios (kernel
# overlay vs cowfs, in every mode) picked by CHECK_DIFFERENTIAL. A separate pytest run,
# as -k would also filter CHECK_TESTS; a -k that matches nothing fails (pytest exit 5).
CHECK_TESTS ?= tests/test_layout.py tests/test_engine.py tests/test_engine_concurrency.py tests/test_concurrency.py
CHECK_DIFFERENTIAL ?= copyup_open_wronly or unlink_lower_file or rename_merged_dir or names_like_libfuse_hidden
check: venv rootless-setup
	$(VENV)/bin/python -m pytest -q $(CHECK_TESTS)
	$(VENV)/bin/python -m pytest -q tests/test_differential.py -k "$(CHECK_DIFFERENTIAL)"

lint: venv
	$(VENV)/bin/ruff check cowfs tests scripts

# Arguments for scripts/bench.py (make eats a bare --quick): make bench BENCH_ARGS="--quick --only copyup"
BENCH_ARGS ?=
bench: venv
	@$(VENV)/bin/python -m compileall -q cowfs >/dev/null  # each mount starts an interpreter: no compiling there
	$(VENV)/bin/python scripts/bench.py $(BENCH_ARGS)

clean:
	@scratch="$$(pwd -P)/scratch"; \
	mounted=$$(awk -v d="$$scratch" '$$2 == d || index($$2, d "/") == 1 { print $$2 }' /proc/mounts); \
	if [ -n "$$mounted" ]; then \
	  echo "make clean: still mounted under scratch/ (unmount with: cowfs umount PATH):" >&2; \
	  echo "$$mounted" >&2; exit 1; \
	fi
	rm -rf --one-file-system scratch $(VENV) cowfs.egg-info

# imgbase — see README.md. `make setup` once, then `make image` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export IMGBASE_CACHE ?= /var/cache/imgbase
APT_PACKAGES := mmdebstrap squashfs-tools qemu-system-x86 qemu-utils dpkg-dev e2fsprogs \
                util-linux openssh-client gpg gpgv rpm etcd-server openssl socat rsync ruby dnf createrepo-c \
                groff-base mkosi debian-archive-keyring grub-common lintian ovmf
IMAGE ?= images/node.toml
OUT ?= out

NVR := imgbase-node-1.0-1

.PHONY: setup image compose boot test test-quick test-slow test-powercut lint bench docs tour clean

setup: $(VENV)/.setup-done

# apt first (only what is missing), then a venv with imgbase and its test tools.
$(VENV)/.setup-done: pyproject.toml Makefile
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null | grep -q '^ii' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python >= 3.11 needed")'
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,dev]'
	touch $@

# the main job: compose the default node image, then boot it in qemu and run its self-check
image: compose
	$(BIN)/imgbase vm --live $(OUT)/$(NVR).squashfs --selfcheck --serial-log $(OUT)/$(NVR).selfcheck.log

compose: setup
	$(BIN)/imgbase compose $(IMAGE) -o $(OUT)

# boot the image and keep it up; prints the ssh command (Ctrl-C ends it)
boot: compose
	$(BIN)/imgbase vm --live $(OUT)/$(NVR).squashfs

# the whole suite: unit tests, doctests, real composes and qemu guests -- all but the
# power-cut campaign, which takes as long again (test-powercut)
test: setup
	$(BIN)/pytest -m "not powercut" --durations=40

# the quick part, to run while working
test-quick: setup
	$(BIN)/pytest -m "not slow"

test-slow: setup
	$(BIN)/pytest -m "slow and not powercut"

# kill the power at 20+ points of an update; after each the node boots and recovers
test-powercut: setup
	$(BIN)/pytest -m powercut --durations=5 -s

lint: setup
	$(BIN)/ruff check imgbase tests bench docs
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python bench/compose.py
	$(BIN)/python bench/update.py
	$(BIN)/python bench/boot.py
	$(BIN)/python bench/fleet.py

# the CLI reference and man pages, generated from the parsers (tests fail when stale)
docs: setup
	$(BIN)/python -m imgbase.clidoc --markdown docs/cli.md --man docs/imgbase.1 --agent-man docs/imgbase-agent.8 \
	  --completions docs/completions

# the README's five-minute tour, run for real in qemu (~5 min); its output replaces the old
tour: setup
	$(BIN)/python docs/tour.py --readme README.md

clean:
	rm -rf $(OUT) .pytest_cache .mypy_cache .ruff_cache

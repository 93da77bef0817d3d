# The commands people and CI use. `make run` and `make test` install what is missing.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run stop test test-faults test-cluster test-image image lint bench soak deps venv scenarios lock generate clean

run: deps venv  ## the whole stack, in the foreground, until Ctrl-C
	$(BIN)/flashclaim stack --profile run

stop: venv  ## stop what a `make run` that was killed left running (pid files in .stack/run)
	$(BIN)/flashclaim stack stop --profile run

test: deps venv  ## the whole suite, against servers it starts on ports of its own
	bash deploy/install-deps.sh --test
	$(BIN)/pytest -m "not faults and not cluster and not image"

# Faults injected under load (servers crashed, stopped, flushed, alarmed; processes
# killed), on servers with durable settings: PostgreSQL with fsync on, so that a crash
# proves what it seems to (about four minutes; CI runs it after `make test`).
test-faults: deps venv
	$(BIN)/pytest -m faults --durable-servers

# Clustered faults: a node of a three-node RabbitMQ cluster killed, a PostgreSQL primary
# lost and its standby promoted (about two minutes; CI runs it after `make test`).
test-cluster: deps venv
	$(BIN)/pytest -m cluster

# The image (deploy/Dockerfile), built here with podman: from the official Python image
# when a registry is reachable, else from a base made of Debian packages (deploy/image.sh).
image:
	bash deploy/image.sh

# The image's containers run as docker-compose.yml declares them, against servers of the
# suite's own (a few minutes; CI runs it after `make test`).
test-image: deps venv image
	$(BIN)/pytest -m image -p no:randomly

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: deps venv  ## the figures beside their floors and ceilings, on servers of its own
	bash deploy/install-deps.sh --bench
	$(BIN)/python bench/run.py $(BENCH_ARGS)

soak: deps venv  ## half the capacity for 30 minutes, a fault every five, and the verdict
	bash deploy/install-deps.sh --bench
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

scenarios: venv  ## Flash Sale, Double Dip and a burst against a running `make run`
	$(BIN)/flashclaim scenarios --url http://127.0.0.1:8080

# Every file derived from the code, written from its one source (the list and the
# sources: flashclaim/devtools/generate.py; a test fails while one is behind): after a
# migration, a change of the topology, the policies, the alerts or the dashboard.
generate: deps venv
	$(BIN)/python -m flashclaim.devtools.generate

deps:
	bash deploy/install-deps.sh

venv: $(STAMP)

# Installed from the lock (exact versions, hashes checked), then the project itself.
$(STAMP): pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# After changing dependencies in pyproject.toml: pin them again (uv, from the dev extra).
# requirements.lock is what production installs (the image); requirements-dev.lock adds
# the extras for tests, load tests, the local stack and linting.
LOCK := $(BIN)/uv pip compile pyproject.toml -q --universal --python-version 3.11 --generate-hashes
# The production lock is constrained by the development one: one version of each package.
lock: venv
	$(LOCK) --extra dev -o requirements-dev.lock
	$(LOCK) -c requirements-dev.lock -o requirements.lock
	$(BIN)/uv pip compile requirements-build.in -q --universal --python-version 3.11 \
	  --generate-hashes -c requirements-dev.lock -o requirements-build.lock

clean:
	rm -rf .stack .pytest_cache .mypy_cache .ruff_cache

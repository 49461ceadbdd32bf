# Forfall: `make run` runs the whole pipeline on this machine; `make test` runs every test.
# Both install and start what is missing (tansu, Redis) and reuse what is there.

# Dependencies compile once per machine when the target dir lives outside the work tree.
CARGO_TARGET_DIR ?= $(HOME)/.cache/forfall/target
export CARGO_TARGET_DIR
export CARGO_TERM_COLOR ?= never
NEXTEST_PROFILE ?= default

.PHONY: run test devstack devstack-down build check fmt bench bench-portal bench-billing-run chaos simulate

devstack:
	bash tools/devstack/devstack.sh up

devstack-down:
	bash tools/devstack/devstack.sh down

build:
	cargo build --workspace --bins

# The whole pipeline in one process on simulated time: a demo set of invoices and payments,
# and what happened to each.
run: devstack build
	$(CARGO_TARGET_DIR)/debug/forfall demo

# The fault suite (a short run of it is part of `make test`) starts the service binaries as
# processes of their own, so they are built first.
test: devstack build
	@if cargo nextest --version >/dev/null 2>&1; then \
		cargo nextest run --workspace --profile $(NEXTEST_PROFILE); \
	else \
		echo "cargo-nextest not found; using cargo test"; \
		cargo test --workspace; \
	fi

check:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

bench: devstack
	cargo run --release -p forfall-e2e --bin ingest-throughput -- 300000

# A utility's billing run end to end: N invoices (BILLING_RUN_N, a million) issued, nudged on
# their due date by e-mail and SMS, 40 % paid; each stage's rate next to a plain relay.
BILLING_RUN_N ?= 1000000
bench-billing-run: devstack
	cargo run --release -p forfall-e2e --bin billing-run -- $(BILLING_RUN_N)

# The debtor's page at a steady 300 requests/s, next to a static answer of the same server.
bench-portal: devstack
	cargo run --release -p forfall-e2e --bin portal-load -- 300 20

# The fault suite at full size: three runs of 2,000 debtors, each with its baseline; a seed is
# printed for each, `make chaos CHAOS_ARGS="--seed N --runs 1"` replays one.
chaos: devstack build
	$(CARGO_TARGET_DIR)/debug/chaos $(CHAOS_ARGS)

# A million simulated debtors through the domain core on the example experiment, with its report
# in target/simulation (SIMULATE_ARGS adds or overrides options, e.g. --seed 7).
simulate:
	cargo run --release -p forfall -- simulate --policy deploy/policies/fee-free-reminder.toml --debtors 1000000 --seed 2026 --out $(CARGO_TARGET_DIR)/simulation $(SIMULATE_ARGS)

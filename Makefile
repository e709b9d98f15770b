# The one entry point for people and CI. `make help` lists the targets.
SHELL := /bin/bash
CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/palisade
export CARGO_TARGET_DIR ?= $(CACHE)/target
export PALISADE_TESTBIN ?= $(CACHE)/bin
CARGO ?= cargo

.PHONY: help testbin build images e2e lint-workflows fmt fmt-check clippy crds manifests chart-readme check-generated unit test demo clean-env

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

testbin: ## Build/install the real components tests run against (cached; instant when done)
	@bash hack/testbin.sh

build: ## Build every binary
	$(CARGO) build --all-targets --all-features

fmt: ## Format the code
	$(CARGO) fmt --all

fmt-check: ## Fail if the code is not formatted
	$(CARGO) fmt --all -- --check

clippy: ## Lint, warnings are errors
	$(CARGO) clippy --all-targets --all-features -- -D warnings

crds: ## Regenerate crds/ (and the chart's copy, and deploy/manifests) from the Rust types
	$(CARGO) run --quiet --bin palisade -- crd > crds/palisade.dev.yaml
	cp crds/palisade.dev.yaml charts/palisade/crds/palisade.dev.yaml
	bash hack/manifests.sh

manifests: ## Regenerate deploy/manifests (the kustomize base) from the chart
	bash hack/manifests.sh

chart-readme: ## Regenerate charts/palisade/README.md from its README.md.in and values.yaml
	python3 hack/chart-readme.py charts/palisade

check-generated: ## Fail if crds/, the chart's CRDs, deploy/manifests or the chart README drifted from their sources
	@$(CARGO) run --quiet --bin palisade -- crd | diff -u crds/palisade.dev.yaml - \
	  || { echo "crds/ is stale: run 'make crds' and commit the result"; exit 1; }
	@diff -u crds/palisade.dev.yaml charts/palisade/crds/palisade.dev.yaml \
	  || { echo "charts/palisade/crds is stale: run 'make crds' and commit the result"; exit 1; }
	@tmp=$$(mktemp -d) && bash hack/manifests.sh $$tmp && cp deploy/manifests/namespace.yaml $$tmp/ \
	  && diff -ru deploy/manifests $$tmp && rm -rf $$tmp \
	  || { echo "deploy/manifests is stale: run 'make manifests' and commit the result"; exit 1; }
	@set -o pipefail; python3 hack/chart-readme.py charts/palisade -o - | diff -u charts/palisade/README.md - \
	  || { echo "charts/palisade/README.md is stale: run 'make chart-readme' and commit the result"; exit 1; }

unit: ## Pure tests only (no apiserver, moto or namespaces)
	$(CARGO) test --lib --bins

lint-workflows: testbin ## Lint .github/workflows with actionlint
	$(PALISADE_TESTBIN)/actionlint -color=false

test: testbin fmt-check clippy check-generated lint-workflows ## Everything CI runs but `e2e`: checks, then every test on the real local environment
	$(CARGO) test --all-features --no-fail-fast

images: ## Build the controller and agent images with podman from images/*.Dockerfile (cached); print their sizes
	bash hack/images.sh

e2e: testbin ## The images on real kubelet + containerd nodes: the chart installed, upgraded, uninstalled (builds the images)
	bash hack/images.sh e2e $(CACHE)/e2e-images
	PALISADE_E2E_IMAGES=$(CACHE)/e2e-images $(CARGO) test --features testenv --test real_nodes -- --ignored --nocapture --test-threads=1

demo: testbin ## Bring up the local environment and run Palisade end to end
	$(CARGO) build --quiet --features testenv --bins
	$(CARGO_TARGET_DIR)/debug/palisade-demo

clean-env: ## Remove leftovers of a crashed test run (processes, namespaces)
	-pkill -f "$(PALISADE_TESTBIN)/" || true
	-for ns in $$(ip netns list | awk '/^pal/{print $$1}'); do ip netns del $$ns; done

.PHONY: bench bench-controller bench-node bench-scale
bench: bench-controller bench-node ## Both benchmarks (they print figures; nothing asserts on time)

bench-controller: testbin ## EC2 calls and latency of the controller per scenario (local environment)
	$(CARGO) run --quiet --features testenv --bin palisade-bench-controller

# The controller, agents and the bench driver are built with the Cargo
# profile BENCH_SCALE_PROFILE: debug (the default, as the tests build them),
# bench-node (release, aws-sdk-ec2 unoptimised: minutes once `make
# bench-node` has built it) or release (what users run; an hour or more of
# build on 2 cores).
BENCH_SCALE_PROFILE ?= debug
bench-scale: testbin ## N nodes × P policies: converge time, apiserver requests (audit log) and bytes per component, RSS/CPU, EC2 calls vs AWS's bound, steady state, restart (BENCH_SCALE_ARGS=--quick for a smoke run; BENCH_SCALE_PROFILE=bench-node|release for optimised binaries)
	$(CARGO) build --quiet --profile $(BENCH_SCALE_PROFILE:debug=dev) --features testenv --bin palisade-bench-scale --bin palisade-controller --bin palisade-agent
	$(CARGO_TARGET_DIR)/$(BENCH_SCALE_PROFILE)/palisade-bench-scale $(BENCH_SCALE_ARGS)

bench-node: testbin ## Node dataplane, release build, nft and legacy: each figure beside the raw iptables-restore/ipset baseline of the same text (ours, raw, ratio); zero-gap at 1,000 edits (needs root)
	$(CARGO) run --profile bench-node --quiet --features testenv --bin palisade-bench-node

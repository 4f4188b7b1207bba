#!/usr/bin/env bash
# Tollgate against nginx and the upstream itself, in one run, with wrk on loopback.
#
# Starts the built-in mock upstream (`tollgate mock-upstream`), nginx in front of it
# (`proxy_pass`, keep-alive, no buffering), Tollgate embedded (SQLite, in-process cache) and, when
# MariaDB and Redis answer, Tollgate on MariaDB + Redis, all pointing at the same upstream. Then
# wrk sends the same small chat completion to each: 32 connections non-streaming, 32 connections
# streaming, and 1 connection non-streaming. Prints one table with throughput, p50 and p99, each
# Tollgate row's ratio to nginx, and what the ledger billed. Then holds SLOW_STREAMS (1000) slow
# streams open through each Tollgate and reports its resident memory, idle and at the peak.
#
# Usage: benches/compare.sh            (DURATION=10 seconds per run, CONNECTIONS=32;
#        TOLLGATE=path/to/tollgate to measure a binary already built)
# Installs nginx-light and wrk from the OS packages if they are missing (needs apt-get and root).
# Sends traffic to 127.0.0.1 only; everything it starts stops when it ends.

set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-2}
MYSQL_SERVER=${MYSQL_SERVER:-mysql://root@127.0.0.1:3306}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}

need() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]
}
if ! need nginx || ! need wrk; then
    echo "installing nginx-light and wrk" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light wrk >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [ -z "${TOLLGATE:-}" ]; then
    cargo build --release --locked --bin tollgate >&2
    TOLLGATE=$PWD/target/release/tollgate
fi

DIR=$(mktemp -d -t tollgate-compare-XXXXXX)
chmod 755 "$DIR"
PIDS=()
DATABASE=""
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "$DATABASE" ]; then
        mariadb -uroot -h127.0.0.1 -e "DROP DATABASE IF EXISTS \`$DATABASE\`" 2>/dev/null || true
    fi
    rm -rf "$DIR"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_for() { # port
    for _ in $(seq 1 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "nothing answered on 127.0.0.1:$1" >&2
    exit 1
}

# --- the upstream --------------------------------------------------------------------------
UP=$(free_port)
"$TOLLGATE" mock-upstream --listen "127.0.0.1:$UP" >"$DIR/upstream.log" 2>&1 &
PIDS+=($!)
wait_for "$UP"

# --- nginx -----------------------------------------------------------------------------------
NG=$(free_port)
mkdir -p "$DIR/nginx"
cat >"$DIR/nginx/nginx.conf" <<EOF
worker_processes auto;
pid $DIR/nginx/nginx.pid;
error_log $DIR/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $DIR/nginx/body;
    proxy_temp_path $DIR/nginx/proxy;
    upstream mock { server 127.0.0.1:$UP; keepalive 64; }
    server {
        listen 127.0.0.1:$NG;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF
"$NGINX" -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" -g 'daemon off;' 2>"$DIR/nginx/stderr.log" &
PIDS+=($!)
wait_for "$NG"

# --- Tollgate --------------------------------------------------------------------------------
SECRET="benchmark-secret-of-at-least-32-bytes!!"
cat >"$DIR/pricing.toml" <<'EOF'
rounding = "exact"
[default]
prompt_per_1k = "1"
completion_per_1k = "1"
EOF

start_tollgate() { # name database_url redis_url_line → sets PORT_<name>
    local name=$1 database=$2 redis=$3 port
    port=$(free_port)
    cat >"$DIR/$name.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
[database]
url = "$database"
[cache]
$redis
key_prefix = "bench_$name"
[auth.jwt]
secret = "$SECRET"
[metering]
pricing_file = "$DIR/pricing.toml"
[[upstreams]]
name = "mock"
base_url = "http://127.0.0.1:$UP/v1"
models = ["mock-*"]
EOF
    RUST_LOG=warn "$TOLLGATE" --config "$DIR/$name.toml" serve >"$DIR/$name.log" 2>&1 &
    PIDS+=($!)
    printf -v "PID_$name" '%s' "$!"
    wait_for "$port"
    "$TOLLGATE" --config "$DIR/$name.toml" credits grant bench 1000000000 >/dev/null
    printf -v "PORT_$name" '%s' "$port"
}

start_tollgate embedded "sqlite://$DIR/embedded.db" ""
BACKENDS=(embedded)
if (exec 3<>/dev/tcp/127.0.0.1/3306) 2>/dev/null && (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
    DATABASE="tg_bench_$(date +%s)_$$"
    mariadb -uroot -h127.0.0.1 -e "CREATE DATABASE \`$DATABASE\`"
    start_tollgate production "$MYSQL_SERVER/$DATABASE" "redis_url = \"$REDIS_URL\""
    BACKENDS+=(production)
else
    echo "MariaDB or Redis not answering: Tollgate on MariaDB + Redis is left out" >&2
fi
TOKEN=$("$TOLLGATE" --config "$DIR/embedded.toml" token mint --sub bench --ttl 1d)

# Resident memory of a process, in MiB.
rss_mib() { # pid [field, default VmRSS]
    awk -v f="${2:-VmRSS}:" '$1 == f {printf "%d", $2 / 1024}' "/proc/$1/status"
}
sleep 1
for backend in "${BACKENDS[@]}"; do
    pid_var="PID_$backend"
    printf -v "IDLE_$backend" '%s' "$(rss_mib "${!pid_var}")"
done

# --- load --------------------------------------------------------------------------------------
for stream in false true; do
    cat >"$DIR/stream-$stream.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $TOKEN"
wrk.body = '{"model":"mock-1","messages":[{"role":"user","content":"benchmark this request please"}],"max_tokens":16,"stream":$stream}'
EOF
done

# "1.23ms" / "456.00us" / "1.01s" → milliseconds
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) n = n / 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n = n * 1000
        printf "%.2f", n }'
}

RESULTS="$DIR/results"
: >"$RESULTS"
run() { # label target_url stream connections
    local label=$1 url=$2 stream=$3 connections=$4 threads out
    threads=$((connections < THREADS ? connections : THREADS))
    # A short warm-up (connections, tokenizer, caches), not measured.
    wrk -t"$threads" -c"$connections" -d2s -s "$DIR/stream-$stream.lua" "$url" >/dev/null
    out=$(wrk -t"$threads" -c"$connections" -d"${DURATION}s" --latency -s "$DIR/stream-$stream.lua" "$url")
    if echo "$out" | grep -q "Non-2xx"; then
        echo "$out" >&2
        echo "$label: some answers were not 2xx" >&2
        exit 1
    fi
    local rps p50 p99 requests
    rps=$(echo "$out" | awk '/^Requests\/sec/ {printf "%d", $2}')
    p50=$(to_ms "$(echo "$out" | awk '$1 == "50%" {print $2}')")
    p99=$(to_ms "$(echo "$out" | awk '$1 == "99%" {print $2}')")
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    echo "$label|$stream|$connections|$rps|$p50|$p99|$requests" >>"$RESULTS"
}

PATH_=/v1/chat/completions
for shape in "false $CONNECTIONS" "true $CONNECTIONS" "false 1"; do
    set -- $shape
    run direct "http://127.0.0.1:$UP$PATH_" "$1" "$2"
    run nginx "http://127.0.0.1:$NG$PATH_" "$1" "$2"
    for backend in "${BACKENDS[@]}"; do
        port_var="PORT_$backend"
        run "tollgate-$backend" "http://127.0.0.1:${!port_var}$PATH_" "$1" "$2"
    done
done

# --- memory under many slow streams -------------------------------------------------------------
# SLOW_STREAMS connections, each with a stream in flight all the time: the mock upstream's
# `-slow` knob sends one frame per 50 ms, so each stream of 100 words lasts about 5 s.
SLOW_STREAMS=${SLOW_STREAMS:-1000}
ulimit -n $((SLOW_STREAMS * 4 + 1024)) 2>/dev/null || true
cat >"$DIR/slow.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $TOKEN"
wrk.body = '{"model":"mock-slow","messages":[{"role":"user","content":"benchmark this request please"}],"max_tokens":100,"stream":true}'
EOF
MEMORY=""
for backend in "${BACKENDS[@]}"; do
    pid_var="PID_$backend" port_var="PORT_$backend" idle_var="IDLE_$backend"
    wrk -t2 -c"$SLOW_STREAMS" -d12s --timeout 30s -s "$DIR/slow.lua" \
        "http://127.0.0.1:${!port_var}$PATH_" >"$DIR/slow-$backend.out" &
    WRK=$!
    peak=0
    while kill -0 "$WRK" 2>/dev/null; do
        now=$(rss_mib "${!pid_var}")
        if [ "$now" -gt "$peak" ]; then peak=$now; fi
        sleep 0.2
    done
    wait "$WRK" || true
    completed=$(awk '/requests in/ {print $1}' "$DIR/slow-$backend.out")
    MEMORY+="tollgate-$backend: RSS idle ${!idle_var} MiB; with $SLOW_STREAMS slow streams open, peak ${peak} MiB (VmHWM $(rss_mib "${!pid_var}" VmHWM) MiB, $completed streams completed)"$'\n'
done

# --- the books ---------------------------------------------------------------------------------
sleep 1
BOOKS=""
for backend in "${BACKENDS[@]}"; do
    verify=$("$TOLLGATE" --config "$DIR/$backend.toml" ledger verify | tail -1)
    balance=$("$TOLLGATE" --config "$DIR/$backend.toml" credits balance bench | awk '{print $2}')
    sent=$(awk -F'|' -v l="tollgate-$backend" '$1 == l {s += $7} END {print s}' "$RESULTS")
    BOOKS+="tollgate-$backend: $verify; spent $(python3 -c "from decimal import Decimal as D; print(D(1000000000) - D('$balance'))") credits for at least $sent completed requests (plus warm-ups)"$'\n'
done

# --- the table ---------------------------------------------------------------------------------
echo
echo "$(date -u +%Y-%m-%d) · $(nproc) cores · $("$NGINX" -v 2>&1 | sed 's/.*: //') · $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}') · $("$TOLLGATE" --version) · ${DURATION}s per run"
echo
echo "| connections | stream | target | req/s | p50 ms | p99 ms | ×nginx req/s | p50 − direct |"
echo "|---|---|---|---|---|---|---|---|"
awk -F'|' '
    { label[NR] = $1; stream[NR] = $2; conns[NR] = $3; rps[NR] = $4; p50[NR] = $5; p99[NR] = $6
      key = $2 "/" $3
      if ($1 == "nginx") nginx[key] = $4
      if ($1 == "direct") direct[key] = $5 }
    END {
      for (i = 1; i <= NR; i++) {
        key = stream[i] "/" conns[i]
        ratio = (label[i] ~ /^tollgate/ && nginx[key] > 0) ? sprintf("%.2f", rps[i] / nginx[key]) : ""
        added = (label[i] != "direct") ? sprintf("%+.2f", p50[i] - direct[key]) : ""
        printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", conns[i], stream[i] == "true" ? "yes" : "no", label[i], rps[i], p50[i], p99[i], ratio, added
      }
    }' "$RESULTS"
echo
printf '%s' "$BOOKS"
echo
printf '%s' "$MEMORY"

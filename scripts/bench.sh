#!/usr/bin/env bash
# Side-by-side benchmark: zerocopy-server and nginx on the same machine, same work.
#
#   bash scripts/bench.sh [seconds per run, default 10] [rounds, default 3]
#
# Each server runs one worker pinned to core 0; the load generator (wrk) and a small fast
# backend (a second nginx) share the other core. Two workloads: a proxied keep-alive GET
# and a static 1 KiB file. Servers alternate, round after round; the script prints
# requests/s and p99 of each run, then the medians and the ratio to nginx.
# Installs nginx and wrk (Debian packages) if missing. Uses 127.0.0.1 and free ports only.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
ROUNDS=${2:-3}
CONNECTIONS=${CONNECTIONS:-50}

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
CORES=$(nproc)
LOAD_CORE=$(( CORES > 1 ? 1 : 0 ))
LOAD_MASK=1
for ((i = 0; i < LOAD_CORE; i++)); do LOAD_MASK="${LOAD_MASK}0"; done

cargo build --release --quiet
BIN=$PWD/target/release/zerocopy-server

WORK=$(mktemp -d)
trap 'for p in $(cat "$WORK"/*.pid 2>/dev/null); do kill "$p" 2>/dev/null || true; done; sleep 0.5; rm -rf "$WORK"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BACKEND_PORT=$(free_port); ZC_PORT=$(free_port); NGX_PORT=$(free_port)
mkdir -p "$WORK/www" "$WORK/backend" "$WORK/nginx"
# nginx workers run as an unprivileged user: they must be able to read the files.
chmod 755 "$WORK" "$WORK/www"
head -c 1024 /dev/urandom > "$WORK/www/1k.bin"
chmod 644 "$WORK/www/1k.bin"

# The backend: nginx answering a short body, on the load core.
cat > "$WORK/backend/nginx.conf" <<EOF
worker_processes 1;
worker_cpu_affinity $LOAD_MASK;
pid $WORK/backend.pid;
error_log $WORK/backend/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND_PORT reuseport; location / { return 200 "hello from the backend\n"; } }
}
EOF
taskset -c "$LOAD_CORE" "$NGINX" -c "$WORK/backend/nginx.conf" -p "$WORK/backend"

# nginx under test: one worker on core 0.
cat > "$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
worker_cpu_affinity 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 32; }
  server {
    listen 127.0.0.1:$NGX_PORT;
    location /proxy/ { proxy_pass http://backend/; proxy_http_version 1.1; proxy_set_header Connection ""; }
    location /static/ { alias $WORK/www/; }
  }
}
EOF
"$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx"

cat > "$WORK/zc.toml" <<EOF
[server]
listen = "127.0.0.1:$ZC_PORT"
threads = 1
pid_file = "$WORK/zc.pid"
[logging]
level = "warn"
[path_routes."*"."/proxy/"]
type = "Proxy"
url = "http://127.0.0.1:$BACKEND_PORT/"
  [path_routes."*"."/proxy/".security]
  max_idle_connections_per_host = 32
[path_routes."*"."/static/"]
path = "$WORK/www"
EOF
"$BIN" -c "$WORK/zc.toml" > "$WORK/zc.log" 2>&1 &
sleep 1
for url in "http://127.0.0.1:$ZC_PORT/proxy/x" "http://127.0.0.1:$NGX_PORT/proxy/x" "http://127.0.0.1:$ZC_PORT/static/1k.bin" "http://127.0.0.1:$NGX_PORT/static/1k.bin"; do
  curl -sf -o /dev/null "$url" || { echo "not answering: $url"; cat "$WORK/zc.log"; exit 1; }
done

# One wrk run: prints "rps p99_ms".
run() {
  taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "$1" 2>/dev/null | awk '
    /Requests\/sec/ { rps=$2 }
    /^ +99%/ { v=$2; if (v ~ /us$/) { sub(/us/,"",v); v=v/1000 } else if (v ~ /ms$/) { sub(/ms/,"",v) } else if (v ~ /s$/) { sub(/s/,"",v); v=v*1000 } p99=v }
    END { printf "%d %.2f\n", rps, p99 }'
}

median() { sort -n | awk '{a[NR]=$1} END { print a[int((NR+1)/2)] }'; }

declare -A RPS P99
printf "%-8s %-6s %-16s %12s %10s\n" round work server "requests/s" "p99 ms"
for round in $(seq 1 "$ROUNDS"); do
  for work in proxy static; do
    path=$([ "$work" = proxy ] && echo /proxy/x || echo /static/1k.bin)
    for server in zerocopy nginx; do
      port=$([ "$server" = zerocopy ] && echo "$ZC_PORT" || echo "$NGX_PORT")
      read -r rps p99 < <(run "http://127.0.0.1:$port$path")
      printf "%-8s %-6s %-16s %12s %10s\n" "$round" "$work" "$server" "$rps" "$p99"
      RPS[$work.$server]+="$rps "
      P99[$work.$server]+="$p99 "
    done
  done
done

echo
echo "medians over $ROUNDS rounds, ${DURATION}s each, $CONNECTIONS connections, 1 worker each:"
printf "%-6s %14s %14s %8s %12s %12s\n" work "zc req/s" "nginx req/s" ratio "zc p99 ms" "nginx p99"
for work in proxy static; do
  zr=$(echo ${RPS[$work.zerocopy]} | tr ' ' '\n' | median)
  nr=$(echo ${RPS[$work.nginx]} | tr ' ' '\n' | median)
  zp=$(echo ${P99[$work.zerocopy]} | tr ' ' '\n' | median)
  np=$(echo ${P99[$work.nginx]} | tr ' ' '\n' | median)
  ratio=$(awk -v a="$zr" -v b="$nr" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
  printf "%-6s %14s %14s %8s %12s %12s\n" "$work" "$zr" "$nr" "$ratio" "$zp" "$np"
done

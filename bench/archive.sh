#!/usr/bin/env bash
# Tenant export and import (`bss tenant export|import`, then the same over
# the API: job, download, upload, job) beside pg_dump -n / pg_restore of the
# same schema, in the same run: wall time, rate and peak RSS of each (for
# the API, the service's peak RSS over both). One tenant with RECORDS small records (default 1,000,000),
# made through the API (tenant, schema) and then in bulk by SQL.
#
#   cargo build --release --bin bss && bench/archive.sh [RECORDS]
#
# Needs the machine's PostgreSQL on 127.0.0.1:5432 (trust auth) and GNU time.
set -euo pipefail
cd "$(dirname "$0")/.."
records=${1:-1000000}
bss=${BSS:-target/release/bss}
server=postgres://postgres@127.0.0.1:5432
db=bss_bench_archive
port=18181
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
export DATABASE_URL="$server/$db" BSS_DATA_DIR="$work/data" BSS_HTTP_ADDR="127.0.0.1:$port" \
  BSS_MASTER_KEY=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8= BSS_JWT_SECRET=bench-archive-secret-0123456789abcdef
unset RUST_BACKTRACE
export PGOPTIONS="-c client_min_messages=warning"
mkdir -p "$work/data"
psql "$server/postgres" -qc "DROP DATABASE IF EXISTS $db" -c "DROP DATABASE IF EXISTS ${db}_restore" -c "CREATE DATABASE $db"

"$bss" serve > "$work/serve.log" 2>&1 &
pid=$!
for _ in $(seq 100); do curl -fs "localhost:$port/health/ready" > /dev/null && break; sleep 0.1; done
admin=$("$bss" token --roles platform-admin)
curl -fs -X POST "localhost:$port/v1/tenants" -H "authorization: Bearer $admin" \
  -H 'content-type: application/json' -d '{"id": "bench", "name": "Bench"}' > /dev/null
token=$("$bss" token --tenant bench --roles admin)
curl -fs -X PUT "localhost:$port/v1/schemas/items" -H "authorization: Bearer $token" \
  -H 'content-type: application/json' \
  -d '{"schema": {"type": "object", "required": ["name", "total"], "properties": {"name": {"type": "string"}, "total": {"type": "integer", "x-index": true}, "paid": {"type": "boolean"}}}}' > /dev/null
kill "$pid"; wait "$pid" 2>/dev/null || true

psql "$DATABASE_URL" -qc "INSERT INTO t_bench.items (id, data)
  SELECT 'r' || lpad(g::text, 9, '0'), jsonb_build_object('name', 'item ' || g, 'total', g % 1000, 'paid', g % 2 = 0)
    FROM generate_series(1, $records) g" -c "VACUUM ANALYZE t_bench.items"

# name, then the command: prints seconds, records/s and peak RSS.
measure() {
  local name=$1; shift
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" > /dev/null 2> "$work/err" || { cat "$work/err"; exit 1; }
  read -r secs kib < "$work/time"
  awk -v n="$name" -v s="$secs" -v k="$kib" -v r="$records" \
    'BEGIN { printf "%-28s %7.2f s %10.0f records/s %7.1f MiB peak RSS\n", n, s, r / s, k / 1024 }'
}

echo "one tenant, $records records"
measure "bss tenant export" "$bss" tenant export bench --out "$work/bench.tar.zst"
measure "pg_dump -n t_bench -Fc" pg_dump -h 127.0.0.1 -U postgres -n t_bench -Fc -f "$work/bench.dump" "$db"
measure "bss tenant import" "$bss" tenant import --as bench-checked "$work/bench.tar.zst"
measure "bss tenant import --trust" "$bss" tenant import --as bench-trusted --trust "$work/bench.tar.zst"
psql "$server/postgres" -qc "CREATE DATABASE ${db}_restore"
measure "pg_restore" pg_restore -h 127.0.0.1 -U postgres -d "${db}_restore" "$work/bench.dump"

# The same over the API: from the request to the job's end (and the
# download, or from the upload's start).
"$bss" serve > "$work/serve.log" 2>&1 &
pid=$!
for _ in $(seq 100); do curl -fs "localhost:$port/health/ready" > /dev/null && break; sleep 0.1; done
auth="authorization: Bearer $admin"
# Follows the job at $1 until it ends; fails unless it is done.
follow() {
  local job
  while job=$(curl -fs "localhost:$port$1" -H "$auth"); grep -q '"status":"running"' <<< "$job"; do
    sleep 0.05
  done
  grep -q '"status":"done"' <<< "$job" || { echo "$job"; exit 1; }
}
timed() {
  local name=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  "$@"
  t1=$(date +%s.%N)
  awk -v n="$name" -v a="$t0" -v b="$t1" -v r="$records" \
    'BEGIN { printf "%-28s %7.2f s %10.0f records/s\n", n, b - a, r / (b - a) }'
}
api_export() {
  local at
  at=$(curl -fsi -X POST "localhost:$port/v1/tenants/bench/export" -H "$auth" | tr -d '\r' | awk -F': ' 'tolower($1) == "location" { print $2 }')
  follow "$at"
  curl -fs "localhost:$port$at/archive" -H "$auth" -o "$work/api.tar.zst"
}
api_import() {
  local at
  at=$(curl -fsi -X POST "localhost:$port/v1/tenants/import?as=$1$2" -H "$auth" \
         -H 'content-type: application/zstd' --data-binary @"$work/api.tar.zst" \
       | tr -d '\r' | awk -F': ' 'tolower($1) == "location" { print $2 }')
  follow "$at"
}
timed "API export + download" api_export
timed "API upload + import" api_import bench-api ""
timed "API upload + import trusted" api_import bench-api-trusted "&trust=true"
awk '/VmHWM/ { printf "%-28s %7.1f MiB peak RSS\n", "service (API runs)", $2 / 1024 }' "/proc/$pid/status"
kill "$pid"; wait "$pid" 2>/dev/null || true
ls -l "$work/bench.tar.zst" "$work/bench.dump" | awk '{ printf "%-40s %12d bytes\n", $9, $5 }'
psql "$server/postgres" -qc "DROP DATABASE $db" -c "DROP DATABASE ${db}_restore"

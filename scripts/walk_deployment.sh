#!/usr/bin/env bash
# Walks documentation/deployment.md on one machine over 127.0.0.1, as a hospital IT engineer would try it first:
# test certificates and SuperNode keys (step 3), each hospital's own nnUNet_raw with only its demo cases (step 2),
# the sites started first (step 5), then the server (step 6) with TLS and SuperNode authentication; every phase
# (planning, preprocessing, every round, the final models) goes over Flower; after round 0 the server is stopped
# and resumed with --continue (step 9). Prints the wall time of each phase.
#
#   scripts/walk_deployment.sh WORK_DIR [--rounds 2] [--local-iterations 20] [--size 32]
#
# WORK_DIR must not exist (a clean start). Logs: WORK_DIR/site_A.log, site_B.log, server.log, server_resumed.log.
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage 0;; esac
WORK=$1; shift
ROUNDS=2; ITERATIONS=20; SIZE=32
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2;;
    --local-iterations) ITERATIONS=$2; shift 2;;
    --size) SIZE=$2; shift 2;;
    *) usage;;
  esac
done
[ -e "$WORK" ] && { echo "walk_deployment: $WORK exists; give a new folder" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$WORK"; WORK=$(cd "$WORK" && pwd)
START=$(date +%s)
say() { echo "$(date '+%F %T') [walk, +$(( $(date +%s) - START )) s] $*"; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done; }
trap cleanup EXIT

say "step 3: certificates and SuperNode keys"
bash "$REPO/scripts/make_test_certs.sh" "$WORK/certs" --sites A B > "$WORK/certs.log"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

for SITE in A B; do
  say "step 2: hospital $SITE's own nnUNet_raw (its demo cases only)"
  H="$WORK/hospital_$SITE"
  nnUNet_raw="$H/nnUNet_raw" fednnunet_demo_data --test-sites --size "$SIZE" --site "$SITE" > "$WORK/demo_$SITE.log"
done

for SITE in A B; do
  say "step 5: starting site $SITE (before the server, as the guide orders)"
  H="$WORK/hospital_$SITE"
  setsid env nnUNet_raw="$H/nnUNet_raw" nnUNet_preprocessed="$H/nnUNet_preprocessed" \
    nnUNet_results="$H/nnUNet_results" FLWR_HOME="$H/flwr_home" nnUNet_n_proc_DA=0 \
    fednnunet_site --site "$SITE" -d 501 --server "127.0.0.1:$PORT" --tls-dir "$WORK/certs" \
    --auth-key "$WORK/certs/keys/$SITE" -device cpu -np 1 > "$WORK/site_$SITE.log" 2>&1 &
  PIDS+=($!)
done
sleep 10  # the sites try the server that is not there yet

say "step 6: the server (plans, preprocessing, $ROUNDS rounds of $ITERATIONS iterations, final models)"
S="$WORK/server"
SERVER_ENV=(nnUNet_preprocessed="$S/nnUNet_preprocessed" nnUNet_results="$S/nnUNet_results" FLWR_HOME="$S/flwr_home")
SERVER_ARGS=(-d 501 -c 3d_fullres --method fedavg --rounds "$ROUNDS" --local-iterations "$ITERATIONS"
             --val-iterations 5 --sites A B --host 127.0.0.1 --port "$PORT" --tls-dir "$WORK/certs"
             --auth-keys "$WORK/certs/keys/A.pub" "$WORK/certs/keys/B.pub")
ROUND_LOG="$S/nnUNet_results/Dataset501_FedBrainDemo/FedAvgTrainer__nnUNetCPUPlans__3d_fullres/fold_0/federation_log.json"
setsid env "${SERVER_ENV[@]}" fednnunet_server "${SERVER_ARGS[@]}" -pl nnUNetPlannerCPU --work-dir "$S/flower" \
  > "$WORK/server.log" 2>&1 &
SERVER=$!
while [ ! -f "$ROUND_LOG" ] && kill -0 "$SERVER" 2>/dev/null; do sleep 1; done
if [ "$ROUNDS" -gt 1 ] && kill -0 "$SERVER" 2>/dev/null; then
  say "step 9: round 0 is done; stopping the server (SIGTERM) and resuming it with --continue"
  kill -TERM "$SERVER"; wait "$SERVER" || true
  if env "${SERVER_ENV[@]}" fednnunet_server "${SERVER_ARGS[@]}" -p nnUNetCPUPlans --continue \
      --work-dir "$S/flower_resumed" > "$WORK/server_resumed.log" 2>&1; then
    say "the resumed server finished"
  else
    say "the resumed server failed (exit $?); see $WORK/server_resumed.log"; tail -30 "$WORK/server_resumed.log"
    exit 1
  fi
elif wait "$SERVER"; then
  say "the server finished"
else
  say "the server failed (exit $?); see $WORK/server.log"; tail -30 "$WORK/server.log"; exit 1
fi

echo; echo "server's progress lines (each with its time):"
cat "$WORK/server.log" "$WORK/server_resumed.log" 2>/dev/null |
  grep -E '^\[fednnunet server\] 20|^20[0-9-]+ [0-9:]+ (round|continuing) |^fednnunet_server: (run|20)' || true
for SITE in A B; do
  echo; echo "site $SITE's lines:"
  grep -E "^fednnunet_site: 20" "$WORK/site_$SITE.log" || true
done
echo; echo "empty folders left at the sites:"
find "$WORK"/hospital_* -type d -empty | sed "s|$WORK/||" || true
say "done; logs in $WORK"

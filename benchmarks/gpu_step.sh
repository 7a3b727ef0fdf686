# Sourced by the multi-GPU scripts (nccl_2gpu.sh, nccl_multi_gpu.sh): one step of a device call.
#   step NAME LIMIT_S command...   runs the command under timeout (capped by what is left of
#                                  $BUDGET seconds), output in $OUT/NAME.log, its tail printed;
#                                  with PATTERNS set (an array of globs), only matching NAMEs run.
# Appends to $SUMMARY and counts failures in $FAILED.
step() {
  local name=$1 limit=$2 pattern wanted=1; shift 2
  if [[ -n ${PATTERNS+x} ]]; then
    wanted=0
    for pattern in "${PATTERNS[@]}"; do [[ $name == $pattern ]] && wanted=1; done
  fi
  (( wanted )) || return 0
  local left=$((BUDGET - SECONDS))
  if (( left < 20 )); then
    echo "== $name: skipped, ${left} s left"; SUMMARY+="$name: skipped"$'\n'; FAILED=$((FAILED + 1)); return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit} s, at ${SECONDS} s): $*"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-20}" "$OUT/$name.log"
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  SUMMARY+="$name: exit $rc ($((SECONDS - t0)) s)$([ $rc = 124 ] && echo ', TIMED OUT')"$'\n'
  (( rc != 0 )) && FAILED=$((FAILED + 1))
  return 0
}

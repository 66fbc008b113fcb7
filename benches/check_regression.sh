#!/usr/bin/env bash
# Fails when Strait's instructions or syscalls per request (HTTP/1.1 or h2c, one request in flight)
# rise more than 2 % over benches/baseline.json. Run before and after every request-path change:
#   cargo build --release && benches/check_regression.sh
# After an intended change, refresh the baseline with: benches/check_regression.sh --update
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
"$here/count.sh" --peers strait --json "$out" >/dev/null
python3 - "$here/baseline.json" "$out" "${1:-}" <<'PY'
import json, sys
base_path, new_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
with open(new_path) as f:
    new = json.load(f).get("strait", {})
with open(base_path) as f:
    base_doc = json.load(f)
base = base_doc["strait"]
keys = ["instructions_h1", "instructions_h2c", "syscalls_h1", "syscalls_h2c"]
missing = [k for k in keys if k not in new]
if missing:
    sys.exit(f"measurement incomplete, missing {missing}")
if mode == "--update":
    base_doc["strait"] = {k: round(new[k], 2) for k in keys}
    with open(base_path, "w") as f:
        json.dump(base_doc, f, indent=1, sort_keys=True)
        f.write("\n")
    print("baseline updated:", base_doc["strait"])
    sys.exit(0)
failed = False
for k in keys:
    change = 100.0 * (new[k] - base[k]) / base[k]
    verdict = "FAIL" if change > 2.0 else "ok"
    failed |= change > 2.0
    print(f"{k:18s} baseline {base[k]:>10,.2f}  now {new[k]:>10,.2f}  {change:+6.2f} %  {verdict}")
sys.exit(1 if failed else 0)
PY

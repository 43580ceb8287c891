#!/usr/bin/env bash
# Download (or generate) a dataset and convert it into the cache ncf.py trains on.
#   ./prepare_dataset.sh [NAME]     NAME: ml-20m (default, as the recipe) ml-25m ml-32m ml-1m ml-100k synthetic
#   ./prepare_dataset.sh NAME --validation   also hold out a validation item per user (convert.py --validation),
#                                    into $DATA_DIR/cache/NAME-validation/ (for tune.py and honest model selection)
#   DATA_DIR=/data ./prepare_dataset.sh ml-1m      the cache lands in $DATA_DIR/cache/NAME/
# Returns at once when the cache is already complete and intact (convert.py --check verifies its format
# version and each file's SHA-256); an incomplete, outdated or damaged cache is rebuilt. Before any
# download or generation, convert.py --check_output refuses a cache folder it may not replace (one
# holding other files, or the input). PYTHON picks the interpreter; without it the project's .venv is
# used when present, else python3.
set -euo pipefail

prog=$(basename "$0")
here=$(cd "$(dirname "$0")" && pwd)
name=${1:-ml-20m}
validation=${2:-}
if [ -n "$validation" ] && [ "$validation" != --validation ]; then
  echo "$prog: error: unknown option '$validation'; the only option after NAME is --validation" >&2
  exit 2
fi
data_dir=${DATA_DIR:-./data}
if [ -z "${PYTHON:-}" ] && [ -x "$here/.venv/bin/python" ]; then
  python="$here/.venv/bin/python"
else
  python=${PYTHON:-python3}
fi

case "$name" in
  ml-20m|ml-25m|ml-32m) ratings="$data_dir/$name/ratings.csv" ;;
  ml-1m) ratings="$data_dir/$name/ratings.dat" ;;
  ml-100k) ratings="$data_dir/$name/u.data" ;;
  synthetic) ratings="$data_dir/synthetic/ratings.csv" ;;
  *)
    echo "$prog: error: unknown dataset '$name'; choose one of ml-20m ml-25m ml-32m ml-1m ml-100k synthetic" >&2
    exit 2 ;;
esac

cache="$data_dir/cache/$name${validation:+-validation}"
if [ -e "$cache" ] && "$python" "$here/convert.py" --check "$cache"; then
  echo "$prog: cache $cache is already complete; nothing to do"
  exit 0
fi
# Exits 2 with convert.py's one-line reason when the cache folder may not be written or replaced.
"$python" "$here/convert.py" --check_output "$cache" --path "$ratings"
if [ -e "$cache" ]; then
  echo "$prog: rebuilding $cache"
fi

if [ "$name" = synthetic ]; then
  if [ -f "$ratings" ]; then
    echo "$prog: $ratings already exists; skipping generation"
  else
    "$python" "$here/synthetic.py" --output "$ratings"
  fi
else
  "$here/download_dataset.sh" "$name" "$data_dir"
fi

"$python" "$here/convert.py" --path "$ratings" --output "$cache" ${validation:+--validation}

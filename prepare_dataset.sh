#!/usr/bin/env bash
# Download (or generate) a dataset and convert it into the cache ncf.py trains on.
#   ./prepare_dataset.sh [NAME] [DATA_DIR] [CACHE_DIR] [--validation]
#     NAME: ml-20m (default, as the recipe) ml-25m ml-32m ml-1m ml-100k synthetic
#     DATA_DIR: where NAME.zip and NAME/ go (default $DATA_DIR, else ./data; the Docker image sets /data)
#     CACHE_DIR: the cache (default DATA_DIR/cache/NAME)
#   These are the recipe's positional arguments, with its meaning: `./prepare_dataset.sh ml-1m /data`
#   works as there. An empty one takes its default, as in the recipe.
#   --validation (anywhere): also hold out a validation item per user (convert.py --validation), into
#     DATA_DIR/cache/NAME-validation/ unless CACHE_DIR is given (for tune.py and honest model selection).
# Returns at once when the cache is already complete and intact (convert.py --check verifies its format
# version, each file's SHA-256, its source file and split); an incomplete, outdated, damaged or other
# cache is rebuilt. Before any download or generation, convert.py --check_output refuses a cache folder
# it may not replace (one holding other files, or the input). PYTHON picks the interpreter; without it the project's .venv is
# used when present, else python3.
set -euo pipefail

prog=$(basename "$0")
here=$(cd "$(dirname "$0")" && pwd)
usage="usage: $prog [NAME] [DATA_DIR] [CACHE_DIR] [--validation]"
positional=()
validation=
for arg in "$@"; do
  case "$arg" in
    --validation) validation=--validation ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*)
      echo "$prog: error: unknown option '$arg'; the only option is --validation ($usage)" >&2
      exit 2 ;;
    *) positional+=("$arg") ;;
  esac
done
if [ "${#positional[@]}" -gt 3 ]; then
  echo "$prog: error: too many arguments (${#positional[@]}); $usage" >&2
  exit 2
fi
name=${positional[0]:-ml-20m}
data_dir=${positional[1]:-${DATA_DIR:-./data}}
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

cache=${positional[2]:-$data_dir/cache/$name${validation:+-validation}}
# With --path, --check also wants the cache converted from that file (when it is still there) and with
# --validation as asked: a CACHE_DIR holding another dataset's cache is not "already complete".
if [ -e "$cache" ] && "$python" "$here/convert.py" --check "$cache" --path "$ratings" ${validation:+"$validation"}; then
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

"$python" "$here/convert.py" --path "$ratings" --output "$cache" ${validation:+"$validation"}
echo "$prog: $cache is ready; train with: torchrun --standalone --nproc_per_node=<number of GPUs> ncf.py --data $cache"

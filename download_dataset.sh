#!/usr/bin/env bash
# Download a MovieLens dataset from GroupLens, verify its MD5 and unzip it into DATA_DIR/NAME/.
#   ./download_dataset.sh [NAME] [DATA_DIR]      NAME: ml-20m (default) ml-25m ml-32m ml-1m ml-100k
# Without curl it downloads with python's urllib, without unzip it extracts with python's zipfile.
# DATA_DIR defaults to $DATA_DIR, then ./data. MOVIELENS_URL replaces the GroupLens base URL.
# The zip is downloaded to a temporary name and renamed only once verified, and the folder is unzipped
# elsewhere and renamed into place, so a failed run leaves nothing a rerun would take as good.
# It never deletes what it did not write: a DATA_DIR/NAME folder without the ratings file, or a
# DATA_DIR/NAME.zip that fails its MD5 check, is reported (exit 2) for the user to move away.
# MovieLens data must never be committed: its licence forbids redistribution.
set -euo pipefail

prog=$(basename "$0")
here=$(cd "$(dirname "$0")" && pwd)
name=${1:-ml-20m}
data_dir=${2:-${DATA_DIR:-./data}}
base_url=${MOVIELENS_URL:-https://files.grouplens.org/datasets/movielens}
python=${PYTHON:-python3}  # only without curl or unzip

case "$name" in
  ml-20m|ml-25m|ml-32m) ratings=ratings.csv ;;
  ml-1m) ratings=ratings.dat ;;
  ml-100k) ratings=u.data ;;
  *)
    echo "$prog: error: unknown dataset '$name'; choose one of ml-20m ml-25m ml-32m ml-1m ml-100k" >&2
    exit 2 ;;
esac

zip="$data_dir/$name.zip"
folder="$data_dir/$name"
if [ -f "$folder/$ratings" ]; then
  echo "$prog: $folder/$ratings is already there; skipping download and unzip"
  exit 0
fi

if [ -e "$folder" ] && [ -n "$(ls -A "$folder" 2>/dev/null || echo unreadable)" ]; then
  echo "$prog: error: $folder exists but holds no $ratings, and it is not replaced: move it away and rerun" >&2
  exit 2
fi
if ! mkdir -p "$data_dir" 2>/dev/null || [ ! -w "$data_dir" ]; then
  echo "$prog: error: cannot write to the data folder $data_dir: choose another DATA_DIR or fix its permissions" >&2
  exit 2
fi
if [ -e "$zip" ] && [ ! -f "$zip" ]; then
  echo "$prog: error: $zip is in the way (not a file): move it away and rerun" >&2
  exit 2
fi
if [ -f "$zip" ] && ! "$here/verify_dataset.sh" "$name" "$zip" >/dev/null 2>&1; then
  echo "$prog: error: $zip fails its MD5 check (cut short, or another file), and it is not replaced: delete it and rerun to download it again" >&2
  exit 2
fi
part="$zip.part-$$"
unzip_dir="$data_dir/.unzip-$name-$$"
trap 'rm -rf "$part" "$unzip_dir"' EXIT

download() {
  local url="$base_url/$name.zip"
  echo "$prog: downloading $url"
  if command -v curl >/dev/null; then
    curl --fail --location --silent --show-error --retry 2 --output "$part" "$url"
  else
    "$python" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$url" "$part"
  fi
}

if [ -f "$zip" ]; then
  echo "$prog: $zip is already downloaded and verified; skipping download"
else
  if ! download; then
    echo "$prog: error: could not download $base_url/$name.zip; check the network or MOVIELENS_URL and rerun" >&2
    exit 1
  fi
  "$here/verify_dataset.sh" "$name" "$part" >/dev/null || {
    echo "$prog: error: $base_url/$name.zip failed its MD5 check (corrupt or truncated download); nothing was kept, rerun to download again" >&2
    exit 1
  }
  mv "$part" "$zip"
fi

extract() {
  if command -v unzip >/dev/null; then
    unzip -q "$zip" -d "$unzip_dir"
  else
    # A slim image without unzip (the recipe's Dockerfile installs it; ours does too): python's zipfile
    # reads the same archives and, like unzip, keeps members inside the target folder.
    echo "$prog: unzip not found; extracting with python's zipfile"
    "$python" -m zipfile -e "$zip" "$unzip_dir" 2>/dev/null
  fi
}

echo "$prog: unzipping $zip"
mkdir -p "$unzip_dir"
if ! extract || [ ! -f "$unzip_dir/$name/$ratings" ]; then
  echo "$prog: error: $zip does not unzip to $name/$ratings; delete $zip and rerun" >&2
  exit 1
fi
rmdir "$folder" 2>/dev/null || true  # an empty folder only; anything else was refused above
mv "$unzip_dir/$name" "$folder"
echo "$prog: $folder/$ratings is ready"

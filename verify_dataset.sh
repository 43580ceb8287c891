#!/usr/bin/env bash
# Check a MovieLens zip against the MD5 GroupLens publishes for it.
#   ./verify_dataset.sh [NAME] [ZIP]     NAME: ml-20m (default) ml-25m ml-32m ml-1m ml-100k; ZIP: ./NAME.zip
# Prints PASSED or FAILED on stdout, as the recipe's script does (so `./verify_dataset.sh ml-1m` run in the
# folder holding ml-1m.zip works as there), and also answers by exit status: 0 PASSED, 1 FAILED (the
# reason on stderr), 2 for an unknown NAME or a bad command line.
# MOVIELENS_MD5=<hex> replaces the built-in checksum (tests use it for their own small zips).
set -euo pipefail

prog=$(basename "$0")
if [ "$#" -gt 2 ]; then
  echo "$prog: error: usage: $prog [NAME] [ZIP] (NAME is one of ml-20m ml-25m ml-32m ml-1m ml-100k)" >&2
  exit 2
fi
name=${1:-ml-20m}
zip=${2:-$name.zip}

# The .md5 files GroupLens publishes next to each zip on files.grouplens.org/datasets/movielens/.
# ml-32m's value is quoted from memory and not re-checked offline; if it fails for a genuine download,
# compare with ml-32m.zip.md5 on the GroupLens site and pass MOVIELENS_MD5.
case "$name" in
  ml-20m) expected=cd245b17a1ae2cc31bb14903e1204af3 ;;
  ml-25m) expected=6b51fb2759a8657d3bfcbfc42b592ada ;;
  ml-32m) expected=d472be332d4daa821edc399621853b57 ;;
  ml-1m) expected=c4d9eecfca2ab87c1945afe126590906 ;;
  ml-100k) expected=0e33842e24a9c977be4e0107933c0723 ;;
  *)
    echo "$prog: error: unknown dataset '$name'; choose one of ml-20m ml-25m ml-32m ml-1m ml-100k" >&2
    exit 2 ;;
esac
expected=${MOVIELENS_MD5:-$expected}

failed() {
  echo FAILED
  echo "$prog: error: $1" >&2
  exit 1
}

if [ ! -f "$zip" ]; then
  failed "$zip does not exist (or is not a file); download it with ./download_dataset.sh $name, or pass the zip's path"
fi
md5_of() {
  if command -v md5sum >/dev/null; then
    md5sum "$1" | cut -d' ' -f1
  else
    "${PYTHON:-python3}" -c 'import hashlib, sys; print(hashlib.md5(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
  fi
}
actual=$(md5_of "$zip" 2>/dev/null) || failed "cannot read $zip: check its permissions"
if [ "$actual" != "$expected" ]; then
  failed "$zip has MD5 $actual, expected $expected: the download is corrupt or truncated; delete it and download again"
fi
echo PASSED

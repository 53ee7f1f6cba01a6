#!/usr/bin/env bash
# The Pile (EleutherAI) -> jsonl.zst shards for training.
#
# EleutherAI distributed the Pile as train/00..29.jsonl.zst, val.jsonl.zst and test.jsonl.zst with a SHA256SUMS.txt
# at the-eye.eu/public/AI/pile, which is offline. This script downloads the same layout from the Hugging Face mirror
# monology/pile-uncopyrighted (the Pile without its copyrighted subsets), pinned to one commit. The sha256 of each
# file is the Git LFS object id the Hub publishes for it; every download is checked against it.
#
# Usage: data/download_the_pile.sh [--dry-run] [--train-files N] [--workers N] RAW_DIR [OUT_DIR]
#   RAW_DIR          where the downloads go (hundreds of GB for all 30 train files; val and test are 338 MB each)
#   OUT_DIR          the shards go to OUT_DIR/pile, OUT_DIR/pile_val and OUT_DIR/pile_test (default: data/ of this
#                    repository, which is where configs/pretrain_7b.yaml looks when run from the repository root)
#   --train-files N  only train/00 .. train/N-1 (default 30, all)
#   --workers N      compressing processes of the shard step (default 4)
#   --dry-run        print the commands, touch neither the network nor the disk
# Re-running resumes partial downloads (curl -C -), skips verified files and finished shards.
# HF_TOKEN, when set, is sent to the Hub as a bearer token (it is never printed).
set -euo pipefail

REPO_ID=monology/pile-uncopyrighted
REVISION=3be90335b66f24456a5d6659d9c8d208c0357119 # "Upload to LFS": train/00-29, val, test
HUB=https://huggingface.co
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}

usage() {
	sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
	exit "$1"
}

DRY_RUN=0
TRAIN_FILES=30
WORKERS=4
while [[ $# -gt 0 ]]; do
	case "$1" in
	--dry-run) DRY_RUN=1 && shift ;;
	--train-files) TRAIN_FILES=${2:?--train-files needs a number} && shift 2 ;;
	--workers) WORKERS=${2:?--workers needs a number} && shift 2 ;;
	-h | --help) usage 0 ;;
	-*) echo "error: unknown option $1" >&2 && usage 2 ;;
	*) break ;;
	esac
done
[[ $# -ge 1 && $# -le 2 ]] || usage 2
if ! [[ $TRAIN_FILES =~ ^[0-9]+$ ]] || ((TRAIN_FILES < 1 || TRAIN_FILES > 30)); then
	echo "error: --train-files=$TRAIN_FILES: give a number from 1 to 30" >&2
	exit 2
fi
RAW=$1
OUT=${2:-$ROOT/data}
AUTH=()
if [[ -n ${HF_TOKEN:-} ]]; then AUTH=(-H "Authorization: Bearer $HF_TOKEN"); fi

show() { # print a command as a shell would read it
	printf '+'
	printf ' %q' "$@"
	printf '\n'
}

run() { # print a command, then run it unless --dry-run
	show "$@"
	if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}

fetch() { # fetch URL DEST: resumable; DEST appears only once complete (the partial file is DEST.part)
	local url=$1 dest=$2 attempt
	if [[ -f $dest ]]; then
		echo "have $dest"
		return
	fi
	run mkdir -p "$(dirname "$dest")"
	show curl -fL --retry 10 --retry-delay 5 --retry-all-errors -C - -o "$dest.part" "$url"
	[[ $DRY_RUN == 1 ]] && return
	for attempt in 1 2 3 4 5; do # a new curl re-reads how much of DEST.part is there
		if curl ${AUTH[@]+"${AUTH[@]}"} -fL --retry 10 --retry-delay 5 --retry-all-errors -C - -o "$dest.part" "$url"; then
			mv "$dest.part" "$dest"
			return
		fi
		echo "curl failed (attempt $attempt of 5); resuming in 30 s" >&2
		sleep 30
	done
	echo "error: could not download $url to $dest; run this script again to resume" >&2
	exit 1
}

published_checksums() { # RAW/SHA256SUMS from the Hub's file listing (the LFS oid is the file's sha256)
	local sums=$RAW/SHA256SUMS dir
	if [[ -s $sums ]]; then return; fi
	for dir in "" train; do
		fetch "$HUB/api/datasets/$REPO_ID/tree/$REVISION${dir:+/$dir}" "$RAW/listing${dir:+-$dir}.json"
	done
	echo "+ $PYTHON - $RAW/listing.json $RAW/listing-train.json > $sums  # the oid of each listed .jsonl.zst"
	[[ $DRY_RUN == 1 ]] && return
	"$PYTHON" - "$RAW/listing.json" "$RAW/listing-train.json" >"$sums.tmp" <<'EOF'
import json, sys

for listing in sys.argv[1:]:
    for entry in json.load(open(listing, encoding="utf-8")):
        if entry.get("type") == "file" and entry["path"].endswith(".jsonl.zst") and entry.get("lfs"):
            print(f"{entry['lfs']['oid']}  {entry['path']}")
EOF
	mv "$sums.tmp" "$sums"
}

sha256() {
	if command -v sha256sum >/dev/null; then sha256sum "$1"; else shasum -a 256 "$1"; fi | cut -d' ' -f1
}

verify() { # verify REL: sha256 of RAW/REL against SHA256SUMS; a match is remembered in RAW/REL.sha256
	local rel=$1 file=$RAW/$1 expected actual
	show sha256sum "$file"
	[[ $DRY_RUN == 1 ]] && return
	expected=$(awk -v f="$rel" '$2 == f { print $1 }' "$RAW/SHA256SUMS")
	if [[ -f $file.sha256 && $file.sha256 -nt $file && $(cat "$file.sha256") == "$expected" ]]; then return; fi
	actual=$(sha256 "$file")
	if [[ -z $expected ]]; then
		echo "sha256 $actual  $rel (the Hub published no checksum for it; compare by hand)"
	elif [[ $actual != "$expected" ]]; then
		echo "error: $file: sha256 $actual, the Hub says $expected; delete the file and run again" >&2
		exit 1
	fi
	echo "$actual" >"$file.sha256"
}

published_checksums
files=(val.jsonl.zst test.jsonl.zst)
for ((i = 0; i < TRAIN_FILES; i++)); do files+=("train/$(printf %02d "$i").jsonl.zst"); done
for rel in "${files[@]}"; do
	fetch "$HUB/datasets/$REPO_ID/resolve/$REVISION/$rel" "$RAW/$rel"
	verify "$rel"
done

shard() { run env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m data.shard "$@" --source pile; }
train=()
for ((i = 0; i < TRAIN_FILES; i++)); do train+=("$RAW/train/$(printf %02d "$i").jsonl.zst"); done
shard "${train[@]}" --out "$OUT/pile" --workers "$WORKERS"
shard "$RAW/val.jsonl.zst" --out "$OUT/pile_val" --workers "$WORKERS"
shard "$RAW/test.jsonl.zst" --out "$OUT/pile_test" --workers "$WORKERS"

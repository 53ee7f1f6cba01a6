#!/usr/bin/env bash
# WuDaoCorpora 2.0 base (BAAI; 200 GB of Chinese web text) -> jsonl.zst shards for training.
#
# BAAI hands the corpus out only after a login, so this script cannot fetch it on its own:
#   1. Log in at https://data.baai.ac.cn/details/WuDaoCorporaText, accept the license and download
#      WuDaoCorpus2.0_base_200G.rar (one archive, about 64 GB). Open-Llama later took the same archive from the
#      Science Data Bank (download.scidb.cn, file WuDaoCorporaText-2.0-open.rar) where that mirror still serves it.
#   2. Put the archive at RAW_DIR/WuDaoCorpus2.0_base_200G.rar, or give the signed link your browser received as
#      WUDAO_URL='https://...' and this script downloads it with curl, resumably.
#   3. The script then checks the sha256 (BAAI publishes none: it prints the one it computes and compares it with
#      WUDAO_SHA256 when you set that), extracts the archive with unrar, 7z or bsdtar, and shards the part-*.json
#      files (each a JSON array of {"id", "title", "content", "dataType", ...}: the text is "content", the other
#      fields go into meta).
#
# Usage: data/download_wudao.sh [--dry-run] [--workers N] RAW_DIR [OUT_DIR]
#   RAW_DIR      the archive and its extracted folder WuDaoCorpus2.0_base_200G/ (about 270 GB together)
#   OUT_DIR      the shards go to OUT_DIR/wudao (default: data/ of this repository, as configs/pretrain_7b.yaml expects)
#   --workers N  compressing processes of the shard step (default 4)
#   --dry-run    print the commands, touch neither the network nor the disk
# Re-running resumes the download (curl -C -) and skips a verified archive, a finished extraction and finished shards.
set -euo pipefail

ARCHIVE_NAME=WuDaoCorpus2.0_base_200G.rar
FOLDER_NAME=WuDaoCorpus2.0_base_200G
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}

usage() {
	sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
	exit "$1"
}

DRY_RUN=0
WORKERS=4
while [[ $# -gt 0 ]]; do
	case "$1" in
	--dry-run) DRY_RUN=1 && shift ;;
	--workers) WORKERS=${2:?--workers needs a number} && shift 2 ;;
	-h | --help) usage 0 ;;
	-*) echo "error: unknown option $1" >&2 && usage 2 ;;
	*) break ;;
	esac
done
[[ $# -ge 1 && $# -le 2 ]] || usage 2
RAW=$1
OUT=${2:-$ROOT/data}
ARCHIVE=$RAW/$ARCHIVE_NAME
FOLDER=$RAW/$FOLDER_NAME

show() { # print a command as a shell would read it
	printf '+'
	printf ' %q' "$@"
	printf '\n'
}

run() { # print a command, then run it unless --dry-run
	show "$@"
	if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}

sha256() {
	if command -v sha256sum >/dev/null; then sha256sum "$1"; else shasum -a 256 "$1"; fi | cut -d' ' -f1
}

download() { # the archive, from WUDAO_URL, resumably; the partial file is ARCHIVE.part
	local attempt
	if [[ -f $ARCHIVE || -f $FOLDER/.extracted ]]; then return; fi
	if [[ -z ${WUDAO_URL:-} && $DRY_RUN == 0 ]]; then
		echo "error: $ARCHIVE is missing. Log in at https://data.baai.ac.cn/details/WuDaoCorporaText, download" >&2
		echo "  $ARCHIVE_NAME and put it there, or run again with WUDAO_URL='<the signed download link>'." >&2
		echo "  (data/download_wudao.sh --help explains each step.)" >&2
		exit 1
	fi
	if [[ -z ${WUDAO_URL:-} ]]; then echo "# WUDAO_URL is not set: a real run stops here (see --help)"; fi
	run mkdir -p "$RAW"
	show curl -fL --retry 10 --retry-delay 5 --retry-all-errors -C - -o "$ARCHIVE.part" "${WUDAO_URL:-<WUDAO_URL>}"
	[[ $DRY_RUN == 1 ]] && return
	for attempt in 1 2 3 4 5; do # a new curl re-reads how much of ARCHIVE.part is there
		if curl -fL --retry 10 --retry-delay 5 --retry-all-errors -C - -o "$ARCHIVE.part" "$WUDAO_URL"; then
			mv "$ARCHIVE.part" "$ARCHIVE"
			return
		fi
		echo "curl failed (attempt $attempt of 5); resuming in 30 s" >&2
		sleep 30
	done
	echo "error: could not download WUDAO_URL to $ARCHIVE; signed links expire: get a fresh one and run again" >&2
	exit 1
}

verify() { # no published checksum: print ours, compare with WUDAO_SHA256 if given; remembered in ARCHIVE.sha256
	local actual
	if [[ -f $FOLDER/.extracted ]]; then return; fi
	show sha256sum "$ARCHIVE"
	[[ $DRY_RUN == 1 ]] && return
	if [[ -f $ARCHIVE.sha256 && $ARCHIVE.sha256 -nt $ARCHIVE ]]; then
		actual=$(cat "$ARCHIVE.sha256")
	else
		actual=$(sha256 "$ARCHIVE")
		echo "$actual" >"$ARCHIVE.sha256"
	fi
	echo "sha256 $actual  $ARCHIVE_NAME (BAAI publishes no checksum; keep this one to compare copies)"
	if [[ -n ${WUDAO_SHA256:-} && $actual != "$WUDAO_SHA256" ]]; then
		echo "error: $ARCHIVE: sha256 $actual, WUDAO_SHA256 says $WUDAO_SHA256; delete it and download again" >&2
		exit 1
	fi
}

extract() { # everything is overwritten, so an interrupted extraction is simply run again; .extracted marks the end
	local tool="" candidate
	if [[ -f $FOLDER/.extracted ]]; then return; fi
	for candidate in unrar 7z bsdtar; do
		if command -v "$candidate" >/dev/null; then tool=$candidate && break; fi
	done
	if [[ -z $tool && $DRY_RUN == 0 ]]; then
		echo "error: no RAR extractor: install unrar, 7z (p7zip-full) or bsdtar (libarchive-tools) and run again" >&2
		exit 1
	fi
	case "${tool:-unrar}" in # a dry run without any extractor shows unrar
	unrar) run unrar x -o+ -idq "$ARCHIVE" "$RAW/" ;;
	7z) run 7z x -aoa -o"$RAW" "$ARCHIVE" ;;
	bsdtar) run bsdtar -xf "$ARCHIVE" -C "$RAW" ;;
	esac
	[[ $DRY_RUN == 1 ]] && return
	if ! compgen -G "$FOLDER/*.json" >/dev/null; then
		echo "error: the archive did not give $FOLDER/*.json; see what $RAW holds and pass that folder to" >&2
		echo "  python -m data.shard FOLDER --out $OUT/wudao --source wudao --text-field content" >&2
		exit 1
	fi
	touch "$FOLDER/.extracted"
}

download
verify
extract
run env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m data.shard "$FOLDER" --out "$OUT/wudao" \
	--source wudao --text-field content --workers "$WORKERS"

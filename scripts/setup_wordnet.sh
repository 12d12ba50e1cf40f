#!/usr/bin/env bash
# WordNet 3.0 for NLTK's METEOR (`medrega-eval score --compat medrega`), offline, from Debian's `wordnet-base` and
# `wordnet-sense-index` (index.sense, which NLTK's WordNet reader opens when it starts).
#
#   scripts/setup_wordnet.sh            # installs wordnet-base if needed (root + apt), builds the NLTK layout
#   NLTK_DATA=/opt/nltk_data scripts/setup_wordnet.sh
#
# Result: $DEST/corpora/wordnet/{data,index}.{noun,verb,adj,adv}, {noun,verb,adj,adv}.exc, cntlist.rev, index.sense,
# lexnames.
# DEST is the first entry of $NLTK_DATA, else $MEDREGA_NLTK_DATA, else ${XDG_CACHE_HOME:-~/.cache}/medrega/nltk_data
# (the same rule medrega_eval.metrics.meteor uses to find it). The Debian package has every database file NLTK reads
# except `lexnames`, which is generated here from the lexicographer-file table of the package's own lexnames(5WN)
# manual page; when the manual page is not installed (Docker images often drop /usr/share/man) the same table,
# WordNet 3.0's 45 files, is taken from this script.
# Exit status: 0 ready, 3 the packages are missing and cannot be installed here (not root or no apt-get), 1 other error.
set -euo pipefail

SRC=/usr/share/wordnet
MAN="${MEDREGA_LEXNAMES_MAN:-/usr/share/man/man5/lexnames.5WN.gz}"  # override: tests of the built-in table
if [[ -n "${NLTK_DATA:-}" ]]; then
  DEST="${NLTK_DATA%%:*}"
else
  DEST="${MEDREGA_NLTK_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/medrega/nltk_data}"
fi
OUT="$DEST/corpora/wordnet"

if [[ ! -f "$SRC/data.noun" || ! -f "$SRC/index.sense" ]]; then
  if command -v flock >/dev/null; then  # parallel test workers: one apt-get at a time
    exec 9>"${TMPDIR:-/tmp}/medrega_setup_wordnet.lock"
    flock 9
  fi
fi
if [[ ! -f "$SRC/data.noun" || ! -f "$SRC/index.sense" ]]; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base wordnet-sense-index
  else
    echo "setup_wordnet.sh: $SRC/data.noun or $SRC/index.sense missing; install Debian's wordnet-base and" \
         "wordnet-sense-index (as root: apt-get install wordnet-base wordnet-sense-index) and run this script again" >&2
    exit 3
  fi
fi

mkdir -p "$OUT"
for f in data.noun data.verb data.adj data.adv index.noun index.verb index.adj index.adv \
         noun.exc verb.exc adj.exc adv.exc cntlist.rev index.sense; do
  [[ -f "$SRC/$f" ]] || { echo "setup_wordnet.sh: $SRC/$f missing from wordnet-base/wordnet-sense-index" >&2; exit 1; }
  cp "$SRC/$f" "$OUT/$f"
done

# lexnames: "NN<TAB>file.name<TAB>category" (1 noun, 2 verb, 3 adjective, 4 adverb), 45 lines.
table() {
  if [[ -f "$MAN" ]]; then
    # the table rows of the manual page: two digits, a tab, the lexicographer file name
    zcat "$MAN" | grep -P '^[0-9]{2}\t(noun|verb|adj|adv)\.' | awk -F'\t' '{gsub(/ +$/, "", $2); print $1, $2}'
  else
    local names=(adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body
      noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive
      noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation
      noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication
      verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception
      verb.possession verb.social verb.stative verb.weather adj.ppl)
    for i in "${!names[@]}"; do printf '%02d %s\n' "$i" "${names[$i]}"; done
  fi
}
table | awk '{split($2, p, "."); c = (p[1] == "noun") ? 1 : (p[1] == "verb") ? 2 : (p[1] == "adj") ? 3 : 4;
              printf "%s\t%s\t%d\n", $1, $2, c}' > "$OUT/lexnames.tmp"
n=$(wc -l < "$OUT/lexnames.tmp")
if [[ "$n" != 45 ]]; then
  echo "setup_wordnet.sh: expected 45 lexicographer files, got $n" >&2
  exit 1
fi
mv "$OUT/lexnames.tmp" "$OUT/lexnames"
echo "$OUT"

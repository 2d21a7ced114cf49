#!/usr/bin/env bash
# Checks a Dockerfile of images/ against the binaries this build tree produced, without
# a container engine (there is none on the build machine). Registered by
# tests/images/CMakeLists.txt (label "images"); docs/images.md, "What the test checks".
#
#   check_images.sh [--binary-optional] [--expect-failure REGEX]... \
#                   SOURCE_DIR BIN_DIR DOCKERFILE
#
# The Dockerfile is read with its ARG defaults (for shardd: TORCH=cpu). Checks:
#  1. every FROM is another stage or an image pinned by a tag other than "latest" or
#     by a digest (no unresolved ${VAR});
#  2. the final image runs as a numeric, non-root USER (runAsNonRoot needs a number);
#  3. every plain COPY of the build stages names a path that exists in SOURCE_DIR;
#  4. every COPY --from=<stage> into the final image copies <B>/bin/<name>, where <B> is
#     that stage's `cmake -B` directory and <name> a target its `cmake --build --target`
#     builds, and BIN_DIR/<name> exists (the file this build produced);
#  5. the ENTRYPOINT is exec form and runs one of those copied binaries;
#  6. every shared library `ldd BIN_DIR/<name>` lists belongs (dpkg -S on this machine)
#     to a Debian package that the final image's stages install with apt-get install,
#     or that one of those packages depends on (Depends/Pre-Depends, as apt installs
#     them), or that the base image already has (BASE_PACKAGES below);
#  7. every library the binary itself names (DT_NEEDED) is in a package named on an
#     apt-get install line (or a base package), not merely pulled in by another;
#  8. every package the final image installs provides at least one of those libraries,
#     unless the Dockerfile says why not with
#        # images-check: not-a-library <package> (<reason>)
#
# Exit status: 0 all passed; 1 a check failed (each failure on its own FAIL line, naming
# the library, the package and the Dockerfile); 77 (ctest SKIP_RETURN_CODE) with
# --binary-optional when a copied binary is not built in BIN_DIR (e.g. shardd in a
# tree configured with SHARDGUARD_WITH_TORCH=OFF): checks 1-3 ran, 4-8 could not.
#
# --expect-failure REGEX (repeatable): the negative test. Runs the same checks and
# passes only if they fail and the output matches every REGEX (grep -E).
set -u -o pipefail

# Packages debian:12-slim already contains and every binary needs: the C library
# (libc.so.6, libm.so.6, ld-linux), the C++ runtime and libgcc_s. apt itself depends on
# all three, so they cannot be missing from an image that runs apt-get. Nothing else is
# taken for granted: zlib1g or libssl3, for instance, must be installed explicitly.
declare -A BASE_PACKAGES_BY_IMAGE=(
  [debian:12-slim]="libc6 libstdc++6 libgcc-s1"
  [debian:bookworm-slim]="libc6 libstdc++6 libgcc-s1"
)

usage() { echo "usage: $0 [--binary-optional] [--expect-failure REGEX]... SOURCE_DIR BIN_DIR DOCKERFILE" >&2; exit 2; }

binary_optional=0
expect=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --binary-optional) binary_optional=1; shift ;;
    --expect-failure) [[ $# -ge 2 ]] || usage; expect+=("$2"); shift 2 ;;
    --) shift; break ;;
    -*) usage ;;
    *) break ;;
  esac
done
[[ $# -eq 3 ]] || usage

if [[ ${#expect[@]} -gt 0 ]]; then
  args=()
  [[ $binary_optional -eq 1 ]] && args+=(--binary-optional)
  out=$("$0" "${args[@]}" "$@" 2>&1); rc=$?
  printf '%s\n' "$out" | sed 's/^/  | /'
  if [[ $rc -ne 1 ]]; then
    echo "FAIL (negative test): expected the checks to fail with status 1 on $3, got $rc"; exit 1
  fi
  for re in "${expect[@]}"; do
    if ! grep -Eq -- "$re" <<<"$out"; then
      echo "FAIL (negative test): the output does not match /$re/"; exit 1
    fi
    echo "ok (negative test): the failure names /$re/"
  done
  exit 0
fi

SRC=$1 BIN=$2 DF=$3
[[ -f $DF ]] || { echo "FAIL $DF: no such Dockerfile"; exit 1; }
[[ -d $SRC ]] || { echo "FAIL source directory $SRC does not exist"; exit 1; }
name=${DF#"$SRC"/}   # shown in messages, relative to the repository when possible
failures=0
fail() { echo "FAIL $name: $*"; failures=$((failures + 1)); }
ok() { echo "ok   $*"; }

# ---- parse: one logical instruction per line (continuations joined, comments dropped)
mapfile -t LINES < <(awk '
  { line = $0 }
  line ~ /^[ \t]*#/ { next }                       # comments (also inside continuations)
  line ~ /\\[ \t]*$/ { sub(/\\[ \t]*$/, "", line); buf = buf line " "; next }
  { buf = buf line; if (buf !~ /^[ \t]*$/) print buf; buf = "" }
  END { if (buf !~ /^[ \t]*$/) print buf }' "$DF")
# The "# images-check: not-a-library PKG (reason)" annotations.
mapfile -t NOT_LIBRARY < <(sed -n 's/^[[:space:]]*#[[:space:]]*images-check:[[:space:]]*not-a-library[[:space:]]\+\([^[:space:]]\+\).*/\1/p' "$DF")

declare -A GARG=()          # global ARG defaults (before the first FROM)
# shellcheck disable=SC2034  # read through subst's nameref
declare -A SARG=()          # ARGs of the current stage
declare -a ST_NAME=() ST_FROM=() ST_APT=() ST_USER=() ST_COPY=() ST_B=() ST_TARGETS=() ST_ENTRY=() ST_CTX=()
declare -A STAGE_INDEX=()
n=-1

subst() {   # $1 with ${VAR} / $VAR replaced from the given assoc array name ($2)
  local s=$1 k; local -n tbl=$2
  for k in "${!tbl[@]}"; do s=${s//\$\{$k\}/${tbl[$k]}}; s=${s//\$$k/${tbl[$k]}}; done
  printf '%s' "$s"
}

for L in "${LINES[@]}"; do
  L=${L#"${L%%[![:space:]]*}"}
  instr=${L%%[[:space:]]*}; instr=${instr^^}
  rest=${L#*[[:space:]]}; [[ $rest == "$L" ]] && rest=""
  case "$instr" in
    ARG)
      kv=${rest%%[[:space:]]*}; k=${kv%%=*}; v=""; [[ $kv == *=* ]] && v=${kv#*=}
      v=${v#\"}; v=${v%\"}
      if [[ $n -lt 0 ]]; then GARG[$k]=$v
      else
        if [[ $kv == *=* ]]; then SARG[$k]=$v; else SARG[$k]=${GARG[$k]-}; fi
      fi ;;
    FROM)
      read -ra w <<<"$rest"
      img=""; as=""
      for ((i = 0; i < ${#w[@]}; i++)); do
        case "${w[i]}" in
          --platform=*) ;;
          [Aa][Ss]) as=${w[i+1]:-}; i=$((i + 1)) ;;
          *) [[ -z $img ]] && img=${w[i]} ;;
        esac
      done
      n=$((n + 1))
      # shellcheck disable=SC2034  # read through subst's nameref
      SARG=()
      ST_NAME[n]=${as:-$n}; ST_FROM[n]=$(subst "$img" GARG)
      ST_APT[n]=""; ST_USER[n]=""; ST_COPY[n]=""; ST_B[n]=""; ST_TARGETS[n]=""; ST_ENTRY[n]=""; ST_CTX[n]=""
      STAGE_INDEX[${ST_NAME[n]}]=$n; STAGE_INDEX[$n]=$n ;;
    RUN)
      [[ $n -ge 0 ]] || continue
      read -ra w <<<"$(subst "$rest" SARG)"
      apt=0 inst=0 tgt=0
      for ((i = 0; i < ${#w[@]}; i++)); do
        t=${w[i]}; t=${t#\"}; t=${t%\"}; t=${t#\'}; t=${t%\'}
        case "$t" in '&&'|'||'|';'|'|') apt=0 inst=0 tgt=0; continue ;; esac
        end=0; [[ $t == *";" ]] && { t=${t%;}; end=1; }
        if [[ $t == apt-get || $t == apt ]]; then apt=1
        elif [[ $apt -eq 1 && $inst -eq 0 && $t == install ]]; then inst=1
        elif [[ $inst -eq 1 && $t != -* && -n $t ]]; then ST_APT[n]+=" ${t%%=*}"
        fi
        if [[ $t == -B && $((i + 1)) -lt ${#w[@]} ]]; then ST_B[n]=${w[i+1]}
        elif [[ $t == -B?* ]]; then ST_B[n]=${t#-B}
        fi
        if [[ $t == --target ]]; then tgt=1; continue; fi
        if [[ $tgt -eq 1 ]]; then
          if [[ $t == -* ]]; then tgt=0; else ST_TARGETS[n]+=" $t"; fi
        fi
        [[ $end -eq 1 ]] && { apt=0 inst=0 tgt=0; }
      done ;;
    COPY|ADD)
      [[ $n -ge 0 ]] || continue
      read -ra w <<<"$(subst "$rest" SARG)"
      from=""; args=()
      for t in "${w[@]}"; do
        case "$t" in --from=*) from=${t#--from=} ;; --*) ;; *) args+=("$t") ;; esac
      done
      [[ ${#args[@]} -ge 2 ]] || continue
      dst=${args[-1]}
      for ((i = 0; i < ${#args[@]} - 1; i++)); do
        if [[ -n $from ]]; then ST_COPY[n]+="${from}|${args[i]}|${dst}"$'\n'
        else ST_CTX[n]+="${args[i]}"$'\n'; fi
      done ;;
    USER) [[ $n -ge 0 ]] && ST_USER[n]=$(subst "${rest%%[[:space:]]*}" SARG) ;;
    ENTRYPOINT) [[ $n -ge 0 ]] && ST_ENTRY[n]=$rest ;;
  esac
done
[[ $n -ge 0 ]] || { fail "no FROM instruction"; exit 1; }

# chain STAGE: the stage indices from the root to STAGE (following FROM <stage>)
chain() {
  local i=$1 out=() guard=0
  while :; do
    out=("$i" "${out[@]}")
    local f=${ST_FROM[i]}
    if [[ -n ${STAGE_INDEX[$f]+x} && ${STAGE_INDEX[$f]} -lt $i ]]; then i=${STAGE_INDEX[$f]}; else break; fi
    guard=$((guard + 1)); [[ $guard -lt 64 ]] || break
  done
  echo "${out[@]}"
}

final=$n
read -ra FINAL_CHAIN <<<"$(chain "$final")"
root_image=${ST_FROM[${FINAL_CHAIN[0]}]}
declare -A IN_FINAL=()
for i in "${FINAL_CHAIN[@]}"; do IN_FINAL[$i]=1; done
chain_names() { local s="" i; for i in "$@"; do s+="${s:+ → }${ST_NAME[i]}"; done; printf '%s' "$s"; }
echo "$name: final image = $(chain_names "${FINAL_CHAIN[@]}") (FROM $root_image)$(
  for k in "${!GARG[@]}"; do printf ' %s=%s' "$k" "${GARG[$k]}"; done)"

# ---- 1. pinned bases --------------------------------------------------------------
for ((i = 0; i <= n; i++)); do
  f=${ST_FROM[i]}
  if [[ -n ${STAGE_INDEX[$f]+x} && ${STAGE_INDEX[$f]} -lt $i ]]; then continue; fi
  if [[ $f == *'$'* ]]; then fail "stage '${ST_NAME[i]}': FROM $f has an unresolved variable (no ARG default)"; continue; fi
  if [[ $f == *@sha256:* ]]; then ok "stage '${ST_NAME[i]}' FROM $f (digest)"; continue; fi
  last=${f##*/}
  if [[ $last != *:* ]]; then fail "stage '${ST_NAME[i]}': FROM $f has no tag (implicitly :latest); pin a version tag or a digest"
  elif [[ ${last##*:} == latest ]]; then fail "stage '${ST_NAME[i]}': FROM $f uses :latest; pin a version tag or a digest"
  else ok "stage '${ST_NAME[i]}' FROM $f (pinned tag)"; fi
done

# ---- 2. non-root numeric USER -------------------------------------------------------
user=""
for i in "${FINAL_CHAIN[@]}"; do [[ -n ${ST_USER[i]} ]] && user=${ST_USER[i]}; done
uid=${user%%:*}; gid=""; [[ $user == *:* ]] && gid=${user#*:}
if [[ -z $user ]]; then fail "the final image sets no USER (it would run as root)"
elif ! [[ $uid =~ ^[0-9]+$ ]] || { [[ -n $gid ]] && ! [[ $gid =~ ^[0-9]+$ ]]; }; then
  fail "USER $user is not numeric (Kubernetes runAsNonRoot can only verify a numeric uid)"
elif [[ $uid -eq 0 ]]; then fail "USER $user is root"
else ok "final USER $user (numeric, non-root)"; fi

# ---- 3. build-context COPY sources exist ----------------------------------------------
for ((i = 0; i <= n; i++)); do
  while IFS= read -r p; do
    [[ -n $p ]] || continue
    if [[ -e $SRC/${p%/} ]]; then ok "stage '${ST_NAME[i]}' COPY $p (in the source tree)"
    else fail "stage '${ST_NAME[i]}': COPY $p: no such file or directory in $SRC"; fi
  done <<<"${ST_CTX[i]}"
done

# ---- 4. COPY --from=<build stage> into the final image -------------------------------
declare -a BINARIES=()     # name|image path
missing_bins=()
for i in "${FINAL_CHAIN[@]}"; do
  while IFS='|' read -r from srcp dst; do
    [[ -n $from ]] || continue
    if [[ -z ${STAGE_INDEX[$from]+x} ]]; then
      fail "stage '${ST_NAME[i]}': COPY --from=$from: $from is not a stage of this Dockerfile"; continue
    fi
    read -ra bchain <<<"$(chain "${STAGE_INDEX[$from]}")"
    B="" targets=""
    for j in "${bchain[@]}"; do [[ -n ${ST_B[j]} ]] && B=${ST_B[j]}; targets+=${ST_TARGETS[j]}; done
    if [[ -z $B ]]; then fail "stage '${ST_NAME[i]}': COPY --from=$from $srcp: stage $from runs no 'cmake -B <dir>'"; continue; fi
    B=${B%/}
    if [[ $srcp != "$B"/bin/* || ${srcp#"$B"/bin/} == */* ]]; then
      fail "stage '${ST_NAME[i]}': COPY --from=$from $srcp is not a binary of the build ($B/bin/<target>)"; continue
    fi
    bin=${srcp#"$B"/bin/}
    if [[ " $targets " != *" $bin "* ]]; then
      fail "stage '${ST_NAME[i]}': COPY --from=$from $srcp: stage $from does not build target '$bin' (it builds:${targets:- nothing})"; continue
    fi
    [[ $dst == */ ]] && dst=$dst$bin
    if [[ -f $BIN/$bin && -x $BIN/$bin ]]; then
      ok "COPY --from=$from $srcp → $dst: built here as $BIN/$bin"
      BINARIES+=("$bin|$dst")
    elif [[ $binary_optional -eq 1 ]]; then
      echo "NOT CHECKED $name: $bin is not built in $BIN (this tree does not build it: configure with SHARDGUARD_WITH_TORCH=ON for shardd); the ldd checks for it did not run"
      missing_bins+=("$bin"); BINARIES+=("$bin|$dst")
    else
      fail "COPY --from=$from $srcp: $BIN/$bin does not exist (the build did not produce it)"
    fi
  done <<<"${ST_COPY[i]}"
done
for ((i = 0; i <= n; i++)); do
  [[ -n ${IN_FINAL[$i]+x} || -z ${ST_COPY[i]} ]] && continue
  while IFS='|' read -r from srcp dst; do
    [[ -n $from ]] && echo "not checked: stage '${ST_NAME[i]}' COPY --from=$from $srcp (the default build args do not build that stage)"
  done <<<"${ST_COPY[i]}"
done
[[ ${#BINARIES[@]} -gt 0 ]] || fail "the final image copies no binary out of a build stage"

# ---- 5. ENTRYPOINT ------------------------------------------------------------------------
entry=""
for i in "${FINAL_CHAIN[@]}"; do [[ -n ${ST_ENTRY[i]} ]] && entry=${ST_ENTRY[i]}; done
if [[ $entry =~ ^\[[[:space:]]*\"([^\"]+)\" ]]; then
  e=${BASH_REMATCH[1]} found=0
  for b in "${BINARIES[@]}"; do [[ ${b#*|} == "$e" ]] && found=1; done
  if [[ $found -eq 1 ]]; then ok "ENTRYPOINT $entry runs the copied binary"
  else fail "ENTRYPOINT $entry does not run a binary copied from the build stage"; fi
else
  fail "no exec-form ENTRYPOINT [\"/path/binary\"] (the operator passes shard pods args, not a command)"
fi

if [[ ${#missing_bins[@]} -gt 0 ]]; then
  [[ $failures -eq 0 ]] || { echo "$name: $failures check(s) failed"; exit 1; }
  echo "SKIPPED $name: static checks passed; ${missing_bins[*]} not built in $BIN, so its libraries were not checked"
  exit 77
fi

# ---- 6-8. libraries ↔ runtime packages ----------------------------------------------------
declare -A DIRECT=() BASE=() CLOSURE=() USED=() NOTLIB=()
for i in "${FINAL_CHAIN[@]}"; do for p in ${ST_APT[i]}; do DIRECT[$p]=${ST_NAME[i]}; done; done
for p in ${BASE_PACKAGES_BY_IMAGE[${root_image%@*}]-}; do BASE[$p]=1; done
for p in "${NOT_LIBRARY[@]}"; do NOTLIB[$p]=1; done
[[ ${#DIRECT[@]} -gt 0 ]] || fail "the final image's stages install no package (apt-get install)"
echo "runtime packages (apt-get install in $(chain_names "${FINAL_CHAIN[@]}")): ${!DIRECT[*]}"
base_list="${!BASE[*]}"
echo "accepted as already in ${root_image}: ${base_list:-(none: not a known Debian slim base)}"
for p in "${!DIRECT[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
    fail "package $p (apt-get install in stage '${DIRECT[$p]}') is not installed on this machine, so it cannot be checked (make deps)"
done

# What apt-get install --no-install-recommends brings in: the Depends/Pre-Depends closure
# over this machine's installed packages (alternatives and virtual packages resolved to
# the installed provider).
while read -r p; do CLOSURE[$p]=1; done < <(
  dpkg-query -W -f='${db:Status-Abbrev}\t${Package}\t${Provides}\t${Pre-Depends}, ${Depends}\n' 2>/dev/null |
  awk -F'\t' -v roots="${!DIRECT[*]}" '
    function clean(s) { gsub(/\([^)]*\)/, "", s); gsub(/:[a-z0-9]+/, "", s); gsub(/[ \t]/, "", s); return s }
    $1 ~ /^ii/ {
      inst[$2] = 1; deps[$2] = $4
      np = split($3, pv, ","); for (k = 1; k <= np; k++) { v = clean(pv[k]); if (v != "" && !(v in prov)) prov[v] = $2 }
    }
    END {
      nq = split(roots, q, " "); for (k = 1; k <= nq; k++) seen[q[k]] = 1
      for (h = 1; h <= nq; h++) {
        p = q[h]; print p
        nd = split(deps[p], d, ",")
        for (k = 1; k <= nd; k++) {
          na = split(d[k], alt, "|"); pick = ""
          for (a = 1; a <= na && pick == ""; a++) {
            c = clean(alt[a]); if (c == "") continue
            if (c in inst) pick = c; else if (c in prov) pick = prov[c]
          }
          if (pick != "" && !(pick in seen)) { seen[pick] = 1; q[++nq] = pick }
        }
      }
    }')

for b in "${BINARIES[@]}"; do
  bin=${b%%|*}; exe=$BIN/$bin
  mapfile -t LDD < <(ldd "$exe" 2>&1)
  if [[ ${#LDD[@]} -eq 0 ]] || grep -q 'not a dynamic executable' <<<"${LDD[*]}"; then
    fail "ldd $exe: not a dynamic executable?"; continue
  fi
  # soname → path, and every candidate path dpkg may have recorded (usrmerge, symlinks,
  # update-alternatives links such as libblas.so.3)
  declare -A LIBPATH=(); cands=()
  for l in "${LDD[@]}"; do
    if [[ $l =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+=\>[[:space:]]+not\ found ]]; then
      fail "ldd $exe: ${BASH_REMATCH[1]} not found on this machine"; continue
    elif [[ $l =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+=\>[[:space:]]+(/[^[:space:]]+) ]]; then
      so=${BASH_REMATCH[1]} path=${BASH_REMATCH[2]}
    elif [[ $l =~ ^[[:space:]]*(/[^[:space:]]+)[[:space:]]+\( ]]; then
      path=${BASH_REMATCH[1]} so=${path##*/}
    else continue; fi
    LIBPATH[$so]=$path
    real=$(readlink -f "$path")
    cands+=("$path" "/usr$path" "$real" "${real#/usr}")
  done
  declare -A PKG_OF=()
  while IFS= read -r line; do
    [[ $line == *": /"* ]] || continue
    pk=${line%%: /*}; f=/${line#*: /}
    pk=${pk%%,*}; pk=${pk%%:*}
    PKG_OF[$f]=$pk
  done < <(printf '%s\n' "${cands[@]}" | sort -u | grep '^/' | xargs dpkg -S 2>/dev/null)
  # DT_NEEDED of the binary itself
  declare -A NEEDED=()
  while read -r so; do NEEDED[$so]=1; done < <(LC_ALL=C readelf -d "$exe" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')

  nlib=0 nbase=0 ndirect=0 nvia=0
  for so in "${!LIBPATH[@]}"; do
    path=${LIBPATH[$so]}; real=$(readlink -f "$path"); pk=""
    for c in "$path" "/usr$path" "$real" "${real#/usr}"; do [[ -n ${PKG_OF[$c]-} ]] && { pk=${PKG_OF[$c]}; break; }; done
    nlib=$((nlib + 1))
    if [[ -z $pk ]]; then
      fail "$so ($path, for $bin) belongs to no Debian package (dpkg -S); the image cannot install it with apt-get"; continue
    fi
    USED[$pk]=1
    if [[ -n ${BASE[$pk]+x} ]]; then nbase=$((nbase + 1))
    elif [[ -n ${DIRECT[$pk]+x} ]]; then ndirect=$((ndirect + 1))
    elif [[ -n ${CLOSURE[$pk]+x} ]]; then
      nvia=$((nvia + 1))
      if [[ -n ${NEEDED[$so]+x} ]]; then
        fail "$bin needs $so ($path) directly (DT_NEEDED); its package $pk is only a dependency of another package — name $pk in the runtime stage's apt-get install"
      fi
    else
      fail "$bin loads $so ($path) from Debian package $pk, which the runtime stages ($(chain_names "${FINAL_CHAIN[@]}")) do not install and ${root_image} does not ship — add $pk to apt-get install"
    fi
  done
  ok "$bin: $nlib libraries from ldd: $nbase from the base image, $ndirect from packages the Dockerfile names, $nvia from their dependencies"
  unset LIBPATH PKG_OF NEEDED
done

for p in "${!DIRECT[@]}"; do
  if [[ -n ${USED[$p]+x} ]]; then continue; fi
  if [[ -n ${NOTLIB[$p]+x} ]]; then
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' &&
      ok "$p: installed for its files, not a library (images-check: not-a-library)"
    continue
  fi
  fail "package $p (apt-get install in stage '${DIRECT[$p]}') provides none of the libraries the binary loads; remove it, or say why with '# images-check: not-a-library $p (reason)'"
done

if [[ $failures -gt 0 ]]; then echo "$name: $failures check(s) failed"; exit 1; fi
echo "PASS $name"

#!/usr/bin/env bash
# Regenerates the seed corpus of svid_fuzz (tests/fuzz/corpus/svid/) with the openssl
# command line. Not part of the build: the generated files are committed, and keys
# and serials are random, so a rerun changes every file.
#
#   leaf_*.pem     a leaf alone: against the fuzzer's own CA it stops at the chain
#                  check, but it exercises PEM and certificate parsing
#   chain_*.pem    a leaf followed by the CA that issued it: svid_fuzz treats what
#                  follows the first END line as the CA bundle, so these reach the
#                  key usage, EKU and SAN checks (valid for 100 years); a last byte
#                  S, P or F verifies as server, in 1970 or 200 years on
#   *.der          raw DER: svid_fuzz also wraps every input in PEM armour
#   bad_*.pem      malformed armour, base64 or ASN.1
#   id_*.txt       SPIFFE IDs and method paths for the string validators
set -euo pipefail
out="$(cd "$(dirname "$0")" && pwd)/corpus/svid"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
rm -f "$out"/*
cd "$tmp"

days=36500
id="spiffe://shardguard.local/ns/ml/job/fmnist-cnn/shard/1"

openssl ecparam -name prime256v1 -genkey -noout -out ca.key
openssl req -x509 -new -key ca.key -subj "/O=ShardGuard/CN=seed job CA" -days "$days" -sha256 \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem 2>/dev/null

# leaf NAME EXTENSIONS... : a leaf signed by ca.key with exactly these extensions.
leaf() {
  local name="$1"
  shift
  openssl ecparam -name prime256v1 -genkey -noout -out "$name.key"
  openssl req -new -key "$name.key" -subj "/O=ShardGuard/CN=SVID" -out "$name.csr"
  printf '%s\n' "$@" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days "$days" \
    -sha256 -extfile "$name.ext" -out "$name.pem" 2>/dev/null
}

std=("basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyAgreement"
     "extendedKeyUsage=clientAuth,serverAuth" "subjectKeyIdentifier=hash"
     "authorityKeyIdentifier=keyid:always")
leaf valid "${std[@]}" "subjectAltName=URI:$id"
leaf two_uri_sans "${std[@]}" "subjectAltName=URI:$id,URI:spiffe://shardguard.local/ns/ml/job/fmnist-cnn/shard/2"
leaf dns_san_only "${std[@]}" "subjectAltName=DNS:shard-1.ml.svc,DNS:spiffe://shardguard.local/x"
leaf no_san "${std[@]}"
leaf not_spiffe "${std[@]}" "subjectAltName=URI:https://shardguard.local/ns/ml"
leaf bad_spiffe_id "${std[@]}" "subjectAltName=URI:spiffe://Shardguard.Local/ns/ml/../x%2F"
leaf server_only "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
  "extendedKeyUsage=serverAuth" "subjectAltName=URI:$id"
leaf no_eku "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" "subjectAltName=URI:$id"
leaf leaf_is_ca "basicConstraints=critical,CA:TRUE" "keyUsage=critical,digitalSignature,keyCertSign" \
  "extendedKeyUsage=clientAuth" "subjectAltName=URI:$id"
leaf no_digital_signature "basicConstraints=critical,CA:FALSE" "keyUsage=critical,keyAgreement" \
  "extendedKeyUsage=clientAuth" "subjectAltName=URI:$id"

for n in valid two_uri_sans dns_san_only no_san not_spiffe bad_spiffe_id server_only no_eku \
         leaf_is_ca no_digital_signature; do
  cat "$n.pem" ca.pem > "$out/chain_$n.pem"
done
# The last byte picks role and time in svid_fuzz: S = server, P = 1970, F = far future.
{ cat server_only.pem ca.pem; printf S; } > "$out/chain_server_only_as_server.pem"
{ cat valid.pem ca.pem; printf P; } > "$out/chain_valid_not_yet_valid.pem"
{ cat valid.pem ca.pem; printf F; } > "$out/chain_valid_expired.pem"
cp valid.pem "$out/leaf_valid.pem"
cp two_uri_sans.pem "$out/leaf_two_uri_sans.pem"
openssl x509 -in valid.pem -outform DER -out "$out/leaf_valid.der"
openssl x509 -in two_uri_sans.pem -outform DER -out "$out/leaf_two_uri_sans.der"

# Self-signed leaf with a SPIFFE SAN, and a CA presented as the leaf.
openssl req -x509 -new -key valid.key -subj "/CN=self" -days "$days" -sha256 \
  -addext "subjectAltName=URI:$id" -addext "extendedKeyUsage=clientAuth" \
  -out "$out/leaf_self_signed.pem" 2>/dev/null
cat ca.pem ca.pem > "$out/chain_ca_as_leaf.pem"

# Malformed: truncated body, no END line, bad base64, garbage DER in armour, a
# public key instead of a certificate, an empty armour.
head -c 400 valid.pem > "$out/bad_truncated.pem"
sed '$d' valid.pem > "$out/bad_no_end_line.pem"
sed '3s/[A-Za-z]/!/g' valid.pem > "$out/bad_base64.pem"
{ echo "-----BEGIN CERTIFICATE-----"; printf '\x30\x82\x01\x00\x30\x81\xff\x02\x01' | openssl base64
  echo "-----END CERTIFICATE-----"; } > "$out/bad_der_in_armour.pem"
openssl pkey -in valid.key -pubout -out "$out/bad_public_key.pem"
printf -- '-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n' > "$out/bad_empty_armour.pem"

printf '%s' "$id" > "$out/id_shard.txt"
printf '%s' "spiffe://shardguard.local/ns/ml/job/fmnist-cnn/role/exporter" > "$out/id_exporter.txt"
printf '%s' "spiffe://shard.guard_local-1/a/./b//c?d#e" > "$out/id_bad.txt"
printf '%s' "/shardguard.v1.Pipeline/Forward" > "$out/id_method.txt"
printf '%s' "/grpc.health.v1.Health/Check/" > "$out/id_method_bad.txt"
echo "wrote $(ls "$out" | wc -l) files to $out"

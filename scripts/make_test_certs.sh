#!/usr/bin/env bash
# Test certificates and SuperNode authentication keys for fednnunet over Flower.
#
#   scripts/make_test_certs.sh OUT_DIR [--sites A B C] [--san NAME_OR_IP ...] [--days N]
#
# writes
#   OUT_DIR/ca.crt                  a certificate authority's certificate (the server and every site get it)
#   OUT_DIR.ca-key/ca.key           its private key, in a folder of its own beside OUT_DIR: it signs
#                                   certificates, so it goes to nobody (keep it offline); fednnunet_server and
#                                   fednnunet_site refuse a --tls-dir that holds a CA key
#   OUT_DIR/server.pem, server.key  the SuperLink's certificate, signed by the CA, for 127.0.0.1 and localhost
#                                   plus every --san (the server's host name / IP address the sites connect to)
#   OUT_DIR/keys/<site>, <site>.pub one SuperNode authentication key pair per --sites name (OpenSSH ECDSA P-384,
#                                   the format flower-supernode --auth-supernode-private-key and
#                                   flwr supernode register want)
#
# Server:  fednnunet_server ... --tls-dir OUT_DIR --auth-keys OUT_DIR/keys/A.pub OUT_DIR/keys/B.pub
# Site A:  copy OUT_DIR/ca.crt and OUT_DIR/keys/A to site A only, then
#          fednnunet_site --site A ... --tls-dir DIR_WITH_CA_CRT --auth-key keys/A
#
# These are TEST certificates (self-made CA). For a real federation use your hospital's PKI: the server needs a
# certificate whose subject alternative names hold the address the sites use, the sites the CA that signed it.
# Needs openssl; the keys need ssh-keygen or Python with the 'cryptography' package (installed with flwr).
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage 0;; esac
OUT=$1; shift
SITES=()
SANS=()
DAYS=365
mode=""
while [ $# -gt 0 ]; do
  case "$1" in
    --sites) mode=sites;;
    --san) mode=san;;
    --days) DAYS=$2; shift; mode="";;
    -h|--help) usage 0;;
    -*) echo "make_test_certs.sh: unknown option $1" >&2; usage;;
    *) if [ "$mode" = sites ]; then SITES+=("$1"); elif [ "$mode" = san ]; then SANS+=("$1");
       else echo "make_test_certs.sh: unexpected argument $1" >&2; usage; fi;;
  esac
  shift
done

command -v openssl >/dev/null || { echo "make_test_certs.sh: openssl is needed" >&2; exit 1; }
mkdir -p "$OUT"
CA_KEY_DIR="${OUT%/}.ca-key"
mkdir -p "$CA_KEY_DIR"
umask 077

# --- certificate authority
openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days "$DAYS" \
  -keyout "$CA_KEY_DIR/ca.key" -out "$OUT/ca.crt" -subj "/CN=fednnunet test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

# --- the SuperLink's certificate
alt="IP:127.0.0.1,DNS:localhost"
for name in "${SANS[@]+"${SANS[@]}"}"; do
  [[ "$name" == 127.0.0.1 || "$name" == localhost ]] && continue  # always there
  if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then alt="$alt,IP:$name"; else alt="$alt,DNS:$name"; fi
done
cat > "$OUT/server.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$alt
EOF
openssl req -newkey rsa:3072 -nodes -sha256 -keyout "$OUT/server.key" -out "$OUT/server.csr" \
  -subj "/CN=fednnunet superlink" 2>/dev/null
openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.crt" -CAkey "$CA_KEY_DIR/ca.key" -CAcreateserial \
  -out "$OUT/server.pem" -days "$DAYS" -sha256 -extfile "$OUT/server.ext" 2>/dev/null
rm -f "$OUT/server.csr" "$OUT/server.ext" "$OUT/ca.srl"
chmod 644 "$OUT/ca.crt" "$OUT/server.pem"

# --- SuperNode authentication keys (OpenSSH ECDSA on a NIST curve)
if [ ${#SITES[@]} -gt 0 ]; then
  mkdir -p "$OUT/keys"
  for site in "${SITES[@]}"; do
    rm -f "$OUT/keys/$site" "$OUT/keys/$site.pub"
    if command -v ssh-keygen >/dev/null; then
      ssh-keygen -q -t ecdsa -b 384 -N "" -C "fednnunet site $site" -f "$OUT/keys/$site"
    else
      "${PYTHON:-python3}" - "$OUT/keys/$site" "$site" <<'EOF'
import sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP384R1())
with open(sys.argv[1], 'wb') as f:
    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                              serialization.NoEncryption()))
with open(sys.argv[1] + '.pub', 'wb') as f:
    f.write(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            + f' fednnunet site {sys.argv[2]}\n'.encode())
EOF
    fi
    chmod 644 "$OUT/keys/$site.pub"
  done
fi

echo "make_test_certs.sh: wrote $OUT (CA certificate, SuperLink certificate for $alt${SITES[0]+, keys for sites ${SITES[*]}}); the CA's private key is in $CA_KEY_DIR: keep it offline, it goes to no server or site"

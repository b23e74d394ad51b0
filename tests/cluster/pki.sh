#!/bin/bash
# pki.sh DIR NODE NODE_IP: the certificates and kubeconfigs of a single-node
# cluster (openssl): a CA, the API server's serving certificate, client
# certificates for the admin, the controller manager, the scheduler and the
# kubelet, the kubelet's serving certificate and the service-account key.
set -euo pipefail
P=$1 NODE=$2 IP=$3
mkdir -p "$P"
cd "$P"
key() { openssl genrsa -out "$1" 2048 2>/dev/null; }
[ -f ca.key ] || { key ca.key; openssl req -x509 -new -key ca.key -subj /CN=berth-test-ca -days 30 -out ca.crt; }
[ -f sa.key ] || { key sa.key; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null; }
cert() { # name subject extended-usage [subjectAltName]
  [ -f "$1.crt" ] && return 0
  key "$1.key"
  openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$3"
    [ -z "${4:-}" ] || echo "subjectAltName=$4"
  } > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
    -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
cert apiserver /CN=kube-apiserver serverAuth \
  "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,DNS:$NODE,IP:127.0.0.1,IP:10.96.0.1,IP:$IP"
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
cert admin "/O=system:masters/CN=kubernetes-admin" clientAuth
cert kcm /CN=system:kube-controller-manager clientAuth
cert scheduler /CN=system:kube-scheduler clientAuth
cert kube-proxy /CN=system:kube-proxy clientAuth
cert kubelet "/O=system:nodes/CN=system:node:$NODE" clientAuth
cert kubelet-serving "/O=system:nodes/CN=system:node:$NODE" serverAuth "DNS:$NODE,DNS:localhost,IP:127.0.0.1,IP:$IP"
for u in admin kcm scheduler kube-proxy kubelet; do
  cat > "$u.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: berth-test
  cluster: {certificate-authority: $P/ca.crt, server: "https://127.0.0.1:6443"}
users:
- name: $u
  user: {client-certificate: $P/$u.crt, client-key: $P/$u.key}
contexts:
- name: berth-test
  context: {cluster: berth-test, user: $u}
current-context: berth-test
KC
done

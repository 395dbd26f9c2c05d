package redistest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// StartTLS runs a redis-server that speaks only TLS (no plain port), with a
// self-signed certificate for 127.0.0.1 and localhost, and no client
// certificates required. Clients must skip verification (rediss://…
// ?insecure_skip_verify=true) or trust CertFile. Client() speaks TLS.
func StartTLS(tb testing.TB, extra ...string) *Server {
	tb.Helper()
	dir := tb.TempDir()
	certFile, keyFile := filepath.Join(dir, "redis.crt"), filepath.Join(dir, "redis.key")
	writeSelfSigned(tb, certFile, keyFile)
	port := freePort(tb)
	s := &Server{Addr: "127.0.0.1:" + strconv.Itoa(port), Dir: dir, tb: tb, logf: filepath.Join(dir, "redis.log"),
		tls: &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12}} //nolint:gosec // a test's own server
	s.args = append([]string{serverPath(tb), "--bind", "127.0.0.1", "--port", "0", "--tls-port", strconv.Itoa(port),
		"--tls-cert-file", certFile, "--tls-key-file", keyFile, "--tls-ca-cert-file", certFile,
		"--tls-auth-clients", "no", "--dir", dir, "--save", "", "--appendonly", "no",
		"--protected-mode", "no", "--logfile", s.logf}, extra...)
	s.start()
	tb.Cleanup(s.Kill)
	return s
}

// CertFile is the certificate of a StartTLS server ("" for others).
func (s *Server) CertFile() string {
	if s.tls == nil {
		return ""
	}
	return filepath.Join(s.Dir, "redis.crt")
}

func writeSelfSigned(tb testing.TB, certFile, keyFile string) {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "redistest"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		tb.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		tb.Fatal(err)
	}
}

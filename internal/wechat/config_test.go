package wechat

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestValidateNamesEveryMissingVariable(t *testing.T) {
	err := Config{MchID: "1900000001", BaseURL: DefaultBaseURL}.Validate()
	if err == nil {
		t.Fatal("an empty config validated")
	}
	for _, name := range []string{EnvMchSerial, EnvPrivateKey, EnvPublicKey, EnvPublicKeyID, EnvAppID} {
		if !strings.Contains(err.Error(), name) {
			t.Errorf("error does not name %s: %v", name, err)
		}
	}
	if strings.Contains(err.Error(), EnvMchID) {
		t.Errorf("error names %s, which is set: %v", EnvMchID, err)
	}
}

func TestBaseURLMustBeSchemeAndHost(t *testing.T) {
	for _, bad := range []string{"ftp://x", "http://", "http://host/prefix", "http://host?x=1", "::"} {
		if _, err := parseBaseURL(bad); err == nil {
			t.Errorf("parseBaseURL(%q) accepted it", bad)
		}
	}
	for _, good := range []string{"", "https://api.mch.weixin.qq.com", "http://127.0.0.1:8090/"} {
		if _, err := parseBaseURL(good); err != nil {
			t.Errorf("parseBaseURL(%q): %v", good, err)
		}
	}
}

func TestFlagsOverrideEnvironment(t *testing.T) {
	t.Setenv(EnvMchID, "from-env")
	t.Setenv(EnvAppID, "wx-env")
	t.Setenv(EnvBaseURL, "")
	cfg := ConfigFromEnv()
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	cfg.RegisterFlags(fs)
	if err := fs.Parse([]string{"--mchid", "from-flag"}); err != nil {
		t.Fatal(err)
	}
	if cfg.MchID != "from-flag" || cfg.AppID != "wx-env" || cfg.BaseURL != DefaultBaseURL {
		t.Fatalf("got %+v", cfg)
	}
}

// writeKeys writes a PKCS#8 private key with the given mode and a PKIX
// public key, as WeChat hands them out.
func writeKeys(t *testing.T, mode os.FileMode) Config {
	t.Helper()
	dir := t.TempDir()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKCS8PrivateKey(key)
	priv := filepath.Join(dir, "apiclient_key.pem")
	if err := os.WriteFile(priv, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(priv, mode); err != nil { // umask may have narrowed it
		t.Fatal(err)
	}
	pubDER, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	pub := filepath.Join(dir, "pub_key.pem")
	if err := os.WriteFile(pub, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), 0o644); err != nil {
		t.Fatal(err)
	}
	return Config{MchID: "1900000001", MchSerial: "ABC", PrivateKeyPath: priv, PublicKeyPath: pub,
		PublicKeyID: "PUB_KEY_ID_1", AppID: "wx1", BaseURL: DefaultBaseURL}
}

func TestLoadKeysWarnsAboutAReadablePrivateKey(t *testing.T) {
	keys, err := writeKeys(t, 0o644).LoadKeys()
	if err != nil {
		t.Fatal(err)
	}
	if len(keys.Warnings) != 1 || !strings.Contains(keys.Warnings[0], "chmod 600") {
		t.Fatalf("warnings = %q", keys.Warnings)
	}
	keys, err = writeKeys(t, 0o600).LoadKeys()
	if err != nil {
		t.Fatal(err)
	}
	if len(keys.Warnings) != 0 {
		t.Fatalf("a 0600 key got warnings %q", keys.Warnings)
	}
}

func TestLoadKeysNamesTheVariableAndNeverTheKey(t *testing.T) {
	cfg := writeKeys(t, 0o600)
	missing := cfg
	missing.PublicKeyPath = filepath.Join(t.TempDir(), "nope.pem")
	if _, err := missing.LoadKeys(); err == nil || !strings.Contains(err.Error(), EnvPublicKey) {
		t.Fatalf("missing public key: %v", err)
	}
	// A public key where the private key belongs: a plausible mix-up.
	swapped := cfg
	swapped.PrivateKeyPath = cfg.PublicKeyPath
	_, err := swapped.LoadKeys()
	if err == nil || !strings.Contains(err.Error(), EnvPrivateKey) {
		t.Fatalf("swapped keys: %v", err)
	}
	if strings.Contains(err.Error(), "BEGIN") {
		t.Fatalf("the error quotes key material: %v", err)
	}
}

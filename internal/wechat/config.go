package wechat

import (
	"crypto/rsa"
	"errors"
	"flag"
	"fmt"
	"net/url"
	"os"
	"strings"

	"github.com/wechatpay-apiv3/wechatpay-go/utils"
)

// DefaultBaseURL is the production WeChat Pay API host.
const DefaultBaseURL = "https://api.mch.weixin.qq.com"

// Environment variable names. Every program of the project reads these and
// nothing else, so one env file configures the enqueuer, the worker and the
// tests alike.
const (
	EnvMchID       = "WECHATPAY_MCHID"
	EnvMchSerial   = "WECHATPAY_MCH_SERIAL"
	EnvPrivateKey  = "WECHATPAY_PRIVATE_KEY"
	EnvPublicKey   = "WECHATPAY_PUBLIC_KEY"
	EnvPublicKeyID = "WECHATPAY_PUBLIC_KEY_ID"
	EnvAppID       = "WECHATPAY_APPID"
	EnvBaseURL     = "WECHATPAY_BASE_URL"
)

// Config holds the merchant's credentials. Key material is referenced by
// path: keys are read from files when the client is built, never passed
// around as strings that could end up in a log.
type Config struct {
	MchID          string // WECHATPAY_MCHID
	MchSerial      string // WECHATPAY_MCH_SERIAL: serial of the merchant API certificate
	PrivateKeyPath string // WECHATPAY_PRIVATE_KEY: apiclient_key.pem, PKCS#8
	PublicKeyPath  string // WECHATPAY_PUBLIC_KEY: pub_key.pem, the WeChat Pay public key
	PublicKeyID    string // WECHATPAY_PUBLIC_KEY_ID: PUB_KEY_ID_…
	AppID          string // WECHATPAY_APPID
	BaseURL        string // WECHATPAY_BASE_URL, default DefaultBaseURL
}

// ConfigFromEnv reads the WECHATPAY_* variables. It does not validate them;
// call Validate once flags have had their say.
func ConfigFromEnv() Config {
	c := Config{
		MchID:          os.Getenv(EnvMchID),
		MchSerial:      os.Getenv(EnvMchSerial),
		PrivateKeyPath: os.Getenv(EnvPrivateKey),
		PublicKeyPath:  os.Getenv(EnvPublicKey),
		PublicKeyID:    os.Getenv(EnvPublicKeyID),
		AppID:          os.Getenv(EnvAppID),
		BaseURL:        os.Getenv(EnvBaseURL),
	}
	if c.BaseURL == "" {
		c.BaseURL = DefaultBaseURL
	}
	return c
}

// RegisterFlags binds one flag per field to fs, defaulting to the current
// values, so that a flag overrides the environment.
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.MchID, "mchid", c.MchID, "merchant id (env "+EnvMchID+")")
	fs.StringVar(&c.MchSerial, "mch-serial", c.MchSerial, "merchant API certificate serial (env "+EnvMchSerial+")")
	fs.StringVar(&c.PrivateKeyPath, "private-key", c.PrivateKeyPath, "path of the merchant private key, PKCS#8 PEM (env "+EnvPrivateKey+")")
	fs.StringVar(&c.PublicKeyPath, "public-key", c.PublicKeyPath, "path of the WeChat Pay public key PEM (env "+EnvPublicKey+")")
	fs.StringVar(&c.PublicKeyID, "public-key-id", c.PublicKeyID, "WeChat Pay public key id, PUB_KEY_ID_… (env "+EnvPublicKeyID+")")
	fs.StringVar(&c.AppID, "appid", c.AppID, "appid bound to the merchant (env "+EnvAppID+")")
	fs.StringVar(&c.BaseURL, "base-url", c.BaseURL, "WeChat Pay API base URL (env "+EnvBaseURL+")")
}

// Validate reports every missing or malformed value at once, each named by
// its environment variable, so an operator fixes the env file in one pass.
func (c Config) Validate() error {
	var errs []error
	required := []struct{ name, value string }{
		{EnvMchID, c.MchID}, {EnvMchSerial, c.MchSerial}, {EnvPrivateKey, c.PrivateKeyPath},
		{EnvPublicKey, c.PublicKeyPath}, {EnvPublicKeyID, c.PublicKeyID}, {EnvAppID, c.AppID},
	}
	for _, r := range required {
		if strings.TrimSpace(r.value) == "" {
			errs = append(errs, fmt.Errorf("%s is not set", r.name))
		}
	}
	if _, err := parseBaseURL(c.BaseURL); err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", EnvBaseURL, err))
	}
	return errors.Join(errs...)
}

func parseBaseURL(raw string) (*url.URL, error) {
	if raw == "" {
		raw = DefaultBaseURL
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("%q is not a URL: %w", raw, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("%q: scheme must be http or https", raw)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("%q has no host", raw)
	}
	// The request signature covers the path, so a prefix added on the way
	// would make every signature invalid.
	if strings.Trim(u.Path, "/") != "" || u.RawQuery != "" {
		return nil, fmt.Errorf("%q: must be scheme and host only, without a path", raw)
	}
	return u, nil
}

// Keys is the key material a Config points at.
type Keys struct {
	Private *rsa.PrivateKey // merchant key, signs requests
	Public  *rsa.PublicKey  // WeChat Pay key, verifies responses and encrypts fields
	// Warnings are problems worth telling the operator that do not stop
	// start-up, such as a private key file readable by other users.
	Warnings []string
}

// LoadKeys reads both key files. Errors name the variable and the path but
// never the content.
func (c Config) LoadKeys() (*Keys, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	k := &Keys{}
	info, err := os.Stat(c.PrivateKeyPath)
	if err != nil {
		return nil, fmt.Errorf("%s: cannot read %s: %w", EnvPrivateKey, c.PrivateKeyPath, err)
	}
	if perm := info.Mode().Perm(); perm&0o077 != 0 {
		k.Warnings = append(k.Warnings, fmt.Sprintf(
			"%s: %s is readable by group or others (mode %04o); run chmod 600 on it", EnvPrivateKey, c.PrivateKeyPath, perm))
	}
	if k.Private, err = loadPrivateKey(c.PrivateKeyPath); err != nil {
		return nil, fmt.Errorf("%s: %w", EnvPrivateKey, err)
	}
	if k.Public, err = loadPublicKey(c.PublicKeyPath); err != nil {
		return nil, fmt.Errorf("%s: %w", EnvPublicKey, err)
	}
	return k, nil
}

func loadPrivateKey(path string) (*rsa.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cannot read %s: %w", path, err)
	}
	key, err := utils.LoadPrivateKey(string(b))
	if err != nil {
		// The SDK's message can quote the PEM; say only what is wrong.
		return nil, fmt.Errorf("%s is not a PKCS#8 RSA private key in PEM form", path)
	}
	return key, nil
}

// LoadPublicKey reads a WeChat Pay public key (PKIX PEM). Producers that
// only encrypt need nothing else.
func LoadPublicKey(path string) (*rsa.PublicKey, error) { return loadPublicKey(path) }

func loadPublicKey(path string) (*rsa.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cannot read %s: %w", path, err)
	}
	key, err := utils.LoadPublicKey(string(b))
	if err != nil {
		return nil, fmt.Errorf("%s is not an RSA public key in PEM form: %w", path, err)
	}
	return key, nil
}

package sandbox

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"

	"github.com/wechatpay-apiv3/wechatpay-go/utils"
)

// Files kept in Config.DataDir.
const (
	MerchantKeyFile  = "apiclient_key.pem"         // merchant private key, PKCS#8
	PublicKeyFile    = "pub_key.pem"               // WeChat Pay public key, PKIX
	WechatPayKeyFile = "wechatpay_private_key.pem" // the sandbox's own signing key
	IdentityFile     = "sandbox.json"              // ids and default stocks
	StateFile        = "state.json"                // stocks, coupons, counters
	EnvFile          = "sandbox.env"               // WECHATPAY_* for the other programs
)

// identity is what sandbox.json holds: generated once, reused on restart.
type identity struct {
	MchID           string `json:"mchid"`
	MchSerial       string `json:"mch_serial"`
	AppID           string `json:"appid"`
	PublicKeyID     string `json:"public_key_id"`
	StockID         string `json:"stock_id"`
	MultiuseStockID string `json:"multiuse_stock_id"`
	// HolderSalt keys the hash kept of consumer-fund holders' name and id
	// number, so the ledger never holds anything a dictionary could reverse.
	HolderSalt string `json:"holder_salt"`
}

// Identity is what a client needs to talk to the sandbox.
type Identity struct {
	MchID           string
	MchSerial       string // merchant certificate serial, the Authorization serial_no
	AppID           string
	PublicKeyID     string          // Wechatpay-Serial of every response
	MerchantKey     *rsa.PrivateKey // apiclient_key.pem
	PublicKey       *rsa.PublicKey  // pub_key.pem, the WeChat Pay public key
	StockID         string          // default cash-coupon stock
	MultiuseStockID string          // default consumer-fund stock
}

// Identity returns the merchant identity and keys the sandbox accepts.
func (s *Server) Identity() Identity {
	return Identity{
		MchID:           s.id.MchID,
		MchSerial:       s.id.MchSerial,
		AppID:           s.id.AppID,
		PublicKeyID:     s.id.PublicKeyID,
		MerchantKey:     s.mchKey,
		PublicKey:       &s.wxKey.PublicKey,
		StockID:         s.id.StockID,
		MultiuseStockID: s.id.MultiuseStockID,
	}
}

func (s *Server) loadKeys(bits int) error {
	var mchErr, wxErr error
	done := make(chan struct{})
	// Two RSA generations on first start: run them side by side.
	go func() {
		defer close(done)
		s.mchKey, mchErr = s.loadOrCreateKey(MerchantKeyFile, bits)
	}()
	s.wxKey, wxErr = s.loadOrCreateKey(WechatPayKeyFile, bits)
	<-done
	if err := errors.Join(mchErr, wxErr); err != nil {
		return err
	}
	if s.dir == "" {
		return nil
	}
	der, err := x509.MarshalPKIXPublicKey(&s.wxKey.PublicKey)
	if err != nil {
		return err
	}
	// Derived from the private key, so rewriting it is always safe.
	pub := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
	if old, err := os.ReadFile(s.path(PublicKeyFile)); err == nil && string(old) == string(pub) {
		return nil
	}
	return writeFileAtomic(s.path(PublicKeyFile), pub, 0o644)
}

func (s *Server) loadOrCreateKey(name string, bits int) (*rsa.PrivateKey, error) {
	if s.dir != "" {
		b, err := os.ReadFile(s.path(name))
		if err == nil {
			k, err := utils.LoadPrivateKey(string(b))
			if err != nil {
				return nil, fmt.Errorf("%s: %w", s.path(name), err)
			}
			return k, nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
	}
	k, err := rsa.GenerateKey(rand.Reader, bits)
	if err != nil {
		return nil, fmt.Errorf("generate %s: %w", name, err)
	}
	if s.dir == "" {
		return k, nil
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	return k, writeFileAtomic(s.path(name), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
}

// loadIdentity reads sandbox.json, or makes a new identity. It reports
// whether the identity is new and must be saved once the stocks exist.
func (s *Server) loadIdentity() (fresh bool, err error) {
	if s.dir != "" {
		b, err := os.ReadFile(s.path(IdentityFile))
		if err == nil {
			if err := json.Unmarshal(b, &s.id); err != nil {
				return false, fmt.Errorf("%s: %w", s.path(IdentityFile), err)
			}
			if s.id.MchID == "" || s.id.MchSerial == "" || s.id.AppID == "" || s.id.PublicKeyID == "" || s.id.HolderSalt == "" {
				return false, fmt.Errorf("%s: incomplete identity, delete it to start afresh", s.path(IdentityFile))
			}
			return false, nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return false, err
		}
	}
	s.id = identity{
		MchID:       "19" + randDigits(8),
		MchSerial:   fmt.Sprintf("%X", randBytes(20)),
		AppID:       "wx" + hex.EncodeToString(randBytes(8)),
		PublicKeyID: "PUB_KEY_ID_01" + randDigits(30),
		HolderSalt:  hex.EncodeToString(randBytes(16)),
	}
	return true, nil
}

func (s *Server) saveIdentity() error {
	if s.dir == "" {
		return nil
	}
	b, err := json.MarshalIndent(s.id, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(s.path(IdentityFile), append(b, '\n'), 0o600)
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails
	return b
}

func randDigits(n int) string {
	v, _ := rand.Int(rand.Reader, new(big.Int).Exp(big.NewInt(10), big.NewInt(int64(n)), nil))
	return fmt.Sprintf("%0*s", n, v.String())
}

// writeFileAtomic writes to a temporary file and renames it, so a crash
// never leaves a truncated file behind.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
	}
	return err
}

package sandbox_test

import (
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/couponflow/dispatcher/internal/sandbox"
)

func serve(t *testing.T, s *sandbox.Server) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	<-s.Ready()
	t.Cleanup(func() {
		_ = s.Close()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
}

func TestPersistence(t *testing.T) {
	dir := t.TempDir()
	s1, err := sandbox.New(sandbox.Config{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	serve(t, s1)
	id1 := s1.Identity()
	for _, f := range []struct{ re, v string }{
		{`^19[0-9]{8}$`, id1.MchID},
		{`^[0-9A-F]{40}$`, id1.MchSerial},
		{`^wx[0-9a-f]{16}$`, id1.AppID},
		{`^PUB_KEY_ID_[0-9]{32}$`, id1.PublicKeyID},
		{`^[0-9]{1,20}$`, id1.StockID},
		{`^[0-9]{1,20}$`, id1.MultiuseStockID},
	} {
		if !regexp.MustCompile(f.re).MatchString(f.v) {
			t.Errorf("%q does not match %s", f.v, f.re)
		}
	}
	if id1.StockID == id1.MultiuseStockID {
		t.Error("the default stocks share an id")
	}
	for name, mode := range map[string]os.FileMode{
		sandbox.MerchantKeyFile: 0o600, sandbox.WechatPayKeyFile: 0o600, sandbox.PublicKeyFile: 0o644, sandbox.EnvFile: 0o644,
	} {
		if fi, err := os.Stat(filepath.Join(dir, name)); err != nil || fi.Mode().Perm() != mode {
			t.Errorf("%s: %v, mode %v, want %v", name, err, fi.Mode().Perm(), mode)
		}
	}
	env := readEnvFile(t, dir)
	for k, v := range s1.Env() {
		if env[k] != v {
			t.Errorf("sandbox.env %s=%q, Env() has %q", k, env[k], v)
		}
	}
	if env["WECHATPAY_BASE_URL"] != s1.URL() || !strings.HasPrefix(s1.URL(), "http://127.0.0.1:") {
		t.Errorf("base URL %q / %q", env["WECHATPAY_BASE_URL"], s1.URL())
	}
	if k, ok := s1.Stock(id1.StockID); !ok || k.Budget != 1_000_000 || k.MaxPerUser != 1 || k.CouponValue != 100 || k.CouponMinimum != 100 || k.State != sandbox.StateActive {
		t.Errorf("default stock %+v", k)
	}
	if k, ok := s1.Stock(id1.MultiuseStockID); !ok || k.Kind != sandbox.KindMultiuse || k.Budget != 1_000_000 {
		t.Errorf("default multiuse stock %+v", k)
	}

	c := sdk(t, s1)
	extra := newStock(t, s1, sandbox.StockSpec{Budget: 5, Name: "kept"})
	a := sendArgs{openid: "op", stock: extra.ID, outNo: "persist-1"}
	couponID := mustSend(t, c, s1, a)
	if err := s1.MarkUsed(couponID, "", ""); err != nil {
		t.Fatal(err)
	}
	const name, idNo = "赵六", "110105194912310037"
	if _, err := sendMultiuse(c, "op", multiuseBody{StockID: id1.MultiuseStockID, OutRequestNo: "persist-2", UserName: name, IDCardNumber: idNo, Amount: 100, AppID: id1.AppID}, false, ""); err != nil {
		t.Fatal(err)
	}
	ledger1 := s1.Ledger()
	if err := s1.Close(); err != nil {
		t.Fatal(err)
	}
	state, err := os.ReadFile(filepath.Join(dir, sandbox.StateFile))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(state), name) || strings.Contains(string(state), idNo) {
		t.Error("state.json holds a consumer-fund holder's plaintext")
	}

	s2, err := sandbox.New(sandbox.Config{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	serve(t, s2)
	id2 := s2.Identity()
	if id2.MchID != id1.MchID || id2.MchSerial != id1.MchSerial || id2.AppID != id1.AppID || id2.PublicKeyID != id1.PublicKeyID ||
		id2.StockID != id1.StockID || id2.MultiuseStockID != id1.MultiuseStockID ||
		!id2.MerchantKey.Equal(id1.MerchantKey) || !id2.PublicKey.Equal(id1.PublicKey) {
		t.Fatal("identity changed across a restart")
	}
	if k, ok := s2.Stock(extra.ID); !ok || k.Name != "kept" || k.Issued != 1 || k.Remaining != 4 {
		t.Errorf("stock after restart: %+v", k)
	}
	ledger2 := s2.Ledger()
	if len(ledger2.Coupons) != 2 || ledger2.Coupons[0] != ledger1.Coupons[0] || ledger2.Requests["200 OK"] != ledger1.Requests["200 OK"] {
		t.Errorf("ledger after restart %+v, before %+v", ledger2, ledger1)
	}

	c2 := sdk(t, s2)
	if got := mustSend(t, c2, s2, a); got != couponID {
		t.Errorf("retry after restart got %s, want %s", got, couponID)
	}
	if next := mustSend(t, c2, s2, sendArgs{openid: "op2", stock: extra.ID}); next <= couponID || len(next) != len(couponID) {
		t.Errorf("new coupon id %s after %s", next, couponID)
	}
	l, err := list(c2, s2, "op", url.Values{"creator_mchid": {id2.MchID}, "status": {"USED"}})
	if err != nil || len(l.Data) != 1 || l.Data[0].ConsumeInformation == nil || l.Data[0].ConsumeInformation.ConsumeMchID != id2.MchID {
		t.Errorf("used coupon after restart: %+v, %v", l, err)
	}

	// A lost state.json keeps the identity and recreates the default stocks.
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, sandbox.StateFile)); err != nil {
		t.Fatal(err)
	}
	s3, err := sandbox.New(sandbox.Config{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	if _, ok := s3.Stock(id1.StockID); !ok || s3.Identity().MchID != id1.MchID {
		t.Error("default stock not recreated")
	}
	if k, err := s3.CreateStock(sandbox.StockSpec{Budget: 1}); err != nil || k.ID == id1.StockID || k.ID == id1.MultiuseStockID {
		t.Errorf("new stock %+v, %v collides with a default one", k, err)
	}
}

func TestMemoryMode(t *testing.T) {
	s, err := sandbox.New(sandbox.Config{KeyBits: 1024})
	if err != nil {
		t.Fatal(err)
	}
	serve(t, s)
	if s.DataDir() != "" || s.Env()["WECHATPAY_PRIVATE_KEY"] != "" || s.WriteEnvFile() == nil {
		t.Error("memory mode wrote or advertised files")
	}
	mustSend(t, sdk(t, s), s, sendArgs{openid: "o", stock: s.Identity().StockID})
	if len(s.Ledger().Coupons) != 1 {
		t.Error("no coupon in the ledger")
	}
}

func TestNewValidates(t *testing.T) {
	if _, err := sandbox.New(sandbox.Config{Faults: sandbox.Faults{ErrorRate: 1.5}}); err == nil || !strings.Contains(err.Error(), "error_rate") {
		t.Errorf("New accepted error_rate 1.5: %v", err)
	}
	if _, err := sandbox.New(sandbox.Config{KeyBits: 512}); err == nil {
		t.Error("New accepted 512-bit keys")
	}
}

package wechat_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/couponflow/dispatcher/internal/wechat"
)

// The notification URL is set and read back through the SDK's
// CallBackUrlApiService, signed and verified like every call.
func TestCallbacks(t *testing.T) {
	c, ctx := newClient(t), context.Background()
	var werr *wechat.Error
	if _, err := c.QueryCallback(ctx); !errors.As(err, &werr) || werr.StatusCode != 404 {
		t.Fatalf("before any is set: %v", err)
	}
	cb, err := c.SetCallback(ctx, "https://redeem.example.com/wechatpay/coupon-use")
	if err != nil || cb.NotifyURL != "https://redeem.example.com/wechatpay/coupon-use" || cb.UpdateTime == "" {
		t.Fatalf("set: %+v %v", cb, err)
	}
	got, err := c.QueryCallback(ctx)
	if err != nil || got.NotifyURL != cb.NotifyURL || got.MchID != sb.Env()[wechat.EnvMchID] {
		t.Fatalf("query: %+v %v", got, err)
	}
	for _, bad := range []string{"ftp://x.example.com/n", "https://x.example.com/n?a=1", "/relative", "https://x.example.com/" + strings.Repeat("a", 260)} {
		if _, err := c.SetCallback(ctx, bad); !errors.As(err, &werr) || werr.Class != wechat.Permanent {
			t.Errorf("%q: %v", bad, err)
		}
	}
}

func TestLoadAPIv3Key(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "k")
	os.WriteFile(good, []byte(strings.Repeat("a", 32)+"\n"), 0o600)
	if k, warn, err := wechat.LoadAPIv3Key(good); err != nil || len(k) != 32 || len(warn) != 0 {
		t.Fatalf("%d %v %v", len(k), warn, err)
	}
	short := filepath.Join(dir, "short")
	os.WriteFile(short, []byte("secretsecret"), 0o644)
	_, _, err := wechat.LoadAPIv3Key(short)
	if err == nil || !strings.Contains(err.Error(), wechat.EnvAPIv3Key) || strings.Contains(err.Error(), "secretsecret") {
		t.Fatalf("a short key: %v", err)
	}
	if _, _, err := wechat.LoadAPIv3Key(""); err == nil || !strings.Contains(err.Error(), "not set") {
		t.Fatalf("unset: %v", err)
	}
}

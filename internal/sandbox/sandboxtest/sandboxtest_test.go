package sandboxtest_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/wechatpay-apiv3/wechatpay-go/core"
	"github.com/wechatpay-apiv3/wechatpay-go/services/cashcoupons"

	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/sandbox/sandboxtest"
)

func TestStart(t *testing.T) {
	s := sandboxtest.Start(t, sandboxtest.KeyBits(2048), sandboxtest.WithFaults(sandbox.Faults{RateLimit: 100}))
	if !strings.HasPrefix(s.URL(), "http://127.0.0.1:") || s.Faults().RateLimit != 100 {
		t.Fatalf("URL %q, faults %+v", s.URL(), s.Faults())
	}
	env, err := os.ReadFile(filepath.Join(s.DataDir(), sandbox.EnvFile))
	if err != nil || !strings.Contains(string(env), "WECHATPAY_BASE_URL="+s.URL()+"\n") {
		t.Fatalf("sandbox.env: %v\n%s", err, env)
	}
	id := s.Identity()
	resp, _, err := (&cashcoupons.CouponApiService{Client: sandboxtest.SDKClient(t, s)}).SendCoupon(context.Background(), cashcoupons.SendCouponRequest{
		Openid: core.String("o"), StockId: core.String(id.StockID), OutRequestNo: core.String("r1"),
		Appid: core.String(id.AppID), StockCreatorMchid: core.String(id.MchID),
	})
	if err != nil || *resp.CouponId == "" {
		t.Fatalf("send: %v", err)
	}
}

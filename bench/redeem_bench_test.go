package bench

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/metrics"
	"github.com/couponflow/dispatcher/internal/redeem"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/sandbox/sandboxtest"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// BenchmarkReceiver measures the COUPON.USE notifications per second the
// receiver records: each one over HTTP (loopback, keep-alive), its
// signature verified with the 2048-bit WeChat Pay key and its resource
// decrypted (core/notify), its coupon found and its redemption written to
// Redis, the nonce and the record in two round trips. The notifications
// are made beforehand by the sandbox, signed and encrypted for real, each
// for a coupon of its own, so every one is recorded (no duplicate).
// BENCH_NOTIFICATIONS sizes it (5,000); 16 senders post at once, as
// WeChat's several notifying servers do.
func BenchmarkReceiver(b *testing.B) {
	n := envInt(b, "BENCH_NOTIFICATIONS", 5000)
	ctx := context.Background()
	sb := sandboxtest.Start(b)
	env := sb.Env()
	wx, err := wechat.New(ctx, wechat.Config{
		MchID: env[wechat.EnvMchID], MchSerial: env[wechat.EnvMchSerial], PrivateKeyPath: env[wechat.EnvPrivateKey],
		PublicKeyPath: env[wechat.EnvPublicKey], PublicKeyID: env[wechat.EnvPublicKeyID], AppID: env[wechat.EnvAppID],
		BaseURL: env[wechat.EnvBaseURL],
	}, wechat.WithConcurrency(8))
	if err != nil {
		b.Fatal(err)
	}
	stock, err := sb.CreateStock(sandbox.StockSpec{Budget: int64(n) + 10})
	if err != nil {
		b.Fatal(err)
	}
	rdb := redistest.Start(b).Client()
	store := idempotency.New(rdb)
	mch := env[wechat.EnvMchID]
	if _, err := store.SaveCampaign(ctx, idempotency.Campaign{Name: "bench", MchID: mch, Deadline: time.Now().Add(time.Hour)}); err != nil {
		b.Fatal(err)
	}

	// n coupons issued through the API and recorded as a worker would,
	// then used in the sandbox and their notifications signed.
	type note struct {
		body []byte
		h    http.Header
	}
	notes := make([]note, n)
	var wg sync.WaitGroup
	var next atomic.Int64
	errs := make(chan error, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				snd := idempotency.Send{Campaign: "bench", MchID: mch, OutRequestNo: fmt.Sprintf("%s-bench-%d", mch, i), OpenID: openID("obench", i), StockID: stock.ID}
				resp, err := wx.SendCoupon(ctx, wechat.SendCouponRequest{OpenID: snd.OpenID, StockID: snd.StockID, OutRequestNo: snd.OutRequestNo})
				if err == nil {
					_, _, err = store.Register(ctx, snd)
				}
				if err == nil {
					_, err = store.TryClaim(ctx, snd, "bench", time.Minute)
				}
				if err == nil {
					err = store.Finish(ctx, snd, "bench", idempotency.Result{State: idempotency.Succeeded, CouponID: resp.CouponID, Answered: true})
				}
				if err == nil {
					_, err = sb.Use(resp.CouponID, sandbox.Use{})
				}
				if err == nil {
					notes[i].body, notes[i].h, err = sb.SignedNotification(resp.CouponID)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}

	key, _, err := wechat.LoadAPIv3Key(env[wechat.EnvAPIv3Key])
	if err != nil {
		b.Fatal(err)
	}
	pub, err := wechat.LoadPublicKey(env[wechat.EnvPublicKey])
	if err != nil {
		b.Fatal(err)
	}
	rv, err := redeem.New(redeem.Config{Store: store, APIv3Key: key, PublicKey: pub, PublicKeyID: env[wechat.EnvPublicKeyID],
		Metrics: metrics.NewRedemptions()})
	if err != nil {
		b.Fatal(err)
	}
	srv := httptest.NewServer(rv)
	defer srv.Close()
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}}

	b.ResetTimer()
	start := time.Now()
	next.Store(0)
	var failed atomic.Int64
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				req, _ := http.NewRequest(http.MethodPost, srv.URL, bytes.NewReader(notes[i].body))
				req.Header = notes[i].h
				resp, err := client.Do(req)
				if err != nil || resp.StatusCode != http.StatusOK {
					failed.Add(1)
				}
				if resp != nil {
					resp.Body.Close()
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	if failed.Load() != 0 {
		b.Fatalf("%d notifications not acknowledged", failed.Load())
	}
	st, err := store.Status(ctx, "bench")
	if err != nil || st.Redeemed != int64(n) {
		b.Fatalf("recorded %d of %d: %v", st.Redeemed, n, err)
	}
	b.ReportMetric(float64(n)/elapsed.Seconds(), "notifications/s")
	b.ReportMetric(float64(elapsed.Microseconds())/float64(n), "µs/notification")
}

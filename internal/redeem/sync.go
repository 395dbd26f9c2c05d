package redeem

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/metrics"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// Lister lists a user's coupons: *wechat.Client.
type Lister interface {
	ListAllUserCoupons(ctx context.Context, req wechat.ListCouponsRequest) ([]wechat.Coupon, error)
}

// SyncConfig configures Sync.
type SyncConfig struct {
	Store   *idempotency.Store
	Lister  Lister
	Limiter *ratelimit.Limiter // the merchant's favor_list limit, shared with the fleet
	MchID   string
	// CreatorMchID is the stocks' creator (default MchID).
	CreatorMchID string
	Concurrency  int // listings in flight (default 4)
	Metrics      *metrics.Redemptions
	// Progress, if set, is called after each send checked.
	Progress func(checked int64)
}

// SyncResult is what Sync found.
type SyncResult struct {
	Checked int64 // issued, not known as used, listed
	// Found: used coupons that no notification had recorded; recorded now.
	Found int64
	// Already: recorded meanwhile (a notification arriving during the sync).
	Already int64
	// Known: issued coupons already recorded as used before the sync.
	Known int64
	// Indexed: successes added to the coupon index (recorded before it
	// existed), so that the receiver finds their notifications.
	Indexed int
	Errors  []error // listings that failed, the first 20
	Failed  int64
}

// Sync backfills a campaign's redemptions from the list API (GET
// /v3/marketing/favor/users/{openid}/coupons?status=USED), one listing per
// issued coupon not known as used, under the merchant's favor_list rate
// limit. With creator_mchid, status=USED returns the usable coupons as
// well as the used ones (USED:返回可用+已实扣), so a coupon counts as used
// by its own status and consume_information, never by the filter.
func Sync(ctx context.Context, campaign string, cfg SyncConfig) (SyncResult, error) {
	var res SyncResult
	if cfg.Concurrency < 1 {
		cfg.Concurrency = 4
	}
	if cfg.CreatorMchID == "" {
		cfg.CreatorMchID = cfg.MchID
	}
	n, err := cfg.Store.IndexCoupons(ctx, campaign)
	res.Indexed = n
	if err != nil {
		return res, err
	}
	work := make(chan idempotency.Record)
	var mu sync.Mutex
	var wg sync.WaitGroup
	var checked atomic.Int64
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for range cfg.Concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for rec := range work {
				out, err := syncOne(ctx, cfg, rec)
				mu.Lock()
				switch {
				case err != nil:
					res.Failed++
					if len(res.Errors) < 20 {
						res.Errors = append(res.Errors, fmt.Errorf("%s (%s): %w", rec.OutRequestNo, rec.OpenID, err))
					}
				case out == "found":
					res.Found++
				case out == "already":
					res.Already++
				}
				mu.Unlock()
				c := checked.Add(1)
				if cfg.Progress != nil {
					cfg.Progress(c)
				}
			}
		}()
	}
	err = cfg.Store.Each(ctx, campaign, func(r idempotency.Record) error {
		if r.State != idempotency.Succeeded || r.CouponID == "" {
			return nil
		}
		if !r.UsedAt.IsZero() {
			mu.Lock()
			res.Known++
			mu.Unlock()
			return nil
		}
		select {
		case work <- r:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	close(work)
	wg.Wait()
	res.Checked = checked.Load()
	return res, err
}

// syncOne lists one user's used coupons of the send's stock and records
// the send's coupon if it is among them: "found", "already" or "".
func syncOne(ctx context.Context, cfg SyncConfig, rec idempotency.Record) (string, error) {
	for {
		_, err := cfg.Limiter.Wait(ctx, cfg.MchID, ratelimit.ListCoupons, 5*time.Second)
		var tl *ratelimit.TooLong
		if errors.As(err, &tl) {
			continue
		}
		if err != nil {
			return "", err
		}
		break
	}
	coupons, err := cfg.Lister.ListAllUserCoupons(ctx, wechat.ListCouponsRequest{OpenID: rec.OpenID, StockID: rec.StockID,
		Status: "USED", CreatorMchID: cfg.CreatorMchID})
	if err != nil {
		return "", err
	}
	for _, c := range coupons {
		if c.CouponID != rec.CouponID {
			continue
		}
		if c.Status != "USED" || c.ConsumeInformation == nil {
			return "", nil // usable still: the filter lists those too
		}
		use := CouponUse{CouponID: c.CouponID, StockID: c.StockID}
		use.ConsumeInformation = &struct {
			ConsumeTime   string `json:"consume_time"`
			ConsumeMchID  string `json:"consume_mchid"`
			TransactionID string `json:"transaction_id"`
		}{c.ConsumeInformation.ConsumeTime, c.ConsumeInformation.ConsumeMchID, c.ConsumeInformation.TransactionID}
		red, err := use.Redemption("", idempotency.RedeemedBySync)
		if err != nil {
			return "", err
		}
		if c.NormalCoupon != nil {
			red.Amount = c.NormalCoupon.CouponAmount
		}
		out, err := cfg.Store.Redeem(ctx, idempotency.Send{Campaign: rec.Campaign, MchID: rec.MchID, OutRequestNo: rec.OutRequestNo}, red)
		if err != nil {
			return "", err
		}
		if out.Duplicate {
			return "already", nil
		}
		wait := time.Duration(0)
		if !out.SentAt.IsZero() {
			wait = red.ConsumeTime.Sub(out.SentAt)
		}
		cfg.Metrics.Redeemed(idempotency.RedeemedBySync, wait)
		return "found", nil
	}
	return "", nil
}

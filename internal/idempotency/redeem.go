package idempotency

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Sources of a redemption, as the record keeps them.
const (
	RedeemedByNotify = "notify" // WeChat's COUPON.USE notification, through the receiver
	RedeemedBySync   = "sync"   // the list API, through enqueuer redemptions sync: a notification missed
)

// Redemption is a coupon's use, as WeChat reports it.
type Redemption struct {
	CouponID string
	// NotificationID is WeChat's id of the COUPON.USE notification ("" when
	// found by sync).
	NotificationID string
	ConsumeTime    time.Time // consume_information.consume_time
	ConsumeMchID   string    // consume_information.consume_mchid
	TransactionID  string    // consume_information.transaction_id
	Amount         int64     // the coupon's value used, in fen (normal_coupon_information.coupon_amount)
	Source         string    // RedeemedByNotify or RedeemedBySync
}

// RedeemOutcome is what Redeem did.
type RedeemOutcome struct {
	// Recorded: this call wrote the redemption. False with Duplicate: it
	// was recorded before (by this notification's earlier delivery, another
	// notification of the same coupon, or sync), and nothing changed.
	Recorded  bool
	Duplicate bool
	// SentAt is when the send's success was recorded: ConsumeTime minus
	// SentAt is the time from send to redemption.
	SentAt time.Time
}

var (
	//go:embed redeem.lua
	redeemLua    string
	redeemScript = redis.NewScript(libLua + redeemLua)
)

// ErrNotOurs is returned by Redeem and FindCoupon for a coupon that no send
// of the given campaigns issued.
var ErrNotOurs = errors.New("idempotency: the coupon was issued by no send of ours")

// CouponSend is the send that issued a coupon.
type CouponSend struct {
	Campaign, MchID, OutRequestNo string
}

// Send returns the send for Get or Redeem.
func (c CouponSend) Send() Send {
	return Send{Campaign: c.Campaign, MchID: c.MchID, OutRequestNo: c.OutRequestNo}
}

// FindCoupon looks a coupon up in the coupon index of each of campaigns
// (every campaign when nil), in one round trip, and returns the send that
// issued it, or ErrNotOurs. The index is written with the success, so a
// coupon issued before this version was deployed is not found: sync finds
// it from the records (IndexCoupons).
func (s *Store) FindCoupon(ctx context.Context, couponID string, campaigns []string) (CouponSend, error) {
	if campaigns == nil {
		var err error
		if campaigns, err = s.Campaigns(ctx); err != nil {
			return CouponSend{}, fmt.Errorf("idempotency: listing campaigns: %w", err)
		}
	}
	if len(campaigns) == 0 {
		return CouponSend{}, ErrNotOurs
	}
	cmds := make([]*redis.StringCmd, len(campaigns))
	_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, c := range campaigns {
			cmds[i] = p.HGet(ctx, s.keys.Coupons(c), couponID)
		}
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return CouponSend{}, fmt.Errorf("idempotency: looking up coupon %s: %w", couponID, err)
	}
	for i, cmd := range cmds {
		if v, err := cmd.Result(); err == nil {
			mch, orn, ok := strings.Cut(v, ":")
			if ok {
				return CouponSend{Campaign: campaigns[i], MchID: mch, OutRequestNo: orn}, nil
			}
		}
	}
	return CouponSend{}, ErrNotOurs
}

// Redeem records a redemption on the send's record and moves the
// campaign's redemption counters, in one atomic step, once per coupon:
// a duplicate (the same notification delivered again, another
// notification of the same coupon, a sync after the notification) is
// reported as such and changes nothing. A send whose record does not hold
// this coupon is ErrNotOurs.
func (s *Store) Redeem(ctx context.Context, send Send, r Redemption) (RedeemOutcome, error) {
	if r.Source != RedeemedByNotify && r.Source != RedeemedBySync {
		return RedeemOutcome{}, fmt.Errorf("idempotency: redemption source %q: want %q or %q", r.Source, RedeemedByNotify, RedeemedBySync)
	}
	if r.CouponID == "" || r.ConsumeTime.IsZero() {
		return RedeemOutcome{}, fmt.Errorf("idempotency: redemption of %s: coupon_id %q and consume_time %v are required", send.OutRequestNo, r.CouponID, r.ConsumeTime)
	}
	res, err := redeemScript.Run(ctx, s.rdb, []string{s.recordKey(send.Campaign, send.MchID, send.OutRequestNo), s.countsKey(send.Campaign)},
		r.CouponID, r.NotificationID, r.ConsumeTime.UnixMilli(), r.ConsumeMchID, r.TransactionID, r.Amount,
		s.now().UnixMilli(), r.Source).StringSlice()
	if err != nil {
		return RedeemOutcome{}, fmt.Errorf("idempotency: recording the redemption of coupon %s (%s): %w", r.CouponID, send.OutRequestNo, err)
	}
	switch res[0] {
	case "recorded":
		return RedeemOutcome{Recorded: true, SentAt: millis(res[1])}, nil
	case "duplicate":
		return RedeemOutcome{Duplicate: true}, nil
	default: // missing, mismatch
		return RedeemOutcome{}, ErrNotOurs
	}
}

// FirstNotification marks a notification id as handled, for 48 hours
// (WeChat retries one notification for far less), and reports whether this
// was the first time. It is for notifications that match no send, which
// have no record to keep their id: counting them once however often they
// come.
func (s *Store) FirstNotification(ctx context.Context, id string) (bool, error) {
	ok, err := s.rdb.SetNX(ctx, s.keys.RedeemSeen(id), s.now().UnixMilli(), 48*time.Hour).Result()
	if err != nil {
		return false, fmt.Errorf("idempotency: marking notification %s: %w", id, err)
	}
	return ok, nil
}

// Fields of RedeemStats.
const (
	StatNotOurs = "not_ours" // notifications (counted once each) of coupons no send of ours issued
	StatRefused = "refused"  // notifications refused: bad signature, stale, undecryptable
)

// CountRedeemStat adds one to a receiver statistic (StatNotOurs, StatRefused).
func (s *Store) CountRedeemStat(ctx context.Context, field string) error {
	return s.rdb.HIncrBy(ctx, s.keys.RedeemStats(), field, 1).Err()
}

// RedeemStats reads the receiver's statistics that belong to no campaign.
func (s *Store) RedeemStats(ctx context.Context) (map[string]int64, error) {
	m, err := s.rdb.HGetAll(ctx, s.keys.RedeemStats()).Result()
	if err != nil {
		return nil, fmt.Errorf("idempotency: reading redemption statistics: %w", err)
	}
	out := map[string]int64{}
	for k, v := range m {
		out[k], _ = strconv.ParseInt(v, 10, 64)
	}
	return out, nil
}

// IndexCoupons adds every succeeded send of a campaign to its coupon index
// (those recorded before the index existed), and returns how many it
// added. It is idempotent.
func (s *Store) IndexCoupons(ctx context.Context, campaign string) (int, error) {
	n := 0
	var batch []any
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		added, err := s.rdb.HSet(ctx, s.keys.Coupons(campaign), batch...).Result()
		n += int(added)
		batch = batch[:0]
		return err
	}
	err := s.Each(ctx, campaign, func(r Record) error {
		if r.State == Succeeded && r.CouponID != "" {
			batch = append(batch, r.CouponID, r.MchID+":"+r.OutRequestNo)
			if len(batch) >= 2000 {
				return flush()
			}
		}
		return nil
	})
	if err == nil {
		err = flush()
	}
	if err != nil {
		return n, fmt.Errorf("idempotency: indexing the coupons of %s: %w", campaign, err)
	}
	return n, nil
}

// RedemptionSummary is a campaign's redemptions in detail, for the
// campaign page: Status carries the counts, this the distribution of the
// time from send to redemption.
type RedemptionSummary struct {
	Redeemed int64
	Amount   int64 // fen
	// Waits are the times from send to redemption, sorted.
	Waits []time.Duration
}

// Quantile returns the q-quantile (0..1) of the time from send to
// redemption, 0 without redemptions.
func (r RedemptionSummary) Quantile(q float64) time.Duration {
	if len(r.Waits) == 0 {
		return 0
	}
	i := int(q * float64(len(r.Waits)-1))
	return r.Waits[max(0, min(i, len(r.Waits)-1))]
}

// Redemptions walks a campaign's records and summarises its redemptions.
// It reads every record (as Each does), so it is for a page or a report,
// not for every scrape; Status has the counters.
func (s *Store) Redemptions(ctx context.Context, campaign string) (RedemptionSummary, error) {
	var sum RedemptionSummary
	err := s.Each(ctx, campaign, func(r Record) error {
		if r.UsedAt.IsZero() {
			return nil
		}
		sum.Redeemed++
		sum.Amount += r.UsedAmount
		sum.Waits = append(sum.Waits, r.TimeToRedemption())
		return nil
	})
	slices.Sort(sum.Waits)
	return sum, err
}

// TimeToRedemption is the time from the send's success to the coupon's
// use; 0 if it was not used.
func (r Record) TimeToRedemption() time.Duration {
	if r.UsedAt.IsZero() || r.DoneAt.IsZero() || r.UsedAt.Before(r.DoneAt) {
		return 0
	}
	return r.UsedAt.Sub(r.DoneAt)
}

// FirstNonce marks a notification's Wechatpay-Nonce as seen for six
// minutes (the SDK accepts a timestamp up to five minutes off) and reports
// whether this was the first time: the same signed request again is a
// replay, since WeChat signs every delivery afresh.
func (s *Store) FirstNonce(ctx context.Context, nonce string) (bool, error) {
	ok, err := s.rdb.SetNX(ctx, s.keys.RedeemNonce(nonce), 1, 6*time.Minute).Result()
	if err != nil {
		return false, fmt.Errorf("idempotency: marking a notification nonce: %w", err)
	}
	return ok, nil
}

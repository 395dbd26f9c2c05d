package idempotency

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Campaign describes a campaign as its producer declared it.
type Campaign struct {
	Name      string
	MchID     string
	Deadline  time.Time // budget waits end here
	CreatedAt time.Time
	// Retention is how long the records are kept once the campaign has
	// settled (DefaultRetention when zero).
	Retention time.Duration
	// FinishedAt and ExpiresAt are set once the campaign has settled and
	// its retention has started; zero before.
	FinishedAt, ExpiresAt time.Time
	// Report is where its report was archived ("" if it was not).
	Report string
	// Control is an operator's pause or cancel (Running if neither).
	Control Control
	// StartAt is when its sends are processed from (enqueuer campaign
	// --start-at); zero for at once. Kept from the first run (SetStartAt).
	StartAt time.Time
	// DoneAt is when the campaign was found to have nothing left to do
	// (package notify, said once across the fleet); zero before, and again
	// after sends are queued into it anew (ClearDone).
	DoneAt time.Time
	// Skipped is how many rows the campaign's last complete enqueue
	// skipped as invalid, SkippedRows the first few of them ("line 7:
	// openid … has a character outside …"); see RecordSkipped.
	Skipped     int64
	SkippedRows []string
}

func (s *Store) metaKey(campaign string) string { return s.keys.Meta(campaign) }

// SaveCampaign records a campaign the first time it is seen; a re-run keeps
// the original creation time, deadline and retention, so that resuming an
// interrupted enqueue does not move the goalposts (SetRetention changes
// the retention on purpose). A campaign whose retention has passed is
// refused with an *ExpiredError: its records are gone, so its sends
// cannot be told from new ones.
func (s *Store) SaveCampaign(ctx context.Context, c Campaign) (Campaign, error) {
	retention := c.Retention
	if retention <= 0 {
		retention = DefaultRetention
	}
	res, err := saveCampaignScript.Run(ctx, s.rdb, []string{s.metaKey(c.Name), s.keys.Tomb(c.Name)},
		c.MchID, c.Deadline.Unix(), s.now().Unix(), retention.Milliseconds()).Text()
	if err == nil && res == "expired" {
		return Campaign{}, s.closedError(ctx, c.Name)
	}
	if err == nil {
		err = s.rdb.SAdd(ctx, s.campaignsKey(), c.Name).Err()
	}
	if err != nil {
		return Campaign{}, fmt.Errorf("idempotency: saving campaign %s: %w", c.Name, err)
	}
	return s.Campaign(ctx, c.Name)
}

// Campaign reads a campaign's description; Name is "" if it is unknown.
func (s *Store) Campaign(ctx context.Context, name string) (Campaign, error) {
	m, err := s.rdb.HGetAll(ctx, s.metaKey(name)).Result()
	if err != nil {
		return Campaign{}, fmt.Errorf("idempotency: reading campaign %s: %w", name, err)
	}
	if len(m) == 0 {
		return Campaign{}, nil
	}
	deadline, _ := strconv.ParseInt(m["deadline"], 10, 64)
	created, _ := strconv.ParseInt(m["created_at"], 10, 64)
	c := Campaign{Name: name, MchID: m["mchid"], Deadline: time.Unix(deadline, 0), CreatedAt: time.Unix(created, 0),
		Retention: DefaultRetention, FinishedAt: millis(m["finished_at"]), ExpiresAt: millis(m["expires_at"]), Report: m["report"],
		Control: Control(m["control"]), StartAt: millis(m["start_at"]), DoneAt: millis(m["done_at"])}
	c.Skipped, _ = strconv.ParseInt(m["skipped"], 10, 64)
	if rows := m["skipped_rows"]; rows != "" {
		c.SkippedRows = strings.Split(rows, "\n")
	}
	if r, err := strconv.ParseInt(m["retention"], 10, 64); err == nil && r > 0 {
		c.Retention = time.Duration(r) * time.Millisecond
	}
	return c, nil
}

// expectedScript raises the campaign's expected count (KEYS[2] meta,
// field expected) to its registered total (KEYS[1] counts, field total),
// never lowers it, and returns it.
var expectedScript = redis.NewScript(`
redis.call('HDEL', KEYS[2], 'enqueuing')
local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '0') or 0
local expected = tonumber(redis.call('HGET', KEYS[2], 'expected') or '0') or 0
if total > expected then
  redis.call('HSET', KEYS[2], 'expected', total)
  expected = total
end
return expected`)

// RecordExpected notes, at the end of a successful enqueue of a campaign,
// how many sends it holds (its registered total, kept as the largest seen)
// and returns that count. Should Redis later lose records (a failover
// after unreplicated writes), Status reports the difference as Missing.
func (s *Store) RecordExpected(ctx context.Context, campaign string) (int64, error) {
	n, err := expectedScript.Run(ctx, s.rdb, []string{s.countsKey(campaign), s.metaKey(campaign)}).Int64()
	if err != nil {
		return 0, fmt.Errorf("idempotency: recording the expected count of %s: %w", campaign, err)
	}
	return n, nil
}

// MaxSkippedRows is how many invalid rows RecordSkipped keeps, each cut
// to maxSkippedRow bytes: enough for the page to show what is wrong with
// the file; the enqueuer's summary and --dry-run list more.
const (
	MaxSkippedRows = 5
	maxSkippedRow  = 240
)

// RecordSkipped notes how many rows a complete enqueue of the campaign
// skipped as invalid, and the first of them, so that the monitor can
// show them beside the counts they are missing from. A later run's count
// replaces it: each run reads the whole file.
func (s *Store) RecordSkipped(ctx context.Context, campaign string, n int64, rows []string) error {
	kept := make([]string, 0, min(len(rows), MaxSkippedRows))
	for _, r := range rows[:min(len(rows), MaxSkippedRows)] {
		r = strings.ReplaceAll(r, "\n", " ")
		if len(r) > maxSkippedRow {
			r = strings.ToValidUTF8(r[:maxSkippedRow], "") + "…"
		}
		kept = append(kept, r)
	}
	if err := s.rdb.HSet(ctx, s.metaKey(campaign), "skipped", n, "skipped_rows", strings.Join(kept, "\n")).Err(); err != nil {
		return fmt.Errorf("idempotency: recording the invalid rows of %s: %w", campaign, err)
	}
	return nil
}

// BeginEnqueue marks a campaign as being enqueued, until RecordExpected:
// its sends so far may all be done without the campaign being done.
func (s *Store) BeginEnqueue(ctx context.Context, campaign string) error {
	if err := s.rdb.HSet(ctx, s.metaKey(campaign), "enqueuing", s.now().UnixMilli()).Err(); err != nil {
		return fmt.Errorf("idempotency: marking %s as being enqueued: %w", campaign, err)
	}
	return nil
}

// Campaigns lists the names of every campaign, sorted.
func (s *Store) Campaigns(ctx context.Context) ([]string, error) {
	names, err := s.rdb.SMembers(ctx, s.campaignsKey()).Result()
	sort.Strings(names)
	return names, err
}

// Status is a campaign's progress.
type Status struct {
	Campaign string
	Total    int64 // sends registered
	// Expected is how many sends the campaign's last successful enqueue
	// counted (the largest across runs), 0 if none finished yet.
	Expected int64
	ByState  map[State]int64 // every state, zeros included
	// FailedByCode counts permanent failures by WeChat's code.
	FailedByCode map[string]int64
	// Rate is successes per second over the last minute, and Rate10s over
	// the last ten seconds; a window younger than that counts from its
	// first success. FailRate and FailRate10s count permanent failures
	// the same way.
	Rate, Rate10s         float64
	FailRate, FailRate10s float64
	// ChangedAt is when a send of the campaign last changed state: a
	// campaign not done whose sends stopped changing may have lost tasks.
	ChangedAt time.Time

	// Redeemed counts the campaign's coupons used (Redeem), once each;
	// RedeemedAmount sums their value (fen); RedeemedBySync counts those
	// that enqueuer redemptions sync found and no notification had
	// brought; RedeemedWait sums the times from send to redemption.
	Redeemed, RedeemedAmount, RedeemedBySync int64
	RedeemedWait                             time.Duration
}

// RedemptionRate is the share of the campaign's issued coupons that were
// used, 0 before any was issued.
func (st Status) RedemptionRate() float64 {
	if st.ByState[Succeeded] == 0 {
		return 0
	}
	return float64(st.Redeemed) / float64(st.ByState[Succeeded])
}

// MeanTimeToRedemption is the mean time from send to redemption over the
// coupons used, 0 before any was. Redemptions gives the distribution.
func (st Status) MeanTimeToRedemption() time.Duration {
	if st.Redeemed == 0 {
		return 0
	}
	return st.RedeemedWait / time.Duration(st.Redeemed)
}

// Done reports whether the workers have nothing left to do: every send
// has succeeded, failed, was cancelled, or is unknown and waits for
// reconcile.
func (st Status) Done() bool {
	return st.Total > 0 && st.ByState[Succeeded]+st.ByState[Failed]+st.ByState[Unknown]+st.ByState[Cancelled] == st.Total
}

// Missing is how many records fewer than Expected Redis holds: writes it
// acknowledged and then lost (a master that died before a replica had
// them). Running the same enqueue again restores them.
func (st Status) Missing() int64 { return max(st.Expected-st.Total, 0) }

// MissingAdvice is what to tell an operator when Missing is not 0.
func (st Status) MissingAdvice() string {
	return fmt.Sprintf("%d records missing (Redis lost writes); run the same enqueuer campaign command again to restore them", st.Missing())
}

// Settled reports whether every send's outcome is known: done, and
// nothing unknown.
func (st Status) Settled() bool { return st.Done() && st.ByState[Unknown] == 0 }

// Status reads a campaign's counters and its recent send rate in one round trip.
func (s *Store) Status(ctx context.Context, campaign string) (Status, error) {
	now := s.now().Unix()
	rateKeys := make([]string, 60)
	failKeys := make([]string, 60)
	for i := range rateKeys {
		// The current second is still filling; count the 60 before it.
		rateKeys[i] = s.rateKey(campaign, now-1-int64(i))
		failKeys[i] = s.keys.FailRate(campaign, now-1-int64(i))
	}
	var counts *redis.MapStringStringCmd
	var rates, fails *redis.SliceCmd
	var expected *redis.StringCmd
	_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		counts = p.HGetAll(ctx, s.countsKey(campaign))
		expected = p.HGet(ctx, s.metaKey(campaign), "expected")
		rates = p.MGet(ctx, rateKeys...)
		fails = p.MGet(ctx, failKeys...)
		return nil
	})
	if err != nil && errors.Is(err, redis.Nil) {
		// No expected count yet; the other reads answered or failed alone.
		err = errors.Join(counts.Err(), rates.Err(), fails.Err())
	}
	if err != nil {
		return Status{}, fmt.Errorf("idempotency: status of %s: %w", campaign, err)
	}
	st := Status{Campaign: campaign, ByState: map[State]int64{}, FailedByCode: map[string]int64{}}
	st.Expected, _ = strconv.ParseInt(expected.Val(), 10, 64)
	for _, state := range States {
		st.ByState[state] = 0
	}
	for k, v := range counts.Val() {
		n, _ := strconv.ParseInt(v, 10, 64)
		switch {
		case k == "total":
			st.Total = n
		case k == "changed_ms":
			st.ChangedAt = time.UnixMilli(n)
		case k == "redeemed":
			st.Redeemed = n
		case k == "redeemed_amount":
			st.RedeemedAmount = n
		case k == "redeemed_by_sync":
			st.RedeemedBySync = n
		case k == "redeemed_wait_ms":
			st.RedeemedWait = time.Duration(n) * time.Millisecond
		case strings.HasPrefix(k, "failed:"):
			if n != 0 {
				st.FailedByCode[strings.TrimPrefix(k, "failed:")] = n
			}
		default:
			st.ByState[State(k)] = n
		}
	}
	st.Rate, st.Rate10s = perSecond(rates.Val())
	st.FailRate, st.FailRate10s = perSecond(fails.Val())
	return st, nil
}

// perSecond sums the last 60 one-second buckets (newest first) over a
// window that starts at the first second with a count, so a campaign 20s
// old is not averaged over a minute: per second over the minute and over
// the last ten seconds.
func perSecond(buckets []any) (rate, rate10s float64) {
	var sum60, sum10 int64
	span := 0
	for i, v := range buckets {
		if sv, ok := v.(string); ok {
			n, _ := strconv.ParseInt(sv, 10, 64)
			sum60 += n
			if i < 10 {
				sum10 += n
			}
			if n > 0 {
				span = i + 1
			}
		}
	}
	if span > 0 {
		rate = float64(sum60) / float64(span)
		rate10s = float64(sum10) / float64(min(span, 10))
	}
	return rate, rate10s
}

// Each calls fn for every send of a campaign, in the order they were
// registered, reading in batches so that a campaign of millions streams.
func (s *Store) Each(ctx context.Context, campaign string, fn func(Record) error) error {
	const batch = 1000
	for start := int64(0); ; start += batch {
		members, err := s.rdb.LRange(ctx, s.membersKey(campaign), start, start+batch-1).Result()
		if err != nil {
			return fmt.Errorf("idempotency: listing %s: %w", campaign, err)
		}
		if len(members) == 0 {
			return nil
		}
		cmds := make([]*redis.MapStringStringCmd, len(members))
		_, err = s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, m := range members {
				mch, orn, _ := strings.Cut(m, ":")
				cmds[i] = p.HGetAll(ctx, s.recordKey(campaign, mch, orn))
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("idempotency: reading %s: %w", campaign, err)
		}
		for i, m := range members {
			mch, orn, _ := strings.Cut(m, ":")
			if err := fn(recordFrom(mch, orn, cmds[i].Val())); err != nil {
				return err
			}
		}
		if len(members) < batch {
			return nil
		}
	}
}

// ReportHeader is the header row of a campaign report's sends (the
// monitor's CSV download, until it shows redemptions too).
var ReportHeader = []string{"out_request_no", "openid", "state", "coupon_id", "error_code", "error_message",
	"attempts", "first_attempt", "last_attempt"}

// RedemptionColumns follow ReportHeader in a report with redemptions
// (enqueuer report): appended, so that the columns before keep their
// index. They are empty until the coupon is used.
var RedemptionColumns = []string{"redeemed_at", "redeemed_amount", "redeemed_mchid", "redeemed_transaction_id"}

// ReportHeaderWithRedemptions is ReportHeader followed by RedemptionColumns.
var ReportHeaderWithRedemptions = append(append([]string{}, ReportHeader...), RedemptionColumns...)

// ReportRow is the send as a report row: a success carries no error (the
// record keeps the last one from before it); times are UTC RFC 3339.
func (r Record) ReportRow() []string {
	code, msg := r.Code, r.Message
	if r.State == Succeeded {
		code, msg = "", ""
	}
	return []string{r.OutRequestNo, r.OpenID, string(r.State), r.CouponID, code, msg,
		strconv.Itoa(r.Attempts), stamp(r.FirstAttempt), stamp(r.LastAttempt)}
}

// ReportRowWithRedemption is ReportRow followed by the coupon's use:
// consume_time (UTC RFC 3339), its value in fen, the merchant and the
// payment it was used on; empty until it is used.
func (r Record) ReportRowWithRedemption() []string {
	amount := ""
	if !r.UsedAt.IsZero() {
		amount = strconv.FormatInt(r.UsedAmount, 10)
	}
	return append(r.ReportRow(), stamp(r.UsedAt), amount, r.UsedMchID, r.UsedTransactionID)
}

func stamp(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

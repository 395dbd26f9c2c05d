package idempotency

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Retention. A campaign is settled when every send has succeeded or
// failed: nothing pending, in flight, retrying, waiting or unknown. The
// retention sweeper (every worker runs one; a lock lets one work at a time)
// then seals it: it writes the campaign's tombstone, and every key of the
// campaign (records, counters, member list, meta; rate buckets expire on
// their own within 10 minutes, or with it if sooner) expires once the
// retention has passed
// (DefaultRetention unless set at enqueue or later). The tombstone stays:
// a re-run of the campaign after that is refused, since nothing would tell
// its sends from new ones. A new send in a sealed campaign whose keys are
// still kept reopens it, and the sweeper takes the expiry off again.

// DefaultRetention is how long a settled campaign's records are kept.
const DefaultRetention = 30 * 24 * time.Hour

// rateBucketTTL is the life of a rate bucket after its last success, in
// seconds (finish.lua).
const rateBucketTTL = 600

var (
	//go:embed seal.lua
	sealLua    string
	sealScript = redis.NewScript(sealLua)
	//go:embed expire.lua
	expireLua    string
	expireScript = redis.NewScript(expireLua)
	//go:embed savecampaign.lua
	saveCampaignLua    string
	saveCampaignScript = redis.NewScript(saveCampaignLua)
	//go:embed retention.lua
	retentionLua    string
	retentionScript = redis.NewScript(retentionLua)
	//go:embed report.lua
	reportLua    string
	reportScript = redis.NewScript(reportLua)
)

// Tomb is what survives a campaign's retention: its outcome, when it
// finished and where its report was archived.
type Tomb struct {
	Campaign   string
	MchID      string
	FinishedAt time.Time
	ExpiresAt  time.Time // when its records expire, or expired
	Retention  time.Duration
	Total      int64
	Succeeded  int64
	Failed     int64
	Report     string // where `enqueuer report --out` archived it; "" if it was not
	ReportAt   time.Time
}

// Expired reports whether the campaign's records are gone by now.
func (t Tomb) Expired(now time.Time) bool { return !now.Before(t.ExpiresAt) }

// Tomb reads a campaign's tombstone; ok is false if it has none (it has
// not settled, or never existed).
func (s *Store) Tomb(ctx context.Context, campaign string) (t Tomb, ok bool, err error) {
	m, err := s.rdb.HGetAll(ctx, s.keys.Tomb(campaign)).Result()
	if err != nil {
		return Tomb{}, false, fmt.Errorf("idempotency: reading the tombstone of %s: %w", campaign, err)
	}
	if len(m) == 0 {
		return Tomb{}, false, nil
	}
	t = Tomb{Campaign: campaign, MchID: m["mchid"], FinishedAt: millis(m["finished_at"]), ExpiresAt: millis(m["expires_at"]),
		Report: m["report"], ReportAt: millis(m["report_at"])}
	r, _ := strconv.ParseInt(m["retention"], 10, 64)
	t.Retention = time.Duration(r) * time.Millisecond
	t.Total, _ = strconv.ParseInt(m["total"], 10, 64)
	t.Succeeded, _ = strconv.ParseInt(m["succeeded"], 10, 64)
	t.Failed, _ = strconv.ParseInt(m["failed"], 10, 64)
	return t, true, nil
}

// ExpiredError refuses a send or a re-run of a campaign whose retention
// has passed.
type ExpiredError struct{ Tomb Tomb }

func (e *ExpiredError) Error() string {
	t := e.Tomb
	msg := fmt.Sprintf("campaign %s finished at %s (%d sends: %d succeeded, %d failed) and its records expired at %s",
		t.Campaign, stamp(t.FinishedAt), t.Total, t.Succeeded, t.Failed, stamp(t.ExpiresAt))
	if t.Report != "" {
		msg += "; its report was archived to " + t.Report
	} else {
		msg += "; its report was not archived"
	}
	return msg
}

// ErrExpired matches every *ExpiredError with errors.Is.
var ErrExpired = errors.New("idempotency: campaign expired")

func (e *ExpiredError) Is(target error) bool { return target == ErrExpired }

func (s *Store) closedError(ctx context.Context, campaign string) error {
	t, _, err := s.Tomb(ctx, campaign)
	if err != nil {
		return err
	}
	t.Campaign = campaign
	return &ExpiredError{Tomb: t}
}

// Seal starts a settled campaign's retention: it writes the tombstone and
// when the keys expire. It returns whether this call sealed it (false if it
// is not settled, or was sealed before). ApplyExpiry then sets the expiry
// on every key.
func (s *Store) Seal(ctx context.Context, campaign string) (bool, error) {
	res, err := sealScript.Run(ctx, s.rdb, []string{s.countsKey(campaign), s.metaKey(campaign), s.keys.Tomb(campaign)},
		s.now().UnixMilli(), DefaultRetention.Milliseconds()).Text()
	if err != nil {
		return false, fmt.Errorf("idempotency: sealing %s: %w", campaign, err)
	}
	return res == "sealed_now", nil
}

// ApplyExpiry brings the expiry of every key of the campaign in line with
// its meta: the sealed campaign's expiry, or none after a reopening. It
// walks the records in batches, so a campaign of millions does not block
// Redis; it is idempotent, and a no-op once applied.
func (s *Store) ApplyExpiry(ctx context.Context, campaign string) error {
	return s.applyExpiry(ctx, campaign, func() {})
}

// applyExpiry is ApplyExpiry calling tick after each batch (the sweeper
// extends its lock).
func (s *Store) applyExpiry(ctx context.Context, campaign string, tick func()) error {
	// Another walk (a retention changed meanwhile, a reopening) may run at
	// the same time with another target. Only a walk whose target is still
	// the campaign's when it ends marks it applied; a walk that was
	// overtaken walks again with the new target, since some records may
	// now carry its old one.
	again := false
	for range 5 {
		m, err := s.rdb.HMGet(ctx, s.metaKey(campaign), "expires_at", "expiry_applied").Result()
		if err != nil {
			return fmt.Errorf("idempotency: expiry of %s: %w", campaign, err)
		}
		want, _ := m[0].(string)
		applied, _ := m[1].(string)
		if want == applied && !again {
			return nil
		}
		if err := s.walkExpiry(ctx, campaign, want, tick); err != nil {
			return err
		}
		res, err := expireScript.Run(ctx, s.rdb, []string{s.countsKey(campaign), s.membersKey(campaign), s.metaKey(campaign),
			s.keys.Coupons(campaign)}, want).Text()
		if err != nil {
			return fmt.Errorf("idempotency: setting the expiry of %s: %w", campaign, err)
		}
		if res == "ok" || res == "gone" {
			return nil
		}
		again = true
	}
	return fmt.Errorf("idempotency: the expiry of %s kept changing while it was applied", campaign)
}

// walkExpiry sets the expiry want (unix ms; "" for none) on every record
// of the campaign and, when sooner than their own, on its rate buckets.
func (s *Store) walkExpiry(ctx context.Context, campaign, want string, tick func()) error {
	var at time.Time
	if want != "" {
		at = millis(want)
	}
	const batch = 1000
	for start := int64(0); ; start += batch {
		members, err := s.rdb.LRange(ctx, s.membersKey(campaign), start, start+batch-1).Result()
		if err != nil {
			return fmt.Errorf("idempotency: listing %s: %w", campaign, err)
		}
		_, err = s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, mem := range members {
				mch, orn, _ := strings.Cut(mem, ":")
				if at.IsZero() {
					p.Persist(ctx, s.recordKey(campaign, mch, orn))
				} else {
					p.PExpireAt(ctx, s.recordKey(campaign, mch, orn), at)
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("idempotency: setting the expiry of %s: %w", campaign, err)
		}
		tick()
		if len(members) < batch {
			break
		}
	}
	if now := s.now(); !at.IsZero() && at.Before(now.Add(rateBucketTTL*time.Second)) {
		// A rate bucket lives 10 minutes after its last success: when the
		// campaign's keys go sooner, its buckets go with them (one that
		// would have gone a little sooner lives at most until then).
		_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for sec := now.Unix() - rateBucketTTL - 10; sec <= now.Unix()+1; sec++ {
				p.PExpireAt(ctx, s.rateKey(campaign, sec), at)
				p.PExpireAt(ctx, s.keys.FailRate(campaign, sec), at)
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("idempotency: setting the expiry of %s: %w", campaign, err)
		}
	}
	return nil
}

// SetRetention changes how long a campaign's records are kept once it has
// settled; for a campaign already sealed, its expiry moves to its finish
// time plus the new retention (at once if that has passed). A campaign
// whose records are gone cannot be changed.
func (s *Store) SetRetention(ctx context.Context, campaign string, d time.Duration) (Campaign, error) {
	if d <= 0 {
		return Campaign{}, fmt.Errorf("idempotency: retention must be positive, got %s", d)
	}
	res, err := retentionScript.Run(ctx, s.rdb, []string{s.metaKey(campaign), s.keys.Tomb(campaign)}, d.Milliseconds()).Text()
	if err != nil {
		return Campaign{}, fmt.Errorf("idempotency: retention of %s: %w", campaign, err)
	}
	if res == "gone" {
		if _, ok, err := s.Tomb(ctx, campaign); err != nil || ok {
			if err == nil {
				err = s.closedError(ctx, campaign)
			}
			return Campaign{}, err
		}
		return Campaign{}, fmt.Errorf("idempotency: no campaign %s", campaign)
	}
	if err := s.ApplyExpiry(ctx, campaign); err != nil {
		return Campaign{}, err
	}
	return s.Campaign(ctx, campaign)
}

// RecordReport notes where a campaign's report was archived, in its meta
// and, once sealed, its tombstone, so that the refusal of a re-run after
// the retention can say where it went.
func (s *Store) RecordReport(ctx context.Context, campaign, where string) error {
	n, err := reportScript.Run(ctx, s.rdb, []string{s.metaKey(campaign), s.keys.Tomb(campaign)}, where, s.now().UnixMilli()).Int()
	if err != nil {
		return fmt.Errorf("idempotency: recording the report of %s: %w", campaign, err)
	}
	if n == 0 {
		return fmt.Errorf("idempotency: no campaign %s", campaign)
	}
	return nil
}

// SweepResult is what one sweep did.
type SweepResult struct {
	Sealed  []string // campaigns whose retention started
	Expired []string // campaigns whose keys are gone, taken off the list of campaigns
	Skipped bool     // another worker holds the sweeper's lock
}

// Sweep seals every settled campaign, applies the expiry of every sealed
// or reopened one, and forgets the names of campaigns whose keys have
// expired (their tombstones stay). Across a fleet one sweep runs at a time.
func (s *Store) Sweep(ctx context.Context) (SweepResult, error) {
	var res SweepResult
	lock, token := s.keys.Lock("retention"), strconv.FormatInt(s.now().UnixNano(), 36)
	const lease = 2 * time.Minute
	ok, err := s.rdb.SetNX(ctx, lock, token, lease).Result()
	if err != nil {
		return res, fmt.Errorf("idempotency: retention lock: %w", err)
	}
	if !ok {
		res.Skipped = true
		return res, nil
	}
	defer s.unlock(context.WithoutCancel(ctx), lock, token)
	names, err := s.rdb.SMembers(ctx, s.campaignsKey()).Result()
	if err != nil {
		return res, fmt.Errorf("idempotency: listing campaigns: %w", err)
	}
	extend := func() { s.rdb.PExpire(ctx, lock, lease) }
	for _, name := range names {
		extend()
		alive, err := s.rdb.Exists(ctx, s.metaKey(name)).Result()
		if err != nil {
			return res, fmt.Errorf("idempotency: sweeping %s: %w", name, err)
		}
		if alive == 0 {
			if _, tomb, err := s.Tomb(ctx, name); err != nil {
				return res, err
			} else if tomb {
				// Off the list of campaigns, and out of the orphan
				// sweeper's memory.
				_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
					p.SRem(ctx, s.campaignsKey(), name)
					p.HDel(ctx, s.keys.Swept(), name)
					return nil
				})
				if err != nil {
					return res, fmt.Errorf("idempotency: sweeping %s: %w", name, err)
				}
				res.Expired = append(res.Expired, name)
			}
			continue
		}
		sealed, err := s.Seal(ctx, name)
		if err != nil {
			return res, err
		}
		if sealed {
			res.Sealed = append(res.Sealed, name)
		}
		if err := s.applyExpiry(ctx, name, extend); err != nil {
			return res, err
		}
	}
	return res, nil
}

// RunSweeper sweeps every interval until ctx ends, logging what it does.
func (s *Store) RunSweeper(ctx context.Context, interval time.Duration, log *slog.Logger) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		res, err := s.Sweep(ctx)
		switch {
		case err != nil && ctx.Err() == nil:
			log.Warn("retention sweep failed; trying again next interval", "err", err, "interval", interval.String())
		case err == nil:
			for _, name := range res.Sealed {
				if c, err := s.Campaign(ctx, name); err == nil {
					log.Info("campaign settled: its records are kept until its retention ends", "campaign", name,
						"retention", c.Retention.String(), "expires_at", c.ExpiresAt.UTC().Format(time.RFC3339))
				}
			}
			for _, name := range res.Expired {
				log.Info("campaign expired: its keys are gone, its tombstone stays", "campaign", name)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

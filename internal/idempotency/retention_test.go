package idempotency

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/redistest"
)

// finishAll claims and finishes sends 1..n of campaign c1 with the state.
func finishAll(t *testing.T, s *Store, from, to int, state State) {
	t.Helper()
	ctx := context.Background()
	for i := from; i <= to; i++ {
		if c, err := s.TryClaim(ctx, send(i), "w", time.Minute); err != nil || !c.Acquired {
			t.Fatalf("claim %d: %+v %v", i, c, err)
		}
		r := Result{State: state, CouponID: fmt.Sprint("cp", i)}
		if state == Failed {
			r.Code, r.Message = "USER_ACCOUNT_ABNORMAL", "no"
		}
		if err := s.Finish(ctx, send(i), "w", r); err != nil {
			t.Fatal(err)
		}
	}
}

func campaignKeys(t *testing.T, rdb *redis.Client, s *Store, campaign string) map[string]time.Duration {
	t.Helper()
	ctx := context.Background()
	out := map[string]time.Duration{}
	keys := rdb.Keys(ctx, s.Keys().CampaignPattern(campaign)).Val()
	// One round trip: read one by one, thousands of TTLs take long enough
	// on a loaded machine for the first keys to expire meanwhile.
	cmds := make([]*redis.DurationCmd, len(keys))
	if _, err := rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			cmds[i] = p.PTTL(ctx, k)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for i, k := range keys {
		out[k] = cmds[i].Val()
	}
	return out
}

func saveC1(t *testing.T, s *Store, retention time.Duration) {
	t.Helper()
	if _, err := s.SaveCampaign(context.Background(), Campaign{Name: "c1", MchID: "1900000001", Deadline: time.Now().Add(time.Hour), Retention: retention}); err != nil {
		t.Fatal(err)
	}
}

func sweep(t *testing.T, s *Store) SweepResult {
	t.Helper()
	res, err := s.Sweep(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// A campaign keeps everything while anything is left to do; once settled
// every key of it expires after the retention, and only its tombstone
// stays, which refuses a re-run with when it finished and where its report
// went.
func TestSettledCampaignExpiresLeavingItsTombstone(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client()
	s, ctx := New(rdb), context.Background()
	saveC1(t, s, 1500*time.Millisecond)
	for i := 1; i <= 2500; i++ { // more than one batch of the walk
		if _, _, err := s.Register(ctx, send(i)); err != nil {
			t.Fatal(err)
		}
	}
	finishAll(t, s, 1, 2497, Succeeded)
	finishAll(t, s, 2498, 2499, Failed)
	// One send still pending, then one unknown: not settled, nothing expires.
	for _, step := range []string{"pending", "unknown"} {
		if res := sweep(t, s); len(res.Sealed) != 0 {
			t.Fatalf("%s: sealed %v", step, res.Sealed)
		}
		for k, ttl := range campaignKeys(t, rdb, s, "c1") {
			// Rate buckets, of successes and of failures, expire by design.
			if ttl != -1 && !strings.Contains(k, ":rate:") && !strings.Contains(k, ":failrate:") {
				t.Fatalf("%s: %s has a TTL of %s before the campaign settled", step, k, ttl)
			}
		}
		if _, ok, _ := s.Tomb(ctx, "c1"); ok {
			t.Fatalf("%s: a tombstone before the campaign settled", step)
		}
		if step == "pending" {
			finishAll(t, s, 2500, 2500, Unknown)
		}
	}
	// Reconcile settles the unknown send; the next sweep seals the campaign.
	if c, err := s.TryClaim(ctx, send(2500), "reconcile", time.Minute); err != nil || !c.Acquired {
		t.Fatalf("reconcile claim: %+v %v", c, err)
	}
	if err := s.Finish(ctx, send(2500), "reconcile", Result{State: Succeeded, CouponID: "cp2500"}); err != nil {
		t.Fatal(err)
	}
	if err := s.RecordReport(ctx, "c1", "/archive/c1.csv.gz"); err != nil {
		t.Fatal(err)
	}
	before := time.Now()
	if res := sweep(t, s); len(res.Sealed) != 1 {
		t.Fatalf("sealed %v", res.Sealed)
	}
	keys := campaignKeys(t, rdb, s, "c1")
	if len(keys) < 2504 {
		t.Fatalf("%d keys", len(keys))
	}
	for k, ttl := range keys {
		switch {
		case k == s.Keys().Tomb("c1"):
			if ttl != -1 {
				t.Errorf("the tombstone expires in %s", ttl)
			}
		case ttl < 0 || ttl > 1500*time.Millisecond:
			t.Fatalf("%s: TTL %s, want the retention", k, ttl)
		}
	}
	tomb, ok, err := s.Tomb(ctx, "c1")
	if err != nil || !ok || tomb.Total != 2500 || tomb.Succeeded != 2498 || tomb.Failed != 2 || tomb.Report != "/archive/c1.csv.gz" ||
		tomb.FinishedAt.Before(before.Add(-time.Second)) || tomb.ExpiresAt.Sub(tomb.FinishedAt) != 1500*time.Millisecond {
		t.Fatalf("tomb %+v %v %v", tomb, ok, err)
	}
	// A re-run before the expiry: every send a duplicate, nothing new.
	if created, state, err := s.Register(ctx, send(1)); err != nil || created || state != Succeeded {
		t.Fatalf("re-run before expiry: %v %v %v", created, state, err)
	}

	time.Sleep(time.Until(tomb.ExpiresAt) + 100*time.Millisecond)
	left := campaignKeys(t, rdb, s, "c1")
	if len(left) != 1 || left[s.Keys().Tomb("c1")] != -1 {
		t.Fatalf("after the retention: %v", left)
	}
	// A re-run after the expiry is refused whole, saying when and where.
	_, err = s.SaveCampaign(ctx, Campaign{Name: "c1", MchID: "1900000001", Deadline: time.Now().Add(time.Hour)})
	var exp *ExpiredError
	if !errors.As(err, &exp) || !errors.Is(err, ErrExpired) {
		t.Fatalf("re-run after expiry: %v", err)
	}
	for _, want := range []string{"campaign c1 finished at " + tomb.FinishedAt.UTC().Format(time.RFC3339Nano), "2500 sends", "/archive/c1.csv.gz"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal %q does not say %q", err, want)
		}
	}
	if _, _, err := s.Register(ctx, send(1)); !errors.Is(err, ErrExpired) {
		t.Fatalf("a send after expiry: %v", err)
	}
	if c, err := s.TryClaim(ctx, send(1), "w", time.Minute); !errors.Is(err, ErrExpired) || c.Acquired {
		t.Fatalf("a claim after expiry: %+v %v", c, err)
	}
	if len(campaignKeys(t, rdb, s, "c1")) != 1 {
		t.Fatal("the refusals wrote keys")
	}
	// The sweeper forgets the name, here and in the orphan sweeper's
	// hash; the tombstone stays.
	rdb.HSet(ctx, s.Keys().Swept(), "c1", 1, "other", 2)
	if res := sweep(t, s); len(res.Expired) != 1 {
		t.Fatalf("expired %v", res.Expired)
	}
	if names, _ := s.Campaigns(ctx); len(names) != 0 {
		t.Fatalf("campaigns %v", names)
	}
	if f := rdb.HKeys(ctx, s.Keys().Swept()).Val(); len(f) != 1 || f[0] != "other" {
		t.Fatalf("the orphan sweeper's hash keeps %v", f)
	}
}

// A new send in a sealed campaign whose keys are still kept reopens it:
// nothing of it expires any more until it settles again.
func TestNewSendReopensASealedCampaign(t *testing.T) {
	rdb := redistest.Start(t).Client()
	s, ctx := New(rdb), context.Background()
	saveC1(t, s, time.Hour)
	s.Register(ctx, send(1))
	finishAll(t, s, 1, 1, Succeeded)
	sweep(t, s)
	if _, ok, _ := s.Tomb(ctx, "c1"); !ok {
		t.Fatal("not sealed")
	}
	if created, _, err := s.Register(ctx, send(2)); err != nil || !created {
		t.Fatalf("new send: %v %v", created, err)
	}
	if _, ok, _ := s.Tomb(ctx, "c1"); ok {
		t.Fatal("still sealed after a new send")
	}
	if res := sweep(t, s); len(res.Sealed) != 0 {
		t.Fatalf("sealed with a pending send: %v", res)
	}
	for k, ttl := range campaignKeys(t, rdb, s, "c1") {
		if ttl != -1 && !strings.Contains(k, ":rate:") && !strings.Contains(k, ":failrate:") {
			t.Errorf("%s keeps a TTL of %s in a reopened campaign", k, ttl)
		}
	}
	finishAll(t, s, 2, 2, Failed)
	sweep(t, s)
	if tomb, ok, _ := s.Tomb(ctx, "c1"); !ok || tomb.Total != 2 || tomb.Failed != 1 {
		t.Fatalf("tomb %+v %v", tomb, ok)
	}
}

// The retention can be changed before or after the campaign settles; after,
// the expiry moves at once.
func TestSetRetention(t *testing.T) {
	rdb := redistest.Start(t).Client()
	s, ctx := New(rdb), context.Background()
	saveC1(t, s, 0)
	if c, _ := s.Campaign(ctx, "c1"); c.Retention != DefaultRetention {
		t.Fatalf("default retention %s", c.Retention)
	}
	if _, err := s.SetRetention(ctx, "c1", 2*time.Hour); err != nil {
		t.Fatal(err)
	}
	// A re-run without a retention keeps the one set.
	saveC1(t, s, 0)
	s.Register(ctx, send(1))
	finishAll(t, s, 1, 1, Succeeded)
	sweep(t, s)
	rec := s.Keys().Record("c1", "1900000001", "r1")
	if ttl := rdb.PTTL(ctx, rec).Val(); ttl < time.Hour || ttl > 2*time.Hour {
		t.Fatalf("record TTL %s, want 2h", ttl)
	}
	c, err := s.SetRetention(ctx, "c1", 30*time.Minute)
	if err != nil || c.Retention != 30*time.Minute || c.ExpiresAt.Sub(c.FinishedAt) != 30*time.Minute {
		t.Fatalf("%+v %v", c, err)
	}
	for k, ttl := range campaignKeys(t, rdb, s, "c1") {
		if k != s.Keys().Tomb("c1") && (ttl < 0 || ttl > 30*time.Minute) {
			t.Errorf("%s: TTL %s after shortening to 30m", k, ttl)
		}
	}
	if tomb, _, _ := s.Tomb(ctx, "c1"); tomb.Retention != 30*time.Minute || !tomb.ExpiresAt.Equal(c.ExpiresAt) {
		t.Fatalf("tomb %+v", tomb)
	}
	// Shortened into the past: gone now. The finish must be more than the
	// new retention ago, or the keys are only about to expire: on a fast
	// run the steps since the sweep take under a millisecond.
	time.Sleep(10 * time.Millisecond)
	if _, err := s.SetRetention(ctx, "c1", time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if left := campaignKeys(t, rdb, s, "c1"); len(left) != 1 {
		t.Fatalf("left %v", left)
	}
	if _, err := s.SetRetention(ctx, "c1", time.Hour); !errors.Is(err, ErrExpired) {
		t.Fatalf("retention of an expired campaign: %v", err)
	}
	if _, err := s.SetRetention(ctx, "nope", time.Hour); err == nil || errors.Is(err, ErrExpired) {
		t.Fatalf("retention of an unknown campaign: %v", err)
	}
}

// One sweeper at a time across the fleet.
func TestSweepTakesTurns(t *testing.T) {
	rdb := redistest.Start(t).Client()
	s, ctx := New(rdb), context.Background()
	rdb.Set(ctx, s.Keys().Lock("retention"), "another worker", time.Minute)
	if res := sweep(t, s); !res.Skipped {
		t.Fatalf("%+v", res)
	}
	rdb.Del(ctx, s.Keys().Lock("retention"))
	if res := sweep(t, s); res.Skipped {
		t.Fatalf("%+v", res)
	}
	if n := rdb.Exists(ctx, s.Keys().Lock("retention")).Val(); n != 0 {
		t.Fatal("lock left behind")
	}
	keys := rdb.Keys(ctx, "*").Val()
	sort.Strings(keys)
	if len(keys) != 0 {
		t.Fatalf("keys %v", keys)
	}
}

// On a Redis Cluster every retention script touches one slot (the
// campaign's), and the sweep spans the slots of the campaigns set and the
// campaigns.
func TestRetentionOnACluster(t *testing.T) {
	rdb := redistest.StartCluster(t, 3).Client()
	s, ctx := New(rdb), context.Background()
	for _, name := range []string{"c1", "c2", "c3"} {
		if _, err := s.SaveCampaign(ctx, Campaign{Name: name, MchID: "1900000001", Deadline: time.Now().Add(time.Hour), Retention: time.Hour}); err != nil {
			t.Fatal(err)
		}
		a := send(1)
		a.Campaign = name
		if _, _, err := s.Register(ctx, a); err != nil {
			t.Fatal(err)
		}
		if c, err := s.TryClaim(ctx, a, "w", time.Minute); err != nil || !c.Acquired {
			t.Fatalf("claim: %+v %v", c, err)
		}
		if err := s.Finish(ctx, a, "w", Result{State: Succeeded, CouponID: "cp"}); err != nil {
			t.Fatal(err)
		}
	}
	res, err := s.Sweep(ctx)
	if err != nil || len(res.Sealed) != 3 {
		t.Fatalf("sweep: %+v %v", res, err)
	}
	for _, name := range []string{"c1", "c2", "c3"} {
		if ttl := rdb.PTTL(ctx, s.Keys().Record(name, "1900000001", "r1")).Val(); ttl <= 0 || ttl > time.Hour {
			t.Errorf("%s: record TTL %s", name, ttl)
		}
	}
	if _, err := s.SetRetention(ctx, "c2", time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if err := s.RecordReport(ctx, "c1", "/a/c1.csv.gz"); err != nil {
		t.Fatal(err)
	}
	if res, err := s.Sweep(ctx); err != nil || len(res.Expired) != 1 || res.Expired[0] != "c2" {
		t.Fatalf("sweep after c2 expired: %+v %v", res, err)
	}
	a := send(2)
	a.Campaign = "c2"
	if _, _, err := s.Register(ctx, a); !errors.Is(err, ErrExpired) {
		t.Fatalf("register into expired c2: %v", err)
	}
	a.Campaign = "c3"
	if created, _, err := s.Register(ctx, a); err != nil || !created {
		t.Fatalf("reopening c3: %v %v", created, err)
	}
}

// A walk overtaken by a change of retention walks again: no record keeps
// the old expiry, which could let records go before the campaign's meta
// (and a re-run then send them again).
func TestOvertakenExpiryWalksAgain(t *testing.T) {
	rdb := redistest.Start(t).Client()
	s, ctx := New(rdb), context.Background()
	saveC1(t, s, time.Hour)
	for i := 1; i <= 2500; i++ {
		s.Register(ctx, send(i))
	}
	for i := 1; i <= 2500; i++ {
		s.TryClaim(ctx, send(i), "w", time.Minute)
		s.Finish(ctx, send(i), "w", Result{State: Succeeded, CouponID: "cp"})
	}
	if ok, err := s.Seal(ctx, "c1"); err != nil || !ok {
		t.Fatalf("seal %v %v", ok, err)
	}
	changed := false
	err := s.applyExpiry(ctx, "c1", func() {
		if !changed { // after the first batch, another process extends the retention
			changed = true
			if _, err := s.SetRetention(ctx, "c1", 2*time.Hour); err != nil {
				t.Error(err)
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	for k, ttl := range campaignKeys(t, rdb, s, "c1") {
		if k != s.Keys().Tomb("c1") && !strings.Contains(k, ":rate:") && !strings.Contains(k, ":failrate:") && ttl < 90*time.Minute {
			t.Fatalf("%s expires in %s, after the retention became 2h", k, ttl)
		}
	}
	// Once the keys are gone, applying writes nothing back.
	s.SetRetention(ctx, "c1", time.Millisecond)
	rdb.HSet(ctx, s.Keys().Tomb("c1"), "x", 1)
	if err := s.ApplyExpiry(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if left := campaignKeys(t, rdb, s, "c1"); len(left) != 1 {
		t.Fatalf("left %v", left)
	}
}

package idempotency

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/keyspace"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/tasks"
)

func newStore(t *testing.T) *Store {
	t.Helper()
	return New(redistest.Start(t).Client())
}

func send(n int) Send {
	return Send{MchID: "1900000001", OutRequestNo: fmt.Sprintf("r%d", n), Campaign: "c1", OpenID: fmt.Sprintf("o%d", n), StockID: "s1"}
}

func wantCounts(t *testing.T, s *Store, want map[State]int64) Status {
	t.Helper()
	st, err := s.Status(context.Background(), "c1")
	if err != nil {
		t.Fatal(err)
	}
	var sum int64
	for _, state := range States {
		sum += st.ByState[state]
		if st.ByState[state] != want[state] {
			t.Errorf("%s = %d, want %d (all: %v)", state, st.ByState[state], want[state], st.ByState)
		}
	}
	if sum != st.Total {
		t.Errorf("states add up to %d, total is %d", sum, st.Total)
	}
	return st
}

func TestRegisterOnce(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	created, state, err := s.Register(ctx, send(1))
	if err != nil || !created || state != Pending {
		t.Fatalf("first: %v %v %v", created, state, err)
	}
	created, state, err = s.Register(ctx, send(1))
	if err != nil || created || state != Pending {
		t.Fatalf("second: %v %v %v", created, state, err)
	}
	wantCounts(t, s, map[State]int64{Pending: 1})
}

// A batch registers each send once, in file order, counted once: a send
// named twice, or registered before, is not new.
func TestRegisterBatch(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	if _, _, err := s.Register(ctx, send(1)); err != nil {
		t.Fatal(err)
	}
	batch := []Send{send(1), send(2), send(2), send(3)}
	for i := 4; i < 1200; i++ { // more than one script call's worth
		batch = append(batch, send(i))
	}
	regs, err := s.RegisterBatch(ctx, batch)
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range regs {
		want := Registered{Created: true, State: Pending}
		if i == 0 || i == 2 {
			want = Registered{State: Pending}
		}
		if r != want {
			t.Errorf("send %d (%s): %+v, want %+v", i, batch[i].OutRequestNo, r, want)
		}
	}
	wantCounts(t, s, map[State]int64{Pending: 1199})
	members, err := s.rdb.LRange(ctx, s.membersKey("c1"), 0, -1).Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(members) != 1199 || members[0] != "1900000001:r1" || members[1] != "1900000001:r2" || members[2] != "1900000001:r3" || members[1198] != "1900000001:r1199" {
		t.Errorf("members: %d, starting %v", len(members), members[:3])
	}
	// Sends of two campaigns are not one batch; nothing is written.
	other := send(5000)
	other.Campaign = "c2"
	if _, err := s.RegisterBatch(ctx, []Send{send(5001), other}); err == nil {
		t.Error("a batch of two campaigns was registered")
	}
	if rec, _ := s.Get(ctx, send(5001)); rec.State != "" {
		t.Errorf("the refused batch wrote %+v", rec)
	}
}

// A record keeps a cash-coupon task slim, in a listpack hash, and reads
// it back whole.
func TestRecordKeepsTaskSlim(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	a := send(1)
	args := tasks.SendCoupon{Common: tasks.Common{V: tasks.Version, Campaign: a.Campaign, MchID: a.MchID, OpenID: a.OpenID,
		StockID: a.StockID, OutRequestNo: a.OutRequestNo, AppID: "wx1", Deadline: time.Unix(2e9, 0)}, StockCreatorMchID: a.MchID}
	task, err := tasks.NewTask(args)
	if err != nil {
		t.Fatal(err)
	}
	a.Task, a.Queue = tasks.KeepSlim(args, task), "coupons"
	if _, _, err := s.Register(ctx, a); err != nil {
		t.Fatal(err)
	}
	key := s.recordKey(a.Campaign, a.MchID, a.OutRequestNo)
	if enc := s.rdb.ObjectEncoding(ctx, key).Val(); enc != "listpack" {
		t.Errorf("the record is a %s hash", enc)
	}
	rec, err := s.Get(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	if string(rec.Task) != string(tasks.Keep(task)) {
		t.Errorf("task read back as %q, want %q", rec.Task, tasks.Keep(task))
	}
}

func TestClaimFinishLifecycle(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	a := send(1)
	s.Register(ctx, a)
	c, err := s.TryClaim(ctx, a, "w1", time.Minute)
	if err != nil || !c.Acquired || c.Record.State != InFlight || c.Record.Attempts != 1 {
		t.Fatalf("claim: %+v %v", c, err)
	}
	wantCounts(t, s, map[State]int64{InFlight: 1})
	if c2, _ := s.TryClaim(ctx, a, "w2", time.Minute); c2.Acquired || !c2.Busy {
		t.Fatalf("a second delivery got %+v while the first was in flight", c2)
	}
	if err := s.Finish(ctx, a, "w1", Result{State: Retrying, Code: "SYSTEM_ERROR", Message: "boom"}); err != nil {
		t.Fatal(err)
	}
	wantCounts(t, s, map[State]int64{Retrying: 1})
	c, _ = s.TryClaim(ctx, a, "w2", time.Minute)
	if !c.Acquired || c.Record.Attempts != 2 {
		t.Fatalf("retry claim: %+v", c)
	}
	if err := s.Finish(ctx, a, "w2", Result{State: Succeeded, CouponID: "c-1"}); err != nil {
		t.Fatal(err)
	}
	st := wantCounts(t, s, map[State]int64{Succeeded: 1})
	if !st.Done() {
		t.Error("campaign not done")
	}
	c, _ = s.TryClaim(ctx, a, "w3", time.Minute)
	if c.Acquired || c.Busy || c.Record.State != Succeeded || c.Record.CouponID != "c-1" {
		t.Fatalf("claim after success: %+v", c)
	}
	rec, _ := s.Get(ctx, a)
	if rec.FirstAttempt.IsZero() || rec.LastAttempt.Before(rec.FirstAttempt) || rec.Code != "" {
		t.Fatalf("record %+v", rec)
	}
}

func TestFailedByCode(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	for i, code := range []string{"PARAM_ERROR", "PARAM_ERROR", "REQUEST_BLOCKED"} {
		a := send(i)
		s.Register(ctx, a)
		s.TryClaim(ctx, a, "w", time.Minute)
		if err := s.Finish(ctx, a, "w", Result{State: Failed, Code: code, Message: "no"}); err != nil {
			t.Fatal(err)
		}
	}
	st := wantCounts(t, s, map[State]int64{Failed: 3})
	if st.FailedByCode["PARAM_ERROR"] != 2 || st.FailedByCode["REQUEST_BLOCKED"] != 1 {
		t.Fatalf("by code: %v", st.FailedByCode)
	}
}

func TestExpiredLeaseIsTakenOverAndSuccessAlwaysRecorded(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	a := send(1)
	s.Register(ctx, a)
	if c, _ := s.TryClaim(ctx, a, "crashed", 100*time.Millisecond); !c.Acquired {
		t.Fatal("first claim")
	}
	time.Sleep(200 * time.Millisecond)
	if c, _ := s.TryClaim(ctx, a, "rescuer", time.Minute); !c.Acquired || c.Record.Attempts != 2 {
		t.Fatalf("takeover: %+v", c)
	}
	// The slow first holder comes back with an error: its word no longer counts.
	if err := s.Finish(ctx, a, "crashed", Result{State: Retrying, Code: "TIMEOUT"}); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("stale finish: %v", err)
	}
	// But a coupon it saw issued is recorded whatever the lease says.
	if err := s.Finish(ctx, a, "crashed", Result{State: Succeeded, CouponID: "c-9"}); err != nil {
		t.Fatal(err)
	}
	wantCounts(t, s, map[State]int64{Succeeded: 1})
	if err := s.Finish(ctx, a, "rescuer", Result{State: Succeeded, CouponID: "c-9"}); err != nil {
		t.Fatal(err)
	}
	wantCounts(t, s, map[State]int64{Succeeded: 1})
}

func TestOneSendPerUserAtATime(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	a, b := send(1), send(2)
	b.OpenID = a.OpenID
	s.Register(ctx, a)
	s.Register(ctx, b)
	if c, _ := s.TryClaim(ctx, a, "w1", time.Minute); !c.Acquired {
		t.Fatal("claim a")
	}
	if c, _ := s.TryClaim(ctx, b, "w2", time.Minute); c.Acquired || !c.Busy {
		t.Fatalf("b claimed while a was in flight to the same user: %+v", c)
	}
	wantCounts(t, s, map[State]int64{InFlight: 1, Pending: 1})
	s.Finish(ctx, a, "w1", Result{State: Succeeded, CouponID: "x"})
	if c, _ := s.TryClaim(ctx, b, "w2", time.Minute); !c.Acquired {
		t.Fatalf("b after a finished: %+v", c)
	}
}

func TestConcurrentClaimsAcquireOnce(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	a := send(1)
	s.Register(ctx, a)
	var acquired atomic.Int32
	var wg sync.WaitGroup
	for i := 0; i < 32; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			c, err := s.TryClaim(ctx, a, fmt.Sprintf("w%d", i), time.Minute)
			if err != nil {
				t.Error(err)
			}
			if c.Acquired {
				acquired.Add(1)
			}
		}(i)
	}
	wg.Wait()
	if acquired.Load() != 1 {
		t.Fatalf("%d deliveries acquired one send", acquired.Load())
	}
}

func TestUnregisteredSendIsRecordedOnClaim(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	a := send(7)
	if c, err := s.TryClaim(ctx, a, "w", time.Minute); err != nil || !c.Acquired {
		t.Fatalf("%+v %v", c, err)
	}
	wantCounts(t, s, map[State]int64{InFlight: 1})
	var seen []string
	s.Each(ctx, "c1", func(r Record) error { seen = append(seen, r.OutRequestNo); return nil })
	if len(seen) != 1 || seen[0] != a.OutRequestNo {
		t.Fatalf("members %v", seen)
	}
}

func TestEachStreamsInOrder(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	const n = 2500 // more than one batch
	for i := 0; i < n; i++ {
		s.Register(ctx, send(i))
	}
	i := 0
	err := s.Each(ctx, "c1", func(r Record) error {
		if r.OutRequestNo != send(i).OutRequestNo || r.OpenID != send(i).OpenID || r.State != Pending || r.MchID != "1900000001" {
			return fmt.Errorf("record %d: %+v", i, r)
		}
		i++
		return nil
	})
	if err != nil || i != n {
		t.Fatalf("%d records, %v", i, err)
	}
}

func TestStatusRate(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	base := time.Now()
	succeed := func(from, n int, at time.Time) {
		s.now = func() time.Time { return at }
		for i := from; i < from+n; i++ {
			a := send(i)
			s.Register(ctx, a)
			s.TryClaim(ctx, a, "w", time.Minute)
			s.Finish(ctx, a, "w", Result{State: Succeeded, CouponID: "c"})
		}
	}
	succeed(0, 10, base)
	succeed(10, 20, base.Add(15*time.Second))
	s.now = func() time.Time { return base.Add(16 * time.Second) }
	st, err := s.Status(ctx, "c1")
	if err != nil {
		t.Fatal(err)
	}
	// 30 sends over the 16 seconds since the first; 20 in the last 10.
	if st.Rate != 30.0/16 || st.Rate10s != 2 {
		t.Fatalf("rate %v, 10s rate %v; want %v and 2", st.Rate, st.Rate10s, 30.0/16)
	}
}

func TestSaveCampaignKeepsTheFirstDeadline(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	d1 := time.Now().Add(time.Hour).Truncate(time.Second)
	c, err := s.SaveCampaign(ctx, Campaign{Name: "c1", MchID: "1900000001", Deadline: d1})
	if err != nil || !c.Deadline.Equal(d1) {
		t.Fatalf("%+v %v", c, err)
	}
	c, _ = s.SaveCampaign(ctx, Campaign{Name: "c1", MchID: "1900000001", Deadline: d1.Add(time.Hour)})
	if !c.Deadline.Equal(d1) {
		t.Fatalf("deadline moved to %v", c.Deadline)
	}
	names, _ := s.Campaigns(ctx)
	if len(names) != 1 || names[0] != "c1" {
		t.Fatalf("campaigns %v", names)
	}
}

// Every key the store writes is built by the layout under its prefix, and
// a campaign's keys carry the campaign's hash tag.
func TestKeysUnderThePrefix(t *testing.T) {
	rdb := redistest.Start(t).Client()
	keys := keyspace.New("acme")
	s, ctx := New(rdb, WithKeys(keys)), context.Background()
	if _, err := s.SaveCampaign(ctx, Campaign{Name: "c1", MchID: "1900000001", Deadline: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	s.Register(ctx, send(1))
	if c, err := s.TryClaim(ctx, send(1), "w", time.Minute); err != nil || !c.Acquired {
		t.Fatalf("claim: %+v %v", c, err)
	}
	if err := s.Finish(ctx, send(1), "w", Result{State: Succeeded, CouponID: "cp"}); err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{keys.Meta("c1"): true, keys.Campaigns(): true, keys.Counts("c1"): true,
		keys.Members("c1"): true, keys.Record("c1", "1900000001", "r1"): true, keys.Rate("c1", time.Now().Unix()): true,
		keys.Coupons("c1"): true}
	for _, k := range rdb.Keys(ctx, "*").Val() {
		if !want[k] && !strings.HasPrefix(k, "acme:{c1}:rate:") {
			t.Errorf("unexpected key %q", k)
		}
		if !keys.Owns(k) {
			t.Errorf("key %q outside the prefix", k)
		}
	}
}

// A delivery that takes over an expired lease cannot know whether the
// dead holder's call issued a coupon: the record says it may have, until
// WeChat answers.
func TestTakeoverMarksMaybeIssuedUntilAnswered(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	a := send(1)
	s.Register(ctx, a)
	if c, _ := s.TryClaim(ctx, a, "dead", time.Millisecond); !c.Acquired || c.Record.MaybeIssued {
		t.Fatalf("first claim %+v", c)
	}
	time.Sleep(5 * time.Millisecond)
	s.rdb.Del(ctx, s.userLockKey(a.MchID, a.OpenID)) // the dead holder's lock expired with its lease
	c, err := s.TryClaim(ctx, a, "w2", time.Minute)
	if err != nil || !c.Acquired || !c.Record.MaybeIssued || c.Record.ClaimedFrom != InFlight {
		t.Fatalf("takeover %+v %v", c, err)
	}
	// A rate limit is no answer: the flag stays.
	s.Finish(ctx, a, "w2", Result{State: WaitingRate, Code: "FREQUENCY_LIMIT_EXCEED"})
	if rec, _ := s.Get(ctx, a); !rec.MaybeIssued {
		t.Fatalf("a rate limit cleared the flag: %+v", rec)
	}
	// The dead holder's late result comes in: lost, and the flag stays.
	if err := s.Finish(ctx, a, "dead", Result{State: Failed, Code: "X", Answered: true}); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("late finish: %v", err)
	}
	c, _ = s.TryClaim(ctx, a, "w3", time.Minute)
	if err := s.Finish(ctx, a, "w3", Result{State: WaitingBudget, Code: "NOT_ENOUGH", Answered: true}); err != nil {
		t.Fatal(err)
	}
	if rec, _ := s.Get(ctx, a); rec.MaybeIssued {
		t.Fatalf("WeChat's answer did not clear the flag: %+v", rec)
	}
}

func TestUnknownKeepsItsTaskUntilSettled(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	a := send(1)
	s.Register(ctx, a)
	s.TryClaim(ctx, a, "w1", time.Minute)
	s.Finish(ctx, a, "w1", Result{State: Unknown, Code: "SYSTEM_ERROR", MaybeIssued: true, Task: []byte("coupon:send\n{}")})
	st := wantCounts(t, s, map[State]int64{Unknown: 1})
	if !st.Done() || st.Settled() {
		t.Fatalf("an unknown send: done %v, settled %v", st.Done(), st.Settled())
	}
	rec, _ := s.Get(ctx, a)
	if !rec.MaybeIssued || string(rec.Task) != "coupon:send\n{}" {
		t.Fatalf("unknown record %+v", rec)
	}
	// Unknown is not terminal: reconcile claims it again.
	c, _ := s.TryClaim(ctx, a, "reconcile", time.Minute)
	if !c.Acquired {
		t.Fatalf("reconcile could not claim an unknown send: %+v", c)
	}
	s.Finish(ctx, a, "reconcile", Result{State: Succeeded, CouponID: "c1", Answered: true})
	rec, _ = s.Get(ctx, a)
	if rec.Task != nil || rec.MaybeIssued {
		t.Fatalf("settled record keeps %+v", rec)
	}
	if st := wantCounts(t, s, map[State]int64{Succeeded: 1}); !st.Settled() {
		t.Fatal("not settled")
	}
}

// Redis keeps the writes of a script that fails halfway: every script
// checks what could fail before it writes anything.
func TestScriptsWriteNothingWhenTheyFail(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	a, b := send(1), send(2)
	s.Register(ctx, a)
	s.TryClaim(ctx, a, "w1", time.Minute)
	counts := s.countsKey("c1")
	s.rdb.HSet(ctx, counts, "succeeded", "garbage")
	before, _ := s.rdb.HGetAll(ctx, s.recordKey("c1", a.MchID, a.OutRequestNo)).Result()
	if err := s.Finish(ctx, a, "w1", Result{State: Succeeded, CouponID: "c1"}); err == nil {
		t.Fatal("finish over a corrupt counter succeeded")
	}
	after, _ := s.rdb.HGetAll(ctx, s.recordKey("c1", a.MchID, a.OutRequestNo)).Result()
	if fmt.Sprint(before) != fmt.Sprint(after) {
		t.Fatalf("the record changed though the script failed:\n before %v\n after  %v", before, after)
	}
	if n, _ := s.rdb.HGet(ctx, counts, "in_flight").Int(); n != 1 {
		t.Fatalf("in_flight counter %d after a failed finish", n)
	}
	s.rdb.HSet(ctx, counts, "pending", "garbage")
	if _, _, err := s.Register(ctx, b); err == nil {
		t.Fatal("register over a corrupt counter succeeded")
	}
	if n, _ := s.rdb.Exists(ctx, s.recordKey("c1", b.MchID, b.OutRequestNo)).Result(); n != 0 {
		t.Fatal("the record was written though the register failed")
	}
	if total, _ := s.rdb.HGet(ctx, counts, "total").Int(); total != 1 {
		t.Fatalf("total %d", total)
	}
}

// A user lock without a TTL would hold the user for ever.
func TestUserLockWithoutTTLIsBounded(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	a := send(1)
	s.Register(ctx, a)
	lock := s.userLockKey(a.MchID, a.OpenID)
	s.rdb.Set(ctx, lock, "ghost|r0", 0)
	if c, _ := s.TryClaim(ctx, a, "w1", 50*time.Millisecond); !c.Busy {
		t.Fatalf("claim under another's lock: %+v", c)
	}
	if ttl, _ := s.rdb.PTTL(ctx, lock).Result(); ttl <= 0 {
		t.Fatalf("the lock still has no TTL: %s", ttl)
	}
	time.Sleep(100 * time.Millisecond)
	if c, _ := s.TryClaim(ctx, a, "w1", time.Minute); !c.Acquired {
		t.Fatalf("the user is still held: %+v", c)
	}
}

// The user lock, on one Redis and on a Cluster (where it lives on another
// slot and costs round trips of its own): one send per user at a time,
// taken with the claim, released with the result, and a send that is not
// claimed leaves no lock behind.
func TestUserLockOnOneRedisAndOnACluster(t *testing.T) {
	for _, tc := range []struct {
		name  string
		rdb   func(t *testing.T) redis.UniversalClient
		trips int64 // of a TryClaim and a Finish, with their scripts loaded
	}{
		{"one redis", func(t *testing.T) redis.UniversalClient { return redistest.Start(t).Client() }, 2},
		{"cluster", func(t *testing.T) redis.UniversalClient { return redistest.StartCluster(t, 3).Client() }, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rdb := tc.rdb(t)
			s, ctx := New(rdb), context.Background()
			a, b, c := send(1), send(2), send(3)
			// Three sends to one user: c loads the scripts on the nodes
			// of the user's lock and of the campaign.
			b.OpenID, c.OpenID = a.OpenID, a.OpenID
			for _, x := range []Send{a, b, c} {
				if _, _, err := s.Register(ctx, x); err != nil {
					t.Fatal(err)
				}
			}
			// The steady state is counted, with the scripts loaded.
			if cl, err := s.TryClaim(ctx, c, "w0", time.Minute); err != nil || !cl.Acquired {
				t.Fatalf("claim: %+v %v", cl, err)
			}
			if err := s.Finish(ctx, c, "w0", Result{State: Succeeded, CouponID: "k3"}); err != nil {
				t.Fatal(err)
			}

			trips := &redistest.RoundTrips{}
			rdb.AddHook(trips)
			lock := s.userLockKey(a.MchID, a.OpenID)
			cl, err := s.TryClaim(ctx, a, "w1", time.Minute)
			if err != nil || !cl.Acquired {
				t.Fatalf("claim: %+v %v", cl, err)
			}
			if err := s.Finish(ctx, a, "w1", Result{State: Succeeded, CouponID: "k1"}); err != nil {
				t.Fatal(err)
			}
			if n := trips.N(); n != tc.trips {
				t.Errorf("a claim and a finish took %d round trips, want %d", n, tc.trips)
			}

			if cl, _ := s.TryClaim(ctx, b, "w2", time.Minute); !cl.Acquired {
				t.Fatalf("the user is still held after the first send finished: %+v", cl)
			}
			if v, _ := rdb.Get(ctx, lock).Result(); v != "w2|"+b.OutRequestNo {
				t.Fatalf("lock %q", v)
			}
			// Another delivery of the first send, already sent, finds it
			// terminal; a third send to the user finds the user busy.
			if cl, _ := s.TryClaim(ctx, a, "w3", time.Minute); cl.Acquired || cl.Busy || cl.Record.State != Succeeded {
				t.Fatalf("claim of a sent send under another's lock: %+v", cl)
			}
			d := send(4)
			d.OpenID = a.OpenID
			if cl, _ := s.TryClaim(ctx, d, "w4", time.Minute); !cl.Busy {
				t.Fatalf("claim under another's lock: %+v", cl)
			}
			if v, _ := rdb.Get(ctx, lock).Result(); v != "w2|"+b.OutRequestNo {
				t.Fatalf("a refused claim changed the lock: %q", v)
			}
			// A redelivery by the same owner takes its own lock again.
			if cl, _ := s.TryClaim(ctx, b, "w2", time.Minute); !cl.Acquired {
				t.Fatalf("the holder's own claim: %+v", cl)
			}
			if err := s.Finish(ctx, b, "w2", Result{State: Retrying, Code: "SYSTEM_ERROR"}); err != nil {
				t.Fatal(err)
			}
			if n, _ := rdb.Exists(ctx, lock).Result(); n != 0 {
				t.Fatal("the lock outlived the send's result")
			}
			// A claim that is refused (a paused campaign) leaves no lock.
			if err := rdb.HSet(ctx, s.metaKey("c1"), "control", "paused").Err(); err != nil {
				t.Fatal(err)
			}
			if cl, _ := s.TryClaim(ctx, b, "w5", time.Minute); !cl.Paused {
				t.Fatalf("claim in a paused campaign: %+v", cl)
			}
			if n, _ := rdb.Exists(ctx, lock).Result(); n != 0 {
				t.Fatal("a paused send left its user locked")
			}
		})
	}
}

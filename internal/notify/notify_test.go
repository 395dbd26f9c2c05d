package notify

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/redistest"
)

// finished makes a campaign of n sends, all succeeded, with a webhook.
func finished(t *testing.T, store *idempotency.Store, name, url string, n int) {
	t.Helper()
	ctx := context.Background()
	if _, err := store.SaveCampaign(ctx, idempotency.Campaign{Name: name, MchID: "1900", Deadline: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	if err := store.SetNotifyURL(ctx, name, url); err != nil {
		t.Fatal(err)
	}
	if err := store.BeginEnqueue(ctx, name); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		s := idempotency.Send{MchID: "1900", OutRequestNo: fmt.Sprintf("%s-%d", name, i), Campaign: name, OpenID: fmt.Sprintf("o%d", i), StockID: "1"}
		if _, _, err := store.Register(ctx, s); err != nil {
			t.Fatal(err)
		}
		if _, err := store.TryClaim(ctx, s, "w", time.Minute); err != nil {
			t.Fatal(err)
		}
		if err := store.Finish(ctx, s, "w", idempotency.Result{State: idempotency.Succeeded, CouponID: "c"}); err != nil {
			t.Fatal(err)
		}
	}
}

// Several workers look at the same finished campaign at once: its end is
// said once, and the webhook is posted once.
func TestDoneIsSaidOnceAcrossWorkers(t *testing.T) {
	rdb := redistest.Start(t).Client()
	store := idempotency.New(rdb)
	var posts atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { posts.Add(1) }))
	defer srv.Close()
	finished(t, store, "c1", srv.URL, 3)
	ctx := context.Background()
	// Enqueue not finished: all its sends are done, the campaign is not.
	if err := New(rdb, store, WithSecret([]byte("k"))).Once(ctx); err != nil || posts.Load() != 0 {
		t.Fatalf("said while enqueuing: %v, %d posts", err, posts.Load())
	}
	if _, err := store.RecordExpected(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	var said atomic.Int64
	var wg sync.WaitGroup
	for range 5 {
		n := New(rdb, store, WithSecret([]byte("k")), WithOnDone(func(Summary) { said.Add(1) }))
		wg.Go(func() {
			for range 3 {
				if err := n.Once(ctx); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	if said.Load() != 1 || posts.Load() != 1 {
		t.Fatalf("said %d times, posted %d times", said.Load(), posts.Load())
	}
}

// A receiver that fails is posted to again after a growing wait, with the
// same delivery id, until it takes it; without a secret nothing is posted.
func TestWebhookIsRetriedUntilTaken(t *testing.T) {
	rdb := redistest.Start(t).Client()
	store := idempotency.New(rdb)
	var mu sync.Mutex
	var ids []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		ids = append(ids, r.Header.Get(DeliveryHeader))
		if len(ids) < 3 {
			w.WriteHeader(http.StatusBadGateway)
		}
	}))
	defer srv.Close()
	finished(t, store, "c1", srv.URL, 1)
	ctx := context.Background()
	store.RecordExpected(ctx, "c1")
	clock := time.Now()
	n := New(rdb, store, WithSecret([]byte("k")))
	n.now = func() time.Time { return clock }
	for range 3 { // only the first is due
		if err := n.Once(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if len(ids) != 1 {
		t.Fatalf("%d posts before the backoff passed", len(ids))
	}
	for range 2 {
		clock = clock.Add(11 * time.Minute)
		if err := n.Once(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if len(ids) != 3 || ids[0] != ids[2] || ids[0] == "" {
		t.Fatalf("deliveries %v", ids)
	}
	status, _ := rdb.HGet(ctx, store.Keys().Meta("c1"), "notify_status").Result()
	if status != "delivered" {
		t.Fatalf("status %q", status)
	}

	finished(t, store, "c2", srv.URL, 1)
	store.RecordExpected(ctx, "c2")
	if err := New(rdb, store).Once(ctx); err != nil {
		t.Fatal(err)
	}
	status, _ = rdb.HGet(ctx, store.Keys().Meta("c2"), "notify_status").Result()
	if status != "failed" || len(ids) != 3 {
		t.Fatalf("without a secret: status %q, %d posts", status, len(ids))
	}
}

package e2e

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/notify"
	"github.com/couponflow/dispatcher/internal/sandbox"
)

// calls notes when each send call reached the sandbox, by openid prefix.
type calls struct {
	mu sync.Mutex
	at map[string][]time.Time
}

func (c *calls) hook(r sandbox.RecordedRequest) {
	if r.Method != "POST" {
		return
	}
	parts := strings.Split(r.Path, "/")
	if len(parts) < 6 {
		return
	}
	prefix, _, _ := strings.Cut(parts[5], "_")
	c.mu.Lock()
	c.at[prefix] = append(c.at[prefix], time.Now())
	c.mu.Unlock()
}

// between counts the calls of a campaign's openids in [from, to).
func (c *calls) between(prefix string, from, to time.Time) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, t := range c.at[prefix] {
		if !t.Before(from) && t.Before(to) {
			n++
		}
	}
	return n
}

// Pause holds a campaign across three workers from the moment the command
// returns, while another campaign on the same queue takes the whole rate;
// resume finishes it, one coupon each. Cancel leaves no call after it
// returns and exact counts.
func TestPauseResumeCancel(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	c := &calls{at: map[string][]time.Time{}}
	r.sb.OnRequest(c.hook)
	r.sb.SetFaults(sandbox.Faults{Latency: 10 * time.Millisecond, LatencyRate: 1})
	const rate = 60
	limits := "--rate-limits=favor_send=60/s"
	pathA, idsA := r.writeUsers("A", 600)
	pathB, idsB := r.writeUsers("B", 600)
	for _, f := range []struct{ path, name string }{{pathA, "pa"}, {pathB, "pb"}} {
		if out, code := r.enqueuer("campaign", "--file", f.path, "--stock-id", r.stockID(), "--campaign", f.name); code != 0 {
			t.Fatal(out)
		}
	}
	for _, w := range []string{"w1", "w2", "w3"} {
		r.worker(w, "--concurrency", "4", limits)
	}
	r.waitFor("pa", 30*time.Second, "50 sent", func(st idempotency.Status) bool { return st.ByState[idempotency.Succeeded] >= 50 })
	asked := time.Now()
	out, code := r.enqueuer("campaign", "pause", "--campaign", "pa")
	paused := time.Now()
	if code != 0 || !strings.Contains(out, "paused") || !strings.Contains(out, "no call of it is in flight") {
		t.Fatalf("pause exit %d:\n%s", code, out)
	}
	// It returns once the calls in flight are recorded, not once the
	// campaign is over.
	if took := paused.Sub(asked); took > 5*time.Second {
		t.Fatalf("pause took %s", took)
	}
	atPause, _ := r.store.Status(t.Context(), "pa")
	time.Sleep(3 * time.Second)
	if n := c.between("oA", paused, time.Now()); n != 0 {
		t.Fatalf("%d calls of the paused campaign started after pause returned", n)
	}
	if st, _ := r.store.Status(t.Context(), "pa"); st.ByState[idempotency.Succeeded] != atPause.ByState[idempotency.Succeeded] || st.Done() {
		t.Fatalf("the paused campaign moved on: %v, then %v", atPause.ByState, st.ByState)
	}
	// The other campaign kept the rate: with A paused it has it all.
	nB := c.between("oB", paused.Add(time.Second), paused.Add(3*time.Second))
	if nB < rate { // 2 s at 60/s is 120
		t.Fatalf("campaign B made %d calls in the 2 s after the pause; want at least %d of the %d its rate allows", nB, rate, 2*rate)
	}
	t.Logf("pause returned after %s; 0 calls of A in the 3 s after it; B made %d calls in the 2 s from 1 s after it (its rate allows %d)",
		paused.Sub(asked).Round(time.Millisecond), nB, 2*rate)
	st, _ := r.store.Status(t.Context(), "pa")
	out, _ = r.enqueuer("status", "--campaign", "pa")
	if !strings.Contains(out, "PAUSED") || !strings.Contains(out, "pause   by") {
		t.Fatalf("status of a paused campaign:\n%s", out)
	}
	if out, code := r.enqueuer("campaign", "resume", "--campaign", "pa"); code != 0 || !strings.Contains(out, "resumed") {
		t.Fatalf("resume exit %d:\n%s", code, out)
	}
	r.waitFor("pa", time.Minute, "every send done", done)
	r.waitFor("pb", time.Minute, "every send done", done)
	r.checkOneCouponEach(r.stockID(), append(idsA, idsB...))
	t.Logf("paused with %d of 600 sent", st.ByState[idempotency.Succeeded])

	// Cancel a third campaign halfway.
	pathC, _ := r.writeUsers("C", 600)
	if out, code := r.enqueuer("campaign", "--file", pathC, "--stock-id", r.stockID(), "--campaign", "pc"); code != 0 {
		t.Fatal(out)
	}
	r.waitFor("pc", 30*time.Second, "50 sent", func(st idempotency.Status) bool { return st.ByState[idempotency.Succeeded] >= 50 })
	out, code = r.enqueuer("campaign", "cancel", "--campaign", "pc")
	if code != 2 || !strings.Contains(out, "--yes") {
		t.Fatalf("cancel without --yes and without a terminal: exit %d:\n%s", code, out)
	}
	asked = time.Now()
	out, code = r.enqueuer("campaign", "cancel", "--campaign", "pc", "--yes")
	cancelled := time.Now()
	if code != 0 || !strings.Contains(out, "cancelled:") {
		t.Fatalf("cancel exit %d:\n%s", code, out)
	}
	if took := cancelled.Sub(asked); took > 5*time.Second {
		t.Fatalf("cancel took %s", took)
	}
	time.Sleep(2 * time.Second)
	if n := c.between("oC", cancelled, time.Now()); n != 0 {
		t.Fatalf("%d calls of the cancelled campaign started after cancel returned", n)
	}
	st = r.waitFor("pc", 10*time.Second, "done", done)
	issued := 0
	for _, lc := range r.sb.Ledger().Coupons {
		if strings.HasPrefix(lc.OpenID, "oC_") {
			issued++
		}
	}
	if st.ByState[idempotency.Cancelled] < 100 || st.ByState[idempotency.Succeeded] != int64(issued) || st.ByState[idempotency.Cancelled]+int64(issued) != 600 ||
		st.ByState[idempotency.Unknown] != 0 || st.ByState[idempotency.Failed] != 0 {
		t.Fatalf("after cancel: %v, %d coupons issued", st.ByState, issued)
	}
	if !strings.Contains(out, "sends cancelled") || !strings.Contains(out, "no call of it is in flight") {
		t.Fatalf("cancel said:\n%s", out)
	}
	t.Logf("cancel returned after %s: %d cancelled, %d succeeded = %d coupons in the ledger, 0 calls in the 2 s after",
		cancelled.Sub(asked).Round(time.Millisecond), st.ByState[idempotency.Cancelled], st.ByState[idempotency.Succeeded], issued)
	// Enqueueing into it again is refused unless asked for.
	if out, code := r.enqueuer("campaign", "--file", pathC, "--stock-id", r.stockID(), "--campaign", "pc"); code != 2 || !strings.Contains(out, "--reopen") {
		t.Fatalf("enqueue into a cancelled campaign: exit %d:\n%s", code, out)
	}
	trail, _ := r.store.Audit(t.Context(), "pc")
	if len(trail) != 1 || trail[0].Action != "cancel" || trail[0].Who == "" || trail[0].Sends <= 0 {
		t.Fatalf("audit trail %+v", trail)
	}
}

// retry queues exactly the failed sends again, over the tasks asynq
// archived, and nobody gets a second coupon.
func TestRetryQueuesWhatFailed(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	k, err := r.sb.CreateStock(sandbox.StockSpec{Budget: 10})
	if err != nil {
		t.Fatal(err)
	}
	path, ids := r.writeUsers("R", 20)
	if out, code := r.enqueuer("campaign", "--file", path, "--stock-id", k.ID, "--campaign", "re", "--deadline", "3s"); code != 0 {
		t.Fatal(out)
	}
	r.worker("w", "--concurrency", "4")
	st := r.waitFor("re", 30*time.Second, "done", done)
	if st.ByState[idempotency.Succeeded] != 10 || st.FailedByCode["NOT_ENOUGH"] != 10 {
		t.Fatalf("before retry: %v %v", st.ByState, st.FailedByCode)
	}
	if err := r.sb.TopUp(k.ID, 10); err != nil {
		t.Fatal(err)
	}
	if out, code := r.enqueuer("stock", "resume", "--stock-id", k.ID); code != 0 {
		t.Fatal(out)
	}
	out, code := r.enqueuer("retry", "--campaign", "re", "--code", "NOT_ENOUGH", "--dry-run")
	if code != 0 || !strings.Contains(out, "would queue 10 failed sends") {
		t.Fatalf("dry run exit %d:\n%s", code, out)
	}
	if s, _ := r.store.Status(t.Context(), "re"); s.ByState[idempotency.Failed] != 10 {
		t.Fatalf("the dry run changed the record: %v", s.ByState)
	}
	out, code = r.enqueuer("retry", "--campaign", "re")
	if code != 0 || !strings.Contains(out, "10 sends queued again") {
		t.Fatalf("retry exit %d:\n%s", code, out)
	}
	st = r.waitFor("re", 30*time.Second, "all succeeded", func(st idempotency.Status) bool { return st.ByState[idempotency.Succeeded] == 20 })
	if st.Total != 20 {
		t.Fatalf("status %+v", st)
	}
	r.checkOneCouponEach(k.ID, ids)
	// Nothing left to retry; a resend of the succeeded ones is impossible.
	if out, code := r.enqueuer("retry", "--campaign", "re"); code != 0 || !strings.Contains(out, "queueing 0 failed sends") {
		t.Fatalf("second retry exit %d:\n%s", code, out)
	}
}

// The end of a campaign is said once across three workers: one webhook,
// signed, with the campaign's figures.
func TestDoneWebhookArrivesOnce(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	secret := "e2e-notify-secret"
	r.env = append(r.env, notify.EnvSecret+"="+secret)
	var mu sync.Mutex
	var posts []notify.Summary
	var bad []string
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(req.Body)
		var ts, sig string
		for _, part := range strings.Split(req.Header.Get(notify.SignatureHeader), ",") {
			k, v, _ := strings.Cut(part, "=")
			switch k {
			case "t":
				ts = v
			case "v1":
				sig = v
			}
		}
		var s notify.Summary
		mu.Lock()
		defer mu.Unlock()
		if sig != notify.Sign([]byte(secret), ts, body) || json.Unmarshal(body, &s) != nil {
			bad = append(bad, req.Header.Get(notify.SignatureHeader))
		}
		posts = append(posts, s)
	}))
	defer hook.Close()
	path, _ := r.writeUsers("N", 100)
	if out, code := r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "nd", "--notify-url", hook.URL+"/done"); code != 0 {
		t.Fatal(out)
	}
	workers := []*proc{}
	for _, w := range []string{"n1", "n2", "n3"} {
		workers = append(workers, r.worker(w, "--concurrency", "4", "--notify-every", "100ms"))
	}
	r.waitFor("nd", time.Minute, "done", done)
	time.Sleep(2 * time.Second) // every worker has looked at it many times
	mu.Lock()
	defer mu.Unlock()
	if len(posts) != 1 || len(bad) != 0 {
		t.Fatalf("%d posts (%d badly signed): %+v", len(posts), len(bad), posts)
	}
	if s := posts[0]; s.Event != "campaign.done" || s.Campaign != "nd" || s.Total != 100 || s.Succeeded != 100 || s.DoneAt.IsZero() {
		t.Fatalf("summary %+v", s)
	}
	said := 0
	for _, w := range workers {
		said += strings.Count(w.out.String(), `"msg":"campaign done: nothing is left for the workers"`)
	}
	if said != 1 {
		t.Fatalf("the end was logged %d times across the fleet", said)
	}
}

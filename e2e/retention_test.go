package e2e

import (
	"compress/gzip"
	"context"
	"encoding/csv"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/keyspace"
	"github.com/couponflow/dispatcher/internal/sandbox"
)

// A campaign that has settled is sealed by the workers on their own, its
// report archived gzipped, its retention shortened by the operator; then
// every key of it expires, and running its file again is refused with
// when it finished and where its report went, without a call to WeChat.
func TestRetentionExpiresACampaignAndItsTombstoneRefusesARerun(t *testing.T) {
	r := newRig(t)
	path, openids := r.writeUsers("autumn", 60)
	out, code := r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "autumn", "--retention", "1h")
	if code != 0 || !strings.Contains(out, "retention 1h0m0s") {
		t.Fatalf("enqueuer exited %d:\n%s", code, out)
	}
	r.worker("a", append([]string{"--retention-sweep", "200ms"}, fastWaits...)...)
	r.waitFor("autumn", time.Minute, "every send done", done)
	coupons := r.checkOneCouponEach(r.stockID(), openids)

	// The worker seals it: status says until when it is kept.
	ctx := context.Background()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, ok, _ := r.store.Tomb(ctx, "autumn"); ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the workers did not seal the settled campaign")
		}
		time.Sleep(100 * time.Millisecond)
	}
	out, code = r.enqueuer("status", "--campaign", "autumn")
	if code != 0 || !regexp.MustCompile(`settled \S+; records kept until \S+ \(retention 1h0m0s\)`).MatchString(out) {
		t.Fatalf("status exited %d:\n%s", code, out)
	}

	archive := filepath.Join(r.dir, "archive", "autumn.csv.gz")
	os.MkdirAll(filepath.Dir(archive), 0o755)
	out, code = r.enqueuer("report", "--campaign", "autumn", "--out", archive)
	if code != 0 || !strings.Contains(out, "recorded as the archive of campaign autumn") {
		t.Fatalf("report exited %d:\n%s", code, out)
	}
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatalf("the archive is not gzipped: %v", err)
	}
	rows, err := csv.NewReader(zr).ReadAll()
	f.Close()
	if err != nil || len(rows) != 61 || strings.Join(rows[0], ",") != strings.Join(idempotency.ReportHeaderWithRedemptions, ",") {
		t.Fatalf("archive: %d rows, %v", len(rows), err)
	}
	for _, row := range rows[1:] {
		if row[2] != "succeeded" || row[3] != coupons[row[1]].CouponID {
			t.Fatalf("archived row %v does not match the ledger", row)
		}
	}

	out, code = r.enqueuer("campaign", "retention", "--campaign", "autumn")
	if code != 0 || !regexp.MustCompile(`campaign autumn: settled \S+; records kept until \S+ \(retention 1h0m0s\); report archived to `+regexp.QuoteMeta(archive)).MatchString(out) {
		t.Fatalf("campaign retention exited %d:\n%s", code, out)
	}
	out, code = r.enqueuer("campaign", "retention", "--campaign", "autumn", "--set", "3s")
	if code != 0 || !strings.Contains(out, "(retention 3s)") {
		t.Fatalf("campaign retention exited %d:\n%s", code, out)
	}
	tomb, _, _ := r.store.Tomb(ctx, "autumn")
	time.Sleep(time.Until(tomb.ExpiresAt) + 200*time.Millisecond)
	keys := r.rdb.Keys(ctx, r.store.Keys().CampaignPattern("autumn")).Val()
	if len(keys) != 1 || keys[0] != r.store.Keys().Tomb("autumn") {
		t.Fatalf("after the retention the campaign's keys are %v, want its tombstone alone", keys)
	}

	before := r.sb.Ledger()
	out, code = r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "autumn")
	for _, want := range []string{"campaign autumn finished at " + tomb.FinishedAt.UTC().Format(time.RFC3339Nano), "60 sends: 60 succeeded",
		"archived to " + archive, "new --campaign"} {
		if !strings.Contains(out, want) {
			t.Errorf("the refusal does not say %q", want)
		}
	}
	if code != 2 {
		t.Errorf("re-run after expiry exited %d, want 2", code)
	}
	out2, code2 := r.enqueuer("send", "--openid", openids[0], "--stock-id", r.stockID(), "--campaign", "autumn")
	if code2 != 2 || !strings.Contains(out2, "campaign autumn finished at") {
		t.Errorf("send into the expired campaign exited %d:\n%s", code2, out2)
	}
	time.Sleep(time.Second)
	// The refused re-run queried the stock first (one GET) and sent nothing.
	if after := r.sb.Ledger(); len(after.Coupons) != len(before.Coupons) || total(after.Requests) != total(before.Requests)+1 {
		t.Fatalf("the refused re-run sent to WeChat")
	}
	if t.Failed() {
		t.Fatalf("re-run:\n%s", out)
	}
	out, code = r.enqueuer("status", "--campaign", "autumn")
	if code != 0 || !strings.Contains(out, "only this tombstone is left") || !strings.Contains(out, "report archived to "+archive) {
		t.Fatalf("status of the expired campaign exited %d:\n%s", code, out)
	}
	// Under another name the same file is a new campaign, on purpose.
	if out, code = r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "autumn-again"); code != 0 {
		t.Fatalf("new name exited %d:\n%s", code, out)
	}
}

// REDIS_KEY_PREFIX moves every key of ours, in every program: a campaign
// run under another prefix leaves nothing under cf:, and no key outside
// its prefix but asynq's.
func TestKeyPrefixHonouredByEveryProgram(t *testing.T) {
	r := newRig(t)
	r.env = append(r.env, keyspace.EnvPrefix+"=acme")
	keys := keyspace.New("acme")
	r.store = idempotency.New(r.rdb, idempotency.WithKeys(keys))
	path, openids := r.writeUsers("prefixed", 20)
	if out, code := r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "prefixed"); code != 0 {
		t.Fatalf("enqueuer exited %d:\n%s", code, out)
	}
	r.worker("a", append([]string{"--retention-sweep", "200ms"}, fastWaits...)...)
	r.waitFor("prefixed", time.Minute, "every send done", done)
	r.checkOneCouponEach(r.stockID(), openids)
	if out, code := r.enqueuer("status", "--campaign", "prefixed"); code != 0 || !strings.Contains(out, "20 of 20 done") {
		t.Fatalf("status exited %d:\n%s", code, out)
	}
	time.Sleep(500 * time.Millisecond) // a sweep or two
	var ours int
	for _, k := range r.rdb.Keys(context.Background(), "*").Val() {
		switch {
		case keys.Owns(k):
			ours++
		case strings.HasPrefix(k, "asynq:"):
		default:
			t.Errorf("key %q outside the prefix", k)
		}
	}
	if ours == 0 {
		t.Fatal("nothing under acme:")
	}
	if _, ok, _ := r.store.Tomb(context.Background(), "prefixed"); !ok {
		t.Error("the worker did not seal the campaign under the prefix")
	}
}

// A campaign with unknown sends is not settled, so the workers keep all of
// it; once enqueuer reconcile settles it, they seal it without anyone
// asking.
func TestCampaignSettledByReconcileIsSealed(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	r.sb.SetFaults(sandbox.Faults{CommitFailRate: 1, CommitFailMode: sandbox.CommitFailDrop})
	path, _ := r.writeUsers("unsettled", 5)
	if out, code := r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "unsettled", "--max-retry", "1"); code != 0 {
		t.Fatal(out)
	}
	r.worker("a", "--concurrency", "4", "--http-addr=", "--retention-sweep", "100ms")
	r.waitFor("unsettled", time.Minute, "every send stopped", done)
	ctx := context.Background()
	time.Sleep(500 * time.Millisecond) // several sweeps
	if _, ok, _ := r.store.Tomb(ctx, "unsettled"); ok {
		t.Fatal("a campaign with unknown sends was sealed")
	}
	for _, k := range r.rdb.Keys(ctx, r.store.Keys().CampaignPattern("unsettled")).Val() {
		if ttl := r.rdb.PTTL(ctx, k).Val(); ttl != -1 && !strings.Contains(k, ":rate:") {
			t.Fatalf("%s expires in %s while sends are unknown", k, ttl)
		}
	}
	r.sb.SetFaults(sandbox.Faults{})
	if out, code := r.enqueuer("reconcile", "--campaign", "unsettled"); code != 0 {
		t.Fatalf("reconcile exit %d:\n%s", code, out)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if tomb, ok, _ := r.store.Tomb(ctx, "unsettled"); ok {
			if tomb.Total != 5 || tomb.Succeeded != 5 {
				t.Fatalf("tomb %+v", tomb)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the workers did not seal the campaign reconcile settled")
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The sweep that sealed it goes on to set the expiry on every key.
	for {
		ttl := r.rdb.PTTL(ctx, r.store.Keys().Counts("unsettled")).Val()
		if ttl > 700*time.Hour {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("counts TTL %s, want the default 30 days", ttl)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

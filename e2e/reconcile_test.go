package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/sandbox"
)

// Every answer is lost after the coupon is issued, and the retries run out:
// each send ends unknown (never failed), status shows it apart, and
// reconcile's identical resend records the coupon each user holds, once.
func TestUnknownSendsAreSettledByReconcile(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	r.sb.SetFaults(sandbox.Faults{CommitFailRate: 1, CommitFailMode: sandbox.CommitFailDrop})
	path, openids := r.writeUsers("unk", 30)
	if out, code := r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "unk", "--max-retry", "1"); code != 0 {
		t.Fatal(out)
	}
	r.worker("a", "--concurrency", "8", "--http-addr=")
	st := r.waitFor("unk", time.Minute, "every send stopped", done)
	if st.ByState[idempotency.Unknown] != 30 || st.Settled() {
		t.Fatalf("status %+v; want 30 unknown", st.ByState)
	}
	out, code := r.enqueuer("status", "--campaign", "unk")
	if code != 0 || !strings.Contains(out, "30 sends are unknown") || !strings.Contains(out, "enqueuer reconcile --campaign unk") {
		t.Fatalf("status exit %d:\n%s", code, out)
	}
	for _, row := range r.report("unk")[1:] {
		if row[2] != "unknown" || row[3] != "" {
			t.Fatalf("report row %v; want unknown without a coupon id", row)
		}
	}
	issued := r.checkOneCouponEach(r.stockID(), openids) // the sandbox issued them all

	// While WeChat still does not answer, reconcile leaves them unknown
	// and says so.
	out, code = r.enqueuer("reconcile", "--campaign", "unk")
	if code == 0 || !strings.Contains(out, "30 still unknown") {
		t.Fatalf("reconcile without answers exit %d:\n%s", code, out)
	}
	r.sb.SetFaults(sandbox.Faults{})
	out, code = r.enqueuer("reconcile", "--campaign", "unk")
	if code != 0 || !strings.Contains(out, "30 succeeded, 0 failed, 0 still unknown") {
		t.Fatalf("reconcile exit %d:\n%s", code, out)
	}
	if st := r.waitFor("unk", time.Second, "settled", func(st idempotency.Status) bool { return st.Settled() }); st.ByState[idempotency.Succeeded] != 30 {
		t.Fatalf("status %+v", st.ByState)
	}
	for _, row := range r.report("unk")[1:] {
		if row[2] != "succeeded" || issued[row[1]].CouponID != row[3] {
			t.Fatalf("report row %v; the ledger has %+v", row, issued[row[1]])
		}
	}
	r.checkOneCouponEach(r.stockID(), openids)
	out, code = r.enqueuer("reconcile", "--campaign", "unk")
	if code != 0 || !strings.Contains(out, "0 unknown sends") {
		t.Fatalf("a second reconcile exit %d:\n%s", code, out)
	}
}

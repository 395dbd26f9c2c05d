package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/sandbox"
)

// freeAddr returns a loopback address nothing listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// receiver starts the receiver program on addr and waits until it listens.
func (r *rig) receiver(addr string) *proc {
	r.t.Helper()
	p := r.start(filepath.Join(binDir, "receiver"), "--addr", addr, "--http-addr=")
	r.t.Cleanup(func() {
		p.signal(syscall.SIGTERM)
		<-p.done
		if r.t.Failed() {
			r.t.Logf("receiver log (tail):\n%s", tail(p.out.String(), 30))
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return p
		}
		select {
		case <-p.done:
			r.t.Fatalf("the receiver exited: %v\n%s", p.err, p.out.String())
		default:
		}
		if time.Now().After(deadline) {
			r.t.Fatal("the receiver did not listen within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A campaign of 1,000 recipients of which 300 use their coupon: the
// sandbox posts 300 signed, encrypted COUPON.USE notifications, some twice
// and out of order, to the receiver program; status and the report show
// exactly those 300, with their times and amounts.
func TestRedemptionsOfACampaign(t *testing.T) {
	r := newRig(t)
	r.sb.SetNotifySchedule(sandbox.NotifySchedule{Interval: 200 * time.Millisecond})
	r.sb.SetFaults(sandbox.Faults{NotifyDuplicateRate: 0.2, NotifyJitterMS: 300})
	// A stock for 指定面额发券, so that each recipient's coupon has its own value.
	stock, err := r.sb.CreateStock(sandbox.StockSpec{Budget: 2000, MaxPerUser: 1, FixedValue: true})
	if err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	r.receiver(addr)
	url := "http://" + addr + "/wechatpay/coupon-use"
	if out, code := r.enqueuer("callbacks", "set", "--url", url); code != 0 || !strings.Contains(out, url) {
		t.Fatalf("callbacks set exited %d: %s", code, out)
	}
	if out, code := r.enqueuer("callbacks", "show"); code != 0 || !strings.Contains(out, url) {
		t.Fatalf("callbacks show exited %d: %s", code, out)
	}

	var csv strings.Builder
	csv.WriteString("openid,coupon_value,coupon_minimum\n")
	value := map[string]int64{}
	for i := range 1000 {
		id := fmt.Sprintf("oredeem_%04d", i)
		value[id] = int64(100 + i)
		fmt.Fprintf(&csv, "%s,%d,%d\n", id, value[id], value[id]+100)
	}
	path := filepath.Join(r.dir, "redeem.csv")
	if err := os.WriteFile(path, []byte(csv.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, code := r.enqueuer("campaign", "--file", path, "--stock-id", stock.ID, "--campaign", "redeem"); code != 0 {
		t.Fatalf("campaign exited %d: %s", code, out)
	}
	r.worker("a", fastWaits...)
	r.waitFor("redeem", 60*time.Second, "every send done", func(st idempotency.Status) bool {
		return st.Done() && st.ByState[idempotency.Succeeded] == 1000
	})

	// Every third of the first 900 recipients uses the coupon, at a time of
	// its own.
	type use struct {
		at     time.Time
		amount int64
		txn    string
	}
	want := map[string]use{} // by coupon id
	base := time.Now().Add(2 * time.Hour).Truncate(time.Second)
	for i, c := range r.sb.Ledger().Coupons {
		if c.StockID != stock.ID || i%3 != 0 || len(want) == 300 {
			continue
		}
		u := use{at: base.Add(time.Duration(i) * time.Minute), amount: value[c.OpenID], txn: "4200" + strconv.Itoa(1000000+i)}
		if _, err := r.sb.Use(c.CouponID, sandbox.Use{ConsumeTime: u.at, TransactionID: u.txn}); err != nil {
			t.Fatal(err)
		}
		want[c.CouponID] = u
	}
	if len(want) != 300 {
		t.Fatalf("%d coupons used, want 300", len(want))
	}
	st := r.waitFor("redeem", 20*time.Second, "300 redemptions recorded", func(st idempotency.Status) bool { return st.Redeemed >= 300 })
	// Let duplicates and stragglers land, then check nothing counted twice.
	deadline := time.Now().Add(10 * time.Second)
	for {
		all := true
		for _, n := range r.sb.Notifications() {
			all = all && n.Acked
		}
		if all || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	dups := 0
	for _, n := range r.sb.Notifications() {
		dups += n.Duplicates
	}
	if dups == 0 {
		t.Error("no duplicate notification was delivered; the fault was not exercised")
	}
	st, _ = r.store.Status(context.Background(), "redeem")
	var wantAmount int64
	for _, u := range want {
		wantAmount += u.amount
	}
	if st.Redeemed != 300 || st.RedeemedAmount != wantAmount || st.RedemptionRate() != 0.3 {
		t.Fatalf("status: redeemed %d (want 300), amount %d (want %d), rate %v", st.Redeemed, st.RedeemedAmount, wantAmount, st.RedemptionRate())
	}

	rows := r.report("redeem")
	header := rows[0]
	if len(header) != 13 || header[3] != "coupon_id" || header[9] != "redeemed_at" || header[10] != "redeemed_amount" {
		t.Fatalf("report header %q", header)
	}
	redeemed := 0
	for _, row := range rows[1:] {
		u, used := want[row[3]]
		if !used {
			if row[9] != "" || row[10] != "" {
				t.Fatalf("an unused coupon has a redemption: %q", row)
			}
			continue
		}
		redeemed++
		at, err := time.Parse(time.RFC3339Nano, row[9])
		if err != nil || !at.Equal(u.at) || row[10] != strconv.FormatInt(u.amount, 10) || row[12] != u.txn {
			t.Fatalf("row %q: want used at %s, amount %d, transaction %s", row, u.at.UTC().Format(time.RFC3339), u.amount, u.txn)
		}
	}
	if redeemed != 300 {
		t.Fatalf("the report shows %d redemptions, want 300", redeemed)
	}

	out, code := r.enqueuer("status", "--campaign", "redeem", "--json")
	var js map[string]any
	if code != 0 || json.Unmarshal([]byte(out), &js) != nil || js["redeemed"] != float64(300) || js["redemption_rate"] != 0.3 {
		t.Fatalf("status --json exited %d: %s", code, out)
	}
	out, code = r.enqueuer("status", "--campaign", "redeem")
	if code != 0 || !strings.Contains(out, "redeemed 300 of 1000 coupons issued (30.0%)") {
		t.Fatalf("status exited %d: %s", code, out)
	}
	// Nothing missed: a sync finds nothing more.
	out, code = r.enqueuer("redemptions", "sync", "--campaign", "redeem")
	if code != 0 || !strings.Contains(out, "700 issued coupons not known as used were listed") || !strings.Contains(out, "0 were used and no notification had recorded them") {
		t.Fatalf("redemptions sync exited %d: %s", code, out)
	}
}

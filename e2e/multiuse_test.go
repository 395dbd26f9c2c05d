package e2e

import (
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/idempotency"
)

// Consumer funds end to end: the name and ID card number go in on
// standard input and never reach Redis, a log or the wire in plaintext.
func TestMultiuseSendKeepsPersonalDataEncrypted(t *testing.T) {
	r := newRig(t)
	const name, idCard = "王小明", "44030419900101123X"
	w := r.worker("a")
	cmd := exec.Command(filepath.Join(binDir, "enqueuer"), "send", "--kind", "multiuse", "--openid", "o_funds_1",
		"--stock-id", r.sb.Env()["SANDBOX_MULTIUSE_STOCK_ID"], "--amount", "5000", "--campaign", "funds")
	cmd.Env = r.env
	cmd.Stdin = strings.NewReader(name + "\n" + idCard + "\n")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "enqueued send:") {
		t.Fatalf("enqueuer: %v\n%s", err, out)
	}
	r.waitFor("funds", 30*time.Second, "the send done", done)
	st, _ := r.store.Status(context.Background(), "funds")
	if st.ByState[idempotency.Succeeded] != 1 {
		t.Fatalf("status %+v", st)
	}
	// The same send again (a fresh encryption, the same derived
	// out_request_no): a duplicate, nothing queued.
	again := exec.Command(cmd.Path, cmd.Args[1:]...)
	again.Env = r.env
	again.Stdin = strings.NewReader(name + "\n" + idCard + "\n")
	if out, err := again.CombinedOutput(); err != nil || !strings.Contains(string(out), "duplicate: ") || !strings.Contains(string(out), "succeeded") {
		t.Fatalf("second send: %v\n%s", err, out)
	}
	led := r.sb.Ledger()
	if len(led.Coupons) != 1 || led.Coupons[0].OpenID != "o_funds_1" {
		t.Fatalf("ledger %+v", led.Coupons)
	}

	// Every key and value in Redis.
	ctx := context.Background()
	keys, err := r.rdb.Keys(ctx, "*").Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		var values []string
		switch r.rdb.Type(ctx, k).Val() {
		case "string":
			values = []string{r.rdb.Get(ctx, k).Val()}
		case "hash":
			for f, v := range r.rdb.HGetAll(ctx, k).Val() {
				values = append(values, f, v)
			}
		case "list":
			values = r.rdb.LRange(ctx, k, 0, -1).Val()
		case "set":
			values = r.rdb.SMembers(ctx, k).Val()
		case "zset":
			values = r.rdb.ZRange(ctx, k, 0, -1).Val()
		}
		for _, v := range append(values, k) {
			if strings.Contains(v, name) || strings.Contains(v, idCard) || strings.Contains(v, idCard[:14]) {
				t.Fatalf("plaintext personal data in Redis key %s", k)
			}
		}
	}
	if strings.Contains(string(out), idCard) || strings.Contains(w.out.String(), idCard) || strings.Contains(w.out.String(), name) {
		t.Fatal("plaintext personal data in a log")
	}
}

package e2e

import (
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/idempotency"
)

// A worker started while Redis is down waits for it: alive (/healthz 200),
// not ready (/readyz 503), a log line saying so; once Redis starts it
// processes a send and is ready.
func TestWorkerWaitsForRedis(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	r.redis.Kill()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	w := r.worker("waiting", "--http-addr", addr)

	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		code, _ := get("/healthz")
		if code == http.StatusOK && strings.Contains(w.out.String(), "waiting for redis") {
			break
		}
		select {
		case <-w.done:
			t.Fatalf("the worker exited with Redis down: %v\n%s", w.err, w.out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no /healthz 200 and no waiting line in 15s; log:\n%s", w.out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if code, body := get("/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "waiting for redis") {
		t.Fatalf("/readyz while Redis is down: %d %q, want 503 waiting for redis", code, body)
	}
	time.Sleep(time.Second) // still waiting, not exited
	select {
	case <-w.done:
		t.Fatalf("the worker exited with Redis down: %v\n%s", w.err, w.out.String())
	default:
	}
	if n := strings.Count(w.out.String(), "waiting for redis"); n != 1 {
		t.Errorf("%d waiting lines in the first seconds, want 1 (then one every 10s):\n%s", n, w.out.String())
	}

	r.redis.Restart()
	if out, code := r.enqueuer("send", "--openid", "o_wait", "--stock-id", r.stockID(), "--campaign", "wait"); code != 0 {
		t.Fatalf("send exited %d:\n%s", code, out)
	}
	r.waitFor("wait", 30*time.Second, "the send processed", func(st idempotency.Status) bool {
		return st.ByState[idempotency.Succeeded] == 1
	})
	if code, body := get("/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz once Redis answers: %d %q", code, body)
	}
	if !strings.Contains(w.out.String(), "redis answers; starting") {
		t.Errorf("no line saying the worker starts:\n%s", w.out.String())
	}
}
